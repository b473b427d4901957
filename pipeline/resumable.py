"""What `run --resume` accepts, decided before anything in the folder is written.

A folder is resumed only when it is a run of this program (what makes a folder a run: see pipeline.run_folder), its
stages.json and config.yaml are intact (pipeline.run_files), and nobody else could have written its Tune state
(pipeline.run_trust). Anything else is refused in one line naming the folder or file, and what to do.
"""

from __future__ import annotations

from pipeline.run_files import DamagedFile, check_run_config, local_file_exists
from pipeline.run_folder import RUN_MARKER, RunFolder
from pipeline.run_trust import check_private
from pipeline.stage_records import StageRecords
from stages.common import storage
from stages.common.errors import BadInputError
from stages.common.redact import redact


def check_resumable(run: RunFolder) -> None:
    """Refuses, before anything is written, a folder `run --resume` must not touch: one that is not a run of this
    program, one whose records are damaged, one whose Tune state someone else could have written.

    Raises:
      BadInputError: one line naming the folder or file, and what to do.
    """
    where = redact(run.location)
    try:
        if storage.is_uri(run.location):
            has_config = storage.exists(run.config_file)
        else:
            has_config = local_file_exists(run.config_file)
    except DamagedFile as damage:
        if _has_marker(run):
            raise BadInputError(f"cannot resume: {damage}") from None
        raise BadInputError(f"{where} is not a run of mnist-pipeline (config.yaml there: {damage.what}); not "
                            "resuming it, nothing there was changed") from None
    if not has_config:
        raise BadInputError(f"no run to resume at {where} (no config.yaml there)")
    records_damage = _records_damage(run)
    if not _has_marker(run):
        if records_damage is not None or not storage.exists(run.stages_file):
            found = f"its stages.json is damaged ({records_damage.what})" if records_damage else "no stages.json"
            raise BadInputError(
                f"{where} is not a run of mnist-pipeline (no {RUN_MARKER} file, {found}); not resuming it, "
                "nothing there was changed"
            )
    check_private(run)
    if records_damage is not None:
        # Refused rather than read as "no records": every stage would run again, and nothing would stop a --set
        # that changes the training settings from being applied to the restored Tune experiment (check_resume
        # compares against these records). Deleting the file is the user's informed choice.
        raise BadInputError(
            f"cannot resume: {records_damage}; it records which stages finished: delete it to run every stage "
            "again (a Tune experiment in tune/ is then restored, not trained anew)"
        )
    _check_config_file(run)


def _has_marker(run: RunFolder) -> bool:
    if storage.is_uri(run.marker_file):
        return storage.exists(run.marker_file)
    try:
        return local_file_exists(run.marker_file)
    except DamagedFile:
        return False


def _records_damage(run: RunFolder) -> DamagedFile | None:
    try:
        StageRecords.load(run.location)
    except DamagedFile as damage:
        return damage
    return None


def _check_config_file(run: RunFolder) -> None:
    try:
        check_run_config(run)
    except DamagedFile as damage:
        raise BadInputError(f"cannot resume: {damage}") from None
