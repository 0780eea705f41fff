#!/usr/bin/env bash
# The README's comparison of interventions on the embedded model: twelve `mclcbf-diag pope` runs per
# POPE split (MC-LCBF's presets, the published interventions' activation edits, and the two prompt
# controls), then one `mclcbf-diag compare` over all thirty-six. PAI and VISTA run as the table shows them,
# without their logit halves (the presets attention-only and steering-only, their defaults when it was made);
# DECODING=1 adds the full PAI and VISTA, the decoding-level methods (VCD, DoLa, HALC's first token, CausalMM,
# OPERA's first step) and VCD's answers sampled at temperature 1 with three seeds; DECODING=only runs those alone
# (the table of the decoding-level methods in docs/commands/compare.md), with their own compare. Usage: bash reports/comparison.sh [ROOT] (default
# reports/comparison). Every run resumes, so rerunning after an interruption repeats nothing and a
# finished run costs a few seconds. About 2 hours on one CPU thread for the three splits.
set -euo pipefail
root="${1:-reports/comparison}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

runs=(
  "seed|--preset seed-exp6"
  "span|--set span=detected"
  "noclamp|--set span=detected --set clamp=none"
  "fixed|--preset fixed"
  "fixed-after|--preset fixed --set tau=0.6 --set tokens=after_image"
  "pai|--intervention pai --preset attention-only"
  "vaf|--intervention vaf"
  "vista|--intervention vista --preset steering-only"
  "adhh|--intervention adhh"
  "var|--intervention var"
  "lean-no|--prompt lean-no"
  "look-carefully|--prompt look-carefully"
)
if [ "${DECODING:-0}" = only ]; then runs=(); fi  # the decoding-level runs alone, one compare of their own
if [ "${DECODING:-0}" != 0 ]; then
  runs+=("pai-full|--intervention pai" "vista-full|--intervention vista" "vcd|--intervention vcd"
         "dola|--intervention dola" "halc-first-token|--intervention dola --preset halc-first-token"
         "causalmm|--intervention causalmm" "opera|--intervention opera"
         "vcd-sample-0|--intervention vcd --decoding sample --seed 0"
         "vcd-sample-1|--intervention vcd --decoding sample --seed 1"
         "vcd-sample-2|--intervention vcd --decoding sample --seed 2")
fi
dirs=()
for entry in "${runs[@]}"; do
  name="${entry%%|*}"
  read -r -a opts <<< "${entry#*|}"
  for split in adversarial popular random; do
    out="$root/$split/$name"
    echo "== $name, $split split"
    mclcbf-diag pope --split "$split" --batch-size 64 "${opts[@]}" --out "$out"
    dirs+=("$out")
  done
done
cmp="$root/compare"
[ "${DECODING:-0}" = only ] && cmp="$root/compare-decoding"
mclcbf-diag compare "${dirs[@]}" --out "$cmp"
