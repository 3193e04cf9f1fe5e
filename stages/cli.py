"""The `pgolf` command: seven stages, each reading the previous stage's files and writing its own.

Every stage takes `--params params.yaml` (its section there) and `--set KEY=VALUE` overrides; the
named options below are shortcuts for the most used keys. Stage modules are imported lazily so that
`pgolf --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from .artifacts import PgolfError

app = typer.Typer(
    help="pgolf: Parameter Golf as a pipeline. `dvc repro` runs the whole chain; each stage also runs alone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read the stage's section from (skipped if absent).")
SETS = typer.Option(None, "--set", "-s", help="Override a param: --set iterations=100, --set model.num_layers=4 (repeatable).")


def _run(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except PgolfError as exc:
        typer.echo(f"pgolf: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("pgolf: interrupted; no partial artifact was written", err=True)
        raise typer.Exit(130) from None


def _sets(params_path: Path, sets: Optional[list[str]], named: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from .config import load_params, parse_sets

    merged = parse_sets(sets)
    merged.update({k: v for k, v in named.items() if v is not None})
    return load_params(params_path), merged


@app.command(epilog="Example: pgolf tokenize data/raw --out data/tokenized --set vocab_size=1024 --set val_docs=2")
def tokenize(
    inputs: list[Path] = typer.Argument(..., help=".jsonl(.gz/.xz/.zst) with a `text` field, .txt files (one document each), "
                                             "directories of those, or one directory of existing challenge shards + tokenizer."),
    out: Path = typer.Option(Path("data/tokenized"), help="Output directory for shards, tokenizer and manifest."),
    tokenizer: Optional[Path] = typer.Option(None, help="Reuse this SentencePiece .model instead of training one."),
    vocab_size: Optional[int] = typer.Option(None, help="Tokenizer vocabulary size (params: tokenize.vocab_size)."),
    val_docs: Optional[int] = typer.Option(None, help="The first N documents are validation (challenge: 50,000)."),
    caseops: Optional[bool] = typer.Option(None, "--caseops/--no-caseops", help="Lossless case transform before "
                                           "SentencePiece; BPB then comes from the byte sidecar (params: tokenize.caseops)."),
    metrics: Path = typer.Option(Path("artifacts/tokenize_metrics.json"), help="Metrics JSON to write."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Tokenize documents into challenge-format shards plus the canonical byte sidecar and a manifest."""
    def go() -> None:
        from . import tokenize as stage
        from .config import TokenizeConfig, stage_config

        p, s = _sets(params, sets, {"vocab_size": vocab_size, "val_docs": val_docs, "caseops": caseops})
        stage.run(inputs, out, stage_config(TokenizeConfig, "tokenize", p, s, params), tokenizer, metrics)
    _run(go)


