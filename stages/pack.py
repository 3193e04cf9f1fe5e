"""pack: quantized.safetensors + data manifest → model.pgolf (one blob) and a size report.

The challenge counts code bytes + compressed model bytes against 16,000,000. Model bytes are the whole
blob file (pgolf.formats.blob_writer); code bytes are the compressed decode path, the sources needed to
read and score it (pgolf.formats.code). Over the limit the report is still written, the blob is not,
and the stage is rejected (exit 1).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from pgolf.config.sections import PackConfig
from pgolf.errors import PgolfError, Rejected
from pgolf.formats import codecs
from pgolf.formats.blob_writer import build_blob
from pgolf.formats.code import measure_code
from pgolf.formats.files import load_tensors, sha256_file, write_bytes, write_json
from pgolf.formats.submission import blob_header_fields, data_identity


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
           "as one stream (pack.chunk_bytes compresses chunks in parallel)")
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
        raise Rejected(f"model {len(blob):,} + code {code['bytes']:,} = {total:,} bytes exceeds the limit of "
                       f"{cfg.limit:,} by {total - cfg.limit:,}; no blob was written to {out} (the report is in "
                       f"{metrics}). Use fewer bits, a stronger clip or a smaller model.")
