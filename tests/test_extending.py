"""A new benchmark or method is one module plus one config file, found by the command line."""

import json

import pytest

from actprune import eval as benchmarks
from actprune import methods, plan, sparsify_
from actprune.activation import ActSparseLinear

from .helpers import actprune, common
from .tiny import llama

TOY_BENCHMARK = '''
from dataclasses import dataclass

import torch

from actprune.eval import Measured, benchmark


@dataclass
class Options:
    tokens: int = 16


@benchmark("toy_accuracy")
class ToyAccuracy:
    """Next-token accuracy on the first tokens of a fixed sentence."""

    Options = Options

    def __init__(self, options):
        self.options = options

    def prepare(self, env):
        if self.options.tokens < 2:
            raise ValueError(f"benchmark.toy_accuracy.tokens={self.options.tokens}: allowed values are >= 2")
        return {"toy_text": "the game began development in 2010"}

    @torch.no_grad()
    def run(self, model, tokenizer, env):
        ids = tokenizer("The game began development in 2010 , carrying over a large portion of the work",
                        return_tensors="pt").input_ids[:, : self.options.tokens]
        predicted = model(ids).logits[:, :-1].argmax(-1)
        accuracy = (predicted == ids[:, 1:]).float().mean().item()
        return Measured({"toy/accuracy": accuracy}, {"tokens": ids.shape[1]})
'''

TOY_METHOD = '''
import torch

from actprune.activation import ActSparseLinear
from actprune.methods import activation_method


@activation_method("act_random")
def act_random(linear, plan, stats):
    """Keep random entries: the floor any score should beat."""
    return ActSparseLinear(linear, plan.pattern, score=lambda x: torch.rand_like(x))
'''


@pytest.fixture
def extension(tmp_path):
    """A user's module and config folder outside the package."""
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "my_ext.py").write_text(TOY_BENCHMARK + TOY_METHOD)
    (tmp_path / "conf" / "benchmark").mkdir(parents=True)
    (tmp_path / "conf" / "pruning").mkdir(parents=True)
    (tmp_path / "conf" / "benchmark" / "toy_accuracy.yaml").write_text(
        "# @package benchmark.toy_accuracy\ntokens: 12\n"
    )
    (tmp_path / "conf" / "pruning" / "act_random.yaml").write_text("method: act_random\nsparsity: 0.5\n")
    return tmp_path


@pytest.mark.cli
def test_a_benchmark_and_a_method_of_ones_own_run_from_the_command_line(tiny_setup, extension, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(extension / "ext"))
    args = [
        *common(tiny_setup, extension / "sweep"),
        "imports=[my_ext]",
        f"hydra.searchpath=[file://{extension / 'conf'}]",
        "benchmark=[ppl_wikitext2,toy_accuracy]",
        "benchmark.ppl_wikitext2.max_windows=2",
    ]
    done = actprune("-m", *args, "pruning=act_random,act_magnitude")
    assert done.returncode == 0, done.stderr[-3000:]
    found = {
        r["config"]["pruning"]["method"]: r
        for r in (json.loads(p.read_text()) for p in (extension / "sweep").rglob("results.json"))
    }
    assert set(found) == {"act_random", "act_magnitude"}
    for record in found.values():
        assert record["status"] == "ok", record.get("traceback")
        assert 0 <= record["metrics"]["toy/accuracy"] <= 1 and record["toy_accuracy"] == {"tokens": 12}
        assert record["toy_text"].startswith("the game") and "ppl/wikitext2" in record["metrics"]
        assert record["sparsity"]["measured"] == 0.5 and record["replaced_layers"] == 14
    # Bad options of a new benchmark fail before the model loads, naming the key.
    bad = actprune(
        *common(tiny_setup, extension / "bad"),
        "imports=[my_ext]",
        f"hydra.searchpath=[file://{extension / 'conf'}]",
        "benchmark=[toy_accuracy]",
        "benchmark.toy_accuracy.tokens=1",
    )
    record = json.loads((extension / "bad" / "run" / "results.json").read_text())
    assert (
        bad.returncode != 0 and "benchmark.toy_accuracy.tokens=1" in record["error"] and "load" not in record["timings"]
    )


