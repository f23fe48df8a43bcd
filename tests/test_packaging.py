"""The distribution (rto-rlhf): its wheel and sdist carry every module and every data file the package reads."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_files() -> set[str]:
    """Every file of the source package (rto/...), caches left out."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "rto").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def files_read_at_run_time() -> set[str]:
    """The data files the code opens relative to the package: the tasks' prompts and the built-in recipes."""
    from rto.tasks import ifeval, sentiment

    recipes = [resources.files("rto.recipes").joinpath(name) for name in ("demo.yaml", "ifeval.yaml")]
    return {Path(str(f)).resolve().relative_to(ROOT).as_posix()
            for f in [sentiment.PROMPTS_FILE, ifeval.PROMPTS_FILE, *recipes]}


def copy_project(src: Path) -> None:
    """What a build reads, copied to `src` (so nothing is written into the project)."""
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "rto", src / "rto", ignore=shutil.ignore_patterns("__pycache__"))


def build(tmp_path: Path, hook: str) -> Path:
    """Run setuptools' PEP 517 hook `hook` (build_wheel / build_sdist) on the copy of the project in tmp_path/src
    (made first when missing); returns the file built."""
    src = tmp_path / "src"
    if not src.exists():
        copy_project(src)
    out = tmp_path / "dist"
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_the_wheel_and_the_sdist_carry_every_module_and_data_file(tmp_path):
    needed = files_read_at_run_time()
    data = {f for f in package_files() if not f.endswith(".py")}
    assert needed <= data and any(f.endswith(".jsonl") for f in needed) and any(f.endswith(".yaml") for f in needed)

    wheel = build(tmp_path, "build_wheel")
    assert wheel.name.startswith("rto_rlhf-")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = package_files() - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "rto = rto.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    sdist = build(tmp_path, "build_sdist")
    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert not package_files() - in_sdist, f"the sdist lacks {sorted(package_files() - in_sdist)}"


def test_a_data_file_left_out_of_package_data_is_caught(tmp_path):
    """The check above would fail if pyproject.toml stopped shipping the recipes (guards the test itself)."""
    copy_project(tmp_path / "src")
    pyproject = tmp_path / "src" / "pyproject.toml"
    text = pyproject.read_text()
    assert '"rto.recipes" = ["*.yaml"]' in text
    pyproject.write_text(text.replace('"rto.recipes" = ["*.yaml"]', '"rto.recipes" = []'))
    names = set(zipfile.ZipFile(build(tmp_path, "build_wheel")).namelist())
    assert "rto/recipes/demo.yaml" not in names and "rto/recipes/__init__.py" in names


@pytest.mark.parametrize("module", ["rto.tasks.sentiment", "rto.tasks.ifeval"])
def test_the_task_prompts_are_read_from_inside_the_package(module):
    import importlib

    prompts = Path(importlib.import_module(module).PROMPTS_FILE)
    assert prompts.is_file() and prompts.resolve().is_relative_to(ROOT / "rto")
