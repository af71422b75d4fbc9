#!/usr/bin/env bash
# Everything in docs/study, on one GPU (about 13 minutes on an H100: 6.7 for step 1, 3.1 + 3.6 for step 2):
#   1. `matvlm study all`: data, teacher (STUDY's knobs), the 11 study variants 11 at a time (paper recipe:
#      300 distillation steps of 64 at lr 1e-3), report;
#   2. the distillation-recipe variants: the same 300 steps (a quarter of the teacher's) at larger batches and
#      learning rates, L_prob alone, MLPs trainable; then the report again, with them in their own table.
#
#   bash examples/study_gpu.sh WORKDIR DOCS
set -euo pipefail
W=${1:?usage: study_gpu.sh WORKDIR DOCS}
DOCS=${2:?usage: study_gpu.sh WORKDIR DOCS}
NOTE="GPU scale (one H100): \`bash examples/study_gpu.sh WORKDIR DOCS\`."

matvlm study all --workdir "$W" --docs "$DOCS" --jobs 11 --note "$NOTE" > /dev/null

variant() {  # name, then `matvlm study variant` arguments
  local name=$1; shift
  matvlm study variant --workdir "$W" --name "$name" "$@" > "$W/variants/$name.log" 2>&1
}
at_once() {  # each argument "NAME ARGS..." is one variant; all run at once; fails if one fails (see its log)
  local pids=() spec pid
  # shellcheck disable=SC2086  # each spec is word-split on purpose
  for spec in "$@"; do variant $spec & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid"; done
}
B3="distill_batch_size=128 distill_lr=3e-3"
B6="distill_batch_size=128 distill_lr=6e-3"
MLP="train_mode=mamba+mlp+connector"
at_once "h25-b128 --ratio 0.25 --set $B3" "h25-prob-b128 --ratio 0.25 --loss prob --set $B3" \
  "h50-b128 --ratio 0.5 --set $B3" "h50-prob-b128 --ratio 0.5 --loss prob --set $B3" \
  "h25-mlp-b128 --ratio 0.25 --set $B3 $MLP" "h50-mlp-prob-b128 --ratio 0.5 --loss prob --set $B3 $MLP"
at_once "h25-b128-lr6e-3 --ratio 0.25 --set $B6" "h25-prob-b128-lr6e-3 --ratio 0.25 --loss prob --set $B6" \
  "h50-b128-lr6e-3 --ratio 0.5 --set $B6" "h50-prob-b128-lr6e-3 --ratio 0.5 --loss prob --set $B6" \
  "h25-b256 --ratio 0.25 --set distill_batch_size=256 distill_lr=3e-3" \
  "h50-b256 --ratio 0.5 --set distill_batch_size=256 distill_lr=3e-3"
matvlm study report --workdir "$W" --docs "$DOCS" --note "$NOTE"
