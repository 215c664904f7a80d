#!/usr/bin/env bash
# Issue 3 quality run: 7-language English-centric Bible translation, every method of configs/mmt_bible7_*.yaml,
# over seeds, then one comparison table (BLEU/chrF per direction, averages, win ratios, parameters) and the plot.
# Usage: [JOBS=2] [EXTRA="preset=small"] bash bench/mmt_quality.sh [STEPS] [SEEDS...]   e.g.  bash bench/mmt_quality.sh 500 0 1
# JOBS runs that many trainings side by side, each with cores/JOBS torch threads; EXTRA adds recipe overrides.
# Runs land in runs/mmt_bible7/<method>-seed<k>; a stopped script resumes each unfinished run where it left off.
set -euo pipefail
steps=${1:-1000}; shift || true
seeds=${*:-0 1}
jobs=${JOBS:-1}
[ "$jobs" -ge 1 ] || { echo "JOBS must be at least 1, not '$jobs'" >&2; exit 2; }
methods="lms_fd ls_ffn switch lora naive lms_pair lms_lang"   # the slowest first, so parallel workers finish together
out=runs/mmt_bible7${EXTRA:+-$(printf %s "$EXTRA" | tr -c 'A-Za-z0-9._-' '_')}   # other overrides, other runs
# shellcheck disable=SC2086
polypeft mmt prepare configs/mmt_bible7_naive.yaml ${EXTRA:+--set $EXTRA}

train_one() {  # method seed steps: train (or resume) one run, then evaluate it on the test book
  local method=$1 seed=$2 steps=$3 run=$out/$1-seed$2 resume=""
  if [ -f "$run/eval_test.json" ]; then echo "done: $run"; return; fi
  [ -f "$run/checkpoint.pt" ] && resume="--resume"
  local rc=0
  # shellcheck disable=SC2086
  /usr/bin/time -f "$method seed $seed: %e s wall" \
    polypeft mmt train configs/mmt_bible7_$method.yaml --seed "$seed" --set steps="$steps" checkpoint_every=250 \
    valid_every=250 output_dir="$out" ${EXTRA:-} $resume --eval > "$out/$method-seed$seed.log" 2>&1 || rc=$?
  tail -n 3 "$out/$method-seed$seed.log"
  return $rc   # xargs then exits non-zero, and so does this script (set -e)
}
export -f train_one
export out EXTRA
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc itself follows OMP_NUM_THREADS
export OMP_NUM_THREADS=$(( cores / jobs > 0 ? cores / jobs : 1 ))
mkdir -p "$out"
for method in $methods; do for seed in $seeds; do echo "$method $seed $steps"; done; done |
  xargs -P "$jobs" -L 1 bash -c 'train_one "$0" "$1" "$2"'
polypeft mmt compare "$out"/*-seed*/ --baseline naive --out "$out/compare"   # the trailing / leaves out the logs
