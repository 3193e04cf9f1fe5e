"""The GPT of the challenge's naive baseline, read top to bottom.

Token embedding → RMSNorm → U-Net of blocks (the first half pushes skips, the second half pops them,
weighted) → RMSNorm → tied LM head → softcap 30·tanh(z/30). Each block mixes its input with the
embedding stream x0, then runs attention (GQA, QK RMSNorm, RoPE, learned per-head q gain) and a relu²
MLP, each scaled by a learned per-channel vector. Output projections start at zero.

Options beyond the baseline (all off by default; as the record PR #1855 has them unless noted):
document masking (pgolf.nn.attention: SDPA, flex_attention or FlashAttention-4 varlen), SmearGate (BOS-fixed,
PR #1667 + the PR #1851 fix, or the older per-dim blend of PR #398) and BigramHash embeddings (PR #398),
LeakyReLU(0.5)², a float MLP width, partial RoPE, layerwise norm scaling 1/√(l+1), exclusive
self-attention (XSA, arXiv:2603.09078) on the last layers, a sparse (PR #1787) and a headwise (Q-widened,
PR #2071) attention output gate, skip gates, two-lane parallel residuals in the last layers (PR #1204),
depth recurrence, and orthogonal init; the seed studies' memory tokens, DenseFormer, S4D-Lin and Monarch
MLP layers live in pgolf.nn.studies. An option that is off creates no parameter and draws no random number, so the
baseline's init is unchanged.

Two switches change the forward at run time without a retrace that could go stale under torch.compile:
depth recurrence (`GPT.set_looping`) and straight-through fake quantization for QAT (`enable_qat` /
`set_qat`, a tensor toggle: an early record's late QAT never fired because torch.compile constant-folded
its class-attribute flag).

Parameter names match the challenge's `train_gpt.py`, so its int8 artifacts load directly.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.config.sections import ModelConfig
from pgolf.nn.attention import attend, mask_for
from pgolf.nn.layers import CastedLinear
from pgolf.nn.fused_ce import softcapped_cross_entropy
from pgolf.nn.studies import (MEMORY_INIT_STD, DenseFormer, MonarchMLP, S4DMixer, SSMInput, memory_taps,
                              prepend_memory)
from pgolf.errors import PgolfError
BIGRAM_HASH_MULT = 1_000_003  # bucket = (prev · K + cur) mod buckets; K prime, larger than any vocab
SMEAR_WINDOW = 12  # the gate reads the current token's first 12 embedding dims
GATE_WINDOW = 12  # the sparse attention gate reads the first 12 dims of the normed block input


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        # [1, T, 1, dims/2]: broadcast over the batch and the heads of [B, T, H, D]
        return freqs.cos()[None, :, None].to(dtype), freqs.sin()[None, :, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2·cos.size(-1) dims (half-split pairs); the rest carry no position."""
    rot = 2 * cos.size(-1)
    half = rot // 2
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def exclusive(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: remove from each head's output y [B,T,H,D] its component along the same position's own
    value v [B,T,Hkv,D], so heads must carry information from other positions."""
    B, T, H, D = y.shape
    y = y.view(B, T, v.size(2), H // v.size(2), D)
    vn = F.normalize(v, dim=-1)[:, :, :, None]
    return (y - (y * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)


class CausalSelfAttention(nn.Module):
    """GQA with QK-norm, (partial) RoPE and per-head q gain; optionally XSA and two output gates:
    sparse (σ(scale·W_h·n[:12]), W zero-init) and headwise (PR #2071: c_q carries gated_attn_dim extra
    rows; head h's gate is σ of the mean of its gated_attn_dim/H rows' outputs)."""

    adapter = None  # test-time LoRA from the attention input to its output (pgolf.ttt.lora)

    def __init__(self, cfg: ModelConfig, xsa: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        self.attn_backend = cfg.attn_backend
        self.xsa = xsa
        self.gate_dim = cfg.gated_attn_dim
        kv_dim = cfg.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim + self.gate_dim, bias=False)
        if self.gate_dim:
            self.c_q.ortho_rows = (cfg.model_dim, self.gate_dim)  # Q and gate rows are initialised apart
        self.c_k = CastedLinear(cfg.model_dim, kv_dim, bias=False)
        self.c_v = CastedLinear(cfg.model_dim, kv_dim, bias=False)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.proj.zero_init = True
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(cfg.rope_dims or self.head_dim, cfg.rope_base)
        self.attn_gate_w = (nn.Parameter(torch.zeros(cfg.num_heads, min(GATE_WINDOW, cfg.model_dim)))
                            if cfg.sparse_attn_gate else None)
        self.sparse_gate_scale = cfg.sparse_gate_scale

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """x: the block's normed input n [B, T, C]; mask: pgolf.nn.attention's (None: causal). Heads stay in
        [B, T, H, D], the layout of the projections and of FlashAttention's packed tokens, so the fa4 path moves
        no data between them; `attend` transposes for SDPA and flex (issue 16's profile)."""
        B, T, C = x.shape
        q = self.c_q(x)
        if self.gate_dim:
            q, gate_logits = q.split((C, self.gate_dim), dim=-1)
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(T, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = attend(q, k, v, mask, self.attn_backend)
        if self.xsa:
            y = exclusive(y, v)
        if self.attn_gate_w is not None:
            window = x[..., :self.attn_gate_w.size(1)]
            gate = torch.sigmoid(self.sparse_gate_scale * F.linear(window, self.attn_gate_w.to(x.dtype)))  # [B, T, H]
            y = y * gate[..., None]
        if self.gate_dim:
            gate = torch.sigmoid(gate_logits.view(B, T, self.num_heads, -1).mean(-1))  # [B, T, H]
            y = y * gate[..., None]
        out = self.proj(y.reshape(B, T, C))
        return out if self.adapter is None else out + self.adapter(x)  # test-time LoRA from the attention input


class MLP(nn.Module):
    adapter = None  # test-time LoRA from the MLP input to its output (pgolf.ttt.lora)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, cfg.model_dim, bias=False)
        self.proj.zero_init = True
        self.leaky = cfg.activation == "leaky_relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h2 = (F.leaky_relu(h, 0.5) if self.leaky else torch.relu(h)).square()
        out = self.proj(h2)
        return out if self.adapter is None else out + self.adapter(x)


class Canon(nn.Module):
    """A Canon layer (Allen-Zhu, "Physics of Language Models: Part 4.1", 2025; PR #375 with K = 3): the normed
    input of a sublayer gains a causal depthwise mix of its last K positions, n_t + Σ_{i<K} w_i ⊙ n_{t−i}.
    w starts at zero (the identity). `ok[i]` ([B, T, 1]) zeroes tap i where t−i is before the sequence or, with
    document masking, in another document, so nothing crosses a BOS."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k, dim))

    def forward(self, n: torch.Tensor, ok: list[torch.Tensor]) -> torch.Tensor:
        w = self.weight.to(n.dtype)
        out = n + w[0] * n
        for i in range(1, w.size(0)):
            out = out + w[i] * F.pad(n[:, :-i], (0, 0, i, 0)) * ok[i]
        return out


def canon_taps(input_ids: torch.Tensor, k: int, bos_id: int, doc_mask: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    """ok[i] for Canon's taps: 1 where position t−i exists (and, with doc_mask, lies in t's document)."""
    B, T = input_ids.shape
    doc = torch.cumsum(input_ids == bos_id, dim=1) if doc_mask else torch.zeros_like(input_ids)
    pos = torch.arange(T, device=input_ids.device)
    taps = [torch.ones(B, T, 1, dtype=dtype, device=input_ids.device)]
    for i in range(1, k):
        same = (pos >= i) & (doc == F.pad(doc[:, :-i], (i, 0), value=-1))
        taps.append(same.unsqueeze(-1).to(dtype))
    return taps


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        dim = cfg.model_dim
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.attn = (S4DMixer(cfg) if layer < cfg.s4d_layers  # the bottom s4d_layers mix tokens by an SSM
                     else CausalSelfAttention(cfg, xsa=layer >= cfg.num_layers - cfg.xsa_layers))
        self.mlp = MonarchMLP(cfg) if cfg.monarch_blocks else MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))  # (x, x0) weights
        self.canon_attn = Canon(cfg.canon_k, dim) if cfg.canon_k else None  # on each sublayer's normed input
        self.canon_mlp = Canon(cfg.canon_k, dim) if cfg.canon_k else None
        self.parallel = bool(cfg.parallel_from) and layer >= cfg.parallel_from
        if self.parallel:
            # post[s, d]: how much of sublayer s (0 attention, 1 MLP) goes into lane d; resid[d]: lane d's carry
            self.parallel_post_lambdas = nn.Parameter(torch.ones(2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((2,), 1.1))

    def normed(self, x: torch.Tensor, canon: Canon | None, taps) -> torch.Tensor:
        n = rms_norm(x) * self.norm_scale
        return n if canon is None else canon(n, taps)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, mask=None, taps=None) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.normed(x, self.canon_attn, taps), mask)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.normed(x, self.canon_mlp, taps))

    def forward_lanes(self, lane0: torch.Tensor, lane1: torch.Tensor, x0: torch.Tensor,
                      mask=None, taps=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Parallel residuals (PR #1204): attention reads lane0 (mixed with x0), the MLP reads lane1 and does
        not see this block's attention output; both write into both lanes through learned lambdas."""
        dt = lane0.dtype
        mix = self.resid_mix.to(dt)
        a = self.attn_scale.to(dt) * self.attn(self.normed(mix[0] * lane0 + mix[1] * x0, self.canon_attn, taps), mask)
        f = self.mlp_scale.to(dt) * self.mlp(self.normed(lane1, self.canon_mlp, taps))
        post, resid = self.parallel_post_lambdas.to(dt), self.parallel_resid_lambdas.to(dt)
        return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * f,
                resid[1] * lane1 + post[0, 1] * a + post[1, 1] * f)


class SmearGate(nn.Module):
    """e_t ← e_t + λ·σ(w·e_t[:12])·e_{t−1}, except where token t is BOS: a document's first token never
    sees the previous document's last. w and λ start at zero, so the gate starts as the identity."""

    def __init__(self, dim: int, bos_id: int):
        super().__init__()
        self.bos_id = bos_id
        self.smear_w = nn.Parameter(torch.zeros(1, min(SMEAR_WINDOW, dim)))
        self.smear_lambda = nn.Parameter(torch.zeros(1))

    def forward(self, e: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(F.linear(e[..., :self.smear_w.size(1)], self.smear_w.to(e.dtype)))  # [B, T, 1]
        keep = (input_ids[:, 1:] != self.bos_id).unsqueeze(-1).to(e.dtype)
        prev = self.smear_lambda.to(e.dtype) * gate[:, 1:] * e[:, :-1] * keep
        return torch.cat([e[:, :1], e[:, 1:] + prev], dim=1)


class PerDimSmearGate(nn.Module):
    """The older SmearGate (03-19): e_t ← g⊙e_t + (1−g)⊙e_{t−1}, g = σ(smear_logit) per channel, init
    σ(3) ≈ 0.95. Like the newer gate, a BOS never takes in the previous document's last token."""

    def __init__(self, dim: int, bos_id: int):
        super().__init__()
        self.bos_id = bos_id
        self.smear_logit = nn.Parameter(torch.full((dim,), 3.0))

    def forward(self, e: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.smear_logit.to(e.dtype))
        keep = (input_ids[:, 1:] != self.bos_id).unsqueeze(-1).to(e.dtype)
        blended = g * e[:, 1:] + (1 - g) * e[:, :-1]
        return torch.cat([e[:, :1], keep * blended + (1 - keep) * e[:, 1:]], dim=1)


class BigramHash(nn.Module):
    """A hashed embedding of (previous, current) token pairs, projected to the model width and added to
    the token embedding. A BOS (and position 0) hashes as the pair (BOS, BOS): no pair spans two
    documents. The projection starts at zero, so the model starts as if it were absent."""

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_id: int):
        super().__init__()
        self.buckets, self.bos_id = buckets, bos_id
        self.embed = nn.Embedding(buckets, dim)
        nn.init.normal_(self.embed.weight, std=0.005)
        self.proj = CastedLinear(dim, model_dim, bias=False)
        self.proj.zero_init = True

    def bucket_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        prev = F.pad(input_ids[:, :-1], (1, 0), value=self.bos_id)
        prev = torch.where(input_ids == self.bos_id, self.bos_id, prev)
        return (prev * BIGRAM_HASH_MULT + input_ids) % self.buckets

    def forward(self, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.proj(self.embed(self.bucket_ids(input_ids)).to(dtype))


class GPT(nn.Module):
    head_adapter = None  # test-time LoRA on the logits (pgolf.ttt.lora)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (train fills it from the data manifest)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.bigram = (BigramHash(cfg.bigram_buckets, cfg.bigram_dim, cfg.model_dim, cfg.bos_id)
                       if cfg.bigram_buckets else None)
        self.smear = (SmearGate(cfg.model_dim, cfg.bos_id) if cfg.smear_gate
                      else PerDimSmearGate(cfg.model_dim, cfg.bos_id) if cfg.smear_gate_perdim else None)
        # Layer orders: physical indices in the order they run. The encoder is the first half of the
        # order (it pushes skips), the decoder the rest; both modes share skip indices (as in PR #1855).
        self.plain_order = layer_order(cfg, looping=False)
        self.looped_order = layer_order(cfg, looping=True)
        self.looping = cfg.num_loops > 0  # on by default: evaluation, calibration and TTT run the full model
        num_skips = len(self.looped_order) // 2  # the decoder is never shorter than the encoder
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, cfg.model_dim)) if cfg.skip_gates else None
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.num_layers))
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.zero_init = True
        # Multi-token prediction (PR #375), training only: head k maps the final hidden state through its own
        # projection (identity at init) and the LM head to token t+1+k. train drops them from the checkpoint.
        self.mtp = nn.ModuleList(CastedLinear(cfg.model_dim, cfg.model_dim, bias=False)
                                 for _ in range(cfg.mtp_heads)) if cfg.mtp_heads else None
        self.denseformer = DenseFormer(len(self.plain_order)) if cfg.denseformer else None  # pgolf.nn.studies
        self.memory_tokens = None
        self._init_weights()
        if cfg.memory_tokens:  # drawn last, so every other weight is as without them (same seed); bf16-rounded
            self.memory_tokens = nn.Parameter(
                (torch.randn(cfg.memory_tokens, cfg.model_dim) * MEMORY_INIT_STD).bfloat16().float())

    def set_looping(self, on: bool) -> None:
        """Switch depth recurrence on or off (a no-op without num_loops). `looping` is a plain Python
        attribute read while tracing: torch.compile guards on it, so the first call after a switch
        retraces once and later calls reuse that graph (fullgraph still holds; a compiled function
        that skips guards must be recompiled by its caller). Switch on the unwrapped model."""
        self.looping = bool(on) and self.cfg.num_loops > 0

    def _init_weights(self) -> None:
        # Linear layers keep PyTorch's default init (or orthogonal with ortho_init), except output
        # projections, which start at zero.
        if self.cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.tied_embed_init_std)
        if self.cfg.ortho_init:
            for module in self.blocks.modules():
                if isinstance(module, CastedLinear) and not getattr(module, "zero_init", False):
                    row_blocks = getattr(module, "ortho_rows", (module.weight.size(0),))
                    for rows in module.weight.data.split(list(row_blocks)):
                        nn.init.orthogonal_(rows)
        for module in self.modules():
            if getattr(module, "zero_init", False):
                nn.init.zeros_(module.weight)
        for head in self.mtp or ():
            nn.init.eye_(head.weight)
        # The reference builds the model in bf16 and then restores fp32 masters, so its initial
        # weights are bf16-representable; round the same way (with equal seeds the inits match bit for bit).
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.bfloat16().float())

    def hidden(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, D] (the LM head's input). `cu_seqlens`: the fa4 backend's
        segments when the caller planned them on the host (training); else they are read off input_ids.
        With memory tokens the blocks run on [memory; tokens], and the memory positions are cut off at the end."""
        mem = self.cfg.memory_tokens  # memory positions the blocks run on before the tokens (pgolf.nn.studies)
        mask = mask_for(self.cfg.attn_backend, input_ids, self.cfg.bos_id, cu_seqlens, mem) if self.cfg.doc_mask \
            else None
        e = self.tok_emb(input_ids)
        if self.bigram is not None:
            e = e + self.bigram(input_ids, e.dtype)
        if self.smear is not None:
            e = self.smear(e, input_ids)
        x = rms_norm(e)
        if self.memory_tokens is not None:
            x = prepend_memory(x, self.memory_tokens)
        x0 = x
        taps = canon_taps(input_ids, self.cfg.canon_k, self.cfg.bos_id, self.cfg.doc_mask, x.dtype) \
            if self.cfg.canon_k else None
        if taps is not None and mem:
            taps = memory_taps(taps, mem)
        # an S4D layer reads where documents start where an attention layer reads its mask
        ssm = (SSMInput(input_ids == self.cfg.bos_id if self.cfg.doc_mask else None, mem) if self.cfg.s4d_layers
               else None)
        masks = [ssm if isinstance(block.attn, S4DMixer) else mask for block in self.blocks]
        history = [x0] if self.denseformer is not None else None  # DenseFormer: X_0, then each block's output
        order = self.looped_order if self.looping else self.plain_order
        num_encoder = len(order) // 2
        skips = []
        for layer in order[:num_encoder]:
            x = self.blocks[layer](x, x0, masks[layer], taps)
            if history is not None:
                x = self.denseformer(history, x)
            skips.append(x)
        lanes = None  # (lane0, lane1) from the first parallel block on
        for j, layer in enumerate(order[num_encoder:]):
            block = self.blocks[layer]
            if block.parallel and lanes is None:
                lanes = (x, x)
            if skips:  # into the sequential stream, or into the attention lane only
                if lanes is None:
                    x = self.merge_skip(j, x, skips.pop())
                else:
                    lanes = (self.merge_skip(j, lanes[0], skips.pop()), lanes[1])
            if lanes is None:
                x = block(x, x0, masks[layer], taps)
                if history is not None:
                    x = self.denseformer(history, x)
            else:
                lanes = block.forward_lanes(*lanes, x0, masks[layer], taps)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return rms_norm(x[:, mem:])  # without the memory positions: [B, T, D]

    def merge_skip(self, j: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Decoder step j's U-Net skip: x + w⊙skip, or with skip gates the lerp σ(g)·x + (1−σ(g))·(w⊙skip)."""
        scaled = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        gate = torch.sigmoid(self.skip_gates[j].to(x.dtype))
        return gate * x + (1 - gate) * scaled

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's output before the softcap: h Wᵀ of the tied embedding (or lm_head), + test-time LoRA."""
        z = F.linear(h, self.tok_emb.weight.to(h.dtype)) if self.lm_head is None else self.lm_head(h)
        if self.head_adapter is not None:  # test-time LoRA on the logits, before the softcap
            z = z + self.head_adapter(h)
        return z

    def softcap(self, z: torch.Tensor) -> torch.Tensor:
        cap = self.cfg.logit_softcap
        return (cap * torch.tanh(z / cap)).float()

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Softcapped logits [B, T, V] in float32."""
        return self.softcap(self.head_logits(self.hidden(input_ids)))

    label_smoothing = 0.0  # the training objective's ε (set by the trainer only: scoring never smooths)
    mtp_weight = 0.0  # the extra heads' share of the training objective (set by the trainer)

    def loss_from_logits(self, logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1),
                               label_smoothing=self.label_smoothing)

    def head_loss(self, h: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """The training objective on hidden states h: the LM head, softcap and cross-entropy, fused into one
        kernel with `fused_ce` (the softcapped float32 logits are never stored)."""
        if not self.cfg.fused_ce:
            return self.loss_from_logits(self.softcap(self.head_logits(h)), target_ids)
        z = self.head_logits(h)
        return softcapped_cross_entropy(z.reshape(-1, z.size(-1)), target_ids.reshape(-1), self.cfg.logit_softcap,
                                        self.label_smoothing)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy (nats) over all positions (label-smoothed when training asks for it), plus
        mtp_weight × the mean of the multi-token heads' losses when the model has them."""
        h = self.hidden(input_ids, cu_seqlens)
        return self.with_extra_heads(self.head_loss(h, target_ids), h, target_ids)

    def with_extra_heads(self, loss: torch.Tensor, h: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """loss + mtp_weight × the mean of the multi-token heads' losses on hidden states h (when it has them)."""
        if self.mtp is None or not self.mtp_weight:
            return loss
        extra = [self.head_loss(rms_norm(head(h[:, :-k])), target_ids[:, k:])
                 for k, head in enumerate(self.mtp, 1) if h.size(1) > k]  # head k: position t predicts t+1+k
        return loss + self.mtp_weight * torch.stack(extra).mean() if extra else loss


def layer_order(cfg: ModelConfig, looping: bool) -> tuple[int, ...]:
    """Physical layer indices in running order: with looping, loop_start..loop_end run num_loops extra
    times in a row, e.g. (3, 5, 2) on 11 layers: 0 1 2 3 4 5 3 4 5 3 4 5 6 7 8 9 10."""
    layers = list(range(cfg.num_layers))
    if not (looping and cfg.num_loops > 0):
        return tuple(layers)
    loop = layers[cfg.loop_start:cfg.loop_end + 1]
    return tuple(layers[:cfg.loop_end + 1] + loop * cfg.num_loops + layers[cfg.loop_end + 1:])


def resolve_device(name: str) -> str:
    """`auto` → cuda when there is one, else cpu; a CUDA device asked for where there is none is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PgolfError(f"device {name!r} asked for, but no CUDA device is available; use --set device=cpu")
    return name


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (matmuls in bf16, fp32 masters), nothing on CPU: the reference's precision."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def scoring_logits(model: GPT, device: torch.device):
    """x → model.logits(x) under the device's autocast: the function every scoring path hands the ledger."""
    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        with autocast_for(device):
            return model.logits(x)
    return logits_fn


def prepare_for_device(model: GPT, device: torch.device | str) -> GPT:
    """Reference precision: on CUDA the embedding lives in bf16 while linear weights and control
    tensors are fp32 masters (autocast runs matmuls in bf16); on CPU everything is fp32."""
    model = model.to(device)
    if torch.device(device).type == "cuda":
        model.tok_emb.to(torch.bfloat16)
    return model


def enable_qat(model: GPT, bits: int) -> None:
    """Give every block matrix a straight-through fake quantizer at `bits`, off until `set_qat(model, True)`.
    Call before torch.compile: the toggle is a buffer, read as data, so flipping it needs no retrace."""
    for module in model.blocks.modules():
        if isinstance(module, CastedLinear):
            module.qat_bits = bits
            module.register_buffer("qat_mix", torch.zeros((), device=module.weight.device), persistent=False)


def set_qat(model: GPT, on: bool) -> None:
    for module in model.blocks.modules():
        if isinstance(module, CastedLinear) and module.qat_bits:
            module.qat_mix.fill_(1.0 if on else 0.0)


def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor] | None, device: torch.device | str) -> GPT:
    """A GPT for `cfg`, optionally loaded (strictly) from `state_dict`, placed on `device`."""
    model = prepare_for_device(GPT(cfg), device)
    if state_dict is not None:
        own = model.state_dict()
        missing = sorted(set(own) - set(state_dict))
        extra = sorted(set(state_dict) - set(own))
        bad = [n for n in own if n in state_dict and tuple(state_dict[n].shape) != tuple(own[n].shape)]
        if missing or extra or bad:
            raise ValueError(f"weights do not fit the model config: missing {missing[:5]}, unexpected {extra[:5]}, "
                             f"wrong shape {bad[:5]}")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(state_dict[name].to(t.dtype))
    return model
