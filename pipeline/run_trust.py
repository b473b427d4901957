"""Who may have written a run's Tune state: checked before `run --resume` lets Tune unpickle it.

Tune restores an experiment by unpickling its state, so whoever can write into a run's tune/ folder can run code as
the user who resumes the run. check_private refuses such a folder before anything there is read.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from pipeline.run_files import describe_os_error
from pipeline.run_folder import RunFolder
from stages.common import storage
from stages.common.errors import BadInputError


def check_private(run: RunFolder) -> None:
    """Refuses a local run folder, or anything in its tune/ folder, that another user owns or could write.

    Tune restores an experiment by unpickling its state (tuner.pkl, and cloudpickle inside experiment_state-*.json):
    whoever can write there can run code as the user who resumes. Object stores are left to their access control.
    A symbolic link in tune/ is refused too: the experiment is restored from the run folder named, nowhere else.

    Raises:
      BadInputError: one line naming the path, why, and the command that fixes it.
    """
    if storage.is_uri(run.location):
        return
    folder = Path(run.location)
    _refuse_if_unsafe(folder, folder)
    tune = Path(run.tune_dir)
    if not os.path.lexists(tune):
        return
    _refuse_if_unsafe(tune, folder)

    def unreadable(error: OSError) -> None:
        raise BadInputError(f"cannot resume {folder}: {error.filename}: {describe_os_error(error)}")

    for parent, folders, files in os.walk(tune, onerror=unreadable):
        for name in folders + files:
            _refuse_if_unsafe(Path(parent, name), folder)


def _refuse_if_unsafe(path: Path, run_folder: Path) -> None:
    try:
        status = os.lstat(path)
    except OSError as error:
        raise BadInputError(f"cannot resume {run_folder}: {path}: {describe_os_error(error)}") from None
    me = os.geteuid()
    if stat.S_ISLNK(status.st_mode):
        problem, fix = "is a symbolic link", f"replace {path} by what it points to"
    elif status.st_uid != me:
        problem = f"belongs to {_user_name(status.st_uid)}, not to you ({_user_name(me)})"
        fix = f"chown -R {_user_name(me)} {run_folder}"
    elif status.st_mode & stat.S_IWOTH:
        problem, fix = "is writable by every user", f"chmod -R go-w {run_folder}"
    elif status.st_mode & stat.S_IWGRP and not _private_group(status.st_gid, me):
        problem, fix = f"is writable by group {_group_name(status.st_gid)}", f"chmod -R go-w {run_folder}"
    else:
        return
    raise BadInputError(
        f"not resuming {run_folder}: {path} {problem}, and Tune restores its experiment with pickle (whoever can "
        f"write there can run code as you); if you trust its contents: {fix}"
    )


def _private_group(gid: int, uid: int) -> bool:
    """Whether `gid` is the user's own group (the user-private-group scheme: same name, no other members), whose
    write permission umask 002 gives every file and which gives nobody else access."""
    try:
        user, group = pwd.getpwuid(uid), grp.getgrgid(gid)
    except KeyError:
        return False
    return user.pw_gid == gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"
