"""What a sweep's exit status and table say: its own jobs only, whatever the report or another
command does; jobs that would share a folder; records that are not JSON objects; finished sweeps
that need not write."""

import errno
import json
import pathlib
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

from actprune import app
from actprune.run import job, report, results, table

from .helpers import WINDOWS, actprune, common, results_in


def in_process(monkeypatch, *args) -> int | str | None:
    """`actprune ARGS` in this process (so that a test can patch what it calls): its exit code or message."""
    monkeypatch.setattr(sys, "argv", ["actprune", *map(str, args)])
    try:
        app.main()
    except SystemExit as exit:
        return exit.code
    finally:
        GlobalHydra.instance().clear()
    return 0


@pytest.mark.cli
def test_a_report_that_cannot_be_written_fails_the_sweep_and_its_failed_job_is_named(tiny_setup, tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "report.md").mkdir(parents=True)  # report.md cannot be written: a folder is in the way
    done = actprune("-m", *common(tiny_setup, sweep), "pruning=act_magnitude", "pruning.sparsity=0.5,1.5", WINDOWS)
    assert done.returncode == 1, done.stderr[-3000:]
    (verdict,) = [line for line in done.stderr.splitlines() if "jobs not ok" in line]
    assert "1 of 2 jobs not ok (1 failed): " in verdict and "pruning.sparsity=1.5," in verdict
    assert "the report was not written: IsADirectoryError" in done.stderr


@pytest.mark.cli
def test_a_sweep_judges_its_own_jobs_when_another_command_sweeps_the_folder_meanwhile(
    tiny_setup, tmp_path, monkeypatch
):
    sweep = tmp_path / "sweep"
    run_job = job.run_job
    others = []

    def another_command_first(*args, **kwargs):  # another command sweeps the folder while this one runs
        others.append(
            actprune("-m", *common(tiny_setup, sweep), "pruning=act_magnitude", "pruning.sparsity=0.5", WINDOWS)
        )
        return run_job(*args, **kwargs)

    monkeypatch.setattr(job, "run_job", another_command_first)
    code = in_process(
        monkeypatch, "-m", *common(tiny_setup, sweep), "pruning=act_magnitude", "pruning.sparsity=1.5", WINDOWS
    )
    assert others[0].returncode == 0, others[0].stderr[-3000:]
    assert {r["status"] for r in results_in(sweep).values()} == {"ok", "failed"}
    assert "1 of 1 jobs not ok (1 failed): " in str(code) and "pruning.sparsity=1.5," in str(code)


@pytest.mark.cli
def test_jobs_that_would_share_a_folder_are_refused_before_any_runs(tiny_setup, tmp_path):
    sweep = tmp_path / "sweep"
    args = [*common(tiny_setup, sweep), "pruning=act_magnitude", "pruning.sparsity=0.5", WINDOWS]
    done = actprune("-m", *args, "device=cpu,auto")
    assert done.returncode == 1 and "Launching" not in done.stdout + done.stderr
    assert "device=auto, device=cpu" in done.stderr and "hydra.sweep.subdir" in done.stderr
    assert not list(sweep.rglob("results.json"))
    # As the message says: folders named by the device too.
    named = actprune(
        "-m",
        *args,
        "device=cpu,auto",
        'hydra.sweep.subdir="${actprune_job_name:${hydra.overrides.task}}-device=${device}"',
    )
    assert named.returncode == 0, named.stderr[-3000:]
    assert sorted(r["config"]["device"] for r in results_in(sweep).values()) == ["auto", "cpu"]


def test_a_record_that_is_json_but_not_an_object_is_an_unreadable_row(tmp_path):
    for name, text in (("list", "[1, 2]"), ("string", '"x"'), ("ok", json.dumps({"status": "ok", "model": "m"}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / results.RESULTS).write_text(text)
    found = {path.parent.name: record for path, record in results.read_all(tmp_path)}
    assert [found[name]["status"] for name in ("list", "ok", "string")] == ["unreadable", "ok", "unreadable"]
    assert "not an object" in found["list"]["error"]
    assert table.table(list(found.items())).count("unreadable") == 2
    written = report.report([tmp_path], tmp_path / "report")
    assert written["markdown"].read_text().count("| unreadable |") == 2
    assert results.previous(tmp_path / "list")["status"] == "failed"  # a job run there again replaces it
    assert results.claim(tmp_path / "list") == tmp_path / "list" / results.RESULTS


def refuse_unlink(monkeypatch) -> None:
    """Every unlink fails as on a read-only file system, where even a missing file's unlink raises."""

    def read_only(path, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(pathlib.Path, "unlink", read_only)


def test_claiming_a_folder_unlinks_no_refusal_that_is_not_there(tmp_path, monkeypatch):
    refuse_unlink(monkeypatch)
    assert results.claim(tmp_path / "job") == tmp_path / "job" / results.RESULTS
    (tmp_path / "job").mkdir()
    results.write(
        tmp_path / "job" / results.RESULTS, {"status": "ok", "results_version": results.VERSION, "config": {}}
    )
    with pytest.raises(results.AlreadyDone):
        results.claim(tmp_path / "job", {})


@pytest.mark.cli
def test_a_finished_sweep_run_again_writes_nothing_into_its_folders(tiny_setup, tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    args = ["-m", *common(tiny_setup, sweep), "pruning=act_magnitude", "pruning.sparsity=0.5,2:4", WINDOWS]
    assert actprune(*args).returncode == 0
    jobs = [path.parent for path in sweep.rglob(results.RESULTS)]
    before = {path: path.stat().st_mtime_ns for job_dir in jobs for path in [job_dir, *job_dir.rglob("*")]}
    swept = (sweep / "multirun.yaml").stat().st_mtime_ns
    refuse_unlink(monkeypatch)
    assert in_process(monkeypatch, *args) == 0
    printed = capsys.readouterr()
    assert "2 jobs; 2 done before" in printed.out + printed.err
    after = {path: path.stat().st_mtime_ns for job_dir in jobs for path in [job_dir, *job_dir.rglob("*")]}
    assert after == before and (sweep / "multirun.yaml").stat().st_mtime_ns == swept


@pytest.mark.cli
def test_a_finished_sweep_on_a_read_only_folder_runs_again_and_exits_0(tiny_setup, tmp_path, monkeypatch, capsys):
    """Nothing ran, so the report the folder holds is current: a report that cannot be rewritten there
    is said, not a failure. Where a job ran, the same error fails the sweep."""
    sweep = tmp_path / "sweep"
    args = ["-m", *common(tiny_setup, sweep), "pruning=act_magnitude", "pruning.sparsity=0.5", WINDOWS]
    assert actprune(*args).returncode == 0

    def read_only(*_, **__):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(report, "report", read_only)
    refuse_unlink(monkeypatch)
    assert in_process(monkeypatch, *args) == 0
    assert "the folder is read-only; this command ran no job" in capsys.readouterr().out
    code = in_process(monkeypatch, *args, "overwrite=true")
    assert "the report was not written: OSError" in str(code)


def test_a_sweep_says_which_job_it_is_at_and_about_how_long_is_left():
    from actprune.run.callbacks import Sweep

    sweep = Sweep()
    sweep.start(["a", "b", "c"], launched=3)
    sweep.finished = [30.0]
    assert sweep.progress() == "job 1/3 took 30 s; about 60 s left"
    sweep.finished = [30.0, 150.0]
    assert sweep.progress() == "job 2/3 took 2.5 min; about 1.5 min left"
    sweep.finished = [30.0, 150.0, 60.0]
    assert sweep.progress() == "job 3/3 took 60 s"
