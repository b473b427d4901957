"""The config: one YAML file plus `--set key=value` overrides become one typed, validated, frozen object.

Every problem is reported before Ray starts, as one line naming the dotted key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.download import DEFAULT_MIRRORS
from stages.errors import BadInputError
from stages.hyperparameters import SIZE_FIELDS, Hyperparameters, Real, parameter_count, step_bytes
from stages.redact import redact_data
from stages.train_settings import CLIP, TrainSettings, clip, did_you_mean

# A config is a few kB that people write: these bounds are far above any real one, and far below what hurts.
MAX_CONFIG_BYTES = 1 << 20  # read at most this much of a file: a huge file (or /dev/zero) is a mistake
MAX_YAML_VALUES = 10_000  # keys and values of one YAML document, an alias counting all its anchor holds
MAX_YAML_DEPTH = 32  # nesting of one YAML document (the deepest setting is 4 levels down); bounds recursion
MAX_KEY_PARTS = 8  # of an override's dotted key
MAX_MESSAGE = 400  # characters of one error message, whatever went into it
MAX_PATH = 1024  # characters of a folder or URI: the run's own paths go below it, within PATH_MAX (4096)
MAX_URL = 2048  # characters of a mirror: the common limit of URLs
MAX_MIRRORS = 16  # each one is tried in turn for every file
MAX_RESOURCES = 16  # custom Ray resources of one stage task
MAX_PARAMETERS = 100_000_000  # of a trial's CNN: 30x the classic one; with Adam's state 1.2 GB, any node holds it
MAX_STEP_BYTES = 64 << 30  # activations of one training step: beyond any single GPU's or ordinary node's memory

_SECTION = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RAY_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9.\-]{1,253}:([0-9]{1,5})")
_HOST = re.compile(r"[A-Za-z0-9._:\-]{1,253}")  # a name, an IPv4 or an IPv6 address
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(text: str) -> str:
    """Refuses control characters: a newline or NUL in a path fails late, and breaks one-line messages."""
    found = _CONTROL.search(text)
    if found:
        raise ValueError(f"{clip(text)} contains the control character {found.group()!r}")
    return text


def _shorten(message: str) -> str:
    """A message from elsewhere with every long word (a quoted value, say) clipped."""
    return _cap(re.sub(rf"\S{{{CLIP + 1},}}", lambda word: word.group()[: CLIP - 1] + "…", message))


def _cap(message: str) -> str:
    """At most MAX_MESSAGE characters: a safety net under the clipping of each value."""
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def _check_mirror(mirror: str) -> str:
    from stages.download import check_mirror

    try:
        check_mirror(mirror)
    except BadInputError as error:
        raise ValueError(_shorten(str(error))) from None  # it quotes the whole mirror
    return mirror


_Line = Annotated[str, AfterValidator(_one_line)]
_Mirror = Annotated[str, Field(max_length=MAX_URL), AfterValidator(_one_line), AfterValidator(_check_mirror)]


STORAGE_SCHEMES = ("s3", "gs", "gcs")  # the object stores Tune and pyarrow write to


def _check_storage_uri(uri: str) -> None:
    """A run root given as a URI must name an object store's bucket: anything else fails late, or writes elsewhere."""
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        raise ValueError(f"{clip(uri)}: give a local run root as a path ({clip(rest)}), not a file:// URL")
    if scheme not in STORAGE_SCHEMES:
        raise ValueError(f"{clip(uri)}: {scheme[:20]!r} is not a storage this program writes to; give a folder, "
                         "or an s3 or gs bucket (s3://bucket/prefix)")
    bucket = rest.split("/", 1)[0].split("?", 1)[0]
    if not bucket:
        raise ValueError(f"{clip(uri)}: name a bucket, e.g. {scheme}://my-bucket/mnist-runs")


def check_ray_address(address: str) -> None:
    """Raises ValueError saying what is wrong with a Ray address (ray.address, or RAY_ADDRESS as Ray reads it)."""
    form = _RAY_ADDRESS.fullmatch(address)
    if not form:
        raise ValueError(f"{clip(address)} is not a Ray address: use auto, HOST:PORT or ray://HOST:PORT")
    if form.group(2) is not None and not 0 < int(form.group(2)) < 65536:
        raise ValueError(f"{clip(address)}: the port should be 1-65535")


