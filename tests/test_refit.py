"""`refit`: closed-form weights for the pruned input, fitted layer by layer on calibration windows."""

import copy
import re
import weakref

import pytest
import torch

from actprune import calibration, plan, sparsify_
from actprune.activation import ActSparseLinear
from actprune.activation import refit as refit_module
from actprune.activation.refit import DEFAULTS, Moments, check_tokens, fit_layer, options_of, ridge_solve
from actprune.masks import parse_sparsity
from actprune.run.job import plan_job

from .helpers import job_config
from .tiny import llama, qwen2

WINDOWS = torch.randint(0, 256, (8, 40), generator=torch.Generator().manual_seed(1))
REFIT = {"name": "refit", "skip_tokens": 2, "min_tokens_per_dim": 0}


class PositionTokenizer:
    """Each word's token is its position: a window's tokens say where in the text it lies."""

    def __call__(self, text, return_tensors="pt"):
        return type("Encoding", (), {"input_ids": torch.arange(len(text.split()))[None]})


@pytest.mark.parametrize("tokens,count,seqlen", [(1000, 8, 40), (1000, 25, 40), (999, 128, 7), (64, 1, 64)])
def test_calibration_windows_never_share_a_token_and_depend_on_the_seed_alone(tokens, count, seqlen):
    text = " ".join(["w"] * tokens)
    windows = calibration.sample_windows(PositionTokenizer(), text, count, seqlen, seed=3)
    assert windows.shape == (count, seqlen)
    assert torch.equal(windows - windows[:, :1], torch.arange(seqlen).expand(count, -1))  # contiguous text
    assert windows.unique().numel() == count * seqlen  # no position in two windows
    assert torch.equal(windows, calibration.sample_windows(PositionTokenizer(), text, count, seqlen, seed=3))
    if count * seqlen < tokens:
        assert not torch.equal(windows, calibration.sample_windows(PositionTokenizer(), text, count, seqlen, seed=4))


def test_more_calibration_tokens_than_the_text_holds_are_refused():
    with pytest.raises(
        ValueError,
        match="calibration.windows=26 x calibration.seqlen=40 = 1040 tokens: more than the calibration text's 1000",
    ):
        calibration.sample_windows(PositionTokenizer(), " ".join(["w"] * 1000), 26, 40, seed=0)


def test_the_ridge_solution_is_the_dense_weight_when_nothing_is_pruned():
    weight, bias = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    moments = Moments(6, 5, intercept=True, skip_tokens=0, device="cpu")
    x = torch.randn(200, 6, dtype=torch.float64)
    moments.add(x, x @ weight.T + bias)
    start = torch.cat([torch.randn_like(weight), torch.zeros(5, 1, dtype=torch.float64)], 1)  # shrunk elsewhere
    torch.testing.assert_close(
        ridge_solve(moments, start, 1e-9), torch.cat([weight, bias[:, None]], 1), rtol=1e-6, atol=1e-6
    )
    assert moments.error(torch.cat([weight, bias[:, None]], 1)) == pytest.approx(0, abs=1e-9)


def test_the_moments_error_is_the_mean_squared_error_it_stands_for():
    moments = Moments(4, 3, intercept=False, skip_tokens=1, device="cpu")
    p, t = torch.randn(2, 9, 4), torch.randn(2, 9, 3)
    moments.add(p, t)
    w = torch.randn(3, 4, dtype=torch.float64)
    expected = ((t[:, 1:].double() - p[:, 1:].double() @ w.T) ** 2).sum() / (2 * 8)  # first token of each left out
    assert moments.tokens == 16 and moments.error(w) == pytest.approx(float(expected))


@pytest.mark.parametrize("transforms", [["shift", REFIT], ["hadamard", {"name": "shift", "mode": "static"}, REFIT]])
def test_refit_is_exact_when_nothing_is_pruned(transforms):
    model = qwen2()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
        report = sparsify_(model, {"method": "act_magnitude", "sparsity": 0.0, "transforms": transforms}, WINDOWS)
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)
    assert report.refit["layers"] and report.refit["refit_layers"] == 0  # nothing to gain: every layer keeps W


