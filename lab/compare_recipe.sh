#!/usr/bin/env bash
# Plain training loop vs the optimization recipe (docs/recipe.md) at equal wallclock, small model, CPU.
#
#   bash lab/compare_recipe.sh [SECONDS]        (default 300 s of training per arm)
#   ARMS="plain recipe recipe_record" bash lab/compare_recipe.sh
#
# The arms run AT THE SAME TIME, one thread each, so that on a shared machine they face the same load;
# a step-count difference between them is then the cost of the recipe, not of the neighbours.
#   plain:         the loop as before the recipe: Adam without decay, Muon without weight decay at one
#                  LR and a fixed momentum, sequential data, no QAT, raw final weights.
#   recipe:        every default of train_gpt.py, except the settings counted in steps, scaled from the
#                  record's ~6,700 steps to the few hundred of this run (RECIPE_SCALED).
#   recipe_record: (only when ARMS names it) every default unchanged, record step counts included
#                  (momentum warmup 1500 steps, EMA 0.997), to show what they do to a short run.
# All arms keep the warmdown (it predates the recipe), the model and the quantization of train_gpt.py's
# defaults, and GPTQ_RESERVE_SECONDS=0 (calibration then runs after the budget, alike in every arm).
# Data: DATA_PATH and TOKENIZER_PATH must be set (lab/corpus_benchmark.sh builds such a dataset from text).
# Logs go to $OUT_ROOT/<arm>.txt; the table is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # the interpreter to run with (a venv's python, say): python3 from PATH by default
SECONDS_PER_ARM=${1:-300}
OUT_ROOT=${OUT_ROOT:-bench/compare_recipe}
mkdir -p "$OUT_ROOT"

: "${DATA_PATH:?set DATA_PATH to a dataset folder (lab/corpus_benchmark.sh builds one)}"
: "${TOKENIZER_PATH:?set TOKENIZER_PATH to its sentencepiece model}"
export DATA_PATH TOKENIZER_PATH
export OMP_NUM_THREADS=1 OUT_DIR=$OUT_ROOT
export NUM_LAYERS=6 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=3 MATRIX_LR_SPLIT_LAYER=3
export TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=4096 ITERATIONS=1000000 MAX_WALLCLOCK_SECONDS=$SECONDS_PER_ARM
export GPTQ_RESERVE_SECONDS=0 GPTQ_RESERVE_MEASURE=0 WARMUP_STEPS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50
export EVAL_SEQ_LEN=128 EVAL_STRIDE=64 VAL_BATCH_SIZE=8192 SEED=${SEED:-1337}
export TTT=0  # the arms compare training recipes on the sliding-window score

ARMS=${ARMS:-plain recipe}
RECIPE_SCALED=${RECIPE_SCALED:-MUON_MOMENTUM_WARMUP_STEPS=35 EMA_DECAY=0.9}
declare -A SETTINGS=(
    [plain]="MUON_WEIGHT_DECAY=0 MUON_MOMENTUM_WARMUP_STEPS=0 MATRIX_LR_LATE=0.025 EMBED_WEIGHT_DECAY=0
             FINAL_WEIGHTS=raw QAT=off TRAIN_LOADER=sequential"
    [recipe]="$RECIPE_SCALED"
    [recipe_record]=""
)
pids=""
for arm in $ARMS; do
    [[ -v "SETTINGS[$arm]" ]] || { echo "unknown arm $arm: expected ${!SETTINGS[*]}" >&2; exit 1; }
    env RUN_ID="$arm" ${SETTINGS[$arm]} "$PYTHON" train_gpt.py > "$OUT_ROOT/$arm.out" 2>&1 &
    pids="$pids $!"
done
for pid in $pids; do
    wait "$pid"  # a failed arm stops the script (set -e); its output is in $OUT_ROOT/<arm>.out
done

field() { grep -m1 "^$2 " "$OUT_ROOT/$1.txt" | grep -o "$3:[^ ]*" | cut -d: -f2; }
echo "recipe: $RECIPE_SCALED; every arm: ${SECONDS_PER_ARM}s of training, OMP_NUM_THREADS=1, all run together"
echo "| arm | steps | raw float val_bpb | final float val_bpb | final roundtrip val_bpb | final sliding val_bpb |"
echo "|---|---|---|---|---|---|"
for arm in $ARMS; do
    echo "| $arm | $(field $arm raw_float_exact steps) | $(field $arm raw_float_exact val_bpb) |" \
         "$(field $arm final_float_exact val_bpb) | $(field $arm final_roundtrip_exact val_bpb) |" \
         "$(field $arm final_sliding_window_exact val_bpb) |"
done
