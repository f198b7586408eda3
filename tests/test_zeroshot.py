"""lm-evaluation-harness on the pruned model in memory, with the shared task rows."""

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from actprune import sparsify_
from actprune.eval import zeroshot
from actprune.eval.zeroshot import LmEvalOptions

from .conftest import REPO, SHARED_DATA, STORIES, needs_shared

TASKS = ["boolq", "winogrande", "piqa", "arc_easy"]
SPLITS = {"boolq": "validation", "winogrande": "validation", "piqa": "validation", "arc_easy": "test"}


def options(**overrides):
    return OmegaConf.merge(OmegaConf.structured(LmEvalOptions(apply_chat_template=False)), overrides)


def direct_lm_eval(tmp_path, limit):
    """lm_eval on its own: its `hf` model loads the folder; task YAMLs written here point at the rows."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    for task in TASKS:
        builtin = TaskManager().task_index[task].yaml_path
        split = SPLITS[task]
        (tmp_path / f"{task}.yaml").write_text(
            f"include: {builtin}\ntask: {task}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {SHARED_DATA / 'lm_eval' / task / f'{split}.jsonl'}\n"
            f"training_split: null\nvalidation_split: {split if split == 'validation' else 'null'}\n"
            f"test_split: {split if split == 'test' else 'null'}\n"
        )
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={STORIES},dtype=float32",
        tasks=TASKS,
        num_fewshot=0,
        limit=limit,
        batch_size=4,
        device="cpu",
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    return output["results"]


def run_cli(tmp_path, *overrides):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "actprune",
            f"model.path={STORIES}",
            "model.seqlen=512",
            f"paths.data_dir={SHARED_DATA}",
            "logger=none",
            "benchmark=[lm_eval]",
            f"hydra.run.dir={tmp_path}",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done, json.loads((tmp_path / "results.json").read_text())


@pytest.mark.cli
@needs_shared
def test_dense_scores_equal_lm_eval_run_directly_and_pruned_scores_differ(tmp_path):
    limit = 40
    done, dense = run_cli(tmp_path / "dense", "pruning=dense", f"benchmark.lm_eval.limit={limit}")
    assert dense["status"] == "ok", dense["error"]
    (tmp_path / "reference").mkdir()
    reference = direct_lm_eval(tmp_path / "reference", limit)
    for task in TASKS:
        assert dense["metrics"][f"lm_eval/{task}/acc"] == reference[task]["acc,none"], task
        assert dense["metrics"][f"lm_eval/{task}/acc_stderr"] == reference[task]["acc_stderr,none"], task
        if "acc_norm,none" in reference[task]:
            assert dense["metrics"][f"lm_eval/{task}/acc_norm"] == reference[task]["acc_norm,none"], task
    assert "lm_eval/winogrande/acc_norm" not in dense["metrics"] and "lm_eval/piqa/acc_norm" in dense["metrics"]
    assert dense["metrics"]["lm_eval/mean_acc"] == pytest.approx(sum(reference[t]["acc,none"] for t in TASKS) / 4)
    details = dense["lm_eval"]
    assert details["limit"] == limit and details["num_fewshot"] == 0 and details["apply_chat_template"] is False
    assert details["task_versions"]["boolq"] == 2.0 and details["lm_eval_version"]
    assert all(dense["lm_eval_data"][t].endswith(f"{t}/{SPLITS[t]}.jsonl") for t in TASKS)
    assert dense["timings"]["lm_eval"] > 0

    done, pruned = run_cli(
        tmp_path / "pruned", "pruning=act_magnitude", "pruning.sparsity=2:4", f"benchmark.lm_eval.limit={limit}"
    )
    assert pruned["status"] == "ok", pruned["error"]
    assert pruned["sparsity"]["measured"] == 0.5
    assert any(pruned["metrics"][f"lm_eval/{t}/acc"] != dense["metrics"][f"lm_eval/{t}/acc"] for t in TASKS)


@needs_shared
def test_batch_size_is_the_batch_lm_eval_uses_and_scores_do_not_depend_on_it(tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    caplog.set_level("INFO", logger="actprune.eval.zeroshot")
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    sparsify_(model, {"method": "act_magnitude", "sparsity": 0.5})
    scores = {}
    for batch_size in (1, 5):
        batches = []
        hook = model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
        chosen = options(tasks=["piqa"], limit=10, batch_size=batch_size)
        tasks, _, _ = zeroshot.prepare(chosen, str(SHARED_DATA), tmp_path / str(batch_size))
        result = zeroshot.evaluate(model, tokenizer, chosen, tasks, seed=0)
        hook.remove()
        assert max(batches) == batch_size and result["details"]["batch_size"] == batch_size
        scores[batch_size] = (result["metrics"]["lm_eval/piqa/acc"], result["metrics"]["lm_eval/piqa/acc_norm"])
    assert scores[1] == scores[5]
    acc = f"{scores[5][0]:.4f}"  # each task's accuracy is said in the job's log, not only in results.json
    assert any(
        r.message.startswith(f"lm_eval piqa: acc {acc} ± ") and r.message.endswith("on 10 rows") for r in caplog.records
    )


def test_unknown_task_names_the_close_matches(tmp_path):
    with pytest.raises(ValueError) as error:
        zeroshot.prepare(options(tasks=["boolq", "arc_esay"]), None, tmp_path)
    assert (
        "benchmark.lm_eval.tasks" in str(error.value)
        and "'arc_esay'" in str(error.value)
        and "arc_easy" in str(error.value)
    )


def test_task_without_local_rows_or_reachable_data_says_where_files_go(tmp_path):
    (tmp_path / "lm_eval").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        zeroshot.prepare(options(tasks=["piqa"]), str(tmp_path), tmp_path / "work")
    assert str(tmp_path / "lm_eval" / "piqa") in str(error.value) and "validation.jsonl" in str(error.value)


@pytest.mark.cli
@needs_shared
def test_bad_task_fails_before_the_model_is_loaded(tmp_path):
    done, result = run_cli(tmp_path, "benchmark.lm_eval.tasks=[piqa,hellaswagg]")
    assert done.returncode != 0 and result["status"] == "failed"
    assert "hellaswag" in result["error"] and "load" not in result["timings"]


def test_few_shot_examples_come_from_another_split_where_there_is_one(tmp_path, caplog):
    rows = [
        {"goal": f"How to start the game {i}?", "sol1": "Press start.", "sol2": "Carry on.", "label": i % 2}
        for i in range(4)
    ]
    folder = tmp_path / "lm_eval" / "piqa"
    folder.mkdir(parents=True)
    (folder / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _, _, fewshot = zeroshot.prepare(options(tasks=["piqa"], num_fewshot=1), str(tmp_path), tmp_path / "work")
    assert fewshot == {"piqa": "validation"} and "the rows it scores" in caplog.text  # nothing else there: said so
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    caplog.clear()
    tasks, _, fewshot = zeroshot.prepare(options(tasks=["piqa"], num_fewshot=1), str(tmp_path), tmp_path / "work2")
    assert fewshot == {"piqa": "train"} and "the rows it scores" not in caplog.text
    assert len(list(tasks[0].fewshot_docs())) == 4 and tasks[0].config.validation_split == "validation"


def test_lm_evals_task_index_is_built_once_per_process(tmp_path, monkeypatch):
    """Indexing lm_eval's ~14,700 tasks takes about 40 s: once per process, not twice per job. Tasks
    read from local rows load from their overrides alone."""
    from lm_eval import tasks as lm_eval_tasks

    built = []
    real = lm_eval_tasks.TaskManager

    def counting(*args, **kwargs):
        built.append(kwargs.get("include_defaults", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval_tasks, "TaskManager", counting)
    zeroshot.task_index.cache_clear()
    folder = tmp_path / "lm_eval" / "piqa"
    folder.mkdir(parents=True)
    (folder / "validation.jsonl").write_text(
        json.dumps({"goal": "Start?", "sol1": "Press.", "sol2": "Wait.", "label": 0}) + "\n"
    )
    arc = tmp_path / "lm_eval" / "arc_easy"
    arc.mkdir()
    (arc / "test.jsonl").write_text(
        json.dumps(
            {
                "id": "1",
                "question": "Which?",
                "answerKey": "A",
                "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
            }
        )
        + "\n"
    )
    for job in range(2):
        tasks, sources, _ = zeroshot.prepare(
            options(tasks=["piqa", "arc_easy"]), str(tmp_path), tmp_path / f"work{job}"
        )
        assert sources == {"piqa": str(folder / "validation.jsonl"), "arc_easy": str(arc / "test.jsonl")}
        assert {task.config.task for task in tasks} == {"piqa", "arc_easy"}
        assert [len(list(task.eval_docs)) for task in tasks] == [1, 1]  # the local rows
    assert built.count(True) == 1


def test_requests_longer_than_the_context_are_counted_in_one_line_and_local_rows_read_quietly(
    tiny_setup, tmp_path, caplog, capfd
):
    """lm_eval warns once per request it cuts (twice on screen); the job says how many, once. Other
    records of that logger pass."""
    import logging

    from transformers import AutoTokenizer

    from .tiny import llama

    model = llama(vocab_size=256, max_position_embeddings=10)  # 8 of the 12 piqa requests are longer
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["model"])
    chosen = options(tasks=["piqa"], batch_size=4)
    tasks, _, _ = zeroshot.prepare(chosen, str(tiny_setup["data"]), tmp_path)
    with caplog.at_level(logging.WARNING):
        zeroshot.evaluate(model, tokenizer, chosen, tasks, seed=0)
    assert not [r for r in caplog.records if "Truncating" in r.getMessage()]
    (said,) = [r.getMessage() for r in caplog.records if r.name == "actprune.eval.zeroshot"]
    assert said == "lm_eval cut 8 requests longer than the model's context (10 tokens) from the left"
    printed = capfd.readouterr().err
    assert "Truncating" not in printed and "Generating validation split" not in printed
    other = logging.LogRecord("lm_eval.models.huggingface", logging.ERROR, "", 0, "CUDA out of memory", None, None)
    assert zeroshot.Truncations().filter(other)