def test_refit_lowers_the_error_of_each_refit_layer_on_held_out_windows_and_keeps_the_mask():
    base = llama()
    plain, refit = copy.deepcopy(base), copy.deepcopy(base)
    config = {"method": "act_magnitude", "sparsity": "2:4"}
    sparsify_(plain, config, WINDOWS)
    report = sparsify_(refit, {**config, "transforms": [REFIT]}, WINDOWS)
    layers = report.refit["layers"]
    assert report.refit["refit_layers"] > 0 and report.seconds["refit"] > 0
    for name, record in layers.items():
        assert (record["refit"] < record["plain"]) if not record["kept"] else record["ridge"] is None, name
    # Independently of the moments: the decoder layers' first projections on the held-out windows.
    held = WINDOWS[-2:]
    for name in [n for n in layers if n.endswith(("q_proj", "gate_proj")) and not layers[n]["kept"]]:
        wrapper = refit.get_submodule(name)
        seen = []
        handle = wrapper.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        with torch.no_grad():
            refit(held)
        handle.remove()
        x = torch.cat(seen)[:, 2:]  # the tokens the moments counted
        dense = torch.nn.functional.linear(x, wrapper.linear.weight, wrapper.linear.bias)
        with torch.no_grad():
            after = (wrapper(x) - dense).pow(2).mean()
            weights = wrapper.refit_weight, wrapper.refit_bias
            wrapper.refit_weight = wrapper.refit_bias = None
            before = (wrapper(x) - dense).pow(2).mean()
            wrapper.refit_weight, wrapper.refit_bias = weights
        assert after < before, name
    # The mask is plain pruning's: on the same input, every layer zeroes the same entries.
    for name in layers:
        x = torch.randn(2, 5, refit.get_submodule(name).in_features)
        masks = [
            model.get_submodule(name).keep_mask(x, model.get_submodule(name).channel_weight)[0]
            for model in (plain, refit)
        ]
        assert torch.equal(*masks), name


