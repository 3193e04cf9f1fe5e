"""verify's checks: each one a function of the shared context, registered in the order it runs.

A check returns the detail of a PASS, raises PgolfError for a FAIL (any other exception is a FAIL too:
a hostile or broken artifact must still end in a report, not a traceback), or raises Skip. A check whose
prerequisites (`needs`) did not pass is recorded as SKIP. A new check is one decorated function.
Nothing from the file is executed: pgolf blobs are JSON + raw bytes, and the challenge's
`final_model.int8.ptz` goes through torch.load(weights_only=True) only.
"""

from __future__ import annotations

import copy
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pgolf.audit import identity, model_checks
from pgolf.audit.challenge_claims import Claims
from pgolf.audit.denominator import audit_run
from pgolf.config.sections import NONCOMPLIANT_TTT, EvalConfig, ModelConfig, VerifyConfig
from pgolf.errors import PgolfError
from pgolf.formats import blob as blobfmt
from pgolf.formats.blob_model import model_config
from pgolf.formats import codecs
from pgolf.formats.code import measure_code
from pgolf.formats.dequant import dequantize
from pgolf.formats import record_int6
from pgolf.formats.official_int8 import infer_baseline_config, official_int8_state_dict, read_official_int8
from pgolf.formats.shards import shard_paths
from pgolf.nn.model import GPT, build_model, resolve_device
from pgolf.text.evaluate import EvalData
from pgolf.ttt.modes import score_weights
from pgolf.ttt.ngram_mix import NgramMixer

PGOLF, OFFICIAL, RECORD = "pgolf", "official-int8", "record-int6"
FORMATS = (PGOLF, OFFICIAL, RECORD)
NO_BLOB = "claims only"  # no artifact given: the claims' arithmetic against the data
ANY = FORMATS + (NO_BLOB,)


@dataclass
class Context:
    """What the checks read, and what earlier checks found for later ones."""

    blob: Path | None
    data: Path
    raw: bytes  # the whole file, read within verify.limit's bounds (pgolf.formats.blob.read_capped)
    fmt: str
    manifest: dict
    manifest_path: Path
    cfg: VerifyConfig
    eval_cfg: EvalConfig
    claimed: float | None
    header: dict | None = None
    payload: memoryview | None = None
    official: dict | None = None
    record: dict | None = None  # a record-family artifact as read (formats.record_int6)
    state_dict: dict[str, torch.Tensor] | None = None
    model_cfg: ModelConfig | None = None
    sizes: dict | None = None
    measured: dict | None = None
    challenge: Claims | None = None  # a submission's logs / submission.json, every run they claim
    model: GPT | None = None  # the decoded weights, built once for the model-level checks
    model_fp32: GPT | None = None  # the same in float32 (built_fp32)
    expected: dict | None = None  # a known-good list of validation file digests (--expect-manifest)
    eval_data: EvalData | None = None  # the validation tokens and bytes, loaded once
    file_digests: dict | None = None  # name → sha256 and MD5 of the val shards, sidecars and tokenizer, read once

    def val(self) -> EvalData:
        if self.eval_data is None:
            self.eval_data = EvalData.load(self.data)
        return self.eval_data

    def digests(self) -> dict[str, dict[str, str]]:
        if self.file_digests is None:
            self.file_digests = identity.digests(self.data, self.manifest)
        return self.file_digests


@dataclass
class Row:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str


class Skip(Exception):
    """Not applicable (or nothing to compare against); the message says why."""


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Context], str]
    formats: tuple[str, ...] = FORMATS
    needs: tuple[str, ...] = field(default=())
    only_if: Callable[[Context], bool] | None = None  # otherwise not a row at all (e.g. no submission logs given)


CHECKS: list[Check] = []


def check(name: str, *, formats: tuple[str, ...] = FORMATS, needs: tuple[str, ...] = (),
          only_if: Callable[[Context], bool] | None = None):
    """Register a check (decorator); stacked, one function serves several formats with different needs."""
    def register(fn: Callable[[Context], str]) -> Callable[[Context], str]:
        CHECKS.append(Check(name, fn, formats, needs, only_if))
        return fn
    return register


