"""A plain (non-editable) wheel carries the Hydra configs: installed into a fresh venv, `actprune` runs from anywhere."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO, SHARED_DATA, STORIES, needs_shared


def run(*args, cwd, env=None, timeout=300):
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.cli
@pytest.mark.integration
@needs_shared
def test_wheel_installs_configs_and_runs_from_anywhere(tmp_path):
    pytest.importorskip("setuptools", minversion="77", reason="building the wheel needs setuptools>=77 here")
    # Build from a copy of the sources, so no build/ folder is left in (or reused from) the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("actprune", "conf", "hydra_plugins"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp_path / "dist",
        src,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("actprune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {"actprune/conf/" + p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert "actprune/conf/config.yaml" in configs and "actprune/conf/hydra/launcher/local.yaml" in configs
    assert configs <= names, sorted(configs - names)
    # The packages are listed by hand in pyproject.toml: a new subpackage left out of the list shows here.
    modules = {p.relative_to(REPO).as_posix() for d in ("actprune", "hydra_plugins") for p in (REPO / d).rglob("*.py")}
    assert "hydra_plugins/actprune_sweeper/sweeper.py" in modules
    assert modules <= names, sorted(modules - names)
    assert "hydra_plugins/__init__.py" not in names  # Hydra needs hydra_plugins as a namespace package

    # A fresh venv that borrows this environment's dependencies by a plain path line in a .pth (which adds
    # the folder to sys.path without running its .pth files, so the editable actprune stays invisible).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path
    )
    purelib = run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
    ).stdout.strip()
    (Path(purelib) / "_actprune_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(
        python,
        "-c",
        "import actprune, hydra_plugins.actprune_sweeper as s; from actprune.app import CONF_DIR;"
        " print(actprune.__file__); print(s.__file__); print(CONF_DIR)",
        cwd=elsewhere,
        env=env,
    ).stdout.splitlines()
    assert all(path.startswith(str(venv)) for path in where), where
    assert where[2].endswith(os.path.join("actprune", "conf"))

    done = run(
        venv / "bin" / "actprune",
        f"model.path={STORIES}",
        "model.seqlen=128",
        f"paths.data_dir={SHARED_DATA}",
        "logger=none",
        "pruning=act_magnitude",
        "pruning.sparsity=2:4",
        "benchmark.ppl_wikitext2.max_windows=2",
        cwd=elsewhere,
        env=env,
    )
    (path,) = (elsewhere / "outputs" / "runs").glob("*/results.json")
    result = json.loads(path.read_text())
    assert result["status"] == "ok", result["error"]
    assert result["metrics"]["ppl/wikitext2"] > 1
    assert result["config"]["pruning"]["sparsity"] == "2:4" and "act_magnitude" in done.stdout
