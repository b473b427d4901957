"""`python ~/pipeline` for `ray submit <cluster config> pipeline -- ARGS`.

`ray submit` copies the `pipeline` package to ~/pipeline/pipeline and runs `python ~/pipeline`; the launcher
configs copy this file to ~/pipeline/__main__.py on the head. It runs the submitted package (its folder comes first
on sys.path) and joins the cluster it runs on, as `ray job submit` entrypoints do.
"""

import os
import runpy

if not os.environ.get("RAY_ADDRESS"):
    os.environ["RAY_ADDRESS"] = "auto"
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
