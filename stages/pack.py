"""pack: quantized.safetensors + data manifest → model.pgolf (one blob) and a size report.

The challenge counts code bytes + compressed model bytes against 16,000,000. Model bytes are the whole
blob file (pgolf.formats.blob_writer); code bytes are the compressed decode path, the sources needed to
read and score it (pgolf.formats.code). Over the limit the report is still written, no blob is (an
existing one is left as it was), and the stage is rejected (exit 1).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pgolf.config.sections import PackConfig
from pgolf.errors import PgolfError, Rejected
from pgolf.formats import codecs
from pgolf.formats.blob_writer import build_blob
from pgolf.formats.code import measure_code
from pgolf.formats.files import load_tensors, sha256_file, write_bytes
from pgolf.formats.submission import blob_header_fields, check_data_matches, data_identity
from pgolf.report.metrics import write_metrics
from pgolf.report.progress import Bar


def print_report(rep: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pack → {out}")
    table.add_column("item")
    table.add_column("bytes", justify="right")
    table.add_column("detail")
    for name, size in rep["payload_sizes"].items():
        table.add_row(f"payload, {name}", f"{size:,}", "kept" if name == rep["codec"] else
                      "where smallest" if rep["streams"] and name in {s["codec"] for s in rep["streams"]} else "")
    if rep["streams"]:
        table.add_section()
    for st in rep["streams"]:
        table.add_row(f"  stream {st['name']}", f"{st['compressed_bytes']:,}",
                      f"{st['codec']}, {st['raw_bytes']:,} raw ({8 * st['compressed_bytes'] / st['raw_bytes']:.2f} bits/byte)")
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
    t0 = time.perf_counter()
    tensors, meta = load_tensors(quantized, kind="quantized")
    model_vocab = (meta.get("model_config") or {}).get("vocab_size")
    check_data_matches(Path(data), meta.get("tokenizer_sha256"), model_vocab, str(quantized))
    ident = data_identity(Path(data))
    if not isinstance(meta.get("schema"), dict):
        raise PgolfError(f"{quantized}: no quantization schema in its metadata; re-run `pgolf quantize`")

    tried = ", ".join(codecs.AUTO) if cfg.codec == "auto" else cfg.codec
    how = (f"as per-group streams, rows sorted: {cfg.sort_rows}" if cfg.container == "pergroup" else
           f"in {cfg.chunk_bytes:,}-byte chunks, in parallel" if cfg.chunk_bytes else "as one stream")
    print(f"pack: compressing {len(tensors)} tensors with {tried}, {how}")
    code = measure_code(cfg.codec)
    with Bar(f"pack: compressing with {tried}", None):  # one call: a spinner and the time it takes
        blob, header, sizes = build_blob(tensors, blob_header_fields(meta, ident, sha256_file(quantized), code),
                                         cfg.codec, cfg.chunk_bytes, cfg.container, cfg.sort_rows)
    total = len(blob) + code["bytes"]
    rep = {
        "model_bytes": len(blob), "code_bytes": code["bytes"], "total_bytes": total, "limit": cfg.limit,
        "fits": total <= cfg.limit, "headroom_bytes": cfg.limit - total,
        "codec": header["codec"], "payload_sizes": sizes, "raw_payload_bytes": header["payload"]["raw_bytes"],
        "payload_chunks": len(header["payload"].get("chunks") or [None]),
        "streams": [{k: st[k] for k in ("name", "codec", "raw_bytes", "compressed_bytes")}
                    for st in header["payload"].get("streams", [])],
        "code_codec": code["codec"], "code_sizes": code["sizes"], "code_raw_bytes": code["raw_bytes"],
        "code_files": code["files"], "blob": str(out), "params": asdict(cfg),
    }
    if rep["fits"]:
        write_bytes(out, blob)
        rep["blob_sha256"] = sha256_file(out)
    # passed: fits the limit (else the stage is rejected, as verify is on a failed check): one column for both
    report = write_metrics(metrics, {"bytes": total, "passed": rep["fits"], "seconds": round(time.perf_counter() - t0, 1)},
                           rep)
    print_report(rep, out)
    if not rep["fits"]:
        kept = f"; the existing {out} is left as it was" if out.exists() else ""
        raise Rejected(f"model {len(blob):,} + code {code['bytes']:,} = {total:,} bytes exceeds the limit of "
                       f"{cfg.limit:,} by {total - cfg.limit:,}; no blob was written (the sizes are in {report}"
                       f"{kept}). Use fewer bits, a stronger clip or a smaller model.")
