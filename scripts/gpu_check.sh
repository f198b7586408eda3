#!/usr/bin/env bash
# `make gpu-check OUT=DIR`: everything that needs a GPU, in one call on a bare CUDA machine (python3 with torch,
# triton and transformers; no network). It installs the wheels `make gpu-wheels` put in .wheels/gpu (hydra-core,
# omegaconf, antlr4: what `import actprune` needs beyond those) into a temporary folder, then runs, each under its
# own time limit (at most 7.7 minutes in all):
#   1. the CUDA tests: tests/test_kernels.py (compiled kernels, half precision, semi-structured 2:4 prefill) and
#      tests/test_cuda.py (models through the kernels, both mask scopes, bf16, an exported folder);
#   2. scripts/bench_speed.py decode and prefill at Llama-2-7B and Llama-3-8B shapes (batch 1/4/8, token and
#      step masks, the fraction of a device-to-device copy's bandwidth each call reaches);
#   3. scripts/bench_speed.py end to end on SmolLM2-135M's architecture with random weights (its GGUF does not
#      travel): tokens/s dense vs backend=kernel vs emulate, and how close the kernel's logits are.
# Results: DIR/results.jsonl (one JSON line for the environment, one per measurement, one per step with its exit
# status), the tests' DIR/pytest.xml, the whole output in DIR/gpu_check.log. A step that fails is recorded and the
# next one runs; the script then names the failed steps and exits 1. A lent GPU has minutes: what can be checked
# in seconds is checked before anything runs, and the script stops (exit 2) where there are no wheels, DIR cannot
# be created or already holds a run's steps (two runs' lines would mix), no CUDA device is visible, or pip fails.
# PYTHON (default python3) and WHEELS (default .wheels/gpu) choose the interpreter and the wheels' folder.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
python=${PYTHON:-python3}
wheels=${WHEELS:-.wheels/gpu}
results="$out/results.jsonl"
stop() {
    echo "gpu_check: $*: nothing run" >&2
    exit 2
}
ls "$wheels"/*.whl >/dev/null 2>&1 || stop "no wheels in $wheels (run 'make gpu-wheels' where pip reaches PyPI, and carry .wheels)"
mkdir -p "$out" || stop "cannot create the output folder $out"
! grep -qs '"part": "step"' "$results" || stop "$results holds an earlier run's results: give another OUT, or delete it"
: >"$results" || stop "cannot write $results"
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
# The environment, and whether CUDA is visible, before any install (torch alone: a few seconds).
"$python" - >>"$results" <<'PY' || stop "$python: no CUDA device, or torch, triton or transformers missing (see above)"
import json, sys, torch
if not torch.cuda.is_available():
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    sys.exit(f"torch {torch.__version__} ({build}) sees no CUDA device: the GPU check needs one")
import triton, transformers
print(json.dumps({"part": "environment", "torch": torch.__version__, "triton": triton.__version__,
                  "transformers": transformers.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(),
                  "capability": ".".join(map(str, torch.cuda.get_device_capability()))}))
PY
site=$(mktemp -d)
"$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl ||
    stop "pip could not install the wheels of $wheels"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()
step() {  # step NAME SECONDS SINK COMMAND...: run it (stdout also to SINK), record its exit status and wall time
    local name=$1 limit=$2 sink=$3 start=$SECONDS
    shift 3
    echo "== $name (at most ${limit}s): $*"
    timeout -k 10 "$limit" "$@" | tee -a "$sink"  # -k: a process stuck in CUDA may ignore the TERM
    local status=${PIPESTATUS[0]}
    echo "{\"part\": \"step\", \"step\": \"$name\", \"exit_status\": $status, \"seconds\": $((SECONDS - start))}" >>"$results"
    case $status in
    0) ;;
    124 | 137) failed+=("$name (timed out after ${limit}s)") ;;
    *) failed+=("$name (exit $status)") ;;
    esac
}
xdist=$("$python" -c "import xdist" 2>/dev/null && echo "-n 8")
step tests 240 /dev/null "$python" -m pytest -q -p no:cacheprovider $xdist tests/test_kernels.py tests/test_cuda.py \
    --junitxml="$out/pytest.xml"
step bench_decode 120 "$results" "$python" scripts/bench_speed.py --parts decode,prefill \
    --shapes llama-2-7b,llama-3-8b --patterns dense,0.5,2:4,8:16 --batches 1,4,8 --scopes token,step --repeats 20
step bench_generate 100 "$results" "$python" scripts/bench_speed.py --parts end_to_end_random --patterns 8:16 \
    --batches 1,4,8 --scopes token,step --new-tokens 32 --e2e-repeats 2
if ((${#failed[@]})); then
    echo "gpu_check: ${#failed[@]} of 3 steps failed: $(printf '%s; ' "${failed[@]}")results in $out" >&2
    exit 1
fi
echo "gpu_check: all 3 steps passed; results in $out"