@app.command(epilog="Example: pgolf train --data data/tokenized --set preset=tiny --set iterations=50")
def train(
    data: Path = typer.Option(Path("data/tokenized"), help="Tokenized data directory (from `pgolf tokenize`)."),
    out: Path = typer.Option(Path("artifacts/ckpt.safetensors"), help="Checkpoint to write."),
    preset: Optional[str] = typer.Option(None, help="Preset: tiny | baseline | record | pr2071 | pr398 (params: preset)."),
    iterations: Optional[int] = typer.Option(None, help="Training steps (params: train.iterations)."),
    max_wallclock_seconds: Optional[float] = typer.Option(None, help="Wall-clock cap in seconds; 0 = none."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    metrics: Path = typer.Option(Path("artifacts/train_metrics.json"), help="Metrics JSON to write."),
    loss_log: Path = typer.Option(Path("artifacts/train_log.csv"), help="Per-step loss table (for `dvc plots`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last saved state "
                                "(saved every train.checkpoint_every steps beside --out)."),
    suspend_after: Optional[float] = typer.Option(None, "--suspend-after", min=0, help="Save the full state and stop "
                                                  "after this many seconds (compiling included), to go on later "
                                                  "with --resume: for machines held by the call or the hour."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Train the model on the train shards; multi-GPU with `torchrun --nproc_per_node=N -m stages.cli train`."""
    def go() -> None:
        from . import train as stage
        from .config import ModelConfig, TrainConfig, stage_config

        p, s = _sets(params, sets, {"preset": preset, "iterations": iterations,
                                   "max_wallclock_seconds": max_wallclock_seconds, "device": device})
        stage.run(data, out, stage_config(ModelConfig, "model", p, s, params),
                  stage_config(TrainConfig, "train", p, s, params), metrics, loss_log, resume, suspend_after)
    _run(go)


@app.command(epilog="Example: pgolf calibrate artifacts/ckpt.safetensors --data data/tokenized --set n_batches=4")
def calibrate(
    ckpt: Path = typer.Argument(Path("artifacts/ckpt.safetensors"), help="Checkpoint from `pgolf train`."),
    data: Path = typer.Option(Path("data/tokenized"), help="Tokenized data directory (training shards are read)."),
    out: Path = typer.Option(Path("artifacts/hessians.safetensors"), help="Hessians file to write."),
    metrics: Path = typer.Option(Path("artifacts/calibrate_metrics.json"), help="Metrics JSON to write."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Collect H = E[x xᵀ] of every linear layer's input over training batches."""
    def go() -> None:
        from . import calibrate as stage
        from .config import CalibrateConfig, stage_config

        p, s = _sets(params, sets, {})
        stage.run(ckpt, data, out, stage_config(CalibrateConfig, "calibrate", p, s, params), metrics)
    _run(go)


@app.command(epilog="Example: pgolf quantize --bits 6 artifacts/ckpt.safetensors   "
             "(GPTQ: --method gptq --hessians artifacts/hessians.safetensors --clip sdclip --embed-bits 7; "
             "to a byte budget: --budget 16000000)")
def quantize(
    ckpt: Path = typer.Argument(..., help="Checkpoint from `pgolf train`."),
    bits: Optional[int] = typer.Option(None, help="Bits per weight, 2..8 (params: quantize.bits)."),
    method: Optional[str] = typer.Option(None, help="rtn | gptq (gptq needs --hessians; without them it falls back to rtn)."),
    clip: Optional[str] = typer.Option(None, help="percentile (the reference's) | sdclip (k·std per row)."),
    embed_bits: Optional[int] = typer.Option(None, help="Bits for the embedding/head (0 = --bits)."),
    attn_bits: Optional[int] = typer.Option(None, help="Bits for attention matrices (0 = --bits)."),
    mlp_bits: Optional[int] = typer.Option(None, help="Bits for MLP matrices (0 = --bits)."),
    lqer_top_k: Optional[int] = typer.Option(None, help="Low-rank (LQER) correction of the k tensors with the largest error; 0 = off."),
    budget: Optional[int] = typer.Option(None, help="Choose per-tensor bits (and LQER on/off) so the packed artifact "
                                         "(model + code) fits this many bytes with the least Hessian-weighted error; 0 = off."),
    data: Optional[Path] = typer.Option(Path("data/tokenized"), help="Tokenized data (with --budget: exact packed sizes; "
                                        "skipped if absent)."),
    hessians: Optional[Path] = typer.Option(None, help="Hessians from `pgolf calibrate` (used by gptq; weighted errors in the report)."),
    out: Optional[Path] = typer.Option(None, help="Output file [default: quantized.safetensors beside CKPT]."),
    metrics: Optional[Path] = typer.Option(None, help="Report JSON [default: quantize_metrics.json beside the output]."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Quantize a checkpoint's weights to integer codes plus scales (self-describing safetensors)."""
    def go() -> None:
        from . import quantize as stage
        from .config import PackConfig, QuantizeConfig, stage_config

        p, s = _sets(params, sets, {"bits": bits, "method": method, "clip": clip, "embed_bits": embed_bits,
                                   "attn_bits": attn_bits, "mlp_bits": mlp_bits, "lqer_top_k": lqer_top_k,
                                   "budget": budget})
        target = out or ckpt.with_name("quantized.safetensors")
        packing = stage_config(PackConfig, "pack", p, {}, params)  # the budget is measured as pack will pack
        stage.run(ckpt, target, stage_config(QuantizeConfig, "quantize", p, s, params), hessians,
                  metrics or target.with_name("quantize_metrics.json"), pack_codec=packing.codec,
                  pack_chunk_bytes=packing.chunk_bytes,
                  data=data if data is not None and (data / "manifest.json").is_file() else None)
    _run(go)


@app.command(epilog="Example: pgolf pack artifacts/quantized.safetensors --data data/tokenized --codec auto")
def pack(
    quantized: Path = typer.Argument(Path("artifacts/quantized.safetensors"), help="Output of `pgolf quantize`."),
    data: Path = typer.Option(Path("data/tokenized"), help="Tokenized data whose tokenizer and val shards the blob is made for."),
    out: Path = typer.Option(Path("artifacts/model.pgolf"), help="Blob to write."),
    codec: Optional[str] = typer.Option(None, help="auto | zlib | zstd | brotli | lzma (auto keeps the smallest)."),
    limit: Optional[int] = typer.Option(None, help="Byte limit for model + code (default 16,000,000); over it: exit 1."),
    metrics: Path = typer.Option(Path("artifacts/pack_metrics.json"), help="Size report JSON to write."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Pack quantized weights into one self-describing compressed blob and check it against the size limit."""
    def go() -> None:
        from . import pack as stage
        from .config import PackConfig, stage_config

        p, s = _sets(params, sets, {"codec": codec, "limit": limit})
        stage.run(quantized, data, out, stage_config(PackConfig, "pack", p, s, params), metrics)
    _run(go)


@app.command("ttt-eval", epilog="Example: pgolf ttt-eval artifacts/model.pgolf --data data/tokenized --stride 64 --val-tokens 100000")
def ttt_eval(
    blob: Path = typer.Argument(Path("artifacts/model.pgolf"), help="Blob from `pgolf pack`."),
    data: Path = typer.Option(Path("data/tokenized"), help="Tokenized data with the val shards (and byte sidecar)."),
    stride: Optional[int] = typer.Option(None, help="Sliding windows scoring S new tokens each; 0 = non-overlapping."),
    seq_len: Optional[int] = typer.Option(None, help="Window length in tokens."),
    val_tokens: Optional[int] = typer.Option(None, help="Score only the first N val tokens (whole windows); 0 = all."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    metrics: Path = typer.Option(Path("artifacts/ttt_eval_metrics.json"), help="Metrics JSON to write."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Decode a blob and score the validation shards in bits per byte (canonical sidecar and LUT bytes)."""
    def go() -> None:
        from . import ttt_eval as stage
        from .config import EvalConfig, stage_config

        p, s = _sets(params, sets, {"stride": stride, "seq_len": seq_len, "val_tokens": val_tokens, "device": device})
        stage.run(blob, data, stage_config(EvalConfig, "ttt_eval", p, s, params), metrics)
    _run(go)


@app.command(epilog="Example: pgolf verify someone.pgolf --data data/tokenized --claim 1.2244 --val-tokens 200000")
def verify(
    blob: Path = typer.Argument(..., help="A pgolf blob, or the challenge baseline's final_model.int8.ptz."),
    data: Path = typer.Option(Path("data/tokenized"), help="Tokenized data with the tokenizer and val shards the blob claims."),
    claim: Optional[float] = typer.Option(None, help="Claimed val BPB to check."),
    claims: Optional[Path] = typer.Option(None, help="JSON with the claim: {\"val_bpb\": ...} (e.g. ttt_eval_metrics.json)."),
    limit: Optional[int] = typer.Option(None, help="Size limit in bytes (default 16,000,000)."),
    val_tokens: Optional[int] = typer.Option(None, help="Re-score only the first N val tokens; 0 = all."),
    fmt: str = typer.Option("auto", "--format", help="auto | pgolf | official-int8."),
    report: Path = typer.Option(Path("artifacts/verify_metrics.json"), help="JSON report to write."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Re-evaluate someone's artifact: integrity, size, data match, BPB against the claim. Exit 1 on any failed check."""
    def go() -> None:
        from . import verify as stage
        from .config import EvalConfig, VerifyConfig, stage_config

        p, s = _sets(params, sets, {"limit": limit, "val_tokens": val_tokens})
        eval_sets = {k: v for k, v in s.items() if k in ("val_tokens", "seq_len", "stride", "batch_seqs", "device")}
        verify_sets = {k: v for k, v in s.items() if k not in eval_sets}
        stage.run(blob, data, stage_config(VerifyConfig, "verify", p, verify_sets, params),
                  stage_config(EvalConfig, "ttt_eval", p, {}, params), claim, claims, fmt, report, eval_sets)
    _run(go)


def main() -> None:  # `python -m stages.cli` (torchrun uses this)
    app(prog_name="pgolf")


if __name__ == "__main__":
    sys.exit(main())