def detect_format(data: bytes) -> str:
    """pgolf by its magic; the challenge's int8 artifact by its zlib header; the record family's by PGRP or a
    brotli stream that opens a torch.save zip; else pgolf (whose magic check then fails)."""
    if data.startswith(blobfmt.MAGIC):
        return PGOLF
    if data.startswith(record_int6.PGRP):
        return RECORD
    if len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] * 256 + data[1]) % 31 == 0:
        return OFFICIAL
    return RECORD if record_int6.is_record_artifact(data) else PGOLF


def run_checks(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for spec in CHECKS:
        if ctx.fmt not in spec.formats or (spec.only_if is not None and not spec.only_if(ctx)):
            continue
        blocked = [r.name for r in rows if r.name in spec.needs and r.status != "PASS"]
        if blocked:
            rows.append(Row(spec.name, "SKIP", f"needs {', '.join(blocked)}"))
            continue
        try:
            rows.append(Row(spec.name, "PASS", spec.run(ctx)))
        except Skip as why:
            rows.append(Row(spec.name, "SKIP", str(why)))
        except PgolfError as exc:
            rows.append(Row(spec.name, "FAIL", str(exc)))
        except Exception as exc:  # noqa: BLE001 — see the module docstring
            rows.append(Row(spec.name, "FAIL", f"unexpected {type(exc).__name__}: {exc}"))
    return rows


# ---- integrity

@check("header", formats=(PGOLF,))
def pgolf_header(ctx: Context) -> str:
    ctx.header, ctx.payload = blobfmt.parse_blob(ctx.raw, ctx.blob, ctx.cfg.limit)
    chunks, streams = ctx.header["payload"].get("chunks"), ctx.header["payload"].get("streams")
    if streams:
        used = sorted({s["codec"] for s in streams})
        layout = f"v{blobfmt.VERSION_STREAMS}, {len(streams)} streams ({', '.join(used)})"
    else:
        layout = f"v{blobfmt.VERSION_CHUNKED}, {len(chunks)} chunks" if chunks else f"v{blobfmt.VERSION}"
    return f"blob {layout}, codec {ctx.header['codec']}, {len(ctx.header['tensors'])} tensors"


@check("header", formats=(OFFICIAL,))
def official_header(ctx: Context) -> str:
    ctx.official = obj = read_official_int8(ctx.raw, ctx.blob, ctx.cfg.limit)
    return f"{obj['__quant_format__']}: {len(obj['quantized'])} quantized, {len(obj['passthrough'])} kept"


@check("header", formats=(RECORD,))
def record_header(ctx: Context) -> str:
    ctx.record = obj = record_int6.read_record_int6(ctx.raw, ctx.blob, ctx.cfg.limit)
    kinds = sorted({re.sub(r" \(.*\)", "", k) for k in obj["m"].values()})
    return f"record int6 artifact, {obj['container']} container: {len(obj['m'])} weights ({', '.join(kinds)})"


@check("payload hash", formats=(PGOLF,), needs=("header",))
def pgolf_payload(ctx: Context) -> str:
    blobfmt.check_payload(ctx.header, ctx.payload, ctx.blob)
    return f"sha256 {ctx.header['payload']['sha256'][:16]}… matches ({len(ctx.payload):,} bytes)"


@check("payload hash", formats=(OFFICIAL,), needs=("header",))
def official_payload(ctx: Context) -> str:
    return "zlib adler-32 verified on decompression (this format records no sha256)"


@check("payload hash", formats=(RECORD,), needs=("header",))
def record_payload(ctx: Context) -> str:
    return "this format records no sha256; every stream decoded to its declared size and shapes"


# ---- size: the whole file plus the code that decodes and scores it

@check("size")
def size(ctx: Context) -> str:
    recorded = (ctx.header.get("code") or {}).get("bytes") if ctx.header else None
    code_codec = ((ctx.header or {}).get("code") or {}).get("codec", "auto")
    recomputed = measure_code(code_codec if code_codec in codecs.CODECS else "auto")["bytes"]
    code = max(recomputed, recorded) if isinstance(recorded, int) else recomputed
    total, limit = len(ctx.raw) + code, ctx.cfg.limit
    ctx.sizes = {"model_bytes": len(ctx.raw), "code_bytes_recorded": recorded, "code_bytes_recomputed": recomputed,
                 "code_bytes": code, "total_bytes": total, "limit": limit}
    detail = (f"model {len(ctx.raw):,} + code {code:,} (recorded {recorded if recorded is not None else 'n/a'}, "
              f"recomputed {recomputed:,}; the larger counts) = {total:,} vs limit {limit:,}")
    if total > limit:
        raise PgolfError(f"OVER by {total - limit:,}: {detail}")
    return detail


# ---- decoding

@check("decode", formats=(PGOLF,), needs=("header", "payload hash"))
def pgolf_decode(ctx: Context) -> str:
    ctx.model_cfg = model_config(ctx.header, ctx.blob)  # held to the schema before decoding
    tensors = blobfmt.decode_payload(ctx.header, ctx.payload, ctx.blob)
    ctx.state_dict = dequantize(tensors, ctx.header["schema"], str(ctx.blob))
    return f"{len(ctx.state_dict)} tensors, JSON + raw bytes only (nothing executed)"


def record_renamed(ctx: Context, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dequantized record weights (the script's names) onto the model of ctx.model_cfg."""
    with torch.device("meta"):  # the shapes alone
        wanted = {n: t.shape for n, t in GPT(ctx.model_cfg).state_dict().items()}
    return record_int6.to_pgolf_names(flat, wanted, str(ctx.blob))


@check("decode", formats=(RECORD,), needs=("header", "payload hash"))
def record_decode(ctx: Context) -> str:
    flat = record_int6.dequantize_record(ctx.record, str(ctx.blob))
    runs = ctx.challenge.runs if ctx.challenge else []
    hyper = next((r.hyperparameters for r in runs if r.hyperparameters), None)
    ctx.model_cfg, origin = record_int6.record_model_config(flat, int(ctx.manifest.get("vocab_size", 0)), hyper,
                                                            str(ctx.blob))
    ctx.state_dict = record_renamed(ctx, flat)
    c = ctx.model_cfg
    return (f"{len(ctx.state_dict)} tensors onto pgolf's model from {origin}: {c.num_layers} layers, width "
            f"{c.model_dim}; torch.load(weights_only=True), nothing executed")


@check("decode", formats=(OFFICIAL,), needs=("header", "payload hash"))
def official_decode(ctx: Context) -> str:
    ctx.state_dict = official_int8_state_dict(ctx.official, str(ctx.blob))
    ctx.model_cfg = c = infer_baseline_config(ctx.state_dict, int(ctx.manifest.get("vocab_size", 0)))
    return (f"baseline architecture: {c.num_layers} layers, width {c.model_dim}, {c.num_heads}/{c.num_kv_heads} "
            "heads; torch.load(weights_only=True), nothing executed")


# ---- the data it claims

@check("vocab", needs=("decode",))
def vocab(ctx: Context) -> str:
    want = int(ctx.manifest.get("vocab_size", -1))
    have = ctx.model_cfg.vocab_size
    if have != want:
        raise PgolfError(f"model vocab {have} != {want} in {ctx.manifest_path}: vocab/tokenizer mismatch")
    return f"{have} tokens"


@check("tokenizer", formats=(PGOLF,), needs=("header",))
def tokenizer(ctx: Context) -> str:
    claimed_sha = ctx.header.get("tokenizer_sha256")
    tok_path = ctx.data / str(ctx.manifest.get("tokenizer", "tokenizer.model"))
    if not tok_path.is_file():
        raise PgolfError(f"{tok_path}: tokenizer file missing from the data directory")
    actual = ctx.digests()[tok_path.name]["sha256"]
    if claimed_sha != ctx.manifest.get("tokenizer_sha256") or claimed_sha != actual:
        raise PgolfError(f"blob made for tokenizer {str(claimed_sha)[:12]}…, data has {actual[:12]}… ({tok_path}); "
                         "verify against the data it was made for")
    return f"sha256 {actual[:16]}… matches {tok_path}"


@check("tokenizer", formats=(OFFICIAL, RECORD))
def official_tokenizer(ctx: Context) -> str:
    raise Skip(f"the {ctx.fmt} format records no tokenizer; vocab size checked instead")


@check("val shards", formats=(PGOLF,), needs=("header",))
def val_shards(ctx: Context) -> str:
    claimed_val = ctx.header.get("val_shards")
    if not isinstance(claimed_val, dict) or not claimed_val:
        raise PgolfError(f"{ctx.blob}: header records no val shard hashes")
    val_files = {p.name for p in shard_paths(ctx.data, "val") + shard_paths(ctx.data, "val_bytes")}
    actual = {name: d["sha256"] for name, d in ctx.digests().items() if name in val_files}
    missing = sorted(set(claimed_val) - set(actual))
    extra = sorted(set(actual) - set(claimed_val))
    differ = sorted(n for n in set(claimed_val) & set(actual) if claimed_val[n] != actual[n])
    if missing or extra or differ:
        raise PgolfError(f"val set differs from the one the blob was made for: missing {missing}, "
                         f"unexpected {extra}, different content {differ} in {ctx.data}")
    return f"{len(actual)} files match by sha256"


@check("val shards", formats=(OFFICIAL, RECORD))
def official_val_shards(ctx: Context) -> str:
    raise Skip(f"the {ctx.fmt} format records no val shard hashes")


# ---- the validation files, whatever was given

@check("val identity", formats=ANY)
def val_identity(ctx: Context) -> str:
    """The scored files' sha256 and MD5 (against --expect-manifest when given) and the kind of text."""
    found = ctx.digests()
    kind = identity.text_kind(ctx.data, ctx.manifest)
    listed = "; ".join(f"{name} sha256 {d['sha256'][:16]}… md5 {d['md5']}" for name, d in found.items())
    if ctx.expected is not None:
        problems = identity.compare(found, ctx.expected)
        if problems:
            raise PgolfError(f"not the expected validation files: {'; '.join(problems)}")
        listed += f"; all {len(ctx.expected)} expected digests match"
    return f"{kind}; {listed}"


# ---- the model the artifact computes (pgolf.audit.model_checks), on a few hundred validation tokens

def built(ctx: Context) -> tuple[GPT, torch.device]:
    device = torch.device(resolve_device(ctx.eval_cfg.device))
    if ctx.model is None:
        ctx.model = build_model(ctx.model_cfg, ctx.state_dict, device).eval()
    return ctx.model, device


def built_fp32(ctx: Context) -> tuple[GPT, torch.device]:
    """The same model all in float32, for the checks that compare two forwards: under bf16 autocast two
    sequence lengths round differently (by up to 0.06 on a logit of 10, measured on an H200), which a
    tolerance tight enough to catch a leak would call one."""
    model, device = built(ctx)
    if ctx.model_fp32 is None:
        ctx.model_fp32 = copy.deepcopy(model).float()
    return ctx.model_fp32, device


@check("causality", needs=("decode", "vocab"))
def causality(ctx: Context) -> str:
    model, device = built_fp32(ctx)
    return model_checks.causality(model, model_checks.sample(ctx.val()), device)


@check("document isolation", needs=("decode", "vocab"))
def document_isolation(ctx: Context) -> str:
    model, device = built_fp32(ctx)
    if not model.cfg.doc_mask:
        raise Skip("the model attends across documents by design (doc_mask off), as the challenge's baseline does")
    tokens = model_checks.boundary_sample(ctx.val(), model.cfg.bos_id)
    if tokens is None:
        raise Skip("the validation stream is one document: no document start to test across")
    return model_checks.document_isolation(model, tokens, device)


@check("normalised distribution", needs=("decode", "vocab"))
def normalised_distribution(ctx: Context) -> str:
    model, device = built(ctx)
    mixer = None if ctx.eval_cfg.ngram_mix == "none" else \
        (lambda: NgramMixer.from_config(ctx.eval_cfg, model.cfg.vocab_size))  # the claim's scored distribution
    return model_checks.normalised(model, model_checks.sample(ctx.val()), ctx.val(), device, mixer)


@check("deterministic decode", formats=(PGOLF,), needs=("decode",))
def deterministic_decode(ctx: Context) -> str:
    again = dequantize(blobfmt.decode_payload(ctx.header, ctx.payload, ctx.blob), ctx.header["schema"], str(ctx.blob))
    return model_checks.same_weights(ctx.state_dict, again)


@check("deterministic decode", formats=(OFFICIAL,), needs=("decode",))
def official_deterministic_decode(ctx: Context) -> str:
    return model_checks.same_weights(ctx.state_dict, official_int8_state_dict(ctx.official, str(ctx.blob)))


@check("deterministic decode", formats=(RECORD,), needs=("decode",))
def record_deterministic_decode(ctx: Context) -> str:
    again = record_int6.dequantize_record(record_int6.read_record_int6(ctx.raw, ctx.blob, ctx.cfg.limit), str(ctx.blob))
    return model_checks.same_weights(ctx.state_dict, record_renamed(ctx, again))


# ---- what a submission's own files claim (logs, submission.json)

def from_submission(ctx: Context) -> bool:
    return ctx.challenge is not None


@check("claims agree", formats=ANY, only_if=lambda ctx: from_submission(ctx) and bool(ctx.challenge.stated))
def claims_agree(ctx: Context) -> str:
    """submission.json's stated mean against the mean of the runs its logs (or seed_results) report."""
    if ctx.challenge is None or not ctx.challenge.stated or ctx.challenge.runs == ctx.challenge.stated:
        raise Skip("needs the runs (logs or seed_results) beside submission.json's mean")
    stated = ctx.challenge.stated[0].val_bpb
    mean = statistics.fmean(r.val_bpb for r in ctx.challenge.runs)
    detail = f"stated {stated:.8f} vs {ctx.challenge.summary()} (|Δ| {abs(stated - mean):.2e})"
    if abs(stated - mean) > STATED_MEAN_SLACK:
        raise PgolfError(f"submission.json's val_bpb is not the mean of its runs: {detail}")
    return detail


STATED_MEAN_SLACK = 1e-6  # a mean of 8-decimal numbers, itself printed to 8 decimals


@check("claimed size", formats=ANY, only_if=from_submission)
def claimed_size(ctx: Context) -> str:
    """The total size each run (and submission.json) states, against the limit (PR #1809: 16,024,793)."""
    runs = [r for r in (ctx.challenge.runs + ctx.challenge.stated if ctx.challenge else []) if r.total_bytes]
    if not runs:
        raise Skip("no claimed total size in the claims")
    over = [f"{r.source}: {r.total_bytes:,} ({r.evidence.get('size', 'stated')})" for r in runs
            if r.total_bytes > ctx.cfg.limit]
    if over:
        raise PgolfError(f"over the {ctx.cfg.limit:,}-byte limit: {'; '.join(over)}")
    return (f"largest claimed {max(r.total_bytes for r in runs):,} bytes ≤ {ctx.cfg.limit:,} ({len(runs)} "
            f"claim{'s' if len(runs) > 1 else ''})")


@check("byte denominator", formats=ANY, only_if=from_submission)
def byte_denominator(ctx: Context) -> str:
    """Each run's implied byte count against the validation text's (pgolf.audit.denominator)."""
    runs = [r for r in (ctx.challenge.runs if ctx.challenge else []) if r.val_loss and r.tokens]
    if not runs:
        raise Skip("needs a claim stating val_loss, the token count and val_bpb (a training log)")
    verdicts = [audit_run(r, ctx.val()) for r in runs]
    failed = [detail for ok, detail in verdicts if not ok]
    if failed:
        raise PgolfError(" | ".join(failed))
    return " | ".join(detail for _, detail in verdicts)


# ---- the score

@check("ttt compliance")
def ttt_compliance(ctx: Context) -> str:
    """A claim made with a protocol that trains before it scores is refused outright: no re-run reproduces a
    valid score from it."""
    if ctx.eval_cfg.ttt in NONCOMPLIANT_TTT:
        raise PgolfError(f"the claim was made with ttt={ctx.eval_cfg.ttt}: {NONCOMPLIANT_TTT[ctx.eval_cfg.ttt]}; "
                         "not a valid score (re-score with a score-first mode, e.g. --set ttt=score_first)")
    return f"ttt={ctx.eval_cfg.ttt}: scores every target before any update that sees it"


@check("bpb", formats=(OFFICIAL, RECORD), needs=("decode", "vocab", "ttt compliance"))
@check("bpb", formats=(PGOLF,), needs=("decode", "vocab", "tokenizer", "val shards", "ttt compliance"))
def bpb(ctx: Context) -> str:
    ctx.measured = score_weights(ctx.state_dict, ctx.model_cfg, ctx.data, ctx.eval_cfg)
    got = float(ctx.measured["val_bpb"])
    if ctx.claimed is None:
        raise Skip(f"measured {got:.6f} (no claim given)")
    tolerance = ctx.cfg.tolerance
    detail = (f"measured {got:.6f} vs claimed {ctx.claimed:.6f} (|Δ| {abs(got - ctx.claimed):.6f}, "
              f"tolerance {tolerance})")
    if not abs(got - ctx.claimed) <= tolerance:
        raise PgolfError(f"claim not reproduced: {detail}")
    return detail
