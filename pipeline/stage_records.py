"""What each finished stage of a run did, so that `run --resume` can skip it.

After a stage finishes, the runner records in <run>/stages.json the stage's fingerprint (a hash of the config slice
it reads, the fingerprint of the stage before it, and the source code of the modules that implement it), how long
it took, and what it produced. A resumed run skips a stage when the recorded fingerprint equals the one its config
and code give now and its outputs are still there.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import Config, dotted, to_plain
from pipeline.run_files import (
    MAPPING,
    NUMBER,
    OPTIONAL_TEXT,
    TEXT,
    Check,
    DamagedFile,
    read_json_object,
    shape_problem,
)
from pipeline.run_folder import RunFolder
from stages.common import storage
from stages.common.code_hash import code_hash

# The modules whose code decides each stage's output: editing one invalidates that stage (and those after it).
_STAGE_CODE = {  # a package stands for every module in it (stages.common.code_hash)
    "download": ("stages.download", "stages.dataset", "stages.common.atomic"),
    "preprocess": ("stages.preprocess", "stages.dataset"),
    "train": ("stages.train", "stages.training"),
    "evaluate": ("stages.evaluate", "stages.evaluation", "stages.training"),
}


@dataclass(frozen=True)
class StageInputs:
    """What a stage's output depends on, and the fingerprint that sums it up with the stages before it."""

    settings: dict[str, Any]  # dotted config key -> value
    code: str  # sha256 of the stage's modules
    fingerprint: str


@dataclass(frozen=True)
class StageRecord:
    fingerprint: str
    settings: dict[str, Any]
    code: str
    finished: str | None  # local time, ISO 8601; None while the stage runs
    seconds: float | None = None
    outputs: dict[str, Any] = field(default_factory=dict)


def stage_inputs(config: Config) -> dict[str, StageInputs]:
    """Each stage's inputs. Fingerprints are chained: a change to one stage's inputs changes every later one's too.

    Resources, addresses, mirrors and the quality gate are not inputs: they change where or whether a stage runs,
    not what it produces (downloads are verified against MNIST's checksums whichever mirror served them).
    """
    plain = dotted(to_plain(config))
    keys = {
        "download": ["data.cache_dir"],
        "preprocess": ["run.seed", "data.validation_size", "data.max_train_images", "data.max_test_images"],
        "train": ["run.seed", "model.", "train."],
        "evaluate": ["evaluate.batch_size", "evaluate.ensemble_top_k"],
    }
    result, upstream = {}, ""
    for stage, prefixes in keys.items():
        settings = {key: value for key, value in plain.items() if any(_under(key, p) for p in prefixes)}
        code = code_hash(*_STAGE_CODE[stage])
        identity = {"stage": stage, "settings": settings, "code": code, "upstream": upstream}
        upstream = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        result[stage] = StageInputs(settings, code, upstream)
    return result


def _under(key: str, prefix: str) -> bool:
    return key.startswith(prefix) if prefix.endswith(".") else key == prefix




_RECORD_FIELDS: dict[str, Check] = {
    "fingerprint": TEXT,
    "settings": MAPPING,
    "code": TEXT,
    "finished": OPTIONAL_TEXT,
    "seconds": (lambda v: v is None or NUMBER[0](v), "a number or null"),
    "outputs": MAPPING,
}


def _record(location: str, stage: str, record: object) -> StageRecord:
    """One stage's record, checked field by field: a record read back is trusted to be what _write wrote."""
    if stage not in _STAGE_CODE:
        raise DamagedFile(location, f"unknown stage {stage!r}")
    problem = shape_problem(record, _RECORD_FIELDS, exact=True) if isinstance(record, dict) else "not an object"
    if problem:
        raise DamagedFile(location, f"record {stage!r}: {problem}")
    return StageRecord(**record)


class StageRecords:
    """The records of one run folder, read once and rewritten (atomically) after every stage."""

    def __init__(self, run_location: str, records: dict[str, StageRecord] | None = None):
        self._file = RunFolder(run_location).stages_file
        self._records = dict(records or {})

    @classmethod
    def load(cls, run_location: str) -> StageRecords:
        """The run's records; none when the run stopped before its first stage finished.

        Raises:
          DamagedFile: stages.json exists but is not what this program writes (unreadable, not JSON, a record of
            another shape): a DataError naming the file and what is wrong.
        """
        location = RunFolder(run_location).stages_file
        raw = read_json_object(location)
        if raw is None:
            return cls(run_location)
        return cls(run_location, {stage: _record(location, stage, record) for stage, record in raw.items()})

    def finished(self, stage: str, inputs: StageInputs) -> StageRecord | None:
        """The stage's record if it finished with exactly these inputs."""
        record = self._records.get(stage)
        ok = record is not None and record.finished is not None and record.fingerprint == inputs.fingerprint
        return record if ok else None

    def started(self, stage: str) -> StageRecord | None:
        """The stage's record, finished or not."""
        return self._records.get(stage)

    def begin(self, stage: str, inputs: StageInputs) -> None:
        self._write(stage, StageRecord(inputs.fingerprint, inputs.settings, inputs.code, finished=None))

    def finish(self, stage: str, inputs: StageInputs, seconds: float, outputs: dict[str, Any]) -> None:
        finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record = StageRecord(inputs.fingerprint, inputs.settings, inputs.code, finished, round(seconds, 2), outputs)
        self._write(stage, record)

    def _write(self, stage: str, record: StageRecord) -> None:
        self._records[stage] = record
        storage.write_json(self._file, {name: asdict(record) for name, record in self._records.items()})


def describe_changes(records: StageRecords, current: dict[str, StageInputs], upto: str) -> list[str]:
    """The settings that differ between the recorded inputs of the stages up to `upto` and the current ones, for
    people: "train.epochs: 6 -> 4"."""
    changes = []
    for stage, inputs in current.items():
        record = records.started(stage)
        if record is not None:
            for key in sorted(set(record.settings) | set(inputs.settings)):
                old, new = record.settings.get(key), inputs.settings.get(key)
                if old != new:
                    changes.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)}")
        if stage == upto:
            break
    return list(dict.fromkeys(changes))  # run.seed feeds two stages: name it once


def changed_code(records: StageRecords, current: dict[str, StageInputs]) -> list[str]:
    """The stages whose code differs from the code they ran with."""
    return [
        stage for stage, inputs in current.items()
        if (record := records.started(stage)) is not None and record.code != inputs.code
    ]
