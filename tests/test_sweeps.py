"""Sweeps at cluster scale: resume, failures re-run, kills, in-process reuse, the report, launchers."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from actprune import reuse
from actprune.app import CONF_DIR, sweep_name
from actprune.eval import perplexity as ppl_benchmark
from actprune.run import job
from actprune.run.tracking import Tracker

from .conftest import SHARED_DATA, STORIES, needs_shared
from .helpers import WINDOWS, actprune, common, job_config, measuring, offline_wandb_log, results_in


def slow_job(setup, tmp_path) -> list[str]:
    """A job that measures for many minutes (a test split of the tiny text repeated 1000 times), so
    that a signal sent once it is measuring always finds it measuring, however busy the machine."""
    data = tmp_path / "slow_data"
    shutil.copytree(setup["data"], data)
    test = data / "wikitext-2-raw-v1" / "test.jsonl"
    test.write_text(test.read_text() * 1000)
    return [
        *common(setup, tmp_path),
        f"paths.data_dir={data}",
        "pruning=act_magnitude",
        "pruning.sparsity=0.5",
        "model.seqlen=8",
        "benchmark.ppl_wikitext2.max_windows=10000000",
    ]


def out(done) -> str:
    return done.stdout + done.stderr


def ppl(found: dict) -> dict:
    return {name: record["metrics"]["ppl/wikitext2"] for name, record in found.items()}


@pytest.mark.cli
def test_a_sweep_run_again_skips_finished_jobs_and_reruns_failed_ones(tiny_setup, tmp_path):
    sweep = tmp_path / "sweep"
    args = [*common(tiny_setup, sweep), "pruning=act_magnitude,weight_magnitude", "pruning.sparsity=0.5,2:4", WINDOWS]
    first = actprune("-m", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Sweep: job 1/4" in first.stdout and "Sweep: job 1/4 took" in first.stdout and " left" in first.stdout
    assert "Sweep: job 4/4 took" in first.stdout
    found = results_in(sweep)
    assert len(found) == 4 and all(r["status"] == "ok" for r in found.values())
    written = {path: path.read_bytes() for path in sweep.rglob("results.json")}

    # One job is marked failed by hand: the same command re-runs that one only.
    failed_path = next(p for p in written if "pruning=weight_magnitude" in str(p) and "2:4" in str(p))
    failed_path.write_text(json.dumps({**json.loads(written[failed_path]), "status": "failed"}))
    second = actprune("-m", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 jobs; 3 done before" in out(second) and "1 failed" in out(second)
    assert "Launching 1 jobs" in out(second)
    for path, content in written.items():
        if path != failed_path:
            assert path.read_bytes() == content  # untouched
    rerun = json.loads(failed_path.read_text())
    assert rerun["status"] == "ok" and rerun["metrics"] == json.loads(written[failed_path])["metrics"]
    assert json.loads((failed_path.parent / "results.failed.1.json").read_text())["status"] == "failed"

    # A third time: nothing to launch.
    third = actprune("-m", *args)
    assert "4 jobs; 4 done before" in out(third) and "Launching" not in out(third)
    assert {p: p.read_bytes() for p in sweep.rglob("results.json")} == {
        **written,
        failed_path: failed_path.read_bytes(),
    }

    # overwrite=true re-runs every job in its own folder, the earlier records kept beside.
    forced = actprune("-m", *args, "overwrite=true")
    assert forced.returncode == 0 and "Launching 4 jobs" in out(forced)
    assert set(sweep.rglob("results.json")) == set(written) and len(list(sweep.rglob("results.ok.1.json"))) == 4


@pytest.mark.cli
def test_the_same_command_finds_the_same_sweep_folder(tiny_setup, tmp_path):
    args = [a for a in common(tiny_setup, tmp_path) if not a.startswith("hydra.sweep.dir")]
    first = actprune("-m", *args, "pruning=act_magnitude", "pruning.sparsity=0.5,2:4", WINDOWS, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    folders = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("sweep-")
    again = actprune("-m", *args, "pruning=act_magnitude", "pruning.sparsity=0.5,2:4", WINDOWS, cwd=tmp_path)
    assert "2 done before" in out(again) and list((tmp_path / "outputs" / "multiruns").iterdir()) == folders
    other = actprune("-m", *args, "pruning=act_magnitude", "pruning.sparsity=0.25", WINDOWS, cwd=tmp_path)
    assert other.returncode == 0 and len(list((tmp_path / "outputs" / "multiruns").iterdir())) == 2
    # paths.* never names the folder (make demo passes paths.data_dir only where ../shared exists): the
    # same rows elsewhere resume, other rows are not done but refused, naming the inputs.
    moved = shutil.copytree(tiny_setup["data"], tmp_path / "moved")
    again = actprune(
        "-m",
        *[a.replace(str(tiny_setup["data"]), str(moved)) for a in args],
        "pruning=act_magnitude",
        "pruning.sparsity=0.5,2:4",
        WINDOWS,
        cwd=tmp_path,
    )
    assert "2 done before" in out(again) and len(list((tmp_path / "outputs" / "multiruns").iterdir())) == 2
    data = tmp_path / "other"
    shutil.copytree(tiny_setup["data"], data)
    (data / "wikitext-2-raw-v1" / "test.jsonl").write_text('{"text": "Other rows , other words ."}\n' * 200)
    changed = actprune(
        "-m",
        *[a.replace(str(tiny_setup["data"]), str(data)) for a in args],
        "pruning=act_magnitude",
        "pruning.sparsity=0.5,2:4",
        WINDOWS,
        cwd=tmp_path,
    )
    assert changed.returncode != 0 and "inputs differ" in out(changed) and "0 done before" in out(changed)
    assert len(list((tmp_path / "outputs" / "multiruns").iterdir())) == 2


def test_where_data_and_caches_are_never_names_a_sweep_folder():
    assert sweep_name(["experiment=demo"]) == sweep_name(["experiment=demo", "paths.data_dir=/work/shared/data"])
    assert sweep_name(["experiment=demo"]) == sweep_name(["experiment=demo", "paths.cache_dir=/tmp/c", "logger=none"])
    assert sweep_name(["experiment=demo"]) != sweep_name(["experiment=demo", "pruning.sparsity=2:4"])


@pytest.mark.cli
def test_a_job_killed_part_way_leaves_nothing_that_claims_success(tiny_setup, tmp_path):
    process, _ = measuring(slow_job(tiny_setup, tmp_path))
    try:
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    run = tmp_path / "run"
    assert run.is_dir() and not (run / "results.json").exists()
    done = actprune(*common(tiny_setup, tmp_path), "pruning=act_magnitude", "pruning.sparsity=0.5", WINDOWS)
    assert done.returncode == 0 and json.loads((run / "results.json").read_text())["status"] == "ok"


@pytest.mark.cli
def test_ctrl_c_records_the_job_as_interrupted_and_exits_130_without_a_traceback(tiny_setup, tmp_path):
    process, seen = measuring(slow_job(tiny_setup, tmp_path))
    try:
        process.send_signal(signal.SIGINT)
        seen += process.communicate(timeout=60)[0]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130 and b"Traceback" not in seen, seen.decode()[-3000:]
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "interrupted" and "KeyboardInterrupt" in record["error"]
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.cli
def test_an_interrupted_job_is_recorded_as_interrupted_and_runs_again(tiny_setup, tmp_path, monkeypatch):
    cfg = job_config(tiny_setup, tmp_path, "pruning=act_magnitude", "pruning.sparsity=0.5")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ppl_benchmark, "perplexity", interrupt)
    with pytest.raises(KeyboardInterrupt):
        job.run_job(cfg, tmp_path / "job", "g", "n")
    assert json.loads((tmp_path / "job" / "results.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    assert job.run_job(cfg, tmp_path / "job", "g", "n")["status"] == "ok"
    assert (tmp_path / "job" / "results.interrupted.1.json").is_file()


@pytest.mark.cli
def test_in_process_jobs_reuse_the_model_and_leave_it_dense_bit_for_bit(tiny_setup, tmp_path):
    reuse.release()
    dense = job.run_job(job_config(tiny_setup, tmp_path, "pruning=dense"), tmp_path / "dense", "g", "dense")
    ((model, _),) = [value for key, value in reuse._cache.items() if key[0] == "model"]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for overrides in (
        ["pruning=weight_sparsegpt", "pruning.sparsity=2:4"],
        ["pruning=weight_wanda", "pruning.sparsity=0.5"],
        ["pruning=act_magnitude", "pruning.sparsity=2:4", "pruning.transforms=[hadamard,shift]"],
    ):
        # calibration windows never overlap: the tiny text holds 2,520 tokens, not the default 32 x 512
        config = job_config(tiny_setup, tmp_path, *overrides, "calibration.windows=8", "calibration.seqlen=128")
        record = job.run_job(config, tmp_path / overrides[0], "g", overrides[0])
        assert record["status"] == "ok" and record["metrics"]["ppl/wikitext2"] != dense["metrics"]["ppl/wikitext2"]
        ((again, _),) = [value for key, value in reuse._cache.items() if key[0] == "model"]
        assert again is model  # reused, not reloaded
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    last = job.run_job(job_config(tiny_setup, tmp_path, "pruning=dense"), tmp_path / "dense2", "g", "dense2")
    assert last["metrics"] == dense["metrics"]
    reuse.release()
    assert not reuse._cache


@pytest.mark.cli
def test_a_failed_job_does_not_hand_an_altered_model_to_the_next(tiny_setup, tmp_path, monkeypatch):
    reuse.release()
    job.run_job(job_config(tiny_setup, tmp_path, "pruning=dense"), tmp_path / "a", "g", "a")
    monkeypatch.setattr(ppl_benchmark, "perplexity", lambda *a, **k: 1 / 0)
    failed = job.run_job(
        job_config(tiny_setup, tmp_path, "pruning=weight_magnitude", "pruning.sparsity=0.5"), tmp_path / "b", "g", "b"
    )
    assert failed["status"] == "failed" and not [k for k in reuse._cache if k[0] == "model"]
    reuse.release()


def test_a_job_run_again_continues_its_wandb_run(tmp_path):
    logger = OmegaConf.create({"name": "wandb", "project": "actprune", "entity": None, "mode": "offline", "tags": []})
    ids = []
    for _ in range(2):
        tracker = Tracker(logger, tmp_path, group="g", name="n", config={})
        ids.append(tracker.run.id)
        tracker.finish("failed", "boom")
    assert ids[0] == ids[1] == (tmp_path / "wandb_run_id").read_text().strip()


def sweeper_jobs(experiment: str) -> list:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    options = OmegaConf.to_container(cfg.hydra.sweeper)
    # Hydra's plugin scan (during compose) re-imports plugin modules: take the class it knows.
    sweeper = get_class(options.pop("_target_"))
    return sweeper(**options).jobs([])


@pytest.mark.parametrize(
    "experiment,count",
    [
        ("paper_llama2_7b", 12),
        ("paper_gemma3_4b", 12),
        ("paper_qwen2_5_7b", 23),
        ("act_vs_weight", 17),
        ("quality_816", 11),
    ],
)
def test_presets_expand_to_the_tables_they_promise(experiment, count):
    jobs = sweeper_jobs(experiment)
    assert len(jobs) == count and len({tuple(j) for j in jobs}) == count
    assert sum("pruning=dense" in j for j in jobs) == 1
    if experiment.startswith("paper_"):

        def sparsities(method):
            return {
                o.split("=")[1].replace("\\", "")
                for j in jobs
                if f"pruning={method}" in j
                for o in j
                if o.startswith("pruning.sparsity=")
            }

        act, weight = sparsities("act_magnitude"), sparsities("weight_magnitude")
        assert act == {"0.2", "0.5", "0.7", "0.9", "2:4", "8:16"} and weight == {"2:4", "8:16", "0.25", "0.5", "0.75"}


def test_the_quality_preset_calibrates_out_of_domain_and_scores_zero_shot_accuracy_too():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=quality_816"], return_hydra_config=True)
    assert cfg.calibration.corpus == "c4" and set(cfg.benchmark) == {"ppl_wikitext2", "lm_eval"}
    assert list(cfg.benchmark.lm_eval.tasks) == ["boolq", "winogrande", "piqa", "arc_easy"]
    assert cfg.benchmark.lm_eval.limit == 100 and cfg.benchmark.ppl_wikitext2.max_windows == 24
    jobs = sweeper_jobs("quality_816")
    assert not any(o.startswith("calibration.") for j in jobs for o in j)  # no job calibrates in domain
    uniform = [j for j in jobs if "pruning.allocation=calibrated" not in j]
    assert {"pruning=weight_sparsegpt", "pruning=act_magnitude"} <= {o for j in uniform for o in j}
    assert sum("pruning.allocation=calibrated" in j for j in jobs) == 2  # extra rows, at 8:16 and 2:4
    transforms = {o for j in jobs for o in j if o.startswith("pruning.transforms=")}
    assert len(transforms) == 2 and all("permute" in t and "refit" not in t for t in transforms)  # what carries


def test_mitigation_preset_composes_into_its_sweep():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=mitigation_table"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert cfg.pruning.method == "act_magnitude" and cfg.benchmark.ppl_wikitext2.max_windows == 32
    assert params["pruning.score"].split(",") == ["magnitude", "weight_norm", "amber", "clact"]
    assert params["pruning.sparsity"] == "2:4,8:16,16:32,0.5"


STORIES_SWEEP = [
    f"model.path={STORIES}",
    "model.seqlen=128",
    f"paths.data_dir={SHARED_DATA}",
    "logger=none",
    "pruning=act_magnitude,weight_magnitude",
    "pruning.sparsity=0.5,2:4",
    "benchmark.ppl_wikitext2.max_windows=4",
]


@pytest.mark.cli
@needs_shared
def test_stories260k_sweep_twice_local_launcher_and_report(tmp_path):
    """The issue's done-when: a 4-job multirun run twice does the work once; the local launcher
    gives the same numbers in separate processes; actprune-report makes the table, CSV and plots."""
    basic, local = tmp_path / "basic", tmp_path / "local"
    first = actprune("-m", *STORIES_SWEEP, f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={basic}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert out(first).count("results: ") == 4
    second = actprune("-m", *STORIES_SWEEP, f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={basic}")
    assert "4 jobs; 4 done before" in out(second) and "results: " not in out(second)

    launched = actprune(
        "-m",
        "hydra/launcher=local",
        *STORIES_SWEEP,
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={local}",
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "Submitit 'local'" in out(launched)
    pids = {record["host"]["pid"] for record in results_in(local).values()}
    assert len(pids) == 4 and os.getpid() not in pids
    assert ppl(results_in(basic)) == ppl(results_in(local)) and len(ppl(results_in(local))) == 4

    report = subprocess.run(
        [sys.executable, "-m", "actprune.run.report", str(basic), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    markdown = (tmp_path / "report" / "report.md").read_text().splitlines()
    assert markdown[0].startswith("| model | method | sparsity | transforms | perplexity |") and len(markdown) == 2 + 4
    with open(tmp_path / "report" / "report.csv") as file:
        rows = list(csv.DictReader(file))
    assert {(r["method"], r["sparsity"]): float(r["perplexity"]) for r in rows} == {
        (r["config"]["pruning"]["method"], str(r["config"]["pruning"]["sparsity"])): r["metrics"]["ppl/wikitext2"]
        for r in results_in(basic).values()
    }
    png = (tmp_path / "report" / "perplexity.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (basic / "report.md").is_file()  # also written when the sweep ended


@pytest.mark.cli
def test_local_launcher_runs_jobs_in_their_own_processes_with_the_same_numbers(tiny_setup, tmp_path):
    grid = ["pruning=act_magnitude,weight_magnitude", "pruning.sparsity=2:4", WINDOWS]
    basic = actprune("-m", *common(tiny_setup, tmp_path / "basic"), *grid)
    local = actprune("-m", "hydra/launcher=local", *common(tiny_setup, tmp_path / "local"), *grid)
    assert basic.returncode == 0 and local.returncode == 0, local.stderr[-3000:]
    assert "Submitit 'local'" in out(local)
    found = results_in(tmp_path / "local")
    assert len(found) == 2 and len({r["host"]["pid"] for r in found.values()}) == 2
    assert os.getpid() not in {r["host"]["pid"] for r in found.values()}
    assert ppl(found) == ppl(results_in(tmp_path / "basic"))


@pytest.mark.cli
def test_report_logs_its_table_and_plots_to_a_wandb_summary_run(tiny_setup, tmp_path):
    from actprune.run import report

    sweep = tmp_path / "sweep"
    done = actprune("-m", *common(tiny_setup, sweep), "pruning=dense,act_magnitude", "pruning.sparsity=0.5", WINDOWS)
    assert done.returncode == 0, done.stderr[-3000:]
    written = report.report([sweep], tmp_path / "report")
    assert {"markdown", "csv", "perplexity_plot"} <= set(written)
    report.log_to_wandb(written, "sweep", "actprune", None, "offline", tmp_path / "report")
    log = offline_wandb_log(tmp_path / "report")
    assert b"summary/table" in log and b"sweep-summary" in log
    table = json.loads(next((tmp_path / "report" / "wandb").rglob("table*.table.json")).read_text())
    assert "perplexity" in table["columns"] and len(table["data"]) == 2


@pytest.mark.cli
def test_a_refused_sweep_says_so_in_its_table_report_and_exit_status(tiny_setup, tmp_path):
    sweep = tmp_path / "sweep"
    args = [*common(tiny_setup, sweep), "pruning=act_magnitude", "pruning.sparsity=0.5,2:4", WINDOWS]
    assert actprune("-m", *args).returncode == 0
    other = actprune("-m", *args, "device=cpu")  # the same job folders (device is not in their names), other settings
    assert other.returncode == 1 and "2 of 2 jobs not ok (2 refused)" in other.stderr
    lines = other.stdout[other.stdout.index("\nSweep ") :].splitlines()
    rule = next(index for index, line in enumerate(lines) if line.startswith("---"))
    table = lines[rule + 1 : rule + 3]  # after the header and its rule
    assert len(table) == 2 and all("pruning.sparsity=" in line and line.split()[-1] == "refused" for line in table)
    assert (sweep / "report.md").read_text().count("| refused |") == 2
    found = results_in(sweep)
    assert all(r["status"] == "ok" and r["config"]["device"] == "auto" for r in found.values())
    again = actprune("-m", *args)  # the first command again: its jobs are done, the refusals void
    assert again.returncode == 0 and not list(sweep.rglob("refused.json"))


def test_a_job_that_another_live_process_runs_is_skipped_untouched(tiny_setup, tmp_path):
    import socket

    from actprune.run.lock import LOCK, Busy, JobLock

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "slurm": None}))
        with pytest.raises(Busy, match=f"pid {holder.pid}"):
            job.run_job(job_config(tiny_setup, tmp_path, "pruning=dense"), job_dir, "g", "n")
        assert sorted(p.name for p in job_dir.iterdir()) == [LOCK]  # nothing written, the lock kept
    finally:
        holder.kill()
        holder.wait()
    with JobLock(job_dir):  # its holder is gone: the lock is stale and taken
        assert json.loads((job_dir / LOCK).read_text())["pid"] == os.getpid()
    assert not (job_dir / LOCK).exists()


def test_stale_locks_are_told_from_live_ones(tmp_path, monkeypatch):
    import socket

    from actprune.run import lock

    path = tmp_path / lock.LOCK
    path.write_text("{}")
    fresh_elsewhere = {"host": "other-node", "pid": 1, "slurm": "77_3"}
    assert not lock._stale(path, fresh_elsewhere)  # another node's job, touched just now
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert lock._stale(path, fresh_elsewhere)  # this very SLURM job's earlier attempt: requeued
    old = path.stat().st_mtime - lock.STALE - 1
    os.utime(path, (old, old))
    assert lock._stale(path, {"host": "other-node", "pid": 1, "slurm": None})  # nobody touched it for long
    assert lock._stale(path, {"host": socket.gethostname(), "pid": os.getpid()})


@pytest.mark.cli
def test_a_sweep_judges_its_own_jobs_and_those_that_left_no_record(tiny_setup, tmp_path):
    sweep = tmp_path / "sweep"
    failing = actprune("-m", *common(tiny_setup, sweep), "pruning=act_magnitude", "pruning.sparsity=1.5", WINDOWS)
    assert failing.returncode == 1
    ok = actprune("-m", *common(tiny_setup, sweep), "pruning=act_magnitude", "pruning.sparsity=0.5", WINDOWS)
    assert ok.returncode == 0, ok.stderr[-2000:]  # another command's failed job in the folder is not this one's
    assert "| failed |" in (sweep / "report.md").read_text()  # ...though the folder's report shows it
    job_dir = next(p.parent for p in sweep.rglob("results.json") if "0.5" in p.parent.name)
    (job_dir / "results.json").unlink()  # as if killed outright, and not run again:
    (job_dir / ".lock").write_text(json.dumps({"host": "other-node", "pid": 1, "slurm": None}))
    busy = actprune("-m", *common(tiny_setup, sweep), "pruning=act_magnitude", "pruning.sparsity=0.5", WINDOWS)
    assert busy.returncode == 1 and "1 of 1 jobs not ok (1 busy)" in busy.stderr
