#!/usr/bin/env bash
# DeepSpeed ZeRO-2 on one GPU at TinyLLaVA-3.1B sizes (issue 18), about 12 minutes on an H200:
#   1. plain `matvlm distill` and the same run under ZeRO-2 (`--deepspeed examples/configs/ds_zero2.json`): 20 steps
#      of 8 x 1428 tokens, same data and seed; `distill_ddp_check.py compare` checks the loss curves (bf16 noise);
#   2. ZeRO-2 with the optimizer offloaded to the CPU (ds_zero2_offload.json, torch's AdamW on the CPU: no JIT-built
#      op), 2 steps at growing micro-batches: the largest that fits, its step time and peak memory.
# Step time (train_runtime / steps) and peak GPU memory (`peak_gib`, logged by measure.PeakMemory) per run go to
# OUT/deepspeed_check.json.
#
#   pip install deepspeed   # (the GPU machine: its wheel and hjson, pydantic, ... from shared/wheels/deepspeed)
#   bash examples/deepspeed_check.sh WORKDIR OUT
set -euo pipefail
W=${1:?usage: deepspeed_check.sh WORKDIR OUT}
OUT=${2:?usage: deepspeed_check.sh WORKDIR OUT}
mkdir -p "$OUT"
check() { python3 examples/distill_ddp_check.py "$@"; }
distill_ds() { torchrun --standalone --nproc_per_node 1 -m matvlm_hf.cli distill "$@"; }

check prepare --workdir "$W" > /dev/null
python3 -m matvlm_hf.cli distill $(check args --workdir "$W" --output "$W/plain") --save-steps 0 > "$OUT/plain.log" 2>&1
distill_ds $(check args --workdir "$W" --output "$W/zero2") --save-steps 0 --deepspeed examples/configs/ds_zero2.json \
  > "$OUT/zero2.log" 2>&1
check compare "$W/plain" "$W/zero2" | tee "$OUT/compare.txt" || true

for mb in 8 16 24 32 40 48; do
  distill_ds $(check args --workdir "$W" --output "$W/offload-$mb") --deepspeed examples/configs/ds_zero2_offload.json \
    --per-device-batch-size "$mb" --global-batch-size "$mb" --max-steps 2 --save-steps 0 \
    > "$OUT/offload-$mb.log" 2>&1 || { echo "offload micro-batch $mb: failed (see offload-$mb.log)"; break; }
done

python3 - "$W" "$OUT" <<'PY'
import json, sys
from pathlib import Path
w, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = {}
for run in sorted(p for p in w.iterdir() if p.is_dir() and (p.name in ("plain", "zero2") or p.name.startswith("offload-"))):
    states = sorted(run.glob("**/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        runs[run.name] = "no trainer_state.json (failed or out of memory)"
        continue
    state = json.loads(states[-1].read_text())
    logs = state["log_history"]
    steps = [e for e in logs if "loss" in e]
    end = next((e for e in logs if "train_runtime" in e), {})
    runs[run.name] = {
        "steps": state["global_step"],
        "seconds_per_step": end.get("train_runtime", float("nan")) / max(state["global_step"], 1),
        "peak_gib": max((e.get("peak_gib", 0) for e in logs), default=None),
        "losses": [round(e["loss"], 5) for e in steps],
    }
(out / "deepspeed_check.json").write_text(json.dumps(runs, indent=1) + "\n")
print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "losses"} if isinstance(v, dict) else v for k, v in runs.items()}, indent=1))
PY
