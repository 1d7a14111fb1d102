#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in steps that each fit in one 10-minute call on a lent GPU machine.
#
#   bash benchmarks/gpu_suite.sh environment tests layer attention     # one call
#   bash benchmarks/gpu_suite.sh throughput                  # another
#   bash benchmarks/gpu_suite.sh zero                        # and another
#   bash benchmarks/gpu_suite.sh sweep                       # the speed levers, each variant in its own process
#   bash benchmarks/gpu_suite.sh finetune                    # LoRA tokens/s, litmoe's layer against LitGPT's
#   bash benchmarks/gpu_suite.sh expert_parallel             # on a machine with 2+ GPUs: DDP, ZeRO-3, EP 2 (DDP, FSDP)
#
# Run from the repository root. Each step's output is also written to $OUT/STEP.txt (./gpu-results without
# $OUT). On a machine without a package index, first run the install line that ../shared/gpu/wheels.sh
# prints, then set PYTHON=python3; elsewhere PYTHON defaults to "uv run python".
set -uo pipefail
PYTHON=${PYTHON:-uv run python}
results=${OUT:-gpu-results}
mkdir -p "$results"

run_step() {
  case $1 in
    environment) $PYTHON run_train.py --check-environment ;;
    tests) $PYTHON -m pytest -q -rs tests/test_cuda.py ;;
    layer) $PYTHON benchmarks/moe_layer.py --compile ;;  # compiled, as training runs it (the eager table is recorded)
    attention) $PYTHON benchmarks/attention_kernels.py ;;
    throughput) $PYTHON benchmarks/train_throughput.py --tokens 2000000 -- --no-cpu-profile ;;
    sweep) $PYTHON benchmarks/speed_sweep.py --profile ;;
    expert_parallel) $PYTHON benchmarks/expert_parallel.py -- --no-cpu-profile --train.max_tokens 2e6 ;;
    finetune)  # a MoE-200M checkpoint (its weights are what matters, not their training) in /tmp, not under $OUT
      $PYTHON run_train.py --no-cpu-profile --train.max_tokens 2e6 --out_dir /tmp/finetune-base --no-compile \
        --eval.initial_validation false --eval.final_validation false \
      && $PYTHON benchmarks/finetune_speed.py --checkpoint /tmp/finetune-base/final --steps 50 --rounds 2 --lora_mlp ;;
    zero) $PYTHON benchmarks/zero_strategies.py -- --no-cpu-profile --train.max_tokens 1e6 --no-compile \
      --eval.initial_validation false --eval.final_validation false ;;
    *) echo "unknown step '$1'; the steps are: environment tests layer attention throughput sweep finetune expert_parallel zero" >&2; return 2 ;;
  esac
}

status=0
for step in "$@"; do
  echo "== $step"
  run_step "$step" 2>&1 | tee "$results/$step.txt" || status=1
done
exit $status
