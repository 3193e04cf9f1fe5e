"""pack: quantized.safetensors + data manifest → model.pgolf (one blob) and a size report.

The challenge counts code bytes + compressed model bytes against 16,000,000. Model bytes are the whole
blob file; code bytes are the compressed size of the pgolf sources needed to decode and score it
(CODE_FILES), compressed under the same codec rule. Over the limit the report is still written, the
blob is not, and the command exits 1.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import codecs
from .artifacts import PgolfError, load_tensors, read_json, sha256_file, write_bytes, write_json
from .blob import build_blob, check_chunk_bytes
from .config import PackConfig

# The sources a blob needs to be decoded and scored: the blob/codec/dequantization readers, the
# model, the config it is built from, the val-shard reader, the tokenizer LUTs and the scorer.
# (gptq.py and lqer.py: quant.py imports them, for encoding only.)
CODE_FILES = ("artifacts.py", "config.py", "presets.py", "codecs.py", "quant.py", "gptq.py", "lqer.py", "blob.py", "model.py",
              "shards.py", "tokenizer.py", "bpb.py", "ttt_eval.py")
PACKAGE_DIR = Path(__file__).resolve().parent


def code_bundle(files: tuple[str, ...] = CODE_FILES) -> bytes:
    """The listed sources concatenated, each behind a one-line path marker."""
    parts = []
    for name in files:
        path = PACKAGE_DIR / name
        if not path.is_file():
            raise PgolfError(f"{path}: source file needed to decode a blob is missing; reinstall pgolf")
        parts.append(f"# ---- stages/{name} ----\n".encode() + path.read_bytes())
    return b"".join(parts)


def measure_code(codec: str, files: tuple[str, ...] = CODE_FILES) -> dict[str, Any]:
    """Code bytes: the bundle of `files` compressed by `codec` (auto: the smallest)."""
    bundle = code_bundle(files)
    used, compressed, sizes = codecs.choose(codec, bundle)
    return {"files": [f"stages/{f}" for f in files], "raw_bytes": len(bundle), "codec": used,
            "bytes": len(compressed), "sizes": sizes}


def producer_versions() -> dict[str, str]:
    import brotli
    import torch
    import zstandard

    from importlib.metadata import PackageNotFoundError, version

    try:
        pgolf = version("pgolf")
    except PackageNotFoundError:
        pgolf = "unknown"
    return {"pgolf": pgolf, "python": platform.python_version(),
            "torch": torch.__version__, "zstandard": zstandard.__version__,
            "brotli": getattr(brotli, "version", getattr(brotli, "__version__", "unknown"))}


def data_identity(data: Path) -> dict[str, Any]:
    """What the blob is made for: tokenizer hash, vocab and the val shards' sha256s, from the manifest."""
    manifest_path = data / "manifest.json"
    manifest = read_json(manifest_path, "tokenized-data manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not manifest.get("tokenizer_sha256"):
        raise PgolfError(f"{manifest_path}: lacks tokenizer_sha256 or the file hashes; re-run `pgolf tokenize`")
    val = {name: sha for name, sha in sorted(files.items()) if name.startswith("fineweb_val_")}
    if not val:
        raise PgolfError(f"{manifest_path}: lists no fineweb_val_* shards; re-run `pgolf tokenize`")
    return {"tokenizer_sha256": manifest["tokenizer_sha256"], "vocab_size": manifest.get("vocab_size"),
            "val_shards": val, "manifest_sha256": sha256_file(manifest_path)}


def blob_header_fields(meta: dict[str, Any], ident: dict[str, Any], quantized_sha256: str,
                       code: dict[str, Any]) -> dict[str, Any]:
    """The blob header's own fields, from the quantized file's metadata, the data identity and the code
    measurement (quantize's --budget builds the same header to predict the packed size)."""
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


def print_report(rep: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pack → {out}")
    table.add_column("item")
    table.add_column("bytes", justify="right")
    table.add_column("detail")
    for name, size in rep["payload_sizes"].items():
        table.add_row(f"payload, {name}", f"{size:,}", "kept" if name == rep["codec"] else "")
    table.add_section()
    table.add_row("model (blob)", f"{rep['model_bytes']:,}", f"codec {rep['codec']}")
    table.add_row("code", f"{rep['code_bytes']:,}", f"{len(rep['code_files'])} files, {rep['code_codec']}")
    table.add_row("total", f"{rep['total_bytes']:,}",
                  f"limit {rep['limit']:,}: " + ("fits" if rep["fits"] else "OVER"))
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough that names are not cut
        console = Console(width=120)
    console.print(table)


def run(quantized: Path, data: Path, out: Path, cfg: PackConfig, metrics: Path) -> None:
    import typer

    try:
        codecs.check_name(cfg.codec, allow_auto=True)
    except PgolfError as exc:
        raise PgolfError(f"pack params: {exc}") from None
    if cfg.limit <= 0:
        raise PgolfError(f"pack params: limit={cfg.limit} must be a positive byte count")
    check_chunk_bytes(cfg.chunk_bytes)
    tensors, meta = load_tensors(quantized, kind="quantized")
    ident = data_identity(Path(data))
    if meta.get("tokenizer_sha256") != ident["tokenizer_sha256"]:
        raise PgolfError(f"{quantized} was trained with tokenizer {str(meta.get('tokenizer_sha256'))[:12]}…, but "
                         f"{data}/manifest.json has {ident['tokenizer_sha256'][:12]}…: vocab/tokenizer mismatch; "
                         "pack against the data the model was trained on")
    model_vocab = (meta.get("model_config") or {}).get("vocab_size")
    if ident["vocab_size"] is not None and model_vocab != ident["vocab_size"]:
        raise PgolfError(f"{quantized}: model vocab {model_vocab} != {ident['vocab_size']} in {data}/manifest.json; "
                         "pack against the data the model was trained on")
    if not isinstance(meta.get("schema"), dict):
        raise PgolfError(f"{quantized}: no quantization schema in its metadata; re-run `pgolf quantize`")

    tried = ", ".join(codecs.CODECS) if cfg.codec == "auto" else cfg.codec
    how = (f"in {cfg.chunk_bytes:,}-byte chunks, in parallel" if cfg.chunk_bytes else
           "as one stream (brotli-11 and zstd-22 take 1–2 minutes per 36 MB; pack.chunk_bytes parallelises)")
    print(f"pack: compressing {len(tensors)} tensors with {tried}, {how}")
    code = measure_code(cfg.codec)
    blob, header, sizes = build_blob(tensors, blob_header_fields(meta, ident, sha256_file(quantized), code), cfg.codec,
                                     cfg.chunk_bytes)
    total = len(blob) + code["bytes"]
    rep = {
        "model_bytes": len(blob), "code_bytes": code["bytes"], "total_bytes": total, "limit": cfg.limit,
        "fits": total <= cfg.limit, "headroom_bytes": cfg.limit - total,
        "codec": header["codec"], "payload_sizes": sizes, "raw_payload_bytes": header["payload"]["raw_bytes"],
        "payload_chunks": len(header["payload"].get("chunks") or [None]),
        "code_codec": code["codec"], "code_sizes": code["sizes"], "code_raw_bytes": code["raw_bytes"],
        "code_files": code["files"], "blob": str(out), "params": asdict(cfg),
    }
    if rep["fits"]:
        write_bytes(out, blob)
        rep["blob_sha256"] = sha256_file(out)
    elif out.exists():
        out.unlink()  # a stale blob from an earlier run would contradict this report
    write_json(metrics, rep)
    print_report(rep, out)
    if not rep["fits"]:
        print(f"pgolf: error: model {len(blob):,} + code {code['bytes']:,} = {total:,} bytes exceeds the limit of "
              f"{cfg.limit:,} by {total - cfg.limit:,}; no blob was written to {out} (the report is in {metrics}). "
              "Use fewer bits, a stronger clip or a smaller model.", file=sys.stderr)
        raise typer.Exit(1)
