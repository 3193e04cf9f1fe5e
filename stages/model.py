"""The GPT of the challenge's naive baseline, read top to bottom.

Token embedding → RMSNorm → U-Net of blocks (the first half pushes skips, the second half pops them,
weighted) → RMSNorm → tied LM head → softcap 30·tanh(z/30). Each block mixes its input with the
embedding stream x0, then runs attention (GQA, QK RMSNorm, RoPE, learned per-head q gain) and a relu²
MLP, each scaled by a learned per-channel vector. Output projections start at zero.

Options beyond the baseline (all off by default): document masking, SmearGate, LeakyReLU(0.5)², partial
RoPE, layerwise norm scaling 1/√(l+1), and exclusive self-attention (XSA) on the last layers.

Parameter names match the challenge's `train_gpt.py`, so its int8 artifacts load directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# Small per-channel tensors that steer the residual stream: fp32, Adam, never quantized below fp32.
CONTROL_TENSOR_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "smear")
SMEAR_WINDOW = 12  # the gate reads the current token's first 12 embedding dims


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
    def __init__(self, cfg: ModelConfig, xsa: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        self.xsa = xsa
        kv_dim = cfg.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.c_k = CastedLinear(cfg.model_dim, kv_dim, bias=False)
        self.c_v = CastedLinear(cfg.model_dim, kv_dim, bias=False)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.proj.zero_init = True
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(cfg.rope_dims or self.head_dim, cfg.rope_base)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
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
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_mult * cfg.model_dim
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

    def forward(self, x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.norm_scale, mask)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)


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
        self.num_encoder_layers = cfg.num_layers // 2
        self.num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.num_layers))
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.zero_init = True
        self._init_weights()

    def _init_weights(self) -> None:
        # Linear layers keep PyTorch's default init, except output projections, which start at zero.
        if self.cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.tied_embed_init_std)
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
        skips = []
        for block in self.blocks[:self.num_encoder_layers]:
            x = block(x, x0, mask)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.num_encoder_layers:]):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0, mask)
        return rms_norm(x)

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
