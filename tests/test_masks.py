import pytest
import torch

from actprune.masks import Pattern, parse_sparsity, pattern_keep_mask, topk_keep_mask


@pytest.mark.parametrize("n,m", [(2, 4), (8, 16), (1, 4), (3, 8), (16, 32)])
def test_nm_keeps_exactly_n_largest_per_group(n, m):
    x = torch.randn(3, 5, 4 * m)
    keep = topk_keep_mask(x.abs(), n, m)
    groups = keep.unflatten(-1, (-1, m))
    assert (groups.sum(-1) == n).all()
    scores = x.abs().unflatten(-1, (-1, m))
    kept_min = scores.masked_fill(~groups, float("inf")).amin(-1)
    dropped_max = scores.masked_fill(groups, float("-inf")).amax(-1)
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("width", [64, 172, 576])
def test_ratio_is_exact_per_token(ratio, width):
    x = torch.randn(7, width)
    keep = pattern_keep_mask(x.abs(), parse_sparsity(ratio))
    expected_kept = width - round(ratio * width)
    assert (keep.sum(-1) == expected_kept).all()


def test_ties_break_deterministically_towards_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 5.0, 2.0, 2.0, 2.0]])
    keep = topk_keep_mask(scores, 2, 4)
    assert keep.tolist() == [[True, True, False, False, True, True, False, False]]
    assert torch.equal(keep, topk_keep_mask(scores.clone(), 2, 4))


def test_all_equal_and_bf16_ties_still_keep_exactly_n():
    scores = torch.randn(4, 64).to(torch.bfloat16).round()
    keep = topk_keep_mask(scores.abs(), 8, 16)
    assert (keep.unflatten(-1, (-1, 16)).sum(-1) == 8).all()
    zeros = torch.zeros(2, 16)
    assert topk_keep_mask(zeros, 2, 4).sum().item() == 2 * 4 * 2


def test_token_mask_does_not_depend_on_other_tokens():
    x = torch.randn(4, 10, 64)
    keep = pattern_keep_mask(x.abs(), parse_sparsity("8:16"))
    alone = pattern_keep_mask(x[2:3, 4:5].abs(), parse_sparsity("8:16"))
    assert torch.equal(keep[2:3, 4:5], alone)
    x_changed = x.clone()
    x_changed[0] *= 100
    assert torch.equal(
        pattern_keep_mask(x_changed.abs(), parse_sparsity(0.5))[1:], pattern_keep_mask(x.abs(), parse_sparsity(0.5))[1:]
    )


@pytest.mark.parametrize(
    "value,expected",
    [
        (0.5, Pattern(ratio=0.5)),
        ("2:4", Pattern(n=2, m=4)),
        (" 8 : 16 ", Pattern(n=8, m=16)),
        ("0.25", Pattern(ratio=0.25)),
        (0, Pattern(ratio=0.0)),
    ],
)
def test_parse_sparsity(value, expected):
    assert parse_sparsity(value) == expected


@pytest.mark.parametrize(
    "value,words",
    [
        (1.0, "outside [0, 1)"),
        (-0.1, "outside [0, 1)"),
        ("4:4", "1 <= N < M"),
        ("0:4", "1 <= N < M"),
        ("5:4", "1 <= N < M"),
        ("2-4", "malformed"),
        ("half", "malformed"),
        (True, "expected"),
        ([2, 4], "type"),
    ],
)
def test_bad_sparsity_names_the_key_and_allowed_values(value, words):
    with pytest.raises(ValueError, match="pruning.sparsity") as error:
        parse_sparsity(value)
    assert words in str(error.value) and "N:M" in str(error.value)


def test_pattern_targets():
    assert parse_sparsity("2:4").target() == 0.5 and parse_sparsity("3:4").target() == 0.25
    assert parse_sparsity(0.0).is_dense() and not parse_sparsity("8:16").is_dense()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (8, 16), (100, 256)])
def test_tie_resolution_path_equals_the_plain_path_and_keeps_n(dtype, n, m):
    scores = torch.randn(6, 2 * m).abs().to(dtype)
    if dtype == torch.bfloat16:
        scores = (scores * 4).round() / 4  # many ties
    resolved = topk_keep_mask(scores, n, m, resolve_ties=True)
    assert (resolved.unflatten(-1, (-1, m)).sum(-1) == n).all()
    assert torch.equal(resolved, topk_keep_mask(scores, n, m))  # the automatic choice
    if dtype == torch.float32:  # no ties: the comparison alone is already exact
        assert torch.equal(resolved, topk_keep_mask(scores, n, m, resolve_ties=False))
