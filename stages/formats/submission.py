"""What a blob is made for and by: the data identity (tokenizer and validation shards), the producing
versions, and the header fields pack writes (quantize's --budget builds the same header to predict the
packed size byte for byte)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from pgolf.errors import PgolfError
from pgolf.formats.files import read_json, sha256_file


def data_identity(data: Path) -> dict[str, Any]:
    """Tokenizer hash, vocab and the val shards' sha256s, from the tokenized data's manifest."""
    manifest_path = Path(data) / "manifest.json"
    manifest = read_json(manifest_path, "tokenized-data manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not manifest.get("tokenizer_sha256"):
        raise PgolfError(f"{manifest_path}: lacks tokenizer_sha256 or the file hashes; re-run `pgolf tokenize`")
    val = {name: sha for name, sha in sorted(files.items()) if name.startswith("fineweb_val_")}
    if not val:
        raise PgolfError(f"{manifest_path}: lists no fineweb_val_* shards; re-run `pgolf tokenize`")
    return {"tokenizer_sha256": manifest["tokenizer_sha256"], "vocab_size": manifest.get("vocab_size"),
            "val_shards": val, "manifest_sha256": sha256_file(manifest_path)}


def check_data_matches(data: Path, tokenizer_sha256: str | None, vocab_size: int | None, what: str) -> dict[str, Any]:
    """The data's manifest, once it is known to be tokenized with the tokenizer `what` was made with (its
    vocabulary and its sha256), so that no stage reads or labels text of another tokenizer."""
    manifest_path = Path(data) / "manifest.json"
    manifest = read_json(manifest_path, "tokenized-data manifest")
    if not isinstance(manifest, dict):
        raise PgolfError(f"{manifest_path}: not a pgolf manifest; re-run `pgolf tokenize`")
    have_vocab, have_sha = manifest.get("vocab_size"), manifest.get("tokenizer_sha256")
    if vocab_size is not None and have_vocab != vocab_size:
        raise PgolfError(f"{what} has a {vocab_size}-token vocabulary, but {manifest_path} has {have_vocab} tokens: "
                         "vocab/tokenizer mismatch; use the data it was trained on")
    if tokenizer_sha256 is not None and have_sha != tokenizer_sha256:
        raise PgolfError(f"{what} was made with tokenizer {str(tokenizer_sha256)[:12]}…, but {manifest_path} uses "
                         f"{str(have_sha)[:12]}…: tokenizer mismatch (same vocabulary size, other pieces); use the data it was "
                         "trained on")
    return manifest


def producer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import brotli
    import torch
    import zstandard

    try:
        pgolf = version("pgolf")
    except PackageNotFoundError:
        pgolf = "unknown"
    return {"pgolf": pgolf, "python": platform.python_version(),
            "torch": torch.__version__, "zstandard": zstandard.__version__,
            "brotli": getattr(brotli, "version", getattr(brotli, "__version__", "unknown"))}


def blob_header_fields(meta: dict[str, Any], ident: dict[str, Any], quantized_sha256: str,
                       code: dict[str, Any]) -> dict[str, Any]:
    """The blob header's own fields, from the quantized file's metadata, the data identity and the code
    measurement (pgolf.formats.code.measure_code)."""
    return {
        "model_config": meta["model_config"],
        "schema": meta["schema"],
        "quantize_params": meta.get("params"),
        "tokenizer_sha256": ident["tokenizer_sha256"],
        "vocab_size": ident["vocab_size"],
        "val_shards": ident["val_shards"],
        "inputs": {"quantized": quantized_sha256, "manifest": ident["manifest_sha256"],
                   "checkpoint": (meta.get("inputs") or {}).get("checkpoint")},
        "code": {k: code[k] for k in ("files", "codec", "bytes")},
        "producer": producer_versions(),
    }
