import math
from pathlib import Path

import pytest
import torch

from actprune import perplexity, sparsify_
from actprune.eval.perplexity import split_windows

from .tiny import llama


class CharTokenizer:
    """Stands in for a tokenizer: one id per byte, tokenized once like the real protocol."""

    def __call__(self, text, return_tensors="pt"):
        return type("Encoding", (), {"input_ids": torch.tensor([list(text.encode()[:4000])]) % 256})


TEXT = "\n\n".join(["The quick brown fox jumps over the lazy dog, again and again."] * 60)


def test_windows_are_non_overlapping_and_drop_the_remainder():
    ids = torch.arange(103)
    batches = split_windows(ids, 10)
    assert batches.shape == (10, 10) and batches[1, 0] == 10 and batches[-1, -1] == 99
    assert split_windows(ids, 10, max_windows=3).shape == (3, 10)
    with pytest.raises(ValueError, match="longer than the text"):
        split_windows(ids, 200)


def test_perplexity_is_exp_of_mean_token_nll():
    model = llama()
    result = perplexity(model, CharTokenizer(), TEXT, seqlen=64, max_windows=4)
    ids = split_windows(CharTokenizer()(TEXT).input_ids[0], 64, 4)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in ids]
    assert result["ppl"] == pytest.approx(math.exp(sum(losses) / 4), rel=1e-5)
    assert result["windows"] == 4 and result["tokens"] == 4 * 63


def test_pruned_perplexity_does_not_change_with_batch_size():
    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4"})
    one = perplexity(model, CharTokenizer(), TEXT, seqlen=64, batch_size=1, max_windows=6)["ppl"]
    four = perplexity(model, CharTokenizer(), TEXT, seqlen=64, batch_size=4, max_windows=6)["ppl"]
    assert one == pytest.approx(four, rel=1e-5)


def test_non_finite_perplexity_is_an_error():
    model = llama()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        perplexity(model, CharTokenizer(), TEXT, seqlen=64, max_windows=2)


def test_per_window_nll_is_recorded_and_a_paired_comparison_reads_it(tmp_path, capsys):
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import paired_windows

    model = llama()
    dense = perplexity(model, CharTokenizer(), TEXT, seqlen=64, batch_size=1, max_windows=6)
    by_three = perplexity(model, CharTokenizer(), TEXT, seqlen=64, batch_size=3, max_windows=6)
    assert len(dense["window_nll"]) == 6 and sum(dense["window_nll"]) / 6 == pytest.approx(dense["mean_nll"], rel=1e-12)
    assert by_three["window_nll"] == pytest.approx(dense["window_nll"], rel=1e-6)
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4"})
    pruned = perplexity(model, CharTokenizer(), TEXT, seqlen=64, max_windows=6)
    for name, result in (("dense", dense), ("pruned", pruned)):
        (tmp_path / name).mkdir()
        record = {"config": {"pruning": {"method": name}}, "sparsity": {"pattern": "2:4"}, "ppl_wikitext2": result}
        (tmp_path / name / "results.json").write_text(json.dumps(record))
    paired_windows.main([str(tmp_path / "pruned"), str(tmp_path / "dense")])
    printed = capsys.readouterr().out
    wins = sum(p > d for p, d in zip(pruned["window_nll"], dense["window_nll"]))
    assert f"ppl {dense['ppl']:.2f}" in printed and f"lower on {wins}/6 windows" in printed


def test_local_rows_are_read_without_the_datasets_progress_bars(tiny_setup, tmp_path, capfd):
    """A local file read into a fresh Arrow cache prints no `Generating train split`; bars stay on for others."""
    import datasets

    from actprune.calibration import corpus_text
    from actprune.eval.perplexity import wikitext2_test_text

    text, source = wikitext2_test_text(str(tiny_setup["data"]), cache_dir=str(tmp_path / "cache"))
    calibration, _ = corpus_text("wikitext2_validation", str(tiny_setup["data"]), str(tmp_path / "cache"))
    assert source.endswith("test.jsonl") and text.startswith(" = Valkyria") and calibration != text
    assert "Generating" not in capfd.readouterr().err
    assert not datasets.are_progress_bars_disabled()


@pytest.mark.parametrize("scope", ["token", "step"])
def test_a_short_last_batch_of_shared_masks_is_said_and_recorded(scope, caplog):
    from actprune.eval import Env
    from actprune.eval.perplexity import PerplexityOptions, WikiText2Perplexity

    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "mask_scope": scope})
    benchmark = WikiText2Perplexity(PerplexityOptions(seqlen=300, batch_size=5))  # 3778 ids: 12 windows
    benchmark.text, benchmark.source = TEXT, "test"
    details = benchmark.run(model, CharTokenizer(), Env(model_key=("test", scope))).details
    assert details["windows"] == 12
    if scope == "step":  # the last 2 windows shared their masks by two: say so
        assert details["last_batch_windows"] == 2
        assert "shares its masks over 2 windows, not batch_size=5" in caplog.text
    else:  # each token has its own mask whatever the batch
        assert "last_batch_windows" not in details and "shares its masks" not in caplog.text
