"""`pruning.mask_scope=step`: the rows of a call at one position share one mask, and `rows_read` says
what a decode step of the batch reads."""

import pytest
import torch
from torch import nn

from actprune import sparsify_
from actprune.activation import ActSparseLinear
from actprune.masks import POOLS, parse_sparsity, pattern_keep_mask

from .tiny import llama


def pooled_reference(x: torch.Tensor, pool: str) -> torch.Tensor:
    """The shared mask written out: each channel's |x| over the batch (dim 0) pooled, per position."""
    scores = x.abs().float()
    pooled = {
        "mean": scores.sum(0) / x.shape[0],
        "max": scores.max(0).values,
        "rms": (scores * scores).sum(0).div(x.shape[0]).sqrt(),
    }[pool]
    return pattern_keep_mask(pooled, parse_sparsity("8:16"))


@pytest.mark.parametrize("pool", list(POOLS))
def test_the_rows_at_one_position_share_the_mask_of_their_pooled_scores(pool):
    linear = nn.Linear(32, 8)
    step = ActSparseLinear(linear, parse_sparsity("8:16"), mask_scope="step", mask_pool=pool)
    x = torch.randn(4, 5, 32)
    keep = pooled_reference(x, pool)  # (positions, channels)
    torch.testing.assert_close(step(x), (x * keep) @ linear.weight.T + linear.bias)
    token = ActSparseLinear(nn.Linear(32, 8), parse_sparsity("8:16"))
    token(x)
    assert step.measured_sparsity() == token.measured_sparsity() == 0.5
    assert step.measured_rows_read() == 0.5  # one mask per position: half the weight rows
    assert token.measured_rows_read() > 0.85  # four masks of 8 of 16: 1 - 0.5^4 = 0.94 on random inputs


def test_one_row_is_the_token_mask_bit_for_bit_and_a_batch_is_not():
    model = llama()
    token, step = llama(), llama()
    step.load_state_dict(model.state_dict())
    token.load_state_dict(model.state_dict())
    sparsify_(token, {"method": "act_magnitude", "sparsity": "8:16"})
    sparsify_(step, {"method": "act_magnitude", "sparsity": "8:16", "mask_scope": "step"})
    ids = torch.randint(0, 256, (4, 12))
    with torch.no_grad():
        assert torch.equal(step(ids[:1]).logits, token(ids[:1]).logits)
        together = step(ids).logits
        assert not torch.allclose(together, token(ids).logits)
        assert not torch.allclose(together[:1], step(ids[:1]).logits)  # the batch's other rows move its mask


def test_the_report_records_scope_pool_and_rows_read():
    model = llama()
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": "8:16"})
    with torch.no_grad():
        model(torch.randint(0, 256, (8, 16)))
    summary = report.summary()
    assert summary["mask_scope"] == "token" and "mask_pool" not in summary
    assert 0.95 < summary["rows_read"] <= 1.0  # 1 - 0.5^8 on random-like inputs
    step = llama()
    report = sparsify_(step, {"method": "act_magnitude", "sparsity": "8:16", "mask_scope": "step", "mask_pool": "max"})
    with torch.no_grad():
        step(torch.randint(0, 256, (8, 16)))
    summary = report.summary()
    assert summary["mask_scope"] == "step" and summary["mask_pool"] == "max" and summary["rows_read"] == 0.5
    assert summary["measured"] == 0.5


def test_a_threshold_is_compared_with_the_pooled_score():
    linear = nn.Linear(16, 4)
    step = ActSparseLinear(linear, parse_sparsity(0.5), mask_scope="step", mask_pool="mean")
    step.set_threshold(1.0)
    x = torch.randn(3, 7, 16)
    keep = x.abs().mean(0) >= 1.0
    torch.testing.assert_close(step(x), (x * keep) @ linear.weight.T + linear.bias)


@pytest.mark.parametrize(
    "config,words",
    [
        ({"mask_scope": "sequence"}, ["pruning.mask_scope='sequence'", "['token', 'step']", "['mean', 'max', 'rms']"]),
        ({"mask_scope": "step", "mask_pool": "sum"}, ["pruning.mask_pool='sum'", "['mean', 'max', 'rms']"]),
        ({"mask_scope": "step", "method": "weight_magnitude"}, ["pruning.mask_scope=step", "allowed", "token"]),
    ],
)
def test_bad_scopes_and_pools_are_refused_before_loading(config, words):
    with torch.device("meta"):
        model = llama()
    with pytest.raises(ValueError) as error:
        sparsify_(model, {"method": "act_magnitude", "sparsity": "8:16", **config})
    for word in words:
        assert word in str(error.value)


def test_tables_say_the_scope_and_the_batch_it_was_measured_at():
    from actprune.run import table

    def record(batch, scope):
        return {
            "status": "ok",
            "metrics": {"ppl/wikitext2": 10.0},
            "sparsity": {"kind": "activation", "pattern": "8:16", "measured": 0.5, "rows_read": 0.5},
            "config": {
                "pruning": {"method": "act_magnitude", "sparsity": "8:16", "mask_scope": scope, "mask_pool": "max"},
                "benchmark": {"ppl_wikitext2": {"batch_size": batch, "seqlen": 512}},
            },
        }

    header, _, line = table.table([("a", record(4, "step"))]).splitlines()
    assert header.split()[5] == "batch" and line.split()[1:3] == ["act_magnitude", "mask_scope=step:max"]
    assert line.split()[6] == "4"
    assert "batch" not in table.table([("a", record(1, "token"))]).splitlines()[0]  # as before: no batch column
    (row,) = [table.row(record(4, "step"))]
    assert row["batch"] == 4 and row["rows_read"] == 0.5 and "batch" in table.columns([row])
