"""The `pgolf` command: seven stages, each reading the previous stage's files and writing its own.

Every stage takes `--params params.yaml` and `--set KEY=VALUE` / `--set SECTION.KEY=VALUE` overrides;
the named options below are shortcuts for the most used keys. The CLI maps options to config keys
(pgolf.config.resolve does the resolving), picks the paths of outputs the user did not name, and turns
errors into exit codes: PgolfError exits 2, Rejected (a failed verify, a blob over the limit) exits 1.
Stage modules are imported lazily so that `pgolf --help` stays fast.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from pgolf.errors import PgolfError

app = typer.Typer(
    help="pgolf: Parameter Golf as a pipeline. `dvc repro` runs the whole chain; each stage also runs alone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="The params file (skipped if absent: --params none.yaml runs the preset alone).")
SETS = typer.Option(None, "--set", "-s", help="Override a param: --set iterations=100, --set train.iterations=100, "
                    "--set model.num_layers=4, --set preset=tiny (repeatable).")


def _run(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except PgolfError as exc:
        typer.echo(f"pgolf: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("pgolf: interrupted; no partial artifact was written", err=True)
        raise typer.Exit(130) from None


@functools.lru_cache(maxsize=None)
def _pipeline_outputs(cwd: Path) -> frozenset[Path]:
    """The paths the DVC pipeline in `cwd` writes (every stage's outs, metrics and plots); read once."""
    import yaml

    try:
        stages = (yaml.safe_load((cwd / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return frozenset()
    owned = set()
    for spec in stages.values() if isinstance(stages, dict) else []:
        for key in ("outs", "metrics", "plots"):
            for item in (spec or {}).get(key) or []:
                owned.add((cwd / (next(iter(item)) if isinstance(item, dict) else str(item))).resolve())
    return frozenset(owned)


def _output(given: Optional[Path], default: Path) -> Path:
    """The path the user named, else `default`; but a stage run by hand never writes over an output of the
    DVC pipeline here (it would leave `dvc status` dirty and the pipeline's results silently replaced):
    such a default becomes the same name in the current folder, with a note."""
    if given is not None:
        return given
    target = default.resolve()
    if any(target == owned or owned in target.parents for owned in _pipeline_outputs(Path.cwd())):
        instead = Path(default.name)
        typer.echo(f"pgolf: note: {default} is an output of the DVC pipeline here (dvc.yaml); writing {instead} "
                   "instead (name the path to choose)", err=True)
        return instead
    return default


def _params(stage: str, params_path: Path, sets: Optional[list[str]], named: dict[str, Any]):
    from pgolf.config.resolve import resolve

    return resolve(stage, params_path, sets, named)


@app.command(epilog="Example: pgolf tokenize data/raw --out data/tokenized --set vocab_size=1024 --set val_docs=2")
def tokenize(
    inputs: list[Path] = typer.Argument(..., help=".jsonl(.gz/.xz/.zst) with a `text` field, .txt files (one document each), "
                                             "directories of those, or one directory of existing challenge shards + tokenizer."),
    out: Optional[Path] = typer.Option(None, help="Output directory for shards, tokenizer and manifest "
                                       "[default: data/tokenized]."),
    tokenizer: Optional[Path] = typer.Option(None, help="Reuse this SentencePiece .model instead of training one."),
    vocab_size: Optional[int] = typer.Option(None, help="Tokenizer vocabulary size (params: tokenize.vocab_size)."),
    val_docs: Optional[int] = typer.Option(None, help="The first N documents are validation (challenge: 50,000)."),
    caseops: Optional[bool] = typer.Option(None, "--caseops/--no-caseops", help="Lossless case transform before "
                                           "SentencePiece; BPB then comes from the byte sidecar (params: tokenize.caseops)."),
    metrics: Optional[Path] = typer.Option(None, help="Metrics JSON to write [default: artifacts/tokenize_metrics.json]."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Tokenize documents into challenge-format shards plus the canonical byte sidecar and a manifest."""
    def go() -> None:
        from pgolf import tokenize as stage

        p = _params("tokenize", params, sets, {"tokenize.vocab_size": vocab_size, "tokenize.val_docs": val_docs,
                                               "tokenize.caseops": caseops})
        stage.run(inputs, _output(out, Path("data/tokenized")), p.tokenize, tokenizer,
                  _output(metrics, Path("artifacts/tokenize_metrics.json")))
    _run(go)


@app.command(epilog="Example: pgolf train --data data/tokenized --set preset=tiny --set iterations=50")
def train(
    data: Path = typer.Option(Path("data/tokenized"), help="Tokenized data directory (from `pgolf tokenize`)."),
    out: Optional[Path] = typer.Option(None, help="Checkpoint to write [default: artifacts/ckpt.safetensors]."),
    preset: Optional[str] = typer.Option(None, help="Preset: tiny | baseline | record | pr2071 | pr398 (params: preset)."),
    iterations: Optional[int] = typer.Option(None, help="Training steps (params: train.iterations)."),
    max_wallclock_seconds: Optional[float] = typer.Option(None, help="Wall-clock cap in seconds; 0 = none."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    metrics: Optional[Path] = typer.Option(None, help="Metrics JSON to write [default: artifacts/train_metrics.json]."),
    loss_log: Optional[Path] = typer.Option(None, help="Per-step loss table, for `dvc plots` "
                                            "[default: artifacts/train_log.csv]."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last saved state "
                                "(saved every train.checkpoint_every steps beside --out)."),
    suspend_after: Optional[float] = typer.Option(None, "--suspend-after", min=0, help="Save the full state and stop "
                                                  "after this many seconds (compiling included), to go on later "
                                                  "with --resume: for machines held by the call or the hour."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Train the model on the train shards; multi-GPU with `torchrun --nproc_per_node=N -m pgolf.cli train`."""
    def go() -> None:
        from pgolf import train as stage

        p = _params("train", params, sets, {"preset": preset, "train.iterations": iterations,
                                            "train.max_wallclock_seconds": max_wallclock_seconds,
                                            "train.device": device})
        stage.run(data, _output(out, Path("artifacts/ckpt.safetensors")), p.model, p.train,
                  _output(metrics, Path("artifacts/train_metrics.json")), _output(loss_log, Path("artifacts/train_log.csv")),
                  resume, suspend_after)
    _run(go)


@app.command(epilog="Example: pgolf calibrate artifacts/ckpt.safetensors --data data/tokenized --set n_batches=4")
def calibrate(
    ckpt: Path = typer.Argument(Path("artifacts/ckpt.safetensors"), help="Checkpoint from `pgolf train`."),
    data: Path = typer.Option(Path("data/tokenized"), help="Tokenized data directory (training shards are read)."),
    out: Optional[Path] = typer.Option(None, help="Hessians file to write [default: artifacts/hessians.safetensors]."),
    metrics: Optional[Path] = typer.Option(None, help="Metrics JSON to write [default: artifacts/calibrate_metrics.json]."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Collect H = E[x xᵀ] of every linear layer's input over training batches."""
    def go() -> None:
        from pgolf import calibrate as stage

        p = _params("calibrate", params, sets, {})
        stage.run(ckpt, data, _output(out, Path("artifacts/hessians.safetensors")), p.calibrate,
                  _output(metrics, Path("artifacts/calibrate_metrics.json")))
    _run(go)


@app.command(epilog="Example: pgolf quantize --bits 6 artifacts/ckpt.safetensors   "
             "(GPTQ: --method gptq --hessians artifacts/hessians.safetensors --clip sdclip --embed-bits 7; "
             "to a byte budget: --budget 16000000)")
def quantize(
    ckpt: Path = typer.Argument(..., help="Checkpoint from `pgolf train`."),
    bits: Optional[int] = typer.Option(None, help="Bits per weight, 2..8 (params: quantize.bits)."),
    method: Optional[str] = typer.Option(None, help="rtn | gptq (gptq needs --hessians; without them it falls back to rtn) | kmeans (a 2^bits-level codebook per tensor, PR #212)."),
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
    metrics: Optional[Path] = typer.Option(None, help="Metrics row JSON; the per-tensor report and chart go beside it "
                                           "[default: quantize_metrics.json beside the output]."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Quantize a checkpoint's weights to integer codes plus scales (self-describing safetensors)."""
    def go() -> None:
        from pgolf import quantize as stage

        named = {"bits": bits, "method": method, "clip": clip, "embed_bits": embed_bits, "attn_bits": attn_bits,
                 "mlp_bits": mlp_bits, "lqer_top_k": lqer_top_k, "budget": budget}
        p = _params("quantize", params, sets, {f"quantize.{k}": v for k, v in named.items()})
        target = _output(out, ckpt.with_name("quantized.safetensors"))
        stage.run(ckpt, target, p.quantize, p.pack, hessians, _output(metrics, target.with_name("quantize_metrics.json")),
                  data if data is not None and (data / "manifest.json").is_file() else None)
    _run(go)


@app.command(epilog="Example: pgolf pack artifacts/quantized.safetensors --data data/tokenized --codec auto "
             "(per-group streams, each stream's smallest codec); --codec ans for a fast pack; --set container=single "
             "for one stream.")
def pack(
    quantized: Path = typer.Argument(Path("artifacts/quantized.safetensors"), help="Output of `pgolf quantize`."),
    data: Path = typer.Option(Path("data/tokenized"), help="Tokenized data whose tokenizer and val shards the blob is made for."),
    out: Optional[Path] = typer.Option(None, help="Blob to write [default: artifacts/model.pgolf]."),
    codec: Optional[str] = typer.Option(None, help="auto | zlib | zstd | brotli | lzma | ans | lrzip (auto keeps the "
                                        "smallest per stream of all but lrzip, which needs the lrzip program)."),
    limit: Optional[int] = typer.Option(None, help="Byte limit for model + code (default 16,000,000); over it: exit 1."),
    metrics: Optional[Path] = typer.Option(None, help="Size report JSON to write [default: artifacts/pack_metrics.json]."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Pack quantized weights into one self-describing compressed blob and check it against the size limit.

    Counted: the blob's bytes plus the code bytes, i.e. the modules that decode and score a blob (the import
    closure of pgolf.ttt_eval), each without comments and docstrings (ast.unparse), compressed with the pack
    codec (the smallest text codec for auto, ans or lrzip); libraries such as torch and constriction are not
    counted, as the challenge treats imports.
    """
    def go() -> None:
        from pgolf import pack as stage

        p = _params("pack", params, sets, {"pack.codec": codec, "pack.limit": limit})
        stage.run(quantized, data, _output(out, Path("artifacts/model.pgolf")), p.pack,
                  _output(metrics, Path("artifacts/pack_metrics.json")))
    _run(go)


@app.command("ttt-eval", epilog="Example: pgolf ttt-eval artifacts/model.pgolf --data data/tokenized --stride 64 "
             "--val-tokens 100000; with test-time training add --set ttt=score_first (or lora, phased_lora); on 8 GPUs: "
             "torchrun --standalone --nproc_per_node=8 -m pgolf.cli ttt-eval ...")
def ttt_eval(
    blob: Path = typer.Argument(Path("artifacts/model.pgolf"), help="Blob from `pgolf pack`."),
    data: Path = typer.Option(Path("data/tokenized"), help="Tokenized data with the val shards (and byte sidecar)."),
    stride: Optional[int] = typer.Option(None, help="Sliding windows scoring S new tokens each; 0 = non-overlapping."),
    seq_len: Optional[int] = typer.Option(None, help="Window length in tokens."),
    val_tokens: Optional[int] = typer.Option(None, help="Score only the first N val tokens (whole windows); 0 = all."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    metrics: Optional[Path] = typer.Option(None, help="Metrics JSON to write [default: artifacts/ttt_eval_metrics.json]."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Decode a blob and score the validation shards in bits per byte (canonical sidecar and LUT bytes)."""
    def go() -> None:
        from pgolf import ttt_eval as stage

        p = _params("ttt-eval", params, sets, {"ttt_eval.stride": stride, "ttt_eval.seq_len": seq_len,
                                               "ttt_eval.val_tokens": val_tokens, "ttt_eval.device": device})
        stage.run(blob, data, p.ttt_eval, _output(metrics, Path("artifacts/ttt_eval_metrics.json")))
    _run(go)


@app.command(epilog="Example: pgolf verify someone.pgolf --data data/tokenized --claim 1.2244 --val-tokens 200000; "
             "a submission's logs alone: pgolf verify --data data/tokenized --claims train_seed42.log --claims "
             "train_seed0.log --claims submission.json")
def verify(
    blob: Optional[Path] = typer.Argument(None, help="A pgolf blob, or the challenge baseline's final_model.int8.ptz "
                                          "(leave out to audit --claims alone)."),
    data: Path = typer.Option(Path("data/tokenized"), help="Tokenized data with the tokenizer and val shards the blob claims."),
    claim: Optional[float] = typer.Option(None, help="Claimed val BPB to check."),
    claims: Optional[list[Path]] = typer.Option(None, help="The claim: pgolf's ttt_eval_metrics.json, or a challenge "
                                                "submission's training logs and/or submission.json (repeat for "
                                                "several seeds)."),
    limit: Optional[int] = typer.Option(None, help="Size limit in bytes (default 16,000,000)."),
    val_tokens: Optional[int] = typer.Option(None, help="Re-score only the first N val tokens; 0 = all."),
    fmt: str = typer.Option("auto", "--format", help="auto | pgolf | official-int8 | record-int6 (the record family's final_model.int6.ptz; give its training log with --claims for its hyperparameters)."),
    report: Optional[Path] = typer.Option(None, help="Metrics row JSON; the check table goes to *_report.json beside "
                                          "it [default: artifacts/verify_metrics.json]."),
    markdown: Optional[Path] = typer.Option(None, help="Also write a review summary (each check, its evidence, the "
                                            "verdict) as Markdown, to paste into a pull request."),
    expect_manifest: Optional[Path] = typer.Option(None, help="Known-good validation file digests (JSON: file name → "
                                                   "sha256 or MD5 hex) the data must match."),
    params: Path = PARAMS,
    sets: Optional[list[str]] = SETS,
) -> None:
    """Re-evaluate someone's artifact: integrity, size, data match, BPB against the claim; audit a submission's
    logs (claimed size, byte denominator). Exit 1 on any failed check."""
    def go() -> None:
        from pgolf import verify as stage

        p = _params("verify", params, sets, {"verify.limit": limit, "ttt_eval.val_tokens": val_tokens})
        stage.run(blob, data, p.verify, p.ttt_eval, p.from_command_line("ttt_eval"), claim, claims, fmt,
                  _output(report, Path("artifacts/verify_metrics.json")), markdown, expect_manifest)
    _run(go)


def main() -> None:  # `python -m pgolf.cli` (torchrun uses this)
    app(prog_name="pgolf")


if __name__ == "__main__":
    sys.exit(main())
