"""The config's schema: its sections, their keys, defaults and bounds, as one typed, validated, frozen object.

Each stage receives only its own section. Every value is checked here, before Ray starts; reading a file and
`--set` overrides into a Config is pipeline.config_loading's job, and reading their YAML is pipeline.bounded_yaml's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.messages import shorten
from stages.common.errors import BadInputError
from stages.common.redact import redact_data
from stages.download import DEFAULT_MIRRORS
from stages.training.hyperparameters import SIZE_FIELDS, Hyperparameters, Real, parameter_count, step_bytes
from stages.training.train_settings import TrainSettings, base_trial_problem, clip

# A config is a few kB that people write: these bounds are far above any real one, and far below what hurts.
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


def _check_mirror(mirror: str) -> str:
    from stages.download import check_mirror

    try:
        check_mirror(mirror)
    except BadInputError as error:
        raise ValueError(shorten(str(error))) from None  # it quotes the whole mirror
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
    # members are the trials with the best validation accuracy (never chosen on test); 20 classic CNNs are 270 MB
    ensemble_top_k: int | None = Field(
        5, ge=2, le=20,
        description="also measure, and export as model/ensemble.keras, the average of the best trials' models: as "
        "many of the k best (at least 2) as do best on the validation split; null: none",
    )


class TrackingSection(BaseModel):
    model_config = _SECTION

    mlflow_uri: Annotated[str, Field(min_length=1, max_length=MAX_URL), AfterValidator(_one_line)] | None = Field(
        None,
        description="MLflow tracking server (http(s)://host:port, databricks, ...): a parent run per pipeline run, a "
        "child run per trial; null: $MLFLOW_TRACKING_URI if set, else no tracking",
    )
    experiment: Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_one_line)] = Field(
        "mnist-pipeline", description="MLflow experiment the runs go to (created if missing)"
    )
    required: bool = Field(
        True, description="a server that cannot be reached at the start refuses the run (exit 2); false: a warning"
    )
    register_model: Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_one_line)] | None = Field(
        None, description="also register the exported model as a new version of this registered model; null: no"
    )


class Config(BaseModel):
    """The whole config; each stage receives only its own section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: RunSection = Field(default_factory=RunSection)
    ray: RaySection = Field(default_factory=RaySection)
    data: DataSection = Field(default_factory=DataSection)
    model: Hyperparameters = Field(default_factory=Hyperparameters)
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

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

    @model_validator(mode="after")
    def _base_trial_fits(self) -> "Config":
        """Refuses a base trial the searcher cannot start from, before a run folder or Ray exists."""
        problem = base_trial_problem(self.train, self.model)
        if problem is not None:
            raise ValueError(f"train.{problem}")
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


def to_plain(config: BaseModel) -> dict:
    """The config as plain YAML-able data, in the same shape as the file it came from."""
    plain = config.model_dump(mode="json")
    space = plain.get("train", {}).get("search_space")
    if space is not None:
        plain["train"]["search_space"] = {name: {spec["kind"]: spec["args"]} for name, spec in space.items()}
    return plain


def dotted(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections flattened to dotted keys: {"train": {"epochs": 2}} -> {"train.epochs": 2}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
