"""A stage's code version covers every module that implements it, including modules added after the list was made."""

import sys
from pathlib import Path

import pytest

from pipeline.stage_records import _STAGE_CODE
from stages.common.code_hash import code_hash, modules_of

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def package(tmp_path, monkeypatch):
    """An importable package `hashed_pkg` with a module and a subpackage, on a fresh sys.path entry."""
    root = tmp_path / "hashed_pkg"
    (root / "inner").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "first.py").write_text("VALUE = 1\n")
    (root / "inner" / "__init__.py").write_text("")
    (root / "inner" / "deep.py").write_text("DEEP = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [name for name in sys.modules if name.startswith("hashed_pkg")]:
        del sys.modules[name]


def test_a_package_stands_for_every_module_in_it(package):
    assert modules_of("hashed_pkg") == [
        "hashed_pkg", "hashed_pkg.first", "hashed_pkg.inner", "hashed_pkg.inner.deep",
    ]
    before = code_hash("hashed_pkg")
    (package / "inner" / "deep.py").write_text("DEEP = 2\n")  # an edit deep inside
    edited = code_hash("hashed_pkg")
    (package / "second.py").write_text("OTHER = 1\n")  # a module nobody listed
    added = code_hash("hashed_pkg")
    assert len({before, edited, added}) == 3
    assert code_hash("hashed_pkg.first") == code_hash("hashed_pkg.first")  # a plain module: itself only


@pytest.mark.parametrize("stage, package", [("train", "training"), ("evaluate", "evaluation"),
                                            ("preprocess", "dataset")])
def test_each_stage_covers_every_file_of_its_package(stage, package):
    covered = {module for name in _STAGE_CODE[stage] for module in modules_of(name)}
    files = {f"stages.{package}." + path.stem for path in (REPO / "stages" / package).glob("*.py")
             if path.stem != "__init__"}
    assert files and files <= covered, sorted(files - covered)
    assert f"stages.{stage}" in covered
