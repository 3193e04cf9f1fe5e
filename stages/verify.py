"""verify: re-evaluate someone else's artifact against the data and the claim it comes with.

Each check is one row (PASS / FAIL / SKIP): header, payload hash, size, decode, vocab, tokenizer, val
shards, BPB vs the claim. Nothing from the file is executed: pgolf blobs are JSON + raw bytes, and the
challenge's `final_model.int8.ptz` goes through torch.load(weights_only=True) only. The JSON report is
written whatever the outcome; any FAIL exits 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from . import blob as blobfmt
from .artifacts import PgolfError, read_json, sha256_file, write_json
from .config import EvalConfig, ModelConfig, VerifyConfig, build
from .shards import shard_paths

FORMATS = ("auto", "pgolf", "official-int8")
CLAIM_EVAL_KEYS = ("seq_len", "stride", "val_tokens")


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str


class Checks:
    """Runs checks in order; a check whose prerequisites failed is recorded as SKIP."""

    def __init__(self) -> None:
        self.rows: list[Check] = []

    def add(self, name: str, status: str, detail: str) -> None:
        self.rows.append(Check(name, status, detail))

    def run(self, name: str, fn: Callable[[], str], needs: tuple[str, ...] = ()) -> bool:
        blocked = [r.name for r in self.rows if r.name in needs and r.status != "PASS"]
        if blocked:
            self.add(name, "SKIP", f"needs {', '.join(blocked)}")
            return False
        try:
            self.add(name, "PASS", fn())
            return True
        except PgolfError as exc:
            self.add(name, "FAIL", str(exc))
            return False
        except Exception as exc:  # a hostile or broken artifact must still end in a report, not a traceback
            self.add(name, "FAIL", f"unexpected {type(exc).__name__}: {exc}")
            return False

    def passed(self, name: str) -> bool:
        return any(r.name == name and r.status == "PASS" for r in self.rows)

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.rows)


def detect_format(data: bytes) -> str:
    """pgolf by its magic; the challenge's int8 artifact by its zlib header; else pgolf (the magic check fails)."""
    if data.startswith(blobfmt.MAGIC):
        return "pgolf"
    if len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] * 256 + data[1]) % 31 == 0:
        return "official-int8"
    return "pgolf"


def load_claim(claim: float | None, claims: Path | None) -> tuple[float | None, dict[str, Any], str | None]:
    """(claimed val_bpb, eval settings the claim was measured with, where it came from)."""
    if claim is not None and claims is not None:
        raise PgolfError("give either --claim or --claims, not both")
    if claim is not None:
        if not math.isfinite(claim) or claim <= 0:
            raise PgolfError(f"--claim {claim}: expected a positive BPB")
        return float(claim), {}, "--claim"
    if claims is None:
        return None, {}, None
    obj = read_json(claims, "claims file")
    value = obj.get("val_bpb") if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PgolfError(f"{claims}: needs a positive number under 'val_bpb' (e.g. a ttt_eval_metrics.json)")
    # ttt-eval records its settings under "eval"; accept them at the top level too.
    nested = obj.get("eval") if isinstance(obj.get("eval"), dict) else {}
    settings = {}
    for key in CLAIM_EVAL_KEYS:
        v = nested.get(key, obj.get(key))
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            settings[key] = v
    return float(value), settings, str(claims)


def eval_settings(eval_cfg: EvalConfig, claimed: dict[str, Any], overrides: dict[str, Any] | None
                  ) -> tuple[EvalConfig, dict[str, str]]:
    """Eval settings: params < the claim's own (seq_len, stride, val_tokens) < explicit command-line
    overrides, so a claim is re-scored the way it was measured unless the user says otherwise."""
    overrides = overrides or {}
    cfg = build(EvalConfig, (asdict(eval_cfg), "params"), (claimed, "claims file"), (overrides, "--set"))
    sources = {f.name: "command line" if f.name in overrides else "claim" if f.name in claimed else "params"
               for f in fields(EvalConfig)}
    return cfg, sources