def test_a_benchmark_checks_its_options_against_its_schema():
    with pytest.raises(ValueError, match="benchmark.ppl_wikitext2"):
        benchmarks.build("ppl_wikitext2", {"seqlen": 32, "windows": 3})
    with pytest.raises(ValueError, match="benchmark='perplexity' is unknown: allowed values are .*ppl_wikitext2"):
        benchmarks.build("perplexity", {})
    assert benchmarks.build("ppl_wikitext2", {"seqlen": 32}).options.batch_size == 1


def test_a_method_says_what_it_needs_from_calibration():
    model = llama()
    needs = {
        name: plan(model, config).needs
        for name, config in {
            "plain": {"method": "act_magnitude", "sparsity": "2:4"},
            "clact": {"method": "act_magnitude", "sparsity": "2:4", "score": "clact"},
            "pca": {"method": "act_magnitude", "sparsity": "2:4", "transforms": ["pca"]},
            "threshold": {"method": "act_magnitude", "sparsity": 0.5, "selection": "threshold"},
            "wanda": {"method": "weight_wanda", "sparsity": "2:4"},
            "wanda_dense": {"method": "weight_wanda", "sparsity": 0.0},
            "magnitude": {"method": "weight_magnitude", "sparsity": "2:4"},
        }.items()
    }
    assert not needs["plain"] and not needs["magnitude"] and not needs["wanda_dense"]
    assert needs["clact"].statistics == {"l2"} and not needs["clact"].windows
    assert needs["pca"].statistics == {"second_moment"}
    assert needs["threshold"].windows and not needs["threshold"].statistics
    assert needs["wanda"].windows


def test_builtin_methods_are_modules_of_the_methods_package():
    assert {"dense", "act_magnitude", "weight_magnitude", "weight_wanda", "weight_sparsegpt"} <= set(methods.METHODS)
    wanda = methods.METHODS["weight_wanda"]
    assert wanda.kind == "weight" and wanda.layerwise == "norms" and wanda.apply.__module__ == "actprune.methods.wanda"
    report = sparsify_(llama(), {"method": "act_magnitude", "sparsity": "2:4"})
    assert all(isinstance(layer, ActSparseLinear) for layer in report.layers.values())
    assert set(report.seconds) == {"prune"} and report.calibration is None


def test_a_score_and_a_transform_of_ones_own_take_effect():
    import torch

    from actprune.activation.scores import SCORES, register_score
    from actprune.activation.transforms import TRANSFORMS, register_transform

    @register_score("weighted_absmax_test", needs=("absmax",))
    def absmax_weighted(weight, basis, stats):
        return weight.norm(dim=0) / basis.row(stats["absmax"]).abs().clamp_min(1e-5)

    @register_transform("sign_flip_test")
    def sign_flip(basis, weight, stats):
        basis.then_scale(-torch.ones(weight.shape[1], dtype=weight.dtype))
        return {}

    try:
        model, windows = llama(), torch.randint(0, 256, (2, 16))
        config = {
            "method": "act_magnitude",
            "sparsity": "2:4",
            "target_modules": ["down_proj"],
            "layers": [0],
            "score": "weighted_absmax_test",
            "transforms": ["sign_flip_test"],
        }
        assert plan(model, config).needs.statistics == {"absmax"}
        linear, seen = model.model.layers[0].mlp.down_proj, []
        hook = linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].abs().amax((0, 1))))
        with torch.no_grad():
            for window in windows:
                model(window[None])
        hook.remove()
        expected = linear.weight.detach().norm(dim=0) / torch.stack(seen).amax(0).clamp_min(1e-5)
        [layer] = sparsify_(model, config, windows).layers.values()
        assert torch.equal(layer.input_scale, -torch.ones_like(layer.input_scale))
        torch.testing.assert_close(layer.channel_weight, expected)
        with pytest.raises(
            ValueError, match=r"pruning.score='nope' is unknown: allowed values are \[.*'weighted_absmax_test'"
        ):
            plan(model, {**config, "score": "nope"})
    finally:
        SCORES.pop("weighted_absmax_test")
        TRANSFORMS.pop("sign_flip_test")