def test_a_refit_tokens_output_does_not_depend_on_the_batch():
    model = llama()
    sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "transforms": [REFIT]}, WINDOWS)
    ids = torch.randint(0, 256, (3, 10))
    with torch.no_grad():
        together = model(ids).logits
        alone = torch.cat([model(ids[i : i + 1]).logits for i in range(3)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


def test_dense_stream_statistics_and_a_layer_that_gains_nothing_keeps_its_weights():
    model = llama()
    report = sparsify_(
        model,
        {"method": "act_magnitude", "sparsity": "8:16", "transforms": [{**REFIT, "stream": "dense", "ridge": [1e6]}]},
        WINDOWS,
    )
    # A ridge this strong keeps W′ at W: no held-out error is lower, so every layer keeps W exactly.
    assert report.refit["refit_layers"] == 0 and report.refit["options"]["stream"] == "dense"
    assert all(m.refit_weight is None for m in model.modules() if isinstance(m, ActSparseLinear))


def test_fit_layer_keeps_w_where_refitting_does_not_lower_the_held_out_error():
    wrapper = ActSparseLinear(torch.nn.Linear(4, 3), parse_sparsity("2:4"))
    fit, held = (Moments(4, 3, True, 0, "cpu") for _ in range(2))
    x = torch.randn(50, 4)
    fit.add(x, torch.randn(50, 3))  # noise: nothing to learn
    with torch.no_grad():
        held.add(x, torch.nn.functional.linear(x, wrapper.linear.weight, wrapper.linear.bias))
    record = fit_layer(wrapper, fit, held, options_of({"ridge": [1e-6]}))
    assert record["kept"] and wrapper.refit_weight is None


def test_fit_layer_chooses_lambda_on_held_out_windows_then_fits_on_all_of_them(monkeypatch):
    """The final W′, b′ are the ridge solution on the fit and held-out moments together, with λ from
    the mean diagonal of their Σ p pᵀ; the held-out moments' memory is released before that solve."""
    wrapper = ActSparseLinear(torch.nn.Linear(4, 3), parse_sparsity("2:4"))
    mapping, offset = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x = [torch.randn(n, 4, dtype=torch.float64) for n in (60, 20)]
    fit, held = (Moments(4, 3, True, 0, "cpu") for _ in range(2))
    for moments, p in zip((fit, held), x):
        moments.add(p, p @ mapping.T + offset + 0.1 * torch.randn(len(p), 3, dtype=torch.float64))
    pp, tp = fit.pp + held.pp, fit.tp + held.tp  # kept aside: fit_layer changes the moments in place
    held_pp, solves = weakref.ref(held.pp), []
    real = refit_module.ridge_solve
    monkeypatch.setattr(refit_module, "ridge_solve", lambda *args: solves.append(held_pp() is None) or real(*args))
    record = fit_layer(wrapper, fit, held, options_of({"ridge": [1e-3]}))
    assert not record["kept"] and solves == [False, True]  # λ chosen with the held-out moments, then released
    lam = 1e-3 * pp.diagonal()[:4].mean()
    start = torch.cat([wrapper.linear.weight.detach().double(), torch.zeros(3, 1, dtype=torch.float64)], 1)
    expected = torch.linalg.solve(pp + lam * torch.eye(5, dtype=torch.float64), (tp + lam * start).T).T
    torch.testing.assert_close(wrapper.refit_weight.double(), expected[:, :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        wrapper.refit_bias.double(), wrapper.linear.bias.double() + expected[:, 4], rtol=1e-5, atol=1e-5
    )


def test_each_layers_moments_are_freed_once_it_is_fitted(monkeypatch):
    """No earlier layer's moments are alive when the next layer is fitted or its moments created."""
    fitted = []  # weak references to the moments of the layers fitted so far
    real = refit_module.fit_layer

    def spy(wrapper, fit, held, options):
        assert all(ref() is None for ref in fitted), "an earlier layer's moments are still held"
        fitted.extend([weakref.ref(fit), weakref.ref(held)])
        return real(wrapper, fit, held, options)

    class Tracked(Moments):
        def __init__(self, *args):
            assert all(ref() is None for ref in fitted), "moments created while an earlier layer's are held"
            super().__init__(*args)

    monkeypatch.setattr(refit_module, "fit_layer", spy)
    monkeypatch.setattr(refit_module, "Moments", Tracked)
    model = llama()
    report = sparsify_(model, {"method": "act_magnitude", "sparsity": "2:4", "transforms": [REFIT]}, WINDOWS)
    assert len(fitted) == 2 * len(report.refit["layers"]) == 2 * 2 * 7
    assert not any(m.busy for m in model.modules() if isinstance(m, ActSparseLinear))


@pytest.mark.parametrize("stream", ["dense", "sequential"])
def test_each_stream_fits_a_decoder_layer_on_the_inputs_it_names(stream):
    """`dense`: layer 1 is fitted on the dense model's inputs; `sequential`: on those of the model
    whose layer 0 is already pruned and refit (the final model's)."""
    model = llama()
    dense = copy.deepcopy(model)

    def layer_inputs(of, when=lambda: True):
        seen = []

        def record(module, args, kwargs):
            if when():
                seen.append((args[0] if args else kwargs["hidden_states"]).clone())

        handle = of.model.layers[1].register_forward_pre_hook(record, with_kwargs=True)
        return seen, handle

    fitted, handle = layer_inputs(model, lambda: getattr(model.model.layers[1].self_attn.q_proj, "busy", False))
    sparsify_(
        model, {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{**REFIT, "stream": stream}]}, WINDOWS
    )
    handle.remove()
    references = {}
    for name, of in (("dense", dense), ("sequential", model)):
        seen, handle = layer_inputs(of)
        with torch.no_grad():
            for window in WINDOWS:
                of(window[None], use_cache=False)
        handle.remove()
        references[name] = torch.cat(seen)
    assert not torch.allclose(references["dense"], references["sequential"], atol=1e-3)  # the streams differ
    torch.testing.assert_close(torch.cat(fitted), references[stream], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options,words",
    [
        ({"ridge": float("inf")}, "refit ridge=inf: allowed values are a positive finite number"),
        ({"ridge": [0.1, float("nan")]}, "refit ridge=\\[0.1, nan\\]: allowed values are a positive finite number"),
        ({"ridge": True}, "refit ridge=True: allowed values are a positive finite number"),
        ({"ridge": "abc"}, "refit ridge='abc': allowed values are a positive finite number"),
        ({"skip_tokens": 2.5}, "refit skip_tokens=2.5: allowed values are an integer >= 0"),
        ({"skip_tokens": -1}, "refit skip_tokens=-1: allowed values are an integer >= 0"),
        ({"intercept": "abc"}, "refit intercept='abc': allowed values are true or false"),
        ({"holdout": "abc"}, "refit holdout='abc': allowed values are a number between 0 and 1"),
        ({"holdout": 0}, "refit holdout=0: allowed values are a number between 0 and 1"),
        ({"min_tokens_per_dim": "abc"}, "refit min_tokens_per_dim='abc': allowed values are a number >= 0"),
        ({"min_tokens_per_dim": -1}, "refit min_tokens_per_dim=-1: allowed values are a number >= 0"),
        ({"stream": ["dense"]}, "refit stream=\\['dense'\\]: allowed values are \\['sequential', 'dense'\\]"),
        (
            {"skip_tokens": 40, "min_tokens_per_dim": 0},
            "refit skip_tokens=40 leaves no token of calibration.seqlen=40 "
            "to fit: allowed values are skip_tokens < calibration.seqlen",
        ),
    ],
)
def test_options_refit_would_ignore_are_refused_in_the_plan_and_by_sparsify(options, words):
    with pytest.raises(ValueError, match=f"pruning.transforms: {words}"):
        check_tokens(options_of(options), 8, 40, [64])
    with pytest.raises(ValueError, match=words):
        sparsify_(
            llama(),
            {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "refit", **options}]},
            WINDOWS,
        )


