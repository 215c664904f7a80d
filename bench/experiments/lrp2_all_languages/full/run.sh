#!/bin/bash
# The full-size run of bench/RESULTS.md §5 ("Issue 19 ... full grid"): LIRP at every layer 1-12, LSRP at middle and
# top layers, both sides at every even layer, language vectors from up to 2,000 verses per language (curve 50-2,000).
# John is scored only in the cells a choice rule or a bootstrap resample picks (the analysis reads no others).
cd "$(dirname "$0")/../../.." || exit 1
OMP_NUM_THREADS=${THREADS:-1} PYTHONPATH=src ${PYTHON:-python} bench/experiments/lrp2_all_languages/lrp2_all_languages.py --threads ${THREADS:-1} \
  --layers 1,2,3,4,5,6,7,8,9,10,11,12 --lsrp-layers 6,8,10,12 --both-layers 2,4,6,8,10,12 \
  --pool 2000 --vector-sizes 50,100,200,500,1000,2000 --default-vectors 500 --rule bonferroni --out bench/experiments/lrp2_all_languages/full
