"""`make gpu-check` (scripts/gpu_check.sh), run as on a GPU machine with a stand-in python: it stops before
anything runs where it cannot do its work, and exits non-zero, naming them, when steps fail."""

import json
import subprocess
import sys

import pytest
import torch

from .conftest import REPO

# Logs each call (its arguments) to $CALLS, then does what $FAKE says: `exec` hands over to the real python;
# otherwise the environment check reports a GPU, pip installs nothing, and every other call passes or fails.
PYTHON = """#!/usr/bin/env bash
echo "$*" >>"$CALLS"
[ "$FAKE" = exec ] && exec "$REAL" "$@"
[ "$1" = - ] && cat >/dev/null && echo '{"part": "environment", "cuda": "12.8", "device": "stand-in"}' && exit 0
[ "$1 $2" = "-m pip" ] && exit 0
[ "$FAKE" = pass ]
"""


def gpu_check(tmp_path, out, fake="fail"):
    """The script's exit status, its output, and the calls of its python."""
    python = tmp_path / "python"
    python.write_text(PYTHON)
    python.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    (wheels / "stand_in-1.0-py3-none-any.whl").touch()
    calls = tmp_path / "calls"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "WHEELS": str(wheels), "CALLS": str(calls)}
    env.update(FAKE=fake, REAL=sys.executable)
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stdout + done.stderr, calls.read_text().splitlines() if calls.exists() else []


def steps(out) -> list[dict]:
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [line for line in lines if line["part"] == "step"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_it_stops_before_installing_or_running_anything(tmp_path):
    for _ in range(2):  # the same OUT again: it holds no results, so it is no earlier run's
        status, output, calls = gpu_check(tmp_path, tmp_path / "out", fake="exec")
        assert status == 2, output
        assert "sees no CUDA device" in output and "nothing run" in output
        assert steps(tmp_path / "out") == []
    assert calls == ["-", "-"]  # the environment check alone, each time: no pip, no pytest, no benchmark


@pytest.mark.parametrize("case", ["under a file", "holding results"])
def test_an_output_folder_it_cannot_use_stops_it_before_anything_runs(tmp_path, case):
    (tmp_path / "file").touch()
    out = tmp_path / "file" / "out" if case == "under a file" else tmp_path / "earlier"
    if case == "holding results":
        out.mkdir()
        (out / "results.jsonl").write_text('{"part": "step", "step": "tests", "exit_status": 0, "seconds": 1}\n')
    status, output, calls = gpu_check(tmp_path, out)
    assert status == 2, output
    assert ("cannot create the output folder" if case == "under a file" else "holds an earlier run's results") in output
    assert calls == []
    if case == "holding results":
        assert len(steps(out)) == 1  # the earlier run's line, untouched


def test_failed_steps_are_each_recorded_and_named_and_the_exit_is_non_zero(tmp_path):
    status, output, calls = gpu_check(tmp_path, tmp_path / "out")
    assert status == 1, output
    recorded = steps(tmp_path / "out")
    assert [(s["step"], s["exit_status"]) for s in recorded] == [
        ("tests", 1),
        ("bench_decode", 1),
        ("bench_generate", 1),
    ]
    assert "3 of 3 steps failed: tests (exit 1); bench_decode (exit 1); bench_generate (exit 1)" in output
    assert [call.split()[:2] for call in calls] == [
        ["-"],  # the environment check
        ["-m", "pip"],
        ["-c", "import"],  # xdist
        ["-m", "pytest"],
        ["scripts/bench_speed.py", "--parts"],
        ["scripts/bench_speed.py", "--parts"],
    ]


def test_steps_that_pass_exit_zero(tmp_path):
    (tmp_path / "out").mkdir()  # where a start stopped after the environment check: no step ran, so no refusal
    (tmp_path / "out" / "results.jsonl").write_text('{"part": "environment", "cuda": "12.8"}\n')
    status, output, _ = gpu_check(tmp_path, tmp_path / "out", fake="pass")
    assert status == 0, output
    assert [s["exit_status"] for s in steps(tmp_path / "out")] == [0, 0, 0]
    assert (tmp_path / "out" / "results.jsonl").read_text().count('"environment"') == 1  # this run's alone
    assert "all 3 steps passed" in output
