#!/bin/bash
# The run reported in SECTION.md: sizes cut to fit the shared 2-core CPU (load 5-6); the script's defaults are the full run.
cd "$(dirname "$0")/../.." && OMP_NUM_THREADS=2 PYTHONPATH=src /work/main/.venv/bin/python bench/lrp2_all_languages.py \
  --threads 2 --test-queries 100 --layers 4,8,12 --lsrp-layers 12 --both-layers 12 \
  --pool 200 --vector-sizes 50,100,200 --default-vectors 200 --out bench/lrp2_all
