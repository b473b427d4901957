"""The config: one YAML file plus `--set key=value` overrides become one typed, validated, frozen object.

Every problem is reported before Ray starts, as one line naming the dotted key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.download import DEFAULT_MIRRORS
from stages.errors import BadInputError
from stages.hyperparameters import Hyperparameters
from stages.train_settings import TrainSettings, did_you_mean

_SECTION = ConfigDict(extra="forbid", frozen=True, strict=True)


class RunSection(BaseModel):
    model_config = _SECTION

    root: str = Field("runs", min_length=1, description="folder (or URI) under which each run gets <root>/<id>/")
    id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="run id; null: a new timestamped id"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the split, the search and every trial")


class RaySection(BaseModel):
    model_config = _SECTION

    address: str | None = Field(
        None, description="null: start a local Ray for this run; 'auto' or HOST:PORT: join a running cluster"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray; null: all of this machine's")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the local Ray; null: all that Ray detects")
    include_dashboard: bool = Field(True, description="start Ray's dashboard with the local Ray")
    dashboard_host: str = Field("127.0.0.1", description="interface the dashboard binds to; keep it local")
    dashboard_port: int = Field(8265, ge=1, le=65535, description="dashboard port (the next free one if taken)")


class DataSection(BaseModel):
    model_config = _SECTION

    mirrors: list[str] = Field(
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

    @field_validator("mirrors")
    @classmethod
    def _check_mirrors(cls, mirrors: list[str]) -> list[str]:
        from stages.download import check_mirror

        for index, mirror in enumerate(mirrors):
            try:
                check_mirror(mirror)
            except BadInputError as error:
                raise ValueError(f"[{index}] {error}") from None
        return mirrors

    @model_validator(mode="after")
    def _validation_fits(self) -> "DataSection":
        available = self.max_train_images or 60000
        if self.validation_size >= available:
            raise ValueError(
                f"validation_size={self.validation_size} leaves no training images "
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
        return yaml.safe_dump(to_plain(self), sort_keys=False)


def load_config(path: Path | None = None, overrides: list[str] = ()) -> Config:
    """Merges `path` onto the defaults, applies `key=value` overrides, and validates the result.

    Sections merge key by key, and so does `train.search_space` (an entry set to null is removed); any other
    value, a list included, replaces the default.

    Raises:
      BadInputError: the file cannot be read or parsed, an override is malformed, or any value is invalid.
    """
    raw = to_plain(Config())
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise BadInputError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise BadInputError(f"cannot read config file {path}: {error}") from None
        from_file = _parse_yaml(text, where)
        if from_file is not None and not isinstance(from_file, dict):
            raise BadInputError(f"{where}: the config must be a mapping of sections, got {type(from_file).__name__}")
        _merge(raw, from_file or {}, levels=_MERGED_LEVELS)
    for override in overrides:
        _apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise BadInputError(f"{where}: {describe_validation_error(error, Config)}") from None


# section → key → search-space entry: dictionaries merge down to the entries, which replace as a whole.
_MERGED_LEVELS = 3


def _merge(base: dict, update: dict, levels: int) -> None:
    for key, value in update.items():
        if levels > 1 and isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, levels - 1)
        else:
            base[key] = value


def describe_validation_error(error: ValidationError, schema: type[BaseModel]) -> str:
    """One line for the first problem (and how many more there are), naming the dotted key."""
    problems = error.errors()
    first = problems[0]
    key = _dotted(first["loc"])
    if first["type"] == "extra_forbidden":
        parent = _model_at(schema, first["loc"][:-1])
        name = str(first["loc"][-1])
        message = f"unknown key{did_you_mean(name, parent.model_fields) if parent else ''}"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] not in ("value_error", "assertion_error") and "input" in first:
            message += f" (got {first['input']!r})"
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return f"{key}: {message}{more}" if key else f"{message}{more}"


def to_plain(config: BaseModel) -> dict:
    """The config as plain YAML-able data, in the same shape as the file it came from."""
    plain = config.model_dump(mode="json")
    space = plain.get("train", {}).get("search_space")
    if space is not None:
        plain["train"]["search_space"] = {name: {spec["kind"]: spec["args"]} for name, spec in space.items()}
    return plain


def _apply_override(raw: dict, override: str) -> None:
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
