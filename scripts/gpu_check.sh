#!/usr/bin/env bash
# The first GPU's check of train_gpt.py (docs/gpu_path.md, section 6): under 10 minutes on one H100 or
# H200, no network. Parts, in order (name them to run only some):
#   env    torch, CUDA, the GPU, FlashAttention 3/2 availability, the attention backend train_gpt picks
#   tests  tests/test_cuda_path.py on real CUDA tensors (FlashAttention's contract, dtypes, no host sync)
#   bench  lab/benchmark.py at the 8-GPU per-rank batch: ms/step, tokens/s, MFU, peak memory,
#          compile time and graph count, next to the predictions
#   train  a default-config train_gpt.py run, 120 s timed (about 4 minutes with warm-up, compilation,
#          GPTQ, zstd compression and a sliding-window evaluation) on a small dataset
#
#   bash scripts/gpu_check.sh prepare DATA_DIR TOKENIZER   # here, once: .gpu_check/ (data) and .whl/
#   bash scripts/gpu_check.sh [--cpu] [--data DIR] [--tokenizer FILE] [PART ...]
#
# prepare copies the first GPU_CHECK_TRAIN_TOKENS (8 M) training tokens and the validation shard of a
# challenge-format dataset (e.g. bench/corpus_sp1024 from lab/corpus_benchmark.sh) and its
# tokenizer into .gpu_check/ (16 MB), and downloads the wheels the GPU image lacks (zstandard, brotli,
# for Python 3.12) into .whl/: both are git-ignored and travel with the device tool's `carry`.
# Results go to $OUT (the device tool's output folder) or gpu_check_out/: gpu_check.log (everything),
# env.txt, pytest.txt, bench.txt, results.jsonl (the benchmark's line), train.txt (the run's log). The last line
# is `gpu_check summary env:ok tests:ok ...` (a failed part shows its exit status; the others still run).
# --cpu: the same steps with tiny settings on the CPU, so that tests/test_gpu_check.py can run it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = prepare ]; then
  [ $# -eq 3 ] || { echo "usage: bash scripts/gpu_check.sh prepare DATA_DIR TOKENIZER" >&2; exit 2; }
  set -e
  GPU_CHECK_TRAIN_TOKENS=${GPU_CHECK_TRAIN_TOKENS:-8000000} "$PY" - "$2" "$3" <<'EOF'
import os, shutil, sys
from pathlib import Path
sys.path.insert(0, ".")
import train_gpt as tg
from data.shards import shard_filename, write_shard
src, tokenizer = sys.argv[1], Path(sys.argv[2])
out = Path(".gpu_check/data")
out.mkdir(parents=True, exist_ok=True)
train = tg.load_data_shard(tg.find_shards(src, "train")[0])[:int(os.environ["GPU_CHECK_TRAIN_TOKENS"])]
write_shard(out / shard_filename("train", 0), train)
write_shard(out / shard_filename("val", 0), tg.load_validation_tokens(src))
shutil.copyfile(tokenizer, ".gpu_check/tokenizer.model")
print(f"gpu_check prepare train_tokens:{len(train)} -> {out}")
EOF
  versions=$("$PY" -c "import importlib.metadata as m; print(f\"zstandard=={m.version('zstandard')} brotli=={m.version('brotli')}\")")
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl $versions
  du -sh .gpu_check .whl
  exit 0
fi

CPU=0 DATA=.gpu_check/data TOKENIZER=.gpu_check/tokenizer.model PARTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --data) DATA=$2; shift ;;
    --tokenizer) TOKENIZER=$2; shift ;;
    env|tests|bench|train) PARTS+=("$1") ;;
    *) echo "unknown argument $1 (parts: env tests bench train; prepare DATA_DIR TOKENIZER)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#PARTS[@]} -gt 0 ] || PARTS=(env tests bench train)
OUT_DIR=${OUT:-gpu_check_out}
RUN_DIR=${GPU_CHECK_RUN_DIR:-gpu_check_run}  # the run's artifact (16 MB) stays here, not in $OUT
mkdir -p "$OUT_DIR" "$RUN_DIR"
LOG=$OUT_DIR/gpu_check.log
export PYTHONUNBUFFERED=1

