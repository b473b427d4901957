"""The peak memory of a child process, counted from its own start.

`getrusage`'s ru_maxrss will not do on Linux: a process keeps, across exec, the peak of the process it was forked
from, so any child of a test process that holds TensorFlow (1 GB by the end of the suite) reports at least that.
VmHWM in /proc/self/status belongs to the child's own address space, which exec makes new.
"""

from __future__ import annotations

from pathlib import Path

# Python source that defines own_peak_rss_bytes(), for children started with `python -c`.
OWN_PEAK = '''
def own_peak_rss_bytes():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
'''

# `python -c MEASURED_CLI ARGS` runs `python -m pipeline ARGS` and, at exit, writes its peak RSS in bytes to the file
# $PEAK_RSS_FILE names.
MEASURED_CLI = OWN_PEAK + '''
import os, runpy
try:
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
finally:
    with open(os.environ["PEAK_RSS_FILE"], "w") as out:
        out.write(str(own_peak_rss_bytes()))
'''


def read_peak(peak_file: Path) -> int:
    """The peak RSS in bytes a MEASURED_CLI child wrote."""
    return int(peak_file.read_text())
