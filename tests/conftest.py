"""Shared test data: a small generated English-like corpus, and that corpus tokenized once per session."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgolf.config.sections import ModelConfig, TokenizeConfig
from pgolf.nn.model import GPT

N_DOCS = 200
VAL_DOCS = 20
VOCAB_SIZE = 512
# Appears only in the validation documents; written in an alphabet no training document uses, so a
# tokenizer trained on training documents alone cannot have learnt any piece containing it.
VAL_MARKER = "ΞΨΦΔ"

WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but "
    "have an they you were her she there one all we their king queen lord night day love death sword "
    "crown heart blood fair sweet good noble speak come go thou thee thy hath doth shall will would "
    "café naïve Größe façade jalapeño Zürich déjà vu ﬁne oﬃce 東京 Ω≈ç √2 — “quoted” ‘single’ … 😀 🎭"
).split()
PUNCT = [",", ".", ";", "!", "?", ":", ""]


def make_docs(n_docs: int = N_DOCS, seed: int = 0) -> list[str]:
    """Documents of words, digits and punctuation, with line breaks, blank lines, tabs, runs of spaces,
    leading/trailing whitespace, non-ASCII text, and a few degenerate documents (blank, NUL, zero-width)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        parts = []
        for _ in range(rng.randint(20, 120)):
            r = rng.random()
            if r < 0.06:
                parts.append(str(rng.randint(0, 99999)))
            elif r < 0.08:
                parts.append(f"{rng.randint(0, 9)}.{rng.randint(0, 99)}")
            else:
                parts.append(rng.choice(WORDS) + rng.choice(PUNCT))
            if i < VAL_DOCS and rng.random() < 0.15:
                parts.append(VAL_MARKER)
        text = ""
        for word in parts:
            sep = rng.choices([" ", "\n", "\n\n", "  ", "\t", " \n "], weights=[80, 6, 4, 3, 2, 1])[0]
            text += (sep if text else "") + word
        lead = rng.choice(["", "", " ", "\n", "  \t"])
        trail = rng.choice(["", "", "\n", " ", "\n\n  "])
        docs.append(lead + text + trail)
    # degenerate documents, some inside the validation range
    degenerate = {
        3: "   \n\t  ",  # blank: skipped
        7: "",  # empty: skipped
        11: "\u200b\u200b",  # zero-width only: the normalizer drops everything, no tokens: skipped
        25: "hello\x00world  \x00",  # NUL bytes are kept (byte-fallback tokens)
        40: "\n\n\n" + docs[40] + "\n\n\n" if n_docs > 40 else "",
    }
    for i, text in degenerate.items():
        if i < n_docs:
            docs[i] = text
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A .jsonl file of ~200 generated documents (the first VAL_DOCS hold VAL_MARKER)."""
    return write_jsonl(tmp_path / "corpus.jsonl", make_docs())


def tokenize_config(**overrides) -> TokenizeConfig:
    base = {"vocab_size": VOCAB_SIZE, "val_docs": VAL_DOCS, "tokenizer_train_docs": 1_000_000,
            "shard_tokens": 4096, "workers": 2}
    return TokenizeConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tokenized_dir(tmp_path_factory) -> Path:
    """The tiny corpus tokenized once (vocab 512, 20 val docs, small shards so there are several)."""
    from pgolf import tokenize

    root = tmp_path_factory.mktemp("tokenized")
    corpus = write_jsonl(root / "corpus.jsonl", make_docs())
    out = root / "data"
    tokenize.run([corpus], out, tokenize_config(), None, root / "tokenize_metrics.json")
    return out


@pytest.fixture(scope="session")
def calibrated_model(tokenized_dir, tmp_path_factory) -> dict:
    """A 2-layer GPT trained for 30 steps on the session corpus, and its Hessians (for GPTQ and --budget)."""
    from pgolf import calibrate, train
    from pgolf.formats.files import load_tensors
    from pgolf.config.sections import CalibrateConfig, ModelConfig, TrainConfig
    from pgolf.quant.calibration import split_statistics

    root = tmp_path_factory.mktemp("calibrated")
    ckpt, hess = root / "ckpt.safetensors", root / "hessians.safetensors"
    model = ModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
    cfg = TrainConfig(iterations=30, max_wallclock_seconds=0, warmdown_iters=6, warmup_steps=0,
                      train_batch_tokens=2048, train_seq_len=64, grad_accum_steps=1,
                      muon_momentum_warmup_steps=5, log_every=10, val_tokens=1024, device="cpu")
    train.run(tokenized_dir, ckpt, model, cfg, root / "train_metrics.json", root / "log.csv")
    calibrate.run(ckpt, tokenized_dir, hess, CalibrateConfig(n_batches=4, batch_seqs=8, seq_len=64, device="cpu"),
                  root / "calibrate_metrics.json")
    hessians, out_grads = split_statistics(load_tensors(hess, "hessians")[0])
    return {"root": root, "ckpt": ckpt, "hess": hess, "model": model,
            "state": load_tensors(ckpt, "checkpoint")[0], "hessians": hessians, "out_grads": out_grads}


@pytest.fixture(scope="session")
def foreign_tokenized(tmp_path_factory) -> dict[str, Path]:
    """Data the session's model was not trained on: the same vocabulary size from another tokenizer
    (trained on other documents), and another vocabulary size."""
    from pgolf import tokenize

    root = tmp_path_factory.mktemp("foreign")
    corpus = write_jsonl(root / "other.jsonl", make_docs(seed=7))
    out = {}
    for name, vocab in (("same_vocab", VOCAB_SIZE), ("other_vocab", VOCAB_SIZE - 128)):
        out[name] = root / name
        tokenize.run([corpus], out[name], tokenize_config(vocab_size=vocab), None, root / f"{name}.json")
    return out


def assert_png(path: Path) -> None:
    """A real chart: PNG bytes, more than a blank canvas's worth, that matplotlib reads back with ink on it."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, (path, len(data))
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400, pixels.shape
    assert pixels[..., :3].std() > 0.05, "a blank image"


def assert_flat_metrics(path: Path) -> dict:
    """A metrics file is one row of `dvc metrics show`: every value a number, a bool, None or a short string."""
    row = json.loads(path.read_text())
    assert isinstance(row, dict) and row, path
    for key, value in row.items():
        assert value is None or isinstance(value, (bool, int, float)) or \
            (isinstance(value, str) and len(value) <= 24), (path, key, value)
    return row


def filled_gpt(cfg: ModelConfig, scale: float = 0.1, seed: int = 0) -> GPT:
    """A GPT whose every matrix has random content: zero-initialised projections would make a fresh model
    ignore its context, and a test of context-dependent behaviour see nothing."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * scale)
    return model


def run_in_triton_interpreter(script: str) -> None:
    """Run `script` (which prints "ok" when its checks pass) with TRITON_INTERPRET=1, so Triton kernels run on CPU
    tensors. A subprocess, since triton reads the variable when kernels are defined; skipped without triton."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok")