if [ "$CPU" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then  # the packages the GPU image lacks
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
      .whl/*.whl && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi

# Settings per mode: the default (record) configuration on the GPU; a tiny one for the CPU dry run.
if [ "$CPU" = 1 ]; then
  TINY=(VOCAB_SIZE=384 NUM_LAYERS=2 MODEL_DIM=32 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=2 ROPE_DIMS=4
        TRAIN_SEQ_LEN=64 TRAIN_BATCH_TOKENS=1024 EVAL_SEQ_LEN=64 EVAL_STRIDE=16 VAL_BATCH_SIZE=1024
        QUANT_MIN_NUMEL=256 GPTQ_CALIB_SEQS=16 OMP_NUM_THREADS=1)
  BENCH_ARGS=(--steps 1 --warmup 0 --eval-tokens 300 --no-predict)
  TRAIN_ENV=(ITERATIONS=2 MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=0 TRAIN_LOG_EVERY=1 TTT=0)
  PYTEST_ARGS=(-k contract_check)
  T_TESTS=120 T_BENCH=120 T_TRAIN=180
else
  TINY=()
  BENCH_ARGS=(--steps 20 --warmup 5)
  # 120 s timed (zstd alone: brotli 11 and lzma 9 on 16 MB take a minute of CPU that checks nothing here)
  # TTT=0: test-time training's compile warm-up (minutes on the public record) would not fit T_TRAIN;
  # docs/ttt.md says how to check it on a GPU.
  TRAIN_ENV=(MAX_WALLCLOCK_SECONDS=120 COMPRESSOR=zstd TRAIN_LOG_EVERY=20 TTT=0)
  PYTEST_ARGS=()
  T_TESTS=100 T_BENCH=160 T_TRAIN=300  # with env, 9.8 minutes at most
fi

SUMMARY=()
run_part() {  # run_part NAME TIMEOUT_S FILE CMD...: output to FILE and the log; status to the summary
  local name=$1 limit=$2 file=$3 status
  shift 3
  echo "=== gpu_check $name $(date -u +%FT%TZ) limit:${limit}s: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee "$file" >>"$LOG"
  status=${PIPESTATUS[0]}
  echo "=== gpu_check $name status:$status" | tee -a "$LOG"
  SUMMARY+=("$name:$([ "$status" = 0 ] && echo ok || echo "fail($status)")")
}

for part in "${PARTS[@]}"; do
  case $part in
    env)
      run_part env 30 "$OUT_DIR/env.txt" bash -c '(nvidia-smi || echo "nvidia-smi: not available") && "$0" scripts/env_report.py' "$PY"
      ;;
    tests)
      run_part tests "$T_TESTS" "$OUT_DIR/pytest.txt" "$PY" -m pytest -q -rs -p no:cacheprovider \
        tests/test_cuda_path.py "${PYTEST_ARGS[@]}"
      ;;
    bench)
      run_part bench "$T_BENCH" "$OUT_DIR/bench.txt" env "${TINY[@]}" "$PY" lab/benchmark.py "${BENCH_ARGS[@]}" \
        --out "$OUT_DIR/results.jsonl"
      ;;
    train)
      run_part train "$T_TRAIN" "$OUT_DIR/train_stdout.txt" env "${TINY[@]}" "${TRAIN_ENV[@]}" DATA_PATH="$DATA" \
        TOKENIZER_PATH="$TOKENIZER" OUT_DIR="$RUN_DIR" RUN_ID=gpu_check "$PY" train_gpt.py
      cp "$RUN_DIR/gpu_check.txt" "$OUT_DIR/train.txt" 2>/dev/null || echo "no train log" | tee -a "$LOG"
      rm -f "$OUT_DIR/train_stdout.txt"  # the log file has all of it
      ;;
  esac
done
echo "gpu_check summary ${SUMMARY[*]}" | tee -a "$LOG"
