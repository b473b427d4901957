"""The config: one YAML file plus `--set key=value` overrides become one typed, validated, frozen object.

Every problem is reported before Ray starts, as one line naming the dotted key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.download import DEFAULT_MIRRORS
from stages.errors import BadInputError
from stages.hyperparameters import Hyperparameters
from stages.redact import redact_data
from stages.train_settings import TrainSettings, did_you_mean

_SECTION = ConfigDict(extra="forbid", frozen=True, strict=True)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RAY_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9.\-]+:[0-9]{1,5}")


def _check_mirror(mirror: str) -> str:
    from stages.download import check_mirror

    try:
        check_mirror(mirror)
    except BadInputError as error:
        raise ValueError(str(error)) from None
    return mirror


class RunSection(BaseModel):
    model_config = _SECTION

    root: str = Field(
        "runs", min_length=1, description="folder or URI (s3://bucket/prefix, gs://...) holding each run's <root>/<id>/"
    )
    id: str | None = Field(None, description="run id; null: a new timestamped id")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the split, the search and every trial")
    shared_filesystem: bool = Field(
        False, description="root is the same folder on every node of the cluster (an NFS mount, say)"
    )

    @field_validator("root", mode="before")
    @classmethod
    def _root_given(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("needs a folder (YAML reads a bare ~ as null: write '~/runs')")
        return value

    @field_validator("id", mode="before")
    @classmethod
    def _id_is_a_folder_name(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `--run-id 7` or `id: 7` means the folder "7"
        if isinstance(value, str) and not _RUN_ID.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid run id: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit, at most 128 characters"
            )
        return value


STAGE_TASKS = ("download", "preprocess", "evaluate")  # the stages that run as tasks of their own (train drives Tune)


class RaySection(BaseModel):
    model_config = _SECTION

    address: str | None = Field(
        None,
        description="'auto', HOST:PORT or ray://HOST:PORT: join a cluster; null: $RAY_ADDRESS if set, else a local Ray",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray; null: all of this machine's")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the local Ray; null: all that Ray detects")
    include_dashboard: bool = Field(True, description="start Ray's dashboard with the local Ray")

    @field_validator("address")
    @classmethod
    def _address_form(cls, address: str | None) -> str | None:
        if address is not None and not _RAY_ADDRESS.fullmatch(address):
            raise ValueError(f"{address!r} is not a Ray address: use auto, HOST:PORT or ray://HOST:PORT")
        return address
    dashboard_host: str = Field("127.0.0.1", description="interface the dashboard binds to; keep it local")
    dashboard_port: int = Field(8265, ge=1, le=65535, description="dashboard port (the next free one if taken)")
    stage_resources: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="custom Ray resources a stage task needs besides its CPU, e.g. {download: {internet: 1}}",
    )

    @field_validator("stage_resources")
    @classmethod
    def _stage_resources(cls, wanted: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for stage, resources in wanted.items():
            if stage not in STAGE_TASKS:
                raise ValueError(f"{stage!r} is not a stage with a task of its own: use {', '.join(STAGE_TASKS)}")
            for name, amount in resources.items():
                if name in ("CPU", "GPU", "memory", "object_store_memory"):
                    raise ValueError(f"{stage}.{name}: Ray's built-in resources are set by the pipeline, not here")
                if not 0 < amount <= 1e6:
                    raise ValueError(f"{stage}.{name}={amount:g}: give an amount above 0")
        return wanted


class DataSection(BaseModel):
    model_config = _SECTION

    mirrors: list[Annotated[str, AfterValidator(_check_mirror)]] = Field(
        default_factory=lambda: list(DEFAULT_MIRRORS),
        min_length=1,
        description="tried in order for each file: local folder, file:// or http(s):// URL of the four .gz files",
    )
    cache_dir: str = Field("~/.cache/mnist-pipeline", description="verified downloads, shared between runs")
    retries: int = Field(3, ge=0, le=20, description="further attempts per mirror after a transient failure")
    timeout_s: float = Field(30.0, gt=0, le=3600, description="seconds a stalled download may wait")
    validation_size: int = Field(5000, ge=1, description="training images held out to rank trials (stratified)")
    max_train_images: int | None = Field(
        None, ge=2, le=60000, description="use only the first N training images; null: all 60,000"
    )
    max_test_images: int | None = Field(
        None, ge=1, le=10000, description="use only the first N test images; null: all 10,000"
    )

    @field_validator("cache_dir")
    @classmethod
    def _cache_is_a_folder(cls, cache_dir: str) -> str:
        path = Path(cache_dir).expanduser()
        if not cache_dir.strip() or (path.exists() and not path.is_dir()):
            raise ValueError(f"{cache_dir!r} is not a folder")
        return cache_dir

    @model_validator(mode="after")
    def _validation_fits(self) -> "DataSection":
        available = self.max_train_images or 60000
        if self.validation_size >= available:
            raise ValueError(
                f"validation_size: {self.validation_size} leaves no training images "
                f"(only {available} are used; see data.max_train_images)"
            )
        return self


class EvaluateSection(BaseModel):
    model_config = _SECTION

    min_test_accuracy: float | None = Field(
        None, ge=0, le=1, description="fail the run when the test accuracy is below this; null: no gate"
    )
    batch_size: int = Field(1000, ge=1, description="images per prediction step on the test set")


class Config(BaseModel):
    """The whole config; each stage receives only its own section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: RunSection = Field(default_factory=RunSection)
    ray: RaySection = Field(default_factory=RaySection)
    data: DataSection = Field(default_factory=DataSection)
    model: Hyperparameters = Field(default_factory=Hyperparameters)
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)

    def to_yaml(self) -> str:
        """The config as YAML, credentials in URIs replaced by *** (it is printed and saved with the run)."""
        return yaml.safe_dump(redact_data(to_plain(self)), sort_keys=False)


