#!/bin/bash
# The LRP2 choice-rule power study (issue 24): split, Bonferroni and max-t over validation sizes 100-1,000, every
# non-English language, LIRP at layers 1-12, the whole validation pool (books 45-49, 1,431 verses), every John verse.
# Outcomes are cached per language under outcomes/, so a stopped run resumes; arguments are passed on, e.g.
#   bash bench/experiments/lrp2_rule_power/run.sh --languages fr,es,de --outcomes-only   # a few languages at a time
cd "$(dirname "$0")/../../.." || exit 1
OMP_NUM_THREADS=1 PYTHONPATH=src ${PYTHON:-python} bench/lrp2_rule_power.py --threads 1 \
    --out bench/experiments/lrp2_rule_power "$@"