@pytest.mark.parametrize(
    "options,words",
    [
        ({"lambda": 1}, "refit has no option \\['lambda'\\]"),
        ({"ridge": -1}, "refit ridge=-1: allowed values are a positive finite number"),
        ({"stream": "both"}, "refit stream='both': allowed values are \\['sequential', 'dense'\\]"),
        ({"holdout": 1.5}, "holdout=1.5"),
    ],
)
def test_bad_refit_options_name_the_option(options, words):
    with pytest.raises(ValueError, match=words):
        sparsify_(
            llama(),
            {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "refit", **options}]},
            WINDOWS,
        )


def test_too_few_calibration_tokens_are_refused_before_loading(tiny_setup, tmp_path):
    cfg = job_config(
        tiny_setup,
        tmp_path,
        "pruning=act_magnitude",
        "pruning.sparsity=2:4",
        "pruning.transforms=[refit]",
        "calibration.windows=2",
        "calibration.seqlen=32",
    )
    with pytest.raises(
        ValueError, match="refit fits on 28 calibration tokens .* raise calibration.windows to at least"
    ):
        plan_job(cfg, tmp_path)
    with pytest.raises(
        ValueError, match="calibration.windows >= 2 with this holdout \\(no holdout leaves 1 of 1 window to fit"
    ):
        sparsify_(llama(), {"method": "act_magnitude", "sparsity": "2:4", "transforms": [REFIT]}, WINDOWS[:1])
    assert DEFAULTS["min_tokens_per_dim"] == 4


@pytest.mark.parametrize("windows,holdout", [(4, 0.99), (3, 0.9), (10, 0.97)])
def test_a_holdout_that_leaves_no_window_to_fit_names_both_fixes_each_the_least_that_does(windows, holdout):
    """4 windows at holdout 0.99 once asked for more windows alone; a smaller holdout does too."""
    check = lambda count, h: check_tokens(options_of({"holdout": h, "min_tokens_per_dim": 0}), count, 40, [64])  # noqa: E731
    with pytest.raises(
        ValueError, match=f"refit holdout={holdout} holds out {windows} of calibration.windows={windows}"
    ) as error:
        check(windows, holdout)
    found = re.search(
        r"calibration.windows >= (\d+) with this holdout, or holdout <= ([\d.]+) with these", str(error.value)
    )
    more, lower = int(found[1]), float(found[2])
    check(more, holdout)
    check(windows, lower)
    for fewer, higher in ((more - 1, holdout), (windows, round(lower + 0.01, 2))):
        with pytest.raises(ValueError, match="leaving none to fit"):
            check(fewer, higher)


