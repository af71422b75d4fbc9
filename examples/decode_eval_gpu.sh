#!/usr/bin/env bash
# GPU checks on trained models (issues 14 and 17), on one GPU, about 8 minutes on an H200:
#   1. the study's GPU-scale teacher (`matvlm study teacher`, STUDY's knobs) and its 50 % hybrid (`study variant h50`);
#   2. `matvlm eval` of both on the synthetic task (lmms-eval), batch 1 vs 16, fast_decode off vs on: time per item;
#   3. tests/test_gpu_decode.py: fast_decode's greedy tokens == generate()'s over 128 tokens on these trained models.
#
#   bash examples/decode_eval_gpu.sh WORKDIR OUT [LIMIT]       # needs lmms-eval (pip install "matvlm-hf[eval]")
set -euo pipefail
W=${1:?usage: decode_eval_gpu.sh WORKDIR OUT [LIMIT]}
OUT=${2:?usage: decode_eval_gpu.sh WORKDIR OUT [LIMIT]}
LIMIT=${3:-300}
matvlm() { python3 -m matvlm_hf.cli "$@"; }
mkdir -p "$OUT"

start=$SECONDS
matvlm study teacher --workdir "$W" > "$OUT/study_teacher.log" 2>&1
matvlm study variant --workdir "$W" --name h50 > "$OUT/study_h50.log" 2>&1
echo "trained teacher and h50 in $((SECONDS - start)) s"
tail -n 3 "$OUT/study_teacher.log" "$OUT/study_h50.log"

for bs in 1 16; do
  for fd in off on; do
    flag=(); [ "$fd" = on ] && flag=(--fast-decode)
    matvlm eval --model "$W/variants/h50/distilled" --teacher "$W/teacher-matvlm" --tasks matvlm_synthetic \
      --data "matvlm_synthetic=$W/data" --limit "$LIMIT" --batch-size "$bs" "${flag[@]}" --dtype bfloat16 \
      --out "$W/eval-bs$bs-fd$fd" > "$W/eval-bs$bs-fd$fd.log" 2>&1 || { tail -n 30 "$W/eval-bs$bs-fd$fd.log"; continue; }
    cp "$W/eval-bs$bs-fd$fd/results.md" "$OUT/eval-bs$bs-fd$fd.md"
    cat "$OUT/eval-bs$bs-fd$fd.md"
  done
done
python3 - "$W" "$OUT" <<'PY'
import json, sys
from pathlib import Path
w, out = Path(sys.argv[1]), Path(sys.argv[2])
summary = {d.name: json.loads((d / "results.json").read_text()) for d in sorted(w.glob("eval-bs*-fd*")) if d.is_dir()}
(out / "eval_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
PY
MATVLM_TRAINED_STUDY="$W" python3 -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py -k trained 2>&1 \
  | tee "$OUT/test_gpu_decode.log" | tail -n 15