class RunSection(BaseModel):
    model_config = _SECTION

    root: _Line = Field(
        "runs",
        min_length=1,
        max_length=MAX_PATH,
        description="folder or URI (s3://bucket/prefix, gs://...) holding each run's <root>/<id>/",
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
        if isinstance(value, str) and "://" in value:
            _check_storage_uri(value)
        return value

    @field_validator("id", mode="before")
    @classmethod
    def _id_is_a_folder_name(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `--run-id 7` or `id: 7` means the folder "7"
        if isinstance(value, str) and not _RUN_ID.fullmatch(value):
            raise ValueError(
                f"{clip(value)} is not a valid run id: use letters, digits, '.', '_' and '-', "
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
    # one machine: Tune starts as many trials at once as these allow, so an absurd count fails late and badly
    num_cpus: int | None = Field(None, ge=1, le=4096, description="CPUs of the local Ray; null: all of this machine's")
    num_gpus: int | None = Field(None, ge=0, le=256, description="GPUs of the local Ray; null: all that Ray detects")
    include_dashboard: bool = Field(True, description="start Ray's dashboard with the local Ray")

    @field_validator("address")
    @classmethod
    def _address_form(cls, address: str | None) -> str | None:
        if address is not None:
            check_ray_address(address)
        return address

    dashboard_host: str = Field("127.0.0.1", description="interface the dashboard binds to; keep it local")

    @field_validator("dashboard_host")
    @classmethod
    def _host_form(cls, host: str) -> str:
        if not _HOST.fullmatch(host):
            raise ValueError(f"{clip(host)} is not a host name or IP address")
        return host

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
                raise ValueError(f"{clip(stage)} is not a stage with a task of its own: use {', '.join(STAGE_TASKS)}")
            if len(resources) > MAX_RESOURCES:
                raise ValueError(f"{stage}: at most {MAX_RESOURCES} resources, got {len(resources)}")
            for name, amount in resources.items():
                _check_resource_name(stage, name)
                if name in ("CPU", "GPU", "memory", "object_store_memory"):
                    raise ValueError(f"{stage}.{name}: Ray's built-in resources are set by the pipeline, not here")
                if not 0 < amount <= 1e6:
                    raise ValueError(f"{stage}.{name}={amount:g}: give an amount above 0, at most 1e6")
        return wanted


def _check_resource_name(stage: str, name: str) -> None:
    # a Ray resource name is free-form, but one that no node can declare is a typo
    if not 0 < len(name) <= 128 or not name.isprintable() or " " in name:
        raise ValueError(f"{stage}: {clip(name)} is not a resource name (1-128 characters, no spaces)")


class DataSection(BaseModel):
    model_config = _SECTION

    mirrors: list[_Mirror] = Field(
        default_factory=lambda: list(DEFAULT_MIRRORS),
        min_length=1,
        max_length=MAX_MIRRORS,
        description="tried in order for each file: local folder, file:// or http(s):// URL of the four .gz files",
    )
    cache_dir: _Line = Field(
        "~/.cache/mnist-pipeline", max_length=MAX_PATH, description="verified downloads, shared between runs"
    )
    retries: int = Field(3, ge=0, le=20, description="further attempts per mirror after a transient failure")
    timeout_s: float = Field(30.0, ge=0.1, le=3600, description="seconds a stalled download may wait")
    deadline_s: float = Field(
        600.0, gt=0, le=86400,
        description="seconds one attempt at one file may take in all (a mirror that drip-feeds bytes never stalls)",
    )
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
        try:
            path = Path(cache_dir).expanduser()
            usable = bool(cache_dir.strip()) and (not path.exists() or path.is_dir())
        except (OSError, RuntimeError):  # a name too long, ~nosuchuser: refused here rather than at download
            usable = False
        if not usable:
            raise ValueError(f"{clip(cache_dir)} is not a folder")
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

    min_test_accuracy: Real | None = Field(
        None, ge=0, le=1, description="fail the run when the test accuracy is below this; null: no gate"
    )
    # the test set has 10,000 images: a larger batch is the same single step, or an allocation that fails after
    # the whole training
    batch_size: int = Field(1000, ge=1, le=10000, description="images per prediction step on the test set")


class Config(BaseModel):
    """The whole config; each stage receives only its own section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: RunSection = Field(default_factory=RunSection)
    ray: RaySection = Field(default_factory=RaySection)
    data: DataSection = Field(default_factory=DataSection)
    model: Hyperparameters = Field(default_factory=Hyperparameters)
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)

    @model_validator(mode="after")
    def _model_fits(self) -> "Config":
        """Refuses, now rather than when a trial starts, a model (the base one, or the largest the search space
        can pick) whose weights or training step could not fit any machine: the per-field bounds alone allow
        a 822-million-weight CNN."""
        largest = _largest_model(self.model, self.train.search_space)
        shape = (f"{largest.conv1_filters}/{largest.conv2_filters} filters of {largest.kernel_size}x"
                 f"{largest.kernel_size}, {largest.dense_units} dense units, batch {largest.batch_size}")
        if parameter_count(largest) > MAX_PARAMETERS:
            raise ValueError(
                f"model: the largest model this config trains ({shape}) has {parameter_count(largest) / 1e6:,.0f} M "
                f"weights, more than {MAX_PARAMETERS // 10**6} M (the classic CNN has 3.3 M): lower model.dense_units "
                "or the filters, or their train.search_space entries"
            )
        if step_bytes(largest) > MAX_STEP_BYTES:
            raise ValueError(
                f"model: a training step of the largest model this config trains ({shape}) needs about "
                f"{step_bytes(largest) / 2**30:,.0f} GiB, more than {MAX_STEP_BYTES >> 30} GiB: lower "
                "model.batch_size or the filters, or their train.search_space entries"
            )
        return self

    def to_yaml(self) -> str:
        """The config as YAML, credentials in URIs replaced by *** (it is printed and saved with the run)."""
        return yaml.safe_dump(redact_data(to_plain(self)), sort_keys=False)


def _largest_model(base: Hyperparameters, search_space: dict) -> Hyperparameters:
    """`base` with each size field at the largest value the base trial or the search space can give it."""
    largest = {}
    for name in SIZE_FIELDS:
        values = [getattr(base, name)]
        if name in search_space:
            values += [v for v in search_space[name].extremes() if isinstance(v, (int, float))]
        largest[name] = int(max(values))
    return base.model_copy(update=largest)


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
            text = _read_bounded(Path(path))
        except FileNotFoundError:
            raise BadInputError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise BadInputError(f"cannot read config file {path}: {error}") from None
    return _merge(text, str(path) if path is not None else None, overrides)


def load_run_config(config_file: str, overrides: list[str] = ()) -> Config:
    """`load_config` for the config.yaml a run saved (a local path or a URI), as `run --resume` reads it."""
    from stages import storage

    try:
        # the run's own file; read_bytes of a URI cannot stop early, _parse_yaml refuses what is too big
        text = storage.read_bytes(config_file).decode() if storage.is_uri(config_file) else _read_bounded(
            Path(config_file)
        )
    except FileNotFoundError:
        raise BadInputError(f"no run to resume: {config_file} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"cannot read {config_file}: {error}") from None
    return _merge(text, config_file, overrides)


def _read_bounded(path: Path) -> str:
    """The file's text; refused when larger than MAX_CONFIG_BYTES, reading no more than that."""
    with path.open("rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise BadInputError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    return data.decode()


def _merge(text: str | None, where: str | None, overrides: list[str]) -> Config:
    raw = to_plain(Config())
    budget = _Budget()  # one for the file and every override: many small ones add up too
    if text is not None:
        from_file = _parse_yaml(text, where, budget)
        if from_file is not None and not isinstance(from_file, dict):
            raise BadInputError(f"{where}: the config must be a mapping of sections, got {type(from_file).__name__}")
        for section, values in (from_file or {}).items():
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section].update(values)
            else:
                raw[section] = values
    override_keys = [_apply_override(raw, override, budget) for override in overrides]
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        key, message = describe_validation_error(error, Config)
        # name the file only when the bad value came from it; an override's key speaks for itself
        from_override = any(_related(override_key, key) for override_key in override_keys)
        source = f"{where}: " if where is not None and not from_override else ""
        raise BadInputError(f"{source}{_cap(f'{key}: {message}')}") from None


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
            message += f" (got {clip(first['input'])})"
        # validators that check a whole section say which key they mean: "validation_size: ..."
        named = re.match(r"([A-Za-z_]\w*): ", message)
        if named:
            key, message = f"{key}.{named.group(1)}" if key else named.group(1), message[named.end():]
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


def _apply_override(raw: dict, override: str, budget: _Budget) -> str:
    """Sets the value of one `dotted.key=yaml` override in `raw`; returns the dotted key."""
    key, equals, text = override.partition("=")
    if not equals or not key.strip():
        raise BadInputError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got {clip(override)}")
    shown = _key_text(key)
    parts = key.strip().split(".")
    if len(parts) > MAX_KEY_PARTS:
        raise BadInputError(f"--set {shown}: no setting is {len(parts)} levels deep")
    value = _parse_yaml(text, f"--set {shown}", budget) if text.strip() else None
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise BadInputError(f"--set {shown}: {_key_text('.'.join(parts[: depth + 1]))} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return key.strip()


@dataclass
class _Budget:
    """Keys and values the YAML of one config may still expand to, an alias counting all its anchor holds."""

    values: int = MAX_YAML_VALUES


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that no config needs: too big, too deep, a duplicate or merge key, an impossible value."""


class _Loader(yaml.SafeLoader):
    """A SafeLoader that bounds what a document expands to, and refuses duplicate keys and merge keys.

    PyYAML shares an aliased node, so loading is cheap, but walking the result (validating, printing a bad value)
    visits every alias again: 447 bytes of nested aliases make billions of values. Counting each alias as all its
    anchor holds while composing stops such a document at its first alias too many. YAML 1.1 reads `1e-3` as a
    string; like YAML 1.2 (and every user's expectation), this loader reads it as a float.
    """

    def __init__(self, stream: str, budget: _Budget) -> None:
        super().__init__(stream)
        self._budget = budget
        self._depth = 0
        self._values = 0  # keys and values composed, an alias counting all its anchor holds
        self._sizes: dict[int, int] = {}  # id of an anchored node (kept alive in self.anchors) -> values it holds

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._count_alias(event)
            return super().compose_node(parent, index)
        if self._depth >= MAX_YAML_DEPTH:  # refused before the composer's recursion overflows the stack
            raise _Refused(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
        before = self._values
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(1, event.start_mark)
        if event.anchor is not None:
            self._sizes[id(node)] = self._values - before
        return node

    def _count_alias(self, event: yaml.AliasEvent) -> None:
        node = self.anchors.get(event.anchor)
        if node is None:
            return  # an undefined alias: the composer says so
        size = self._sizes.get(id(node))
        if size is None:  # its anchor is still being composed: a cycle, infinite once walked
            raise _Refused(None, None, f"alias *{event.anchor[:CLIP]} is inside its own anchor", event.start_mark)
        self._count(size, event.start_mark)

    def _count(self, values: int, mark: yaml.Mark) -> None:
        self._values += values
        self._budget.values -= values
        if self._budget.values < 0:
            raise _Refused(
                None, None, f"more than {MAX_YAML_VALUES:,} keys and values in all (each alias counts all its "
                "anchor holds): not a config", mark,
            )

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # a merge repeats its mappings' keys: refused rather than bounded, as writing the keys out is clearer
                raise _Refused(None, None, "merge keys (<<) are not supported: write the keys out", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first_seen:
                    first = _place(first_seen[key], key_node.start_mark)
                    raise _Refused(None, None, f"duplicate key {clip(key)} (first at {first})", key_node.start_mark)
                first_seen[key] = key_node.start_mark
            except TypeError:
                pass  # an unhashable key: the base class refuses it
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            value = super().construct_yaml_int(node)
        except ValueError:  # more than 4300 decimal digits
            value = None
        if value is None or value.bit_length() > 64:  # no setting is that large; its repr could not even be printed
            raise _Refused(None, None, f"integer {node.value[:20]}… is too large", node.start_mark)
        return value

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as error:  # 2024-13-45 looks like a date to YAML
            raise _Refused(
                None, None, f"{clip(node.value)} is not a date ({error}; quote it for a text)", node.start_mark
            ) from None


def _place(first: yaml.Mark, then: yaml.Mark) -> str:
    """Where `first` is, as seen from `then`: its line, or its column when both share a line (a --set value)."""
    return f"line {first.line + 1}" if first.line != then.line else f"column {first.column + 1} of the same line"


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|" r"^[-+]?(?:\d[\d_]*)\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)
# the base class registered its own functions: register the overrides
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_timestamp)


def _parse_yaml(text: str, where: str, budget: _Budget) -> Any:
    if len(text) > MAX_CONFIG_BYTES:  # a run's config.yaml from a URI, a value given to --set
        raise BadInputError(f"{where}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config")
    loader = _Loader(text, budget)  # what yaml.load does, with the budget
    try:
        return loader.get_single_data()
    except _Refused as error:
        raise BadInputError(f"{where}: line {error.problem_mark.line + 1}: {error.problem}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise BadInputError(f"{where}: invalid YAML{position}: {_shorten(problem)}") from None
    finally:
        loader.dispose()


def _dotted(location: tuple) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{_key_text(part)}" if text else _key_text(part))
    return text


def _key_text(key: Any) -> str:
    """A key as a message shows it: as it is when short and printable, else clipped (a key can be 1 MB too)."""
    return key if isinstance(key, str) and len(key) <= CLIP and key.isprintable() else clip(key)


def _model_at(schema: type[BaseModel], location: tuple) -> type[BaseModel] | None:
    for part in location:
        field = schema.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        schema = field.annotation
    return schema
