"""`python ~/pipeline` for `ray submit <cluster config> pipeline [-- ARGS]`.

`ray submit` copies the `pipeline` package to ~/pipeline/pipeline and runs `python ~/pipeline`; the launcher
configs copy this file to ~/pipeline/__main__.py on the head. It runs the submitted package (its folder comes first
on sys.path) and joins the cluster it runs on, as `ray job submit` entrypoints do.

With no ARGS it runs `run --config FILE`, FILE being the cluster's own pipeline config that the launcher config's
head_setup_commands name in ~/pipeline/config-path (configs/cluster.yaml for cluster.yaml, configs/onprem.yaml for
clusters/onprem.yaml).
"""

import os
import runpy
import sys
from pathlib import Path

CONFIG_PATH_FILE = Path(__file__).resolve().parent / "config-path"

if len(sys.argv) == 1:
    if not CONFIG_PATH_FILE.is_file():
        sys.exit(
            f"ray submit ... pipeline: no arguments, and no {CONFIG_PATH_FILE} naming the cluster's config "
            "(head_setup_commands write it): give one, as in `ray submit CLUSTER.yaml pipeline -- run --config FILE`"
        )
    config = Path(CONFIG_PATH_FILE.read_text().strip()).expanduser()
    print(f"ray submit ... pipeline: run --config {config}", file=sys.stderr)
    sys.argv += ["run", "--config", str(config)]
if not os.environ.get("RAY_ADDRESS"):
    os.environ["RAY_ADDRESS"] = "auto"
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
