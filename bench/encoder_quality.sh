#!/usr/bin/env bash
# Issue 4 figures on e5-small: Bible retrieval per language and layer, zero-shot verse classification from English
# (with LRP2 LIRP at test time), multilingual fine-tuning naive vs LMS vs LMS+FD (Share and LS) over 2 seeds with
# the training throughput. One torch thread per process; the two seeds run side by side, then merge.
# Usage: bash bench/encoder_quality.sh   -> runs/encoder/{retrieve,zero_shot,multilingual}/*.{json,md}
set -euo pipefail
out=runs/encoder
export OMP_NUM_THREADS=1
polypeft retrieve configs/retrieve_bible.yaml --set output_dir=$out/retrieve
polypeft classify configs/classify_bible.yaml --set "train_languages=[en]" "methods=[naive]" throughput_steps=0 \
  lirp_at_test=true output_dir=$out/zero_shot
polypeft classify configs/classify_bible.yaml --set "seeds=[0]" throughput_steps=20 output_dir=$out/multilingual_seed0 &
polypeft classify configs/classify_bible.yaml --set "seeds=[1]" throughput_steps=0 output_dir=$out/multilingual_seed1 &
wait
python bench/merge_classify.py $out/multilingual $out/multilingual_seed0/classify.json $out/multilingual_seed1/classify.json
