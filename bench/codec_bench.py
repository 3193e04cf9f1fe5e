"""The same quantized codes under every packing: one stream vs per-group streams, each codec, rows sorted
or not, against the order-0 entropy of the codes (issue 14's codec table; CPU only).

    python bench/codec_bench.py BLOB OUT.json [--budget-report quantize_budget_loss_report.json]

BLOB is a packed recipe (bench/gpu_fit16mb.sh returns it); its tensors are decoded once and re-packed
with build_blob exactly as `pgolf pack` would, then decoded again (timed, checked bit-exact). lrzip rows
need the `lrzip` program on PATH (Debian's package). With --budget-report, the codes are also re-scaled
to the widths that budget chose (q·2^(b−6), clamped: an emulation of mixed widths, not GPTQ at those
widths) to compare one ans histogram per stream against one per tensor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pgolf.formats import ans, codecs
from pgolf.formats.blob import check_payload, decode_payload, parse_blob, read_blob
from pgolf.formats.blob_writer import build_blob, plan_streams
from pgolf.formats.files import sha256_file

LIMIT = 64_000_000


def entropy_bytes(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / counts.sum())).sum() / 8)


def measure(tensors, fields, codec, container, sort_rows) -> dict:
    t0 = time.perf_counter()
    blob, header, _ = build_blob(tensors, fields, codec, 0, container, sort_rows)
    packed = time.perf_counter() - t0
    t0 = time.perf_counter()
    parsed, payload = parse_blob(blob, "bench", LIMIT)
    check_payload(parsed, payload, "bench")
    out = decode_payload(parsed, payload, "bench")
    unpacked = time.perf_counter() - t0
    assert all(torch.equal(out[n], t) for n, t in tensors.items()), "not bit-exact"
    row = {"codec": codec, "container": container, "sort_rows": sort_rows, "blob_bytes": len(blob),
           "pack_s": round(packed, 1), "unpack_s": round(unpacked, 1)}
    if "streams" in header["payload"]:
        row["streams"] = {s["name"]: [s["codec"], s["compressed_bytes"]] for s in header["payload"]["streams"]}
    print(json.dumps({k: v for k, v in row.items() if k != "streams"}), flush=True)
    return row


def code_bounds(tensors) -> dict:
    """Per code stream: order-0 entropy of the whole stream and the sum over its tensors, in bytes."""
    rows = {n: {"name": n, "dtype": "int8", "shape": list(t.shape), "nbytes": t.numel()} for n, t in tensors.items()
            if n.endswith("#codes")}
    out = {}
    for s in plan_streams(list(rows.values())):
        parts = [tensors[n].numpy().T.tobytes() for n, _ in s["items"]]
        data = b"".join(parts)
        out[s["name"]] = {"raw": len(data), "entropy_stream": round(entropy_bytes(data)),
                          "entropy_per_tensor": round(sum(entropy_bytes(p) for p in parts)),
                          "ans": len(ans.compress(data))}
    return out


def mixed_widths(tensors, header, report) -> dict:
    """ans with one histogram per stream vs one per tensor, and brotli, on codes re-scaled to budget's widths."""
    chosen = report["budget"]["tensors"]
    scaled = {}
    for name, entry in header["schema"].items():
        if name in chosen and "codes" in entry["parts"]:
            q = tensors[entry["parts"]["codes"]].to(torch.int32)
            b, b0 = chosen[name]["bits"], entry["bits"]
            r = 2 ** (b - 1) - 1
            scaled[name] = torch.clamp(torch.round(q * 2.0 ** (b - b0)), -r, r).to(torch.int8)
    rows = {n: {"name": n, "dtype": "int8", "shape": list(t.shape), "nbytes": t.numel()} for n, t in scaled.items()}
    out = {"ans_one_histogram": 0, "ans_per_tensor": 0, "brotli": 0, "entropy_per_tensor": 0}
    for s in plan_streams([{**r, "name": n + "#codes"} for n, r in rows.items()]):
        parts = [scaled[n[:-len("#codes")]].numpy().T.tobytes() for n, _ in s["items"]]
        data = b"".join(parts)
        out["ans_one_histogram"] += len(ans.compress(data))
        out["ans_per_tensor"] += len(ans.compress(data, [len(p) for p in parts]))
        out["brotli"] += len(codecs.compress("brotli", data))
        out["entropy_per_tensor"] += round(sum(entropy_bytes(p) for p in parts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("blob", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget-report", type=Path)
    args = ap.parse_args()
    header, tensors = read_blob(args.blob, LIMIT)
    fields = {k: v for k, v in header.items() if k not in ("format", "codec", "codec_settings", "payload", "tensors")}
    tensors = {n: t.clone() for n, t in tensors.items()}
    result = {"blob": str(args.blob), "blob_sha256": sha256_file(args.blob), "raw_payload_bytes": header["payload"]["raw_bytes"],
              "code_bounds": code_bounds(tensors), "rows": []}
    plain = [c for c in codecs.AUTO]
    have_lrzip = shutil.which("lrzip") is not None
    for codec in plain:
        result["rows"].append(measure(tensors, fields, codec, "single", "never"))
    for codec in plain + (["lrzip"] if have_lrzip else []):
        result["rows"].append(measure(tensors, fields, codec, "pergroup", "never"))
    for codec in ["brotli"] + (["lrzip"] if have_lrzip else []):
        result["rows"].append(measure(tensors, fields, codec, "pergroup", "always"))
    result["rows"].append(measure(tensors, fields, "auto", "pergroup", "auto"))
    if args.budget_report:
        result["mixed_widths_emulated"] = mixed_widths(tensors, header, json.loads(args.budget_report.read_text()))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
