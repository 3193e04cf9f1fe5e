"""The GPT of the challenge's naive baseline, read top to bottom.

Token embedding → RMSNorm → U-Net of blocks (the first half pushes skips, the second half pops them,
weighted) → RMSNorm → tied LM head → softcap 30·tanh(z/30). Each block mixes its input with the
embedding stream x0, then runs attention (GQA, QK RMSNorm, RoPE, learned per-head q gain) and a relu²
MLP, each scaled by a learned per-channel vector. Output projections start at zero.

Options beyond the baseline (all off by default; TECHNIQUES.md §2): document masking, SmearGate,
LeakyReLU(0.5)², a float MLP width, partial RoPE, layerwise norm scaling 1/√(l+1), exclusive
self-attention (XSA) on the last layers, a sparse and a headwise (Q-widened) attention output gate, skip
gates, two-lane parallel residuals in the last layers, depth recurrence, and orthogonal init. An option
that is off creates no parameter and draws no random number, so the baseline's init is unchanged.

Depth recurrence is switched at run time with `GPT.set_looping(on)`; see there for torch.compile.

Parameter names match the challenge's `train_gpt.py`, so its int8 artifacts load directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# Small per-channel tensors that steer the residual stream: fp32, Adam, never quantized below fp32.
CONTROL_TENSOR_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "skip_gate", "smear",
                           "parallel_", "attn_gate")
SMEAR_WINDOW = 12  # the gate reads the current token's first 12 embedding dims
GATE_WINDOW = 12  # the sparse attention gate reads the first 12 dims of the normed block input


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Weights stay fp32 (the optimizer's master copy); the matmul runs in the activation dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        return freqs.cos()[None, None].to(dtype), freqs.sin()[None, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2·cos.size(-1) dims (half-split pairs); the rest carry no position."""
    rot = 2 * cos.size(-1)
    half = rot // 2
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def exclusive(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: remove from each head's output y [B,H,T,D] its component along the same position's own
    value v [B,Hkv,T,D], so heads must carry information from other positions."""
    B, H, T, D = y.shape
    y = y.view(B, v.size(1), H // v.size(1), T, D)
    vn = F.normalize(v, dim=-1)[:, :, None]
    return (y - (y * vn).sum(-1, keepdim=True) * vn).view(B, H, T, D)


class CausalSelfAttention(nn.Module):
    """GQA with QK-norm, (partial) RoPE and per-head q gain; optionally XSA and two output gates:
    sparse (σ(scale·W_h·n[:12]), W zero-init) and headwise (PR #2071: c_q carries gated_attn_dim extra
    rows; head h's gate is σ of the mean of its gated_attn_dim/H rows' outputs)."""

    def __init__(self, cfg: ModelConfig, xsa: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: the block's normed input n [B, T, C]."""
        B, T, C = x.shape
        q = self.c_q(x)
        if self.gate_dim:
            q, gate_logits = q.split((C, self.gate_dim), dim=-1)
        q = q.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(T, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        if self.xsa:
            y = exclusive(y, v)
        if self.attn_gate_w is not None:
            window = x[..., :self.attn_gate_w.size(1)]
            gate = torch.sigmoid(self.sparse_gate_scale * F.linear(window, self.attn_gate_w.to(x.dtype)))  # [B, T, H]
            y = y * gate.transpose(1, 2)[..., None]
        if self.gate_dim:
            gate = torch.sigmoid(gate_logits.view(B, T, self.num_heads, -1).mean(-1))  # [B, T, H]
            y = y * gate.transpose(1, 2)[..., None]
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, cfg.model_dim, bias=False)
        self.proj.zero_init = True
        self.leaky = cfg.activation == "leaky_relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, 0.5) if self.leaky else torch.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        dim = cfg.model_dim
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.attn = CausalSelfAttention(cfg, xsa=layer >= cfg.num_layers - cfg.xsa_layers)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))  # (x, x0) weights
        self.parallel = bool(cfg.parallel_from) and layer >= cfg.parallel_from
        if self.parallel:
            # post[s, d]: how much of sublayer s (0 attention, 1 MLP) goes into lane d; resid[d]: lane d's carry
            self.parallel_post_lambdas = nn.Parameter(torch.ones(2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((2,), 1.1))

    def forward(self, x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.norm_scale, mask)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)

    def forward_lanes(self, lane0: torch.Tensor, lane1: torch.Tensor, x0: torch.Tensor,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Parallel residuals (§2.8): attention reads lane0 (mixed with x0), the MLP reads lane1 and does
        not see this block's attention output; both write into both lanes through learned lambdas."""
        dt = lane0.dtype
        mix = self.resid_mix.to(dt)
        a = self.attn_scale.to(dt) * self.attn(rms_norm(mix[0] * lane0 + mix[1] * x0) * self.norm_scale, mask)
        f = self.mlp_scale.to(dt) * self.mlp(rms_norm(lane1) * self.norm_scale)
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


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (train fills it from the data manifest)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.smear = SmearGate(cfg.model_dim, cfg.bos_id) if cfg.smear_gate else None
        # Layer orders: physical indices in the order they run. The encoder is the first half of the
        # order (it pushes skips), the decoder the rest; both modes share skip indices (§2.6).
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
        self._init_weights()

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
        # The reference builds the model in bf16 and then restores fp32 masters, so its initial
        # weights are bf16-representable; round the same way (with equal seeds the inits match bit for bit).
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.bfloat16().float())

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states [B, T, D] (the LM head's input)."""
        mask = document_mask(input_ids, self.cfg.bos_id) if self.cfg.doc_mask else None
        e = self.tok_emb(input_ids)
        if self.smear is not None:
            e = self.smear(e, input_ids)
        x = rms_norm(e)
        x0 = x
        order = self.looped_order if self.looping else self.plain_order
        num_encoder = len(order) // 2
        skips = []
        for layer in order[:num_encoder]:
            x = self.blocks[layer](x, x0, mask)
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
                x = block(x, x0, mask)
            else:
                lanes = block.forward_lanes(*lanes, x0, mask)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return rms_norm(x)

    def merge_skip(self, j: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Decoder step j's U-Net skip: x + w⊙skip, or with skip gates the lerp σ(g)·x + (1−σ(g))·(w⊙skip)."""
        scaled = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        gate = torch.sigmoid(self.skip_gates[j].to(x.dtype))
        return gate * x + (1 - gate) * scaled

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Softcapped logits [B, T, V] in float32."""
        h = self.hidden(input_ids)
        z = F.linear(h, self.tok_emb.weight.to(h.dtype)) if self.lm_head is None else self.lm_head(h)
        cap = self.cfg.logit_softcap
        return (cap * torch.tanh(z / cap)).float()

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats) over all positions."""
        logits = self.logits(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))


def document_mask(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, 1, T, T] boolean: causal, and only within the query's document (documents start at BOS).

    Tokens before a window's first BOS form a document of their own (the tail of one cut by the window).
    """
    doc = torch.cumsum(input_ids == bos_id, dim=1)  # document index of every position
    T = input_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def layer_order(cfg: ModelConfig, looping: bool) -> tuple[int, ...]:
    """Physical layer indices in running order: with looping, loop_start..loop_end run num_loops extra
    times in a row, e.g. (3, 5, 2) on 11 layers: 0 1 2 3 4 5 3 4 5 3 4 5 6 7 8 9 10."""
    layers = list(range(cfg.num_layers))
    if not (looping and cfg.num_loops > 0):
        return tuple(layers)
    loop = layers[cfg.loop_start:cfg.loop_end + 1]
    return tuple(layers[:cfg.loop_end + 1] + loop * cfg.num_loops + layers[cfg.loop_end + 1:])


def prepare_for_device(model: GPT, device: torch.device | str) -> GPT:
    """Reference precision: on CUDA the embedding lives in bf16 while linear weights and control
    tensors are fp32 masters (autocast runs matmuls in bf16); on CPU everything is fp32."""
    model = model.to(device)
    if torch.device(device).type == "cuda":
        model.tok_emb.to(torch.bfloat16)
    return model


def is_control(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or any(p in name for p in CONTROL_TENSOR_PATTERNS)


def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor] | None = None,
                device: torch.device | str = "cpu") -> GPT:
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
