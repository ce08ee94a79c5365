"""Shared fixtures: a tiny dataset the tests make themselves, and a tiny training configuration."""

from __future__ import annotations

import os
import random
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_VOCAB = 384

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker, so two workers share two cores
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Synthetic English-like text -> sentencepiece BPE (challenge settings) -> challenge shards.

    Returns build_dataset's result plus the raw validation texts.
    """
    from data.build_dataset import build_dataset
    from data.synthetic_text import generate_documents

    root = tmp_path_factory.mktemp("tiny_data")
    docs = generate_documents(360, seed=0)
    val, train = docs[:40], docs[40:]
    result = build_dataset(train, val, root / "ds", root / "tok" / "tiny_bpe", vocab_size=TINY_VOCAB,
                           shard_tokens=60_000)
    result["val_texts"] = val
    return result


def vary_case(text: str, rng: random.Random) -> str:
    """Web-like capitalization: some words all caps, some capitalized, a few mixed."""
    words = text.split(" ")
    for i, w in enumerate(words):
        r = rng.random()
        words[i] = w.upper() if r < 0.08 else w.capitalize() if r < 0.2 else w[:1] + w[1:].title() if r < 0.23 else w
    return " ".join(words)


def stable_docs(n: int, seed: int) -> list[str]:
    """Synthetic documents with web-like case whose bytes sentencepiece's nmt_nfkc normalization keeps (no
    whitespace runs, no compatibility characters; a newline becomes a space, byte for byte), so the
    tokenizer's own byte count and the original text's agree (CaseOps tests: tests/test_caseops.py, test_bpb.py)."""
    from data.synthetic_text import generate_documents
    rng = random.Random(seed)
    docs = []
    for doc in generate_documents(n, seed=seed):
        doc = "".join(ch for ch in doc.replace("\n\n", "\n") if unicodedata.normalize("NFKC", ch) == ch)
        docs.append(vary_case(doc, rng).strip())  # the normalizer drops leading and trailing whitespace
    return docs


def tiny_env(data: dict, out_dir: Path, **overrides) -> dict:
    """Environment for a run of train_gpt.py that takes seconds on a CPU."""
    env = bare_env()
    env.update(
        DATA_PATH=str(data["output_dir"]), TOKENIZER_PATH=str(data["tokenizer_model"]),
        VOCAB_SIZE=str(TINY_VOCAB), NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2",
        MLP_MULT="2", ROPE_DIMS="4", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS=str(64 * 16), ITERATIONS="12",
        MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="1", VAL_LOSS_EVERY="6", TRAIN_LOG_EVERY="1",
        EVAL_SEQ_LEN="64", EVAL_STRIDE="16", VAL_BATCH_SIZE="1024", OUT_DIR=str(out_dir), RUN_ID="tiny",
        SEED="1337", OMP_NUM_THREADS="1", QUANT_MIN_NUMEL="256", GPTQ_CALIB_SEQS="64",
        TTT="0",  # test-time training has its own tests (tests/test_ttt_pipeline.py): seconds, not minutes
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def cpu_runtime(rank: int = 0, world_size: int = 1):
    """train_gpt.Runtime of one CPU process (or rank `rank` of `world_size` gloo processes)."""
    import contextlib

    import torch

    import train_gpt
    return train_gpt.Runtime(rank, world_size, torch.device("cpu"), train_gpt.grad_accum_steps(world_size),
                             contextlib.nullcontext, torch.float32)


def run_context(h=None, log=print, rt=None, run_id: str = "test"):
    """train_gpt.RunContext for calling a phase of a run directly: the settings (defaults if None), a CPU
    runtime, the run state of a fresh start, the readable source as its code."""
    import train_gpt
    h = h or train_gpt.Hyperparameters()
    code = train_gpt.CodeForm("", "readable", 0)
    return train_gpt.RunContext(h, rt or cpu_runtime(), train_gpt.RunState(run_id, h.gptq_reserve_seconds), log, code)


def gptq_one(w, h, bits: int = 6, damp: float = 0.01, block: int = 32, name: str = "w", **quant):
    """GPTQ of one matrix with Hessian h: quantize_gptq_batch on a batch of one (quant: QuantSettings fields,
    e.g. clip_method="sdclip", sdclip_k_other=12.85 for a matrix named "w")."""
    import train_gpt
    q = train_gpt.QuantSettings(gptq_damp=damp, gptq_block=block, **quant)
    return train_gpt.quantize_gptq_batch([w], [h], bits, [name], q, print)[0]


def bare_env() -> dict:
    """This process's environment without any train_gpt.py setting: each test sets its own."""
    return {k: v for k, v in os.environ.items() if k.upper() not in _HPARAM_NAMES}


def assert_env_error(env: dict, words: list[str]) -> None:
    """Hyperparameters.from_env(env) fails with a SettingError whose message names every word."""
    import train_gpt
    with pytest.raises(train_gpt.SettingError) as err:
        train_gpt.Hyperparameters.from_env(env)
    for word in words:
        assert word in str(err.value)


def _hparam_names() -> set[str]:
    import dataclasses

    import train_gpt
    return {f.name.upper() for f in dataclasses.fields(train_gpt.Hyperparameters)}


_HPARAM_NAMES = _hparam_names()


def tiny_model(seed=0, vocab=64, layers=3):
    """A small GPT in eval mode whose zero-initialized projections are drawn, so that every block acts."""
    import torch
    import train_gpt as tg

    torch.manual_seed(seed)
    cfg = tg.ModelConfig(vocab_size=vocab, num_layers=layers, model_dim=32, num_heads=4, num_kv_heads=2,
                         mlp_mult=2, rope_dims=4)
    model = tg.GPT(cfg)
    with torch.no_grad():  # zero-initialized projections would make every block a no-op
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(std=0.05)
    return model.eval()


def env_settings(**env):
    """Hyperparameters as the environment would give them: env_settings(matrix_lr=0.1) is MATRIX_LR=0.1."""
    import train_gpt as tg
    return tg.Hyperparameters.from_env({k.upper(): str(v) for k, v in env.items()})


@pytest.fixture
def one_thread():
    """What OMP_NUM_THREADS=1 in tiny_env does for a subprocess: on a loaded machine two threads
    fighting for cores make a tiny in-process run several times slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_in_process(env: dict) -> str:
    """train_gpt.main(env) in this process: the run's log."""
    import train_gpt as tg
    tg.main(env)
    return open(os.path.join(env["OUT_DIR"], f"{env['RUN_ID']}.txt"), encoding="utf-8").read()

