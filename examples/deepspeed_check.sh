#!/usr/bin/env bash
# DeepSpeed ZeRO-2 on one GPU at TinyLLaVA-3.1B sizes (issue 18), one 10-minute call on an H200:
#   1. plain `matvlm distill` and the same run under ZeRO-2 (`--deepspeed examples/configs/ds_zero2.json`): 20 steps
#      of 8 x 1428 tokens, same data and seed; `distill_ddp_check.py compare` checks the loss curves (bf16 noise);
#   2. ZeRO-2 with the optimizer offloaded to the CPU (ds_zero2_offload.json, torch's AdamW on the CPU: no JIT-built
#      op), 3 steps per micro-batch, bisected from 48 while BUDGET seconds remain: the largest micro-batch that fits
#      among those tried and the smallest that did not.
# Step time, tokens/s, peak GPU memory and losses per run (`distill_ddp_check.py summary`: the median logged `step_s`
# after the first step, which compiles and autotunes Triton kernels) go to OUT/deepspeed_check.json after every run.
#
#   pip install --no-build-isolation -e ".[deepspeed]"   # (the GPU machine: wheels from shared/wheels/deepspeed)
#   bash examples/deepspeed_check.sh WORKDIR OUT [BUDGET_SECONDS [STAGES]]   # STAGES: compare,offload (default both)
set -euo pipefail
W=${1:?usage: deepspeed_check.sh WORKDIR OUT [BUDGET_SECONDS]}
OUT=${2:?usage: deepspeed_check.sh WORKDIR OUT [BUDGET_SECONDS]}
BUDGET=${3:-560}
STAGES=${4:-compare,offload}
mkdir -p "$OUT"
check() { python3 examples/distill_ddp_check.py "$@"; }
distill_ds() { torchrun --standalone --nproc_per_node 1 -m matvlm_hf.cli distill "$@"; }
summarise() {  # every run so far -> OUT/deepspeed_check.json (losses included); one line per run on stdout
  check summary $(ls -d "$W"/plain "$W"/zero2 "$W"/offload-* 2>/dev/null) > "$OUT/deepspeed_check.json"
  python3 -c 'import json, sys; [print(k, {a: b for a, b in v.items() if a != "losses"} if isinstance(v, dict) else v)
                for k, v in json.load(open(sys.argv[1])).items()]' "$OUT/deepspeed_check.json"
}

check prepare --workdir "$W" > /dev/null
if [[ ,$STAGES, == *,compare,* ]]; then
  python3 -m matvlm_hf.cli distill $(check args --workdir "$W" --output "$W/plain") --save-steps 0 > "$OUT/plain.log" 2>&1
  summarise
  distill_ds $(check args --workdir "$W" --output "$W/zero2") --save-steps 0 --deepspeed examples/configs/ds_zero2.json \
    > "$OUT/zero2.log" 2>&1
  summarise
  check compare "$W/plain" "$W/zero2" | tee "$OUT/compare.txt" || true
fi
[[ ,$STAGES, == *,offload,* ]] || exit 0

lo=0 hi=0 mb=48 last=0
while (( SECONDS + (last > 150 ? 150 : last) < BUDGET )) && (( hi == 0 || hi - lo > 8 )); do
  start=$SECONDS
  if distill_ds $(check args --workdir "$W" --output "$W/offload-$mb") --deepspeed examples/configs/ds_zero2_offload.json \
      --per-device-batch-size "$mb" --global-batch-size "$mb" --max-steps 3 --save-steps 0 \
      > "$OUT/offload-$mb.log" 2>&1; then
    echo "offload micro-batch $mb: fits"; lo=$mb
  else
    echo "offload micro-batch $mb: failed (see offload-$mb.log)"; hi=$mb
  fi
  last=$((SECONDS - start))
  summarise
  if (( hi == 0 )); then mb=$((mb * 3 / 2)); else mb=$(( (lo + hi) / 2 / 4 * 4 )); fi
done
echo "offload: largest micro-batch that fit $lo, smallest that failed ${hi/#0/none tried}"
