#!/usr/bin/env bash
# Every GPU-only check and the performance figures of docs/PERFORMANCE.md, on a CUDA machine. Results go to
# $OUT (default gpu_results/): device.txt, phases.txt, a log per phase and the benchmarks' JSON. Each phase
# has its own time limit and a failing phase does not stop the next, so a cut-short run still brings back
# what finished. Phases: bench (at most 4.5 min) and loader (2 min), then tests (2.5 min) and compile (3.5 min):
# two calls of under 7 minutes each where one command may run 10; plan (2.5 min) on its own, a third call.
#
#   bash scripts/gpu_check.sh --fetch          # on a machine with PyPI: the wheels an offline GPU image lacks, into .whl/
#   bash scripts/gpu_check.sh bench loader     # on the GPU machine, from the repo root, with .whl/ beside it
#   bash scripts/gpu_check.sh tests compile
#   bash scripts/gpu_check.sh plan             # the memory planner against torch.cuda.max_memory_allocated
#   bash scripts/gpu_check.sh --tiny           # every phase at tiny size on CPU: checks the script itself
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch" ]]; then
    set -e
    bash ../shared/device/wheels.sh >/dev/null
    # Only what these checks import: PyAV makes the synthetic videos; hydra 1.3 wants omegaconf 2.3; bitsandbytes
    # QLoRA's 4-bit weights (tests/gpu). The image has peft.
    rm -f .whl/deepspeed-* .whl/pydantic* .whl/annotated_types-* .whl/typing_inspection-* .whl/hjson-* .whl/omegaconf-*
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "av==18.1.0" "omegaconf==2.3.0" "bitsandbytes>=0.45" 2>&1 | grep -v "is ignored" || true
    du -sh .whl
    exit 0
fi

out=${OUT:-gpu_results}
mkdir -p "$out"
: >"$out/phases.txt"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 OV_TRAIN_CACHE=/tmp/ov_cache
tiny=()
if [[ "${1:-}" == "--tiny" ]]; then
    tiny=(--tiny --samples 4 --steps 1)
    shift
elif [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$out/install.log" 2>&1 && export PYTHONPATH=/tmp/site:$PWD || echo "wheel install failed: see install.log" >>"$out/phases.txt"
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
phases=" ${*:-bench loader tests compile plan} "

phase() {  # phase NAME SECONDS COMMAND...: if asked for, run it with a limit, log to $out/NAME.log, note the outcome
    local name=$1 limit=$2
    shift 2
    [[ "$phases" == *" $name "* ]] || return 0
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/phases.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    nproc
    python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'lightning', lightning.__version__)"
    python3 -c "import liger_kernel; print('liger-kernel', getattr(liger_kernel, '__version__', 'installed'))" 2>&1 | tail -1
} >"$out/device.txt" 2>&1

# Side by side in one process: the public recipe's path, then ours at 8k, 16k and 32k tokens per row, then ours at 8k
# through LoRA (adapter=lora's targets, rank 16): trainable parameters, optimizer state and peak memory against full.
phase bench 270 python3 -m ov_train.bench --samples 16 --max-tokens 8192,16384,32768 --adapter lora "${tiny[@]}" \
    --json "$out/bench.json"
# The data loader alone on this machine's cores, and what it delivers against what the GPU consumes.
workers=$([[ ${#tiny[@]} -gt 0 ]] && echo 0 || echo "$(nproc)")
phase loader 120 python3 -m ov_train.bench --loader --loader-workers "$workers" "${tiny[@]}" --json "$out/loader.json"
# The CUDA-only paths (varlen kernel, Liger, bf16 masters, compile) against fp32 references.
phase tests 150 python3 -m pytest -q -p no:cacheprovider tests/gpu
# Each layer compiled, tower and LLM layers checkpointed: 32k rows under the memory goal (the planner puts LLM
# checkpointing alone at 64 GiB for a 32k row of the OneVision mix, both at 19 GiB).
phase compile 200 python3 -m ov_train.bench --samples 16 --compile --warmup 2 --checkpoint vision,llm \
    --max-tokens 16384,32768 "${tiny[@]}" --json "$out/compile.json"
# The memory planner against the GPU: its plan and torch.cuda.max_memory_allocated of the same OV-0.5B step (bf16
# weights, varlen attention, Liger's loss) at 8k / 16k / 32k rows, with the model config's checkpointing
# (vision + LLM) and without (32k without fits 141 GB, not 80). Results in plan/ (the goals report reads *.json).
mkdir -p "$out/plan"
if [[ ${#tiny[@]} -gt 0 ]]; then
    phase plan 150 python3 -m ov_train.planner.calibrate --model tiny --tokens 1024,2048 --json "$out/plan/calibration.json"
else
    phase plan 150 bash -c "python3 -m ov_train.planner.calibrate --device cuda --model ov_qwen2_0_5b \
        --tokens 8192,16384,32768 --json $out/plan/checkpointed.json; python3 -m ov_train.planner.calibrate \
        --device cuda --model ov_qwen2_0_5b --checkpoint none --tokens 8192,16384,32768 --json $out/plan/none.json"
fi
python3 -m ov_train.bench --goals "$out" | tee "$out/goals.txt"
