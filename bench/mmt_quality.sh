#!/usr/bin/env bash
# Issue 3 quality run: 7-language English-centric Bible translation, every method of configs/mmt_bible7_*.yaml,
# over seeds, then one comparison table (BLEU/chrF per direction, averages, win ratios, parameters) and the plot.
# Usage: bash bench/mmt_quality.sh [STEPS] [SEEDS...]   e.g.  bash bench/mmt_quality.sh 500 0 1
# Runs land in runs/mmt_bible7/<method>-seed<k>; a stopped script resumes each unfinished run where it left off.
set -euo pipefail
steps=${1:-1000}; shift || true
seeds=${*:-0 1}
methods="naive lms_pair lms_lang lms_fd switch"
out=runs/mmt_bible7
polypeft mmt prepare configs/mmt_bible7_naive.yaml
for seed in $seeds; do
  for method in $methods; do
    run=$out/$method-seed$seed
    if [ -f "$run/eval_test.json" ]; then echo "done: $run"; continue; fi
    resume=""; [ -f "$run/checkpoint.pt" ] && resume="--resume"
    /usr/bin/time -f "$method seed $seed: %e s wall" \
      polypeft mmt train configs/mmt_bible7_$method.yaml --seed "$seed" --set steps="$steps" checkpoint_every=250 \
      valid_every=250 $resume --eval
  done
done
polypeft mmt compare $out/*-seed* --baseline naive --out $out/compare
