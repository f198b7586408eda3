"""Decode speed beside quality: the generate benchmark's columns in the tables and `speed.png`."""

import csv
import json

from actprune.run import report, results, table

from .helpers import offline_wandb_log


def job(
    folder,
    name,
    method="act_magnitude",
    sparsity="2:4",
    ppl=8.0,
    tok_s=None,
    speedup=None,
    backend="emulate",
    device="cuda",
    device_name=None,
    model="llama",
    pruning=None,
):
    """A finished job's results.json in `folder/name`; the generate benchmark's keys only where `speedup` is given."""
    dense = method == "dense"
    record = {
        "status": "ok",
        "results_version": results.VERSION,
        "model": model,
        "metrics": {"ppl/wikitext2": ppl} if ppl is not None else {},
        "sparsity": {"kind": "dense" if dense else "ratio", "pattern": "dense" if dense else sparsity},
        "config": {
            "model": {"path": f"/models/{model}"},
            "pruning": {"method": method, "sparsity": None if dense else sparsity, **(pruning or {})},
        },
    }
    if speedup is not None:
        record["metrics"] |= {
            "generate/decode_tokens_per_s": tok_s,
            "generate/decode_speedup": speedup,
            "generate/dense_decode_tokens_per_s": tok_s / speedup,
            "generate/prefill_ms": 12.0,
            "generate/ttft_ms": 15.0,
        }
        record["generate"] = {"backend": backend, "device": device, "device_name": device_name}
    results.write(folder / name / "results.json", record)
    return record


def by_sparsity(rows):
    return {row["sparsity"]: row for row in rows}


def test_speed_columns_hold_the_generate_metrics_and_are_empty_for_jobs_without_it(tmp_path):
    job(tmp_path, "timed", sparsity="2:4", tok_s=42.5, speedup=1.25, backend="kernel")
    job(tmp_path, "untimed", sparsity="0.5")
    job(tmp_path, "configured", sparsity="4:8", pruning={"backend": "emulate"})  # no generate benchmark
    rows = table.rows([tmp_path])
    found = by_sparsity(rows)
    assert (found["2:4"]["decode_tok_s"], found["2:4"]["speedup"], found["2:4"]["backend"]) == (42.5, 1.25, "kernel")
    assert (found["0.5"]["decode_tok_s"], found["0.5"]["speedup"], found["0.5"]["backend"]) == (None, None, None)
    assert found["4:8"]["backend"] == "emulate"  # config.pruning.backend where the benchmark did not run

    names = table.columns(rows)
    assert (
        names.index("calibration")
        < names.index("decode_tok_s")
        < names.index("speedup")
        < names.index("backend")
        < names.index("mean_acc")
        == len(names) - len(table.TAIL)
    )
    header, _, *lines = table.markdown(rows).splitlines()
    cells = {
        line.split(" | ")[2]: dict(zip(header.strip("| ").split(" | "), line.strip("| ").split(" | ")))
        for line in lines
    }
    timed = cells["2:4"]
    assert (timed["decode_tok_s"], timed["speedup"], timed["backend"]) == ("42.5000", "1.2500", "kernel")
    assert (cells["0.5"]["decode_tok_s"], cells["0.5"]["speedup"]) == ("", "")

    table.write_csv(rows, tmp_path / "report.csv")
    with open(tmp_path / "report.csv") as file:
        written = {r["sparsity"]: r for r in csv.DictReader(file)}
    assert (written["2:4"]["decode_tok_s"], written["2:4"]["speedup"]) == ("42.5", "1.25")
    assert (written["0.5"]["decode_tok_s"], written["0.5"]["speedup"], written["0.5"]["backend"]) == ("", "", "")


def test_reports_of_jobs_without_the_benchmark_have_no_speed_columns(tmp_path):
    job(tmp_path, "untimed", sparsity="0.5", pruning={"backend": "emulate"})  # every job's config names one
    rows = table.rows([tmp_path])
    assert not set(table.SPEED) & set(table.columns(rows))
    assert "decode_tok_s" not in table.markdown(rows)


def test_the_job_log_table_shows_speed_where_a_job_measured_it(tmp_path):
    timed = job(tmp_path, "timed", tok_s=42.5, speedup=1.25, backend="kernel")
    untimed = job(tmp_path, "untimed", sparsity="0.5")
    header, _, timed_line, untimed_line = table.table([("timed", timed), ("untimed", untimed)]).splitlines()
    assert header.split()[6:9] == ["tok/s", "speedup", "backend"]
    assert timed_line.split()[6:9] == ["42.5", "1.25", "kernel"] and timed_line.split()[-1] == "ok"
    assert untimed_line.split()[6:9] == ["-", "-", "-"] and untimed_line.split()[-1] == "ok"
    assert "tok/s" not in table.table([("untimed", untimed)])  # the usual log line where nothing was timed


def test_the_speed_plot_is_written_only_where_jobs_have_perplexity_and_speedup(tmp_path):
    job(tmp_path / "timed", "dense", method="dense", ppl=6.0, tok_s=40.0, speedup=1.02)
    job(tmp_path / "timed", "pruned", ppl=8.0, tok_s=44.0, speedup=1.1)
    written = report.report([tmp_path / "timed"], tmp_path / "timed_report")
    assert written["speed_plot"] == tmp_path / "timed_report" / "speed.png"
    assert written["speed_plot"].read_bytes().startswith(b"\x89PNG")

    job(tmp_path / "untimed", "pruned", ppl=8.0)
    job(tmp_path / "no_ppl", "pruned", ppl=None, tok_s=44.0, speedup=1.1)
    for name in ("untimed", "no_ppl"):
        written = report.report([tmp_path / name], tmp_path / f"{name}_report")
        assert "speed_plot" not in written and not (tmp_path / f"{name}_report" / "speed.png").exists()


