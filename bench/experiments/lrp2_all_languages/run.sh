#!/bin/bash
# The runs reported in bench/RESULTS.md §5 ("Issue 19: LRP2 on all 11 languages"): grid and vector pool cut to fit the shared 2-core CPU (load 5-8); the script's
# defaults are the full-size run. First 100 John queries per language (-> john100/, moved there by hand), then
# every John verse (-> here); the second reuses the first's validation outcomes and vector pool.
cd "$(dirname "$0")/../.." || exit 1
COMMON="--threads 2 --layers 4,8,12 --lsrp-layers 12 --both-layers 12 --pool 200 --vector-sizes 50,100,200 --default-vectors 200 --test-all-cells --rule bonferroni"
OMP_NUM_THREADS=2 PYTHONPATH=src ${PYTHON:-python} bench/experiments/lrp2_all_languages/lrp2_all_languages.py $COMMON --test-queries ${1:-0} --out bench/experiments/lrp2_all_languages