@pytest.mark.parametrize("windows,holdout", [(4, 0.99), (10, 0.97)])
def test_a_holdout_that_leaves_no_window_to_fit_advises_what_leaves_enough_tokens_to_fit(windows, holdout):
    """4 windows at holdout 0.99 once advised holdout <= 0.87: one window to fit, which the token check
    then refused (a layer of 65 inputs needs 65 tokens, two windows of 36)."""
    check = lambda count, h: check_tokens(options_of({"holdout": h, "min_tokens_per_dim": 1}), count, 40, [64])  # noqa: E731
    with pytest.raises(ValueError, match="leaving none to fit") as error:
        check(windows, holdout)
    found = re.search(
        r"calibration.windows >= (\d+) with this holdout, or holdout <= ([\d.]+) with these", str(error.value)
    )
    check(int(found[1]), holdout)
    check(windows, float(found[2]))


def test_the_windows_asked_for_too_few_tokens_are_the_fewest_that_do():
    options = options_of({"holdout": 0.25})
    with pytest.raises(ValueError, match="raise calibration.windows to at least") as error:
        check_tokens(options, 4, 32, [64])
    windows = int(re.search(r"raise calibration.windows to at least (\d+)", str(error.value))[1])
    check_tokens(options, windows, 32, [64])
    with pytest.raises(ValueError, match="refit fits on"):
        check_tokens(options, windows - 1, 32, [64])


def test_a_ridge_that_leaves_the_solve_at_w_or_overflows_is_refused_and_a_non_finite_error_fails():
    """ridge: 1e308, the old `inf` one step below it, gave every layer a NaN error: all kept W, labelled refit."""
    for ridge in (1e308, [0.1, 2.0**53]):
        with pytest.raises(
            ValueError, match="refit ridge=.*allowed values are a positive finite number up to 2\\*\\*52"
        ):
            plan(
                llama(),
                {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{"name": "refit", "ridge": ridge}]},
            )
    assert options_of({"ridge": refit_module.MAX_RIDGE})["ridge"] == [2.0**52]
    wrapper = ActSparseLinear(torch.nn.Linear(4, 3), parse_sparsity("2:4"))
    fit, held = (Moments(4, 3, True, 0, "cpu") for _ in range(2))
    for moments in (fit, held):
        moments.add(10 * torch.randn(50, 4), torch.randn(50, 3))
    start = torch.cat([wrapper.linear.weight.detach().double(), torch.zeros(3, 1, dtype=torch.float64)], 1)
    # At the bound the solve gives back W: a larger ridge could change nothing but overflow.
    torch.testing.assert_close(ridge_solve(fit, start, refit_module.MAX_RIDGE), start, rtol=1e-12, atol=1e-15)
    with pytest.raises(FloatingPointError, match="refit's held-out errors are not finite .*1e\\+308: nan"):
        fit_layer(wrapper, fit, held, {**options_of({}), "ridge": [1e308]})  # past the plan's check
    assert wrapper.refit_weight is None


@pytest.mark.cli
def test_a_job_records_the_refit(tiny_setup, tmp_path):
    from actprune.run.job import run_job

    cfg = job_config(
        tiny_setup,
        tmp_path,
        "pruning=act_magnitude",
        "pruning.sparsity=2:4",
        "pruning.transforms=[{name:refit,skip_tokens:1,min_tokens_per_dim:1}]",
        "calibration.windows=8",
        "calibration.seqlen=32",
        "calibration.corpus=wikitext2_validation",
    )
    record = run_job(cfg, tmp_path, "group", "job")
    assert record["status"] == "ok", record.get("traceback")
    assert record["refit"]["layers"] and record["refit"]["options"]["skip_tokens"] == 1
    assert record["timings"]["refit"] > 0 and record["sparsity"]["measured"] == pytest.approx(0.5)


def test_the_layers_bias_stays_and_an_intercept_adds_to_it():
    """Without an intercept a biased layer (Qwen2's q/k/v) keeps its bias as it is; with one, a layer
    without a bias gets one."""
    for intercept in (False, True):
        model = qwen2()
        sparsify_(
            model,
            {"method": "act_magnitude", "sparsity": "2:4", "transforms": [{**REFIT, "intercept": intercept}]},
            WINDOWS,
        )
        refit = [m for m in model.modules() if isinstance(m, ActSparseLinear) and m.refit_weight is not None]
        assert refit
        for layer in refit:
            if intercept:
                assert layer.pruned_bias is not None
            elif layer.linear.bias is None:
                assert layer.pruned_bias is None
            else:
                assert torch.equal(layer.pruned_bias, layer.linear.bias)
        assert intercept or any(layer.linear.bias is not None for layer in refit)