def infer_baseline_config(state_dict: dict[str, torch.Tensor], vocab_size: int) -> ModelConfig:
    """The baseline architecture, shaped by the tensors present (layers, width, heads, MLP, tying)."""
    layers = {int(m.group(1)) for n in state_dict if (m := re.match(r"blocks\.(\d+)\.", n))}
    need = ["tok_emb.weight", "blocks.0.attn.q_gain", "blocks.0.attn.c_k.weight", "blocks.0.mlp.fc.weight"]
    missing = [n for n in need if n not in state_dict]
    if missing or layers != set(range(len(layers))):
        raise PgolfError(f"not the baseline architecture: missing {missing or 'a contiguous blocks.0..N-1'}")
    emb = state_dict["tok_emb.weight"]
    dim = int(emb.shape[1])
    heads = int(state_dict["blocks.0.attn.q_gain"].numel())
    if heads < 1 or dim % heads:
        raise PgolfError(f"not the baseline architecture: {heads} q_gain heads do not divide width {dim}")
    head_dim = dim // heads
    cfg = ModelConfig(vocab_size=vocab_size, num_layers=len(layers), model_dim=dim, num_heads=heads,
                      num_kv_heads=max(1, int(state_dict["blocks.0.attn.c_k.weight"].shape[0]) // head_dim),
                      mlp_mult=max(1, int(state_dict["blocks.0.mlp.fc.weight"].shape[0]) // dim),
                      tie_embeddings="lm_head.weight" not in state_dict)
    cfg.validate("official int8 artifact")
    if int(emb.shape[0]) != vocab_size:
        raise PgolfError(f"tok_emb has {int(emb.shape[0])} rows but the data's vocabulary is {vocab_size}: "
                         "vocab/tokenizer mismatch; verify against the data the model was trained on")
    return cfg


def actual_val_shards(data: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(shard_paths(data, "val") + shard_paths(data, "val_bytes"))}


def print_table(checks: list[Check], blob: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    table = Table(title=f"verify {blob}")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(c.name, f"[{style[c.status]}]{c.status}[/]", c.detail)
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough that names are not cut
        console = Console(width=120)
    console.print(table)


def run(blob: Path, data: Path, cfg: VerifyConfig, eval_cfg: EvalConfig, claim: float | None,
        claims: Path | None, fmt: str, report: Path, eval_overrides: dict[str, Any] | None = None) -> None:
    import typer

    if fmt not in FORMATS:
        raise PgolfError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if cfg.limit <= 0 or cfg.tolerance < 0:
        raise PgolfError(f"verify params: limit ({cfg.limit}) must be positive and tolerance ({cfg.tolerance}) >= 0")
    blob, data = Path(blob), Path(data)
    if not blob.is_file():
        raise PgolfError(f"{blob}: file not found")
    if blob.stat().st_size > blobfmt.MAX_RAW_BYTES:
        raise PgolfError(f"{blob}: {blob.stat().st_size:,} bytes; far beyond any size limit, not read")
    manifest_path = data / "manifest.json"
    manifest = read_json(manifest_path, "tokenized-data manifest")
    claimed, claim_settings, claim_source = load_claim(claim, claims)
    ecfg, eval_sources = eval_settings(eval_cfg, claim_settings, eval_overrides)
    raw = blob.read_bytes()
    fmt = detect_format(raw) if fmt == "auto" else fmt
    checks = Checks()
    state: dict[str, Any] = {}
    measured: dict[str, Any] | None = None

    # ---- integrity and decoding
    if fmt == "pgolf":
        def header() -> str:
            state["header"], state["payload"] = blobfmt.parse_blob(raw, blob)
            h = state["header"]
            chunks = h["payload"].get("chunks")
            layout = f"v{blobfmt.VERSION_CHUNKED}, {len(chunks)} chunks" if chunks else f"v{blobfmt.VERSION}"
            return f"blob {layout}, codec {h['codec']}, {len(h['tensors'])} tensors"

        def payload() -> str:
            blobfmt.check_payload(state["header"], state["payload"], blob)
            return f"sha256 {state['header']['payload']['sha256'][:16]}… matches ({len(state['payload']):,} bytes)"

        def decode() -> str:
            from .quant import dequantize

            h = state["header"]
            tensors = blobfmt.decode_payload(h, state["payload"], blob)
            state["state_dict"] = dequantize(tensors, h.get("schema"), str(blob))
            try:
                state["model_cfg"] = ModelConfig(**h["model_config"])
            except (KeyError, TypeError) as exc:
                raise PgolfError(f"{blob}: model config in the header is not understood ({exc})") from None
            state["model_cfg"].validate(f"{blob}: model config")
            return f"{len(state['state_dict'])} tensors, JSON + raw bytes only (nothing executed)"

        checks.run("header", header)
        checks.run("payload hash", payload, needs=("header",))
    else:
        def header() -> str:
            from .quant import read_official_int8

            state["obj"] = obj = read_official_int8(blob)
            return f"{obj['__quant_format__']}: {len(obj['quantized'])} quantized, {len(obj['passthrough'])} kept"

        def decode() -> str:
            from .quant import official_int8_state_dict

            state["state_dict"] = official_int8_state_dict(state["obj"], str(blob))
            state["model_cfg"] = infer_baseline_config(state["state_dict"], int(manifest.get("vocab_size", 0)))
            c = state["model_cfg"]
            return (f"baseline architecture: {c.num_layers} layers, width {c.model_dim}, {c.num_heads}/{c.num_kv_heads} "
                    "heads; torch.load(weights_only=True), nothing executed")

        checks.run("header", header)
        checks.add("payload hash", "PASS" if checks.passed("header") else "SKIP",
                   "zlib adler-32 verified on decompression (this format records no sha256)")

    # ---- size: the whole file plus the code that decodes and scores it
    def size() -> str:
        from .pack import measure_code

        recorded = None
        if fmt == "pgolf" and "header" in state:
            recorded = (state["header"].get("code") or {}).get("bytes")
        code_codec = ((state.get("header") or {}).get("code") or {}).get("codec", "auto")
        recomputed = measure_code(code_codec if code_codec in blobfmt.codecs.CODECS else "auto")["bytes"]
        code = max(recomputed, recorded) if isinstance(recorded, int) else recomputed
        total = len(raw) + code
        state["sizes"] = {"model_bytes": len(raw), "code_bytes_recorded": recorded,
                          "code_bytes_recomputed": recomputed, "code_bytes": code, "total_bytes": total,
                          "limit": cfg.limit}
        detail = (f"model {len(raw):,} + code {code:,} (recorded {recorded if recorded is not None else 'n/a'}, "
                  f"recomputed {recomputed:,}; the larger counts) = {total:,} vs limit {cfg.limit:,}")
        if total > cfg.limit:
            raise PgolfError(f"OVER by {total - cfg.limit:,}: {detail}")
        return detail

    checks.run("size", size)
    checks.run("decode", decode, needs=("header", "payload hash"))

    # ---- the data it claims
    def vocab() -> str:
        want = int(manifest.get("vocab_size", -1))
        have = state["model_cfg"].vocab_size
        if have != want:
            raise PgolfError(f"model vocab {have} != {want} in {manifest_path}: vocab/tokenizer mismatch")
        return f"{have} tokens"

    checks.run("vocab", vocab, needs=("decode",))
    if fmt == "pgolf":
        def tokenizer() -> str:
            claimed_sha = state["header"].get("tokenizer_sha256")
            tok_path = data / str(manifest.get("tokenizer", "tokenizer.model"))
            if not tok_path.is_file():
                raise PgolfError(f"{tok_path}: tokenizer file missing from the data directory")
            actual = sha256_file(tok_path)
            if claimed_sha != manifest.get("tokenizer_sha256") or claimed_sha != actual:
                raise PgolfError(f"blob made for tokenizer {str(claimed_sha)[:12]}…, data has {actual[:12]}… "
                                 f"({tok_path}); verify against the data it was made for")
            return f"sha256 {actual[:16]}… matches {tok_path}"

        def val_shards() -> str:
            claimed_val = state["header"].get("val_shards")
            if not isinstance(claimed_val, dict) or not claimed_val:
                raise PgolfError(f"{blob}: header records no val shard hashes")
            actual = actual_val_shards(data)
            missing = sorted(set(claimed_val) - set(actual))
            extra = sorted(set(actual) - set(claimed_val))
            differ = sorted(n for n in set(claimed_val) & set(actual) if claimed_val[n] != actual[n])
            if missing or extra or differ:
                raise PgolfError(f"val set differs from the one the blob was made for: missing {missing}, "
                                 f"unexpected {extra}, different content {differ} in {data}")
            return f"{len(actual)} files match by sha256"

        checks.run("tokenizer", tokenizer, needs=("header",))
        checks.run("val shards", val_shards, needs=("header",))
    else:
        checks.add("tokenizer", "SKIP", "the official int8 format records no tokenizer; vocab size checked instead")
        checks.add("val shards", "SKIP", "the official int8 format records no val shard hashes")

    # ---- the score
    def bpb() -> str:
        nonlocal measured
        from .ttt_eval import evaluate_state_dict

        measured = evaluate_state_dict(state["state_dict"], state["model_cfg"], data, ecfg)
        got = float(measured["val_bpb"])
        if claimed is None:
            return f"measured {got:.6f} (no claim given)"
        detail = f"measured {got:.6f} vs claimed {claimed:.6f} (|Δ| {abs(got - claimed):.6f}, tolerance {cfg.tolerance})"
        if not abs(got - claimed) <= cfg.tolerance:
            raise PgolfError(f"claim not reproduced: {detail}")
        return detail

    checks.run("bpb", bpb, needs=("decode", "vocab", "tokenizer", "val shards") if fmt == "pgolf" else ("decode", "vocab"))
    if claimed is None and checks.rows[-1].status == "PASS":
        checks.rows[-1].status = "SKIP"  # measured, but nothing to compare against

    result = {
        "passed": not checks.failed,
        "blob": str(blob), "blob_sha256": sha256_file(blob), "format": fmt, "data": str(data),
        "checks": [asdict(c) for c in checks.rows],
        "claim": {"val_bpb": claimed, "source": claim_source, "tolerance": cfg.tolerance},
        "measured": measured,
        "sizes": state.get("sizes"),
        "eval": asdict(ecfg), "eval_sources": eval_sources,
        "model_config": asdict(state["model_cfg"]) if "model_cfg" in state else None,
    }
    write_json(report, result)
    print_table(checks.rows, blob)
    if checks.failed:
        failed = ", ".join(c.name for c in checks.rows if c.status == "FAIL")
        print(f"verify: FAILED ({failed}); report in {report}")
        raise typer.Exit(1)
    print(f"verify: all checks passed; report in {report}")
