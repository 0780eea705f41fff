#!/usr/bin/env bash
# The throughput benchmarks of an earlier revision and of this checkout, side by side in one run.
#
#   bash benchmarks/side_by_side.sh OLD_REV [ROUNDS]
#
# OLD_REV is checked out into a temporary git worktree (removed at the end). For each benchmark
# (trace_overhead, pope_throughput, population_explain at n = 64, intervention_throughput over the
# interventions both revisions know) the old and the new code run alternately, ROUNDS times each
# (default 2), each in its own process with its own checkout first on the path, so load drift hits
# both alike. Each benchmark prints its ratio against the bare forward measured in that same process;
# the lines are prefixed "old"/"new". Compare ratios, not seconds.
set -euo pipefail
old_rev="${1:?usage: bash benchmarks/side_by_side.sh OLD_REV [ROUNDS]}"
rounds="${2:-2}"
root="$(cd "$(dirname "$0")/.." && pwd)"
old="$(mktemp -d)/old"
git -C "$root" worktree add --detach -q "$old" "$old_rev"
trap 'git -C "$root" worktree remove --force "$old"' EXIT
echo "old: $(git -C "$old" log -1 --format='%h %s' | cut -c1-100)"
echo "new: $(git -C "$root" log -1 --format='%h %s' | cut -c1-100)$(git -C "$root" diff --quiet || echo ' (+ uncommitted changes)')"

# the interventions both revisions register (the new one adds decoding-level methods)
known() { (cd "$1" && PYTHONPATH="$1" python -c "from mclcbf_diag.interventions import registry; print(','.join(registry()))"); }
both="$(comm -12 <(known "$old" | tr , '\n' | sort) <(known "$root" | tr , '\n' | sort) | paste -sd, -)"
echo "interventions in both: $both"

run_side() {  # side benchmark args...
  local side="$1" bench="$2"
  shift 2
  local dir="$root"
  [ "$side" = old ] && dir="$old"
  (cd "$dir" && PYTHONPATH="$dir" python "benchmarks/$bench.py" "$@" 2>/dev/null) \
    | grep -E "ratio|×" | sed "s/^/$side $bench: /"
}

for r in $(seq "$rounds"); do
  for side in old new; do run_side "$side" trace_overhead --repeats 10; done
  for side in old new; do run_side "$side" pope_throughput --n 32 --repeats 2; done
  for side in old new; do run_side "$side" population_explain --n 64 --batch-size 16; done
  for side in old new; do run_side "$side" intervention_throughput --n 32 --repeats 2 --only "$both"; done
done
