#!/usr/bin/env bash
# The README's comparison of every method on the embedded model, at greedy first tokens and sampled: per POPE
# split, `mclcbf-diag pope` runs of MC-LCBF's presets, the published interventions' activation edits (PAI
# attention-only and VISTA steering-only, their halves without the logit contrast), the full PAI and VISTA, the
# decoding-level methods (VCD, DoLa, HALC's focal-view contrast with the oracle detector, the first token of HALC's
# released loop (DoLa over every second layer), CausalMM at the vision and the language level, OPERA's first step) and the two prompt
# controls, greedy; then each method again with its answers sampled at temperature 1 with seeds 0, 1 and 2 (a
# sampled run's baseline is sampled with the same draw per question; the three seeds from one pass of forwards,
# `pope --seeds 0,1,2`, each into the folder `--seed S` would write); and one `mclcbf-diag compare` over all of
# them (the seeds' mean ± spread in its findings). The prompt controls run greedy only: they pair baselines.
#
# Usage: bash reports/comparison.sh [ROOT]   (default reports/comparison; the table lands in ROOT/compare; bash 4.4+)
#   SAMPLE=0          greedy runs only (21 runs a split instead of 78, 21 passes instead of 40)
#   SPLITS="a b"      the POPE splits to run (default: adversarial popular random)
#   LIMIT=N           pass --limit N to every run (a smoke test; default: every question)
#   JOBS=N            N runs at a time, each on OMP_NUM_THREADS threads (default 1 and 1: one run per core is the
#                     fastest on a CPU, as the runs are independent)
# Every run resumes, so rerunning after an interruption repeats nothing and a finished run costs a few seconds.
# Time: the kept runs' timing.json add up to about 9 hours of one worker (greedy runs about 5, the 57 sampled
# passes about 4), measured with JOBS=2 on a 2-core x86-64 CPU, partly before freed memory was reused (slower) and
# with other work on the machine; so about 4.5 hours with JOBS=2. HALC (its cropped views: no shared prefix) and
# CausalMM's language level (a counterfactual forward of its own) take the longest, 7-16 minutes a run.
set -euo pipefail
root="${1:-reports/comparison}"
read -r -a splits <<< "${SPLITS:-adversarial popular random}"
limit=()
if [ -n "${LIMIT:-}" ]; then limit=(--limit "$LIMIT"); fi
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
seeds=(0 1 2)  # the sampled runs' seeds

methods=(
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
  "pai-full|--intervention pai"
  "vista-full|--intervention vista"
  "vcd|--intervention vcd"
  "dola|--intervention dola"
  "halc|--intervention halc"
  "halc-first-token|--intervention dola --preset halc-first-token"
  "causalmm|--intervention causalmm"
  "causalmm-language|--intervention causalmm --set level=language"
  "opera|--intervention opera"
)
runs=("${methods[@]}" "lean-no|--prompt lean-no" "look-carefully|--prompt look-carefully")
if [ "${SAMPLE:-1}" != 0 ]; then
  for entry in "${methods[@]}"; do  # the three seeds of a method from one pass of its forwards (pope --seeds)
    runs+=("${entry%%|*}-sample-{seed}|${entry#*|} --decoding sample --seeds $(IFS=,; echo "${seeds[*]}")")
  done
fi

dirs=()
cmds=()  # one run a split of a method, in the order above: NAME|SPLIT|the method's options
for entry in "${runs[@]}"; do
  name="${entry%%|*}"
  for split in "${splits[@]}"; do
    cmds+=("$name|$split|${entry#*|}")
    out="$root/$split/$name"
    case "$name" in
      *"{seed}"*) for seed in "${seeds[@]}"; do dirs+=("${out//\{seed\}/$seed}"); done ;;
      *) dirs+=("$out") ;;
    esac
  done
done

run_one() {  # NAME|SPLIT|OPTIONS: one pope run into ROOT/SPLIT/NAME (its folder locked by pope itself)
  local name="${1%%|*}" rest="${1#*|}"
  local split="${rest%%|*}"
  local -a opts
  read -r -a opts <<< "${rest#*|}"
  echo "== $name, $split split"
  mclcbf-diag pope --split "$split" --batch-size 64 "${limit[@]}" "${opts[@]}" --out "$root/$split/$name"
}

# JOBS runs at a time, each on OMP_NUM_THREADS threads (the runs are independent folders). After a failure no run
# starts; the runs under way finish, then the script exits with the failure's status (rerun it: finished runs are
# skipped in seconds). Ctrl-C or a kill stops the runs under way too (each resumes where it stopped).
jobs_max="${JOBS:-1}"
if ! [[ "$jobs_max" =~ ^[1-9][0-9]*$ ]]; then
  echo "comparison.sh: JOBS=$jobs_max is not a whole number of runs at a time; use e.g. JOBS=2" >&2
  exit 2
fi
trap 'trap - INT TERM; kill $(jobs -p) 2>/dev/null; exit 130' INT TERM
running=0
failed=0
for cmd in "${cmds[@]}"; do
  if (( running >= jobs_max )); then
    wait -n || failed=$?
    running=$((running - 1))
  fi
  (( failed == 0 )) || break
  run_one "$cmd" &
  running=$((running + 1))
done
while (( running > 0 )); do
  wait -n || failed=$?
  running=$((running - 1))
done
if (( failed != 0 )); then
  echo "comparison.sh: a run failed (status $failed); rerun to resume" >&2
  exit "$failed"
fi
mclcbf-diag compare "${dirs[@]}" --out "$root/compare"
