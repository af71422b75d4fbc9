#!/usr/bin/env bash
# Distillation on 2 GPUs (issue 18) at TinyLLaVA-3.1B sizes, one 10-minute call on a 2-GPU machine: the same 20 steps
# of global batch 8 x 1428 tokens (distill_ddp_check.py's data, seed 0, bf16, gradient checkpointing)
#   one:   1 GPU, plain, micro-batch 4 x 2 accumulation
#   ddp:   2 GPUs, DDP (accelerate launch --multi_gpu), micro-batch 4 x 1 accumulation x 2 processes
#   zero2: 2 GPUs, DeepSpeed ZeRO-2 (examples/configs/ds_zero2.json), the same split
# Each 2-GPU curve is compared with the 1-GPU one (`distill_ddp_check.py compare`, bf16 noise, exit status in
# OUT/compare-*.txt) and OUT/multi_gpu_check.json holds step time, tokens/s and peak memory per run
# (`distill_ddp_check.py summary`); scaling = tokens/s on 2 GPUs / tokens/s on 1.
#
#   pip install --no-build-isolation -e ".[deepspeed]"
#   NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 bash examples/multi_gpu_check.sh W OUT
set -euo pipefail
W=${1:?usage: multi_gpu_check.sh WORKDIR OUT}
OUT=${2:?usage: multi_gpu_check.sh WORKDIR OUT}
mkdir -p "$OUT"
check() { python3 examples/distill_ddp_check.py "$@"; }
launch2() { accelerate launch --multi_gpu --num_processes 2 --mixed_precision no --dynamo_backend no "$@"; }
summarise() {
  check summary $(ls -d "$W"/one "$W"/ddp "$W"/zero2 2>/dev/null) > "$OUT/multi_gpu_check.json"
  python3 - "$OUT/multi_gpu_check.json" <<'PY'
import json, sys
runs = json.load(open(sys.argv[1]))
base = runs.get("one", {}).get("tokens_per_s") if isinstance(runs.get("one"), dict) else None
for name, run in runs.items():
    if isinstance(run, dict):
        scale = f", {run['tokens_per_s'] / base:.2f}x one GPU" if base and run["tokens_per_s"] else ""
        print(f"{name}: {run['seconds_per_step']} s/step, {run['tokens_per_s']} tokens/s{scale}, {run['peak_gib']} GiB")
    else:
        print(f"{name}: {run}")
PY
}

check prepare --workdir "$W" --size "${SIZE:-full}" > /dev/null  # SIZE=tiny: a CPU smoke run of the script
python3 -m matvlm_hf.cli distill $(check args --workdir "$W" --output "$W/one") --save-steps 0 > "$OUT/one.log" 2>&1
summarise
launch2 -m matvlm_hf.cli distill $(check args --workdir "$W" --output "$W/ddp") --save-steps 0 > "$OUT/ddp.log" 2>&1
summarise
check compare "$W/one" "$W/ddp" > "$OUT/compare-ddp.txt" && echo "ddp: same curve" || echo "ddp: curves differ"
launch2 -m matvlm_hf.cli distill $(check args --workdir "$W" --output "$W/zero2") --save-steps 0 \
  --deepspeed examples/configs/ds_zero2.json > "$OUT/zero2.log" 2>&1
summarise
check compare "$W/one" "$W/zero2" > "$OUT/compare-zero2.txt" && echo "zero2: same curve" || echo "zero2: curves differ"
