"""One typed config per stage, filled from params.yaml and the command line.

Precedence, lowest first: dataclass defaults (the challenge's naive baseline), the preset named by
params.yaml's top-level `preset` (stages/presets.py), the stage's params.yaml section, then
`--set KEY=VALUE` options. Unknown keys and ill-typed values are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .artifacts import PgolfError


@dataclass
class ModelConfig:
    """The GPT of the challenge's naive baseline; defaults are its values."""

    vocab_size: int = 0  # 0: take it from the tokenized data's manifest
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0  # MLP hidden size = int(mlp_mult · model_dim)
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5
    logit_softcap: float = 30.0
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    bos_id: int = 1
    doc_mask: bool = False  # attention never crosses a BOS into the previous document
    activation: str = "relu2"  # relu2 | leaky_relu2 (LeakyReLU(0.5)²)
    rope_dims: int = 0  # rotate only the first N dims of each head (partial RoPE); 0: all
    ln_scale: bool = False  # scale block l's normed inputs by 1/√(l+1)
    xsa_layers: int = 0  # exclusive self-attention on the last N layers
    smear_gate: bool = False  # mix the previous token's embedding in through a learned gate (never across a BOS)
    smear_gate_perdim: bool = False  # the older SmearGate: per-channel blend σ(g)·e_t + (1−σ(g))·e_{t−1}
    bigram_buckets: int = 0  # BigramHash: hashed (prev, cur) pair embeddings added to the input; 0: off
    bigram_dim: int = 128  # BigramHash embedding width (projected to model_dim)
    attn_backend: str = "auto"  # document-masked attention: auto (flex when training on CUDA, else SDPA) | sdpa | flex
    skip_gates: bool = False  # U-Net skip merge as a lerp x ← σ(g)·x + (1−σ(g))·(w ⊙ skip), g init 0
    parallel_from: int = 0  # two-lane parallel residuals in physical layers >= K (attention lane, MLP lane); 0: off
    # Depth recurrence: layers loop_start..loop_end (inclusive) run num_loops extra times, weights shared.
    loop_start: int = 0
    loop_end: int = 0
    num_loops: int = 0  # 0: off
    sparse_attn_gate: bool = False  # per-head output gate σ(scale · W·n[:12]) after XSA, W zero-init
    sparse_gate_scale: float = 0.5
    gated_attn_dim: int = 0  # headwise gated attention: c_q widened by this many rows (a multiple of num_heads); 0: off
    ortho_init: bool = False  # orthogonal init (gain 1) of every non-zero-init block matrix

    def validate(self, source: str = "model config") -> None:
        if self.model_dim % self.num_heads:
            raise PgolfError(f"{source}: model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise PgolfError(f"{source}: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if (self.model_dim // self.num_heads) % 2:
            raise PgolfError(f"{source}: head dim {self.model_dim // self.num_heads} must be even for RoPE")
        if self.num_layers < 1:
            raise PgolfError(f"{source}: num_layers must be >= 1")
        if not (math.isfinite(self.mlp_mult) and int(self.mlp_mult * self.model_dim) >= 1):
            raise PgolfError(f"{source}: mlp_mult {self.mlp_mult} must give an MLP of at least one unit "
                             f"(hidden = int(mlp_mult · model_dim))")
        if self.activation not in ("relu2", "leaky_relu2"):
            raise PgolfError(f"{source}: activation {self.activation!r}; choose relu2 or leaky_relu2")
        head_dim = self.model_dim // self.num_heads
        if self.rope_dims < 0 or self.rope_dims % 2 or self.rope_dims > head_dim:
            raise PgolfError(f"{source}: rope_dims {self.rope_dims} must be even and at most the head dim {head_dim}")
        if not 0 <= self.xsa_layers <= self.num_layers:
            raise PgolfError(f"{source}: xsa_layers {self.xsa_layers} must be between 0 and num_layers {self.num_layers}")
        if self.num_loops < 0:
            raise PgolfError(f"{source}: num_loops {self.num_loops} must be >= 0 (0: no depth recurrence)")
        if self.num_loops and not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            raise PgolfError(f"{source}: loop_start {self.loop_start} and loop_end {self.loop_end} must satisfy "
                             f"0 <= loop_start <= loop_end < num_layers {self.num_layers}")
        if self.parallel_from:
            # Lanes start at the first parallel layer and last to the end: the parallel layers must be a
            # suffix of the decoder in both the plain and the looped layer order.
            low = max(self.num_layers // 2, self.loop_end + 1 if self.num_loops else 0, 1)
            if not low <= self.parallel_from < self.num_layers:
                raise PgolfError(f"{source}: parallel_from {self.parallel_from} must be 0 (off) or between {low} and "
                                 f"{self.num_layers - 1}: parallel layers must be decoder layers after any looped ones")
        if self.smear_gate and self.smear_gate_perdim:
            raise PgolfError(f"{source}: smear_gate and smear_gate_perdim are two forms of one gate; pick one")
        if self.bigram_buckets < 0 or self.bigram_dim < 1:
            raise PgolfError(f"{source}: bigram_buckets {self.bigram_buckets} must be >= 0 (0: off) and "
                             f"bigram_dim {self.bigram_dim} >= 1")
        if self.attn_backend not in ("auto", "sdpa", "flex"):
            raise PgolfError(f"{source}: attn_backend {self.attn_backend!r}; choose auto, sdpa or flex")
        if not (math.isfinite(self.sparse_gate_scale) and self.sparse_gate_scale > 0):
            raise PgolfError(f"{source}: sparse_gate_scale {self.sparse_gate_scale} must be a positive number")
        if self.gated_attn_dim < 0 or self.gated_attn_dim % self.num_heads:
            raise PgolfError(f"{source}: gated_attn_dim {self.gated_attn_dim} must be 0 (off) or a positive multiple "
                             f"of num_heads {self.num_heads} (each head's gate reads gated_attn_dim / num_heads rows)")


@dataclass
class TokenizeConfig:
    vocab_size: int = 1024
    val_docs: int = 50_000  # the first N documents in input order are validation
    tokenizer_train_docs: int = 5_000_000  # tokenizer trains on the first N *training* documents
    # SentencePiece skips longer "sentences" (here: documents) when training; 4192 is its default,
    # which the challenge kept. Raise it for corpora of long documents (plays, books).
    max_sentence_length: int = 4192
    shard_tokens: int = 100_000_000
    workers: int = 0  # 0: all cores
    # CaseOps: lowercase the text with case operators before SentencePiece (stages/caseops.py); the
    # val byte sidecar then counts original bytes and is the only valid BPB denominator
    caseops: bool = False


@dataclass
class TrainConfig:
    seed: int = 1337
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0  # 0: no cap
    warmdown_iters: int = 1200  # linear LR decay over the last N steps (wall-clock estimated under a cap)
    warmup_steps: int = 20  # compile-priming steps, rolled back afterwards
    train_batch_tokens: int = 524_288
    train_seq_len: int = 1024
    grad_accum_steps: int = 8  # at world size 1; divided by the world size under torchrun
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6
    head_lr: float = 0.008
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0
    muon_ns: str = "classic"  # Newton–Schulz coefficients: classic (3.4445, −4.7750, 2.0315) | polar_express
    muon_row_norm: bool = False  # MuonEq-R: normalise every row of the update before orthogonalising
    muon_wd: float = 0.0  # decoupled weight decay of the Muon matrices (×lr)
    embed_wd: float = 0.0  # decoupled weight decay of the embedding/head (AdamW when > 0)
    scalar_wd: float = 0.0  # decoupled weight decay of the control tensors (AdamW when > 0)
    lr_warmup_steps: int = 0  # linear LR warm-up from 0 over the first N steps
    warmdown_frac: float = 0.0  # > 0: the warmdown is this fraction of the run (steps or wall-clock), not warmdown_iters
    min_lr: float = 0.0  # floor of the LR multiplier during the warmdown
    val_loss_every: int = 0  # 0: only at the end
    val_tokens: int = 0  # in-training validation on the first N val tokens; 0: all
    log_every: int = 50
    checkpoint_every: int = 0  # save the full training state every N steps (for --resume); 0: never
    ema_decay: float = 0.0  # keep an fp32 EMA of the weights (saved and evaluated instead of them); 0: off
    ema_bias_correction: bool = True  # EMA from zero / (1 − decayⁿ): no init weight left in short runs
    swa_every: int = 0  # SWA, the alternative to EMA: average a snapshot every N steps (saved and evaluated); 0: off
    swa_start_frac: float = 0.0  # ... from this fraction of the run on
    loop_enable_frac: float = 0.0  # depth recurrence (model.num_loops) switches on at this fraction of the run
    qat_bits: int = 0  # QAT: straight-through fake quantization of the block matrices at these bits; 0: off
    qat_start_frac: float = 0.0  # ... from this fraction of the run on
    device: str = "auto"
    compile: bool = True  # torch.compile on CUDA (never on CPU)


@dataclass
class CalibrateConfig:
    source: str = "train"  # train: batches of training shards | self: text the model generates itself
    n_batches: int = 16
    batch_seqs: int = 8
    seq_len: int = 1024
    temperature: float = 0.8  # sampling temperature of self-generated calibration text
    seed: int = 0
    device: str = "auto"


@dataclass
class QuantizeConfig:
    bits: int = 8
    method: str = "rtn"  # rtn | gptq (gptq needs the calibrate stage's Hessians; without them: rtn)
    clip: str = "percentile"  # percentile | sdclip
    clip_percentile: float = 99.99984  # the challenge's int8 export
    sdclip_k: float = 12.85
    keep_float_max_numel: int = 65_536  # smaller float tensors stay float (fp16; control tensors fp32)
    # Per-group overrides (0: use bits / sdclip_k). Groups by name: embed (tok_emb, lm_head),
    # attn (attn.c_q/c_k/c_v/proj), mlp (mlp.fc/proj). The k overrides apply with clip=sdclip.
    embed_bits: int = 0
    attn_bits: int = 0
    mlp_bits: int = 0
    embed_k: float = 0.0
    attn_k: float = 0.0
    mlp_k: float = 0.0
    # GPTQ (TECHNIQUES.md §4.2): H += gptq_damp·mean(diag H)·I; columns in blocks; act-order optional.
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = False
    # LQER (§4.5): low-rank correction of the lqer_top_k tensors with the largest ‖W − Ŵ‖_F (0: off).
    lqer_top_k: int = 0
    lqer_rank: int = 4
    lqer_weighted: bool = False  # fit the H-weighted error (E·H^½) instead of E; needs the Hessians
    device: str = "auto"  # where GPTQ runs: auto | cpu | cuda
    # Bit allocation to a byte budget (stages/budget.py): packed blob + code bytes <= budget (0: off).
    # Each quantized tensor gets a width from budget_bits; bits is then unused, a group's *_bits pins it.
    budget: int = 0
    budget_bits: str = "4,5,6,7,8"
    budget_lqer: bool = True  # also offer each width with an LQER correction (lqer_rank, lqer_weighted)
    # Bytes held back when quantize is not given the tokenized data: pack's header lists the val shards
    # (about 90 bytes each), which quantize then cannot see.
    budget_reserve: int = 1024


@dataclass
class PackConfig:
    codec: str = "auto"  # auto | zlib | zstd | brotli | lzma
    limit: int = 16_000_000
    # 0: one compressed stream. N: the payload cut into N-byte chunks compressed independently, in
    # parallel (format version 2), for pack and --budget's builds alike (bench/chunk_bench.py).
    chunk_bytes: int = 0


@dataclass
class EvalConfig:
    seq_len: int = 1024
    stride: int = 0  # 0: non-overlapping seq_len windows (the reference); S: sliding windows scoring S new tokens each
    val_tokens: int = 0  # score only the first N validation tokens (whole windows); 0: all
    batch_seqs: int = 32
    device: str = "auto"
    # Test-time training (TECHNIQUES.md §6.3–6.4), recorded by the record presets; not implemented yet,
    # so anything but "none" is refused rather than scored without it.
    ttt: str = "none"  # none | score_first (full-model SGD per chunk) | phased_lora (per-document LoRA + global SGD)
    ttt_lr: float = 0.0
    ttt_chunk_tokens: int = 0
    ttt_lora_rank: int = 0
    ttt_lora_alpha: float = 0.0
    ttt_beta2: float = 0.0
    ttt_weight_decay: float = 0.0
    ttt_prefix_docs: int = 0  # phased: documents scored before the global SGD phases end
    ttt_phases: int = 0
    ttt_global_lr: float = 0.0


@dataclass
class VerifyConfig:
    tolerance: float = 0.002  # |measured - claimed| BPB allowed
    limit: int = 16_000_000


C = TypeVar("C")


def load_params(path: str | Path | None) -> dict[str, Any]:
    """params.yaml as a dict; {} when `path` is None or the default file is absent."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PgolfError(f"{path}: invalid YAML ({exc}); fix the file") from None
    if not isinstance(data, dict):
        raise PgolfError(f"{path}: expected a mapping of sections (tokenize, model, train, ...)")
    return data


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`["a=1", "model.num_layers=4"]` -> {"a": 1, "model": {"num_layers": 4}} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PgolfError(f"--set {item!r}: expected KEY=VALUE, e.g. --set iterations=100")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value) if value else ""
    return out


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise PgolfError(f"{where}: expected {typ.__name__}, got {value!r}")


def build(cls: type[C], *layers: tuple[dict[str, Any], str]) -> C:
    """Instantiate dataclass `cls` from (values, source) layers, later layers winning."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for values, source in layers:
        for key, value in (values or {}).items():
            if key not in names:
                raise PgolfError(f"{source}: unknown key {key!r} for {cls.__name__}; known: {', '.join(sorted(names))}")
            kwargs[key] = _coerce(value, hints[key], f"{source}: {key}")
    return cls(**kwargs)


def preset(name: str, source: str = "params") -> dict[str, dict[str, Any]]:
    from .presets import PRESETS

    if name not in PRESETS:
        raise PgolfError(f"{source}: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def stage_config(cls: type[C], section: str, params: dict[str, Any], sets: dict[str, Any],
                 params_path: str | Path = "params.yaml") -> C:
    """Config for a stage: preset < params.yaml[section] < --set overrides.

    `sets` comes from parse_sets: plain keys override the stage's own section, `model.*` keys the
    model section, and `preset=NAME` the preset.
    """
    name = str(sets.get("preset", params.get("preset", "baseline")))
    layers: list[tuple[dict[str, Any], str]] = [
        (preset(name, f"{params_path}: preset").get(section, {}), f"preset {name!r}")]
    section_values = params.get(section) or {}
    if not isinstance(section_values, dict):
        raise PgolfError(f"{params_path}: section {section!r} must be a mapping")
    layers.append((section_values, f"{params_path}: {section}"))
    if section == "model":
        overrides = sets.get("model", {})
    else:
        overrides = {k: v for k, v in sets.items() if not isinstance(v, dict) and k != "preset"}
    layers.append((overrides, "--set"))
    cfg = build(cls, *layers)
    if isinstance(cfg, ModelConfig):
        cfg.validate(f"{params_path}: model")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PgolfError(f"device {name!r} asked for, but no CUDA device is available; use --set device=cpu")
    return name
