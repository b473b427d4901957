"""Private disks for the nodes of a test cluster, as real machines have.

Each node of a test cluster runs in a mount namespace of its own whose /root (its home, with the default
`data.cache_dir` and `~/.ray`) and /tmp (Ray's session folders, temporary files) are empty folders of that node.
Only the paths it is given stay visible at their own places: the Python environment and the repository (the
software every node of a real cluster has installed), the MNIST mirror, and the shared run root, which stands in
for an NFS mount. A file a node writes under /root or /tmp anywhere else is its own.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

PRIVATE_TOPS = (Path("/root"), Path("/tmp"))
REPO = Path(__file__).resolve().parent.parent


def missing_prerequisites() -> str | None:
    """Why this machine cannot give test nodes private disks, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces, bind mounts)"
    for tool in ("unshare", "nsenter", "mount"):
        if not shutil.which(tool):
            return f"needs {tool} on PATH"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return "cannot create mount namespaces here"
    return None


def software_paths() -> list[Path]:
    """What every node has installed: the Python this runs on, its environment, the repository."""
    return [Path(sys.base_prefix), Path(sys.prefix), REPO]


def private_disk_script(node_dir: Path, visible: list[Path]) -> str:
    """Shell commands that, run first in a new mount namespace, give it a private /root and /tmp.

    Args:
      node_dir: the node's own folder on the machine; its `root/` and `tmp/` become the node's /root and /tmp.
      visible: paths that stay visible at the same place on the node (bind mounts), wherever they are.
    """
    home, tmp = node_dir / "root", node_dir / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    commands = ["set -e"]
    for path in _outermost(visible):
        for top, private in zip(PRIVATE_TOPS, (home, tmp)):
            if path.is_relative_to(top):
                target = private / path.relative_to(top)
                if path.is_dir():
                    commands.append(f"mkdir -p {_q(target)}")
                else:
                    commands.append(f"mkdir -p {_q(target.parent)} && touch {_q(target)}")
                commands.append(f"mount --rbind {_q(path)} {_q(target)}")
    commands += [f"mount --rbind {_q(home)} /root", f"mount --rbind {_q(tmp)} /tmp"]
    return "\n".join(commands)


def _outermost(paths: list[Path]) -> list[Path]:
    """The resolved paths, without those inside another one (binding the outer one shows them already)."""
    resolved = sorted({Path(os.path.realpath(p)) for p in paths}, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for path in resolved:
        if not any(path.is_relative_to(outer) for outer in kept):
            kept.append(path)
    return kept


def _q(path: Path) -> str:
    return shlex.quote(str(path))
