#!/usr/bin/env bash
# The CPU corpus benchmark: a 1024-piece tokenizer and shards built from ../shared/corpus (FineWeb
# legal + C4 + Wikipedia as train, fineweb_300 as validation), the unigram baselines in bpb, then a
# small train_gpt.py run limited by steps (not wallclock), so its result does not depend on how
# loaded the machine is. ../shared/corpus exists only on the development machines, not in a clone.
#
#   bash lab/corpus_benchmark.sh            # build once (about 20 s), then train (~20 min, 1 core)
#
# BENCH_DIR (default bench/) holds the data and the run; train_gpt.py variables override the config.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # the interpreter to run with (a venv's python, say): python3 from PATH by default
CORPUS=${CORPUS:-../shared/corpus}
BENCH_DIR=${BENCH_DIR:-bench}
DATA=$BENCH_DIR/corpus_sp1024
TOK=$BENCH_DIR/corpus_1024_bpe
if [ ! -f "$DATA/fineweb_val_000000.bin" ]; then
  "$PYTHON" data/build_dataset.py --input "$CORPUS/fineweb_legal.jsonl.xz" "$CORPUS/c4_1000.jsonl.xz" \
      "$CORPUS/wiki_AA.jsonl.xz" --val-input "$CORPUS/fineweb_300.jsonl.xz" --vocab-size 1024 \
      --output-dir "$DATA" --tokenizer-prefix "$TOK" --tokenizer-train-chars 20000000 \
      --shard-tokens 20000000 --no-progress
fi
"$PYTHON" data/token_stats.py --data-path "$DATA" --tokenizer "$TOK.model"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DATA_PATH=$DATA TOKENIZER_PATH=$TOK.model OUT_DIR=${OUT_DIR:-$BENCH_DIR/runs} RUN_ID=${RUN_ID:-corpus_cpu}
export NUM_LAYERS=${NUM_LAYERS:-4} MODEL_DIM=${MODEL_DIM:-128} NUM_HEADS=${NUM_HEADS:-4} NUM_KV_HEADS=${NUM_KV_HEADS:-2}
export TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-256} TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-8192}
export ITERATIONS=${ITERATIONS:-400} MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-0} WARMUP_STEPS=${WARMUP_STEPS:-0}
export VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-100} TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-50}
export EVAL_SEQ_LEN=${EVAL_SEQ_LEN:-256} EVAL_STRIDE=${EVAL_STRIDE:-64} VAL_BATCH_SIZE=${VAL_BATCH_SIZE:-16384}
export TTT=${TTT:-0}  # test-time training takes minutes on a CPU (docs/ttt.md has its own benchmark)
"$PYTHON" train_gpt.py