def load_config(path: Path | None = None, overrides: list[str] = ()) -> Config:
    """Merges `path` onto the defaults, applies `key=value` overrides, and validates the result.

    A file's sections merge into the defaults key by key; every value, a list or the whole `train.search_space`
    included, replaces the default as a whole. An override replaces the one value its dotted key names, so
    `--set train.search_space.dropout=...` changes one entry (null removes it).

    Raises:
      BadInputError: the file cannot be read or parsed, an override is malformed, or any value is invalid; the
        message names the file or the override it came from.
    """
    text = None
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise BadInputError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise BadInputError(f"cannot read config file {path}: {error}") from None
    return _merge(text, str(path) if path is not None else None, overrides)


def load_run_config(config_file: str, overrides: list[str] = ()) -> Config:
    """`load_config` for the config.yaml a run saved (a local path or a URI), as `run --resume` reads it."""
    from stages import storage

    try:
        text = storage.read_bytes(config_file).decode()
    except FileNotFoundError:
        raise BadInputError(f"no run to resume: {config_file} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"cannot read {config_file}: {error}") from None
    return _merge(text, config_file, overrides)


def _merge(text: str | None, where: str | None, overrides: list[str]) -> Config:
    raw = to_plain(Config())
    if text is not None:
        from_file = _parse_yaml(text, where)
        if from_file is not None and not isinstance(from_file, dict):
            raise BadInputError(f"{where}: the config must be a mapping of sections, got {type(from_file).__name__}")
        for section, values in (from_file or {}).items():
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section].update(values)
            else:
                raw[section] = values
    override_keys = [_apply_override(raw, override) for override in overrides]
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        key, message = describe_validation_error(error, Config)
        # name the file only when the bad value came from it; an override's key speaks for itself
        from_override = any(_related(override_key, key) for override_key in override_keys)
        source = f"{where}: " if where is not None and not from_override else ""
        raise BadInputError(f"{source}{key}: {message}") from None


def describe_validation_error(error: ValidationError, schema: type[BaseModel]) -> tuple[str, str]:
    """The dotted key of the first problem, and one line saying what is wrong (and how many more problems)."""
    problems = error.errors()
    first = problems[0]
    key = _dotted(first["loc"])
    if first["type"] == "extra_forbidden":
        parent = _model_at(schema, first["loc"][:-1])
        name = str(first["loc"][-1])
        message = f"unknown key{did_you_mean(name, parent.model_fields) if parent else ''}"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "model_type":  # "...instance of TrainSettings" means nothing to a user
            message = "should be a section: a mapping of keys to values"
        if first["type"] not in ("value_error", "assertion_error") and "input" in first:
            message += f" (got {first['input']!r})"
        # validators that check a whole section say which key they mean: "validation_size: ..."
        named = re.match(r"([A-Za-z_]\w*): ", message)
        if named:
            key, message = f"{key}.{named.group(1)}", message[named.end():]
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return key, message + more


def _related(override_key: str, error_key: str) -> bool:
    """Whether a problem at `error_key` can come from the override of `override_key`."""
    a, b = override_key.split("."), re.split(r"[.\[]", error_key)
    return a[: len(b)] == b[: len(a)]


def to_plain(config: BaseModel) -> dict:
    """The config as plain YAML-able data, in the same shape as the file it came from."""
    plain = config.model_dump(mode="json")
    space = plain.get("train", {}).get("search_space")
    if space is not None:
        plain["train"]["search_space"] = {name: {spec["kind"]: spec["args"]} for name, spec in space.items()}
    return plain


def _apply_override(raw: dict, override: str) -> str:
    """Sets the value of one `dotted.key=yaml` override in `raw`; returns the dotted key."""
    key, equals, text = override.partition("=")
    if not equals or not key.strip():
        raise BadInputError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got {override!r}")
    value = _parse_yaml(text, f"--set {key}") if text.strip() else None
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise BadInputError(f"--set {key}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return key.strip()


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; like YAML 1.2 (and every user's expectation), read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|" r"^[-+]?(?:\d[\d_]*)\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise BadInputError(f"{where}: invalid YAML{position}: {problem}") from None


def _dotted(location: tuple) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _model_at(schema: type[BaseModel], location: tuple) -> type[BaseModel] | None:
    for part in location:
        field = schema.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        schema = field.annotation
    return schema