def test_dense_sits_at_a_speedup_of_exactly_one_and_pruned_jobs_at_their_own(tmp_path):
    job(tmp_path, "dense", method="dense", ppl=6.0, tok_s=40.0, speedup=0.97)
    job(tmp_path, "2:4", sparsity="2:4", ppl=9.0, tok_s=48.0, speedup=1.2)
    job(tmp_path, "4:8", sparsity="4:8", ppl=8.0, tok_s=44.0, speedup=1.1)
    panels = report.speed_points(table.rows([tmp_path]))
    assert panels == {
        ("llama", "emulate", "cuda"): {
            "act_magnitude": [(1.1, 8.0, "4:8"), (1.2, 9.0, "2:4")],
            "dense": [(1.0, 6.0, "dense")],
        }
    }


def test_two_gpus_timed_apart_are_told_apart_by_name(tmp_path):
    for gpu, speedup in (("NVIDIA A100", 1.2), ("NVIDIA H200", 1.4)):  # both recorded as device cuda:0
        job(tmp_path, gpu, tok_s=40.0, speedup=speedup, backend="kernel", device="cuda:0", device_name=gpu)
    panels = report.speed_points(table.rows([tmp_path]))
    assert set(panels) == {("llama", "kernel", "NVIDIA A100"), ("llama", "kernel", "NVIDIA H200")}


def test_emulated_and_kernel_speeds_and_two_devices_are_never_on_one_line(tmp_path):
    job(tmp_path, "dense", method="dense", ppl=6.0, tok_s=40.0, speedup=1.0, backend="none")  # no wrapper
    job(tmp_path, "emulate-2:4", sparsity="2:4", tok_s=20.0, speedup=0.5, backend="emulate")
    job(tmp_path, "emulate-4:8", sparsity="4:8", tok_s=24.0, speedup=0.6, backend="emulate")
    job(tmp_path, "kernel-2:4", sparsity="2:4", tok_s=60.0, speedup=1.5, backend="kernel")
    job(tmp_path, "kernel-4:8", sparsity="4:8", tok_s=56.0, speedup=1.4, backend="kernel")
    job(tmp_path, "cpu-2:4", sparsity="2:4", tok_s=5.0, speedup=1.3, backend="kernel", device="cpu")
    panels = report.speed_points(table.rows([tmp_path]))
    speedups = {
        key: {method: [x for x, _, _ in points] for method, points in lines.items()} for key, lines in panels.items()
    }
    assert speedups == {
        ("llama", "emulate", "cuda"): {"act_magnitude": [0.5, 0.6], "dense": [1.0]},
        ("llama", "kernel", "cpu"): {"act_magnitude": [1.3]},  # the dense job was timed on cuda, not here
        ("llama", "kernel", "cuda"): {"act_magnitude": [1.4, 1.5], "dense": [1.0]},  # dense: every backend's reference
    }


def test_the_speed_plot_goes_to_the_wandb_summary_run(tmp_path):
    job(tmp_path / "sweep", "pruned", tok_s=44.0, speedup=1.1)
    written = report.report([tmp_path / "sweep"], tmp_path / "report")
    report.log_to_wandb(written, "sweep", "actprune", None, "offline", tmp_path / "report")
    assert b"summary/speed_plot" in offline_wandb_log(tmp_path / "report")


def test_a_tables_job_names_leave_out_what_every_job_shares(tmp_path):
    """Long shared overrides (model, data, windows) wrapped every line: they are said once, above."""
    common = "benchmark.ppl_wikitext2.max_windows=24,model.seqlen=512"
    rows = [
        (f"{common},pruning.sparsity=2:4,pruning.transforms=[variance,refit]", job(tmp_path, "a", sparsity="2:4")),
        (f"{common},pruning.sparsity=8:16,pruning.transforms=[variance,refit]", job(tmp_path, "b", sparsity="8:16")),
    ]
    first, header, _, a, b = table.table(rows).splitlines()
    assert first == "every job: " + common + ",pruning.transforms=[variance,refit]"
    assert a.split()[0] == "pruning.sparsity=2:4" and b.split()[0] == "pruning.sparsity=8:16"
    assert table.overrides_of("a=1,t=[x,{name:y,r:[1,2]}],b=2") == ["a=1", "t=[x,{name:y,r:[1,2]}]", "b=2"]
    assert "every job" not in table.table(rows[:1])  # one job: its whole name


def test_a_failed_job_shows_what_it_was_asked_and_why_it_failed(tmp_path):
    failed = {
        "status": "failed",
        "error": "ValueError: pruning.sparsity='abc': allowed values are ...\ntraceback",
        "config": {"pruning": {"method": "act_magnitude", "sparsity": "abc"}},
        "sparsity": {},
        "replaced_layers": None,
        "metrics": {},
    }
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text(json.dumps(failed))
    line = table.table([("bad", failed)]).splitlines()[-1]
    assert line.split()[2] == "abc" and "None" not in line and "?" not in line
    text = table.markdown(table.rows([tmp_path]))
    assert "Jobs not ok:" in text and "(failed): ValueError: pruning.sparsity='abc': allowed values are ..." in text
    assert "traceback" not in text
