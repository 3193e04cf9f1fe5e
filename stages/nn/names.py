"""What a parameter is, by its name: the naming rules the model, the optimizer and the quantizer share.

Names follow the challenge's `train_gpt.py`, so its int8 artifacts load directly; a new component whose
small tensors steer the residual stream adds its name fragment to CONTROL_TENSOR_PATTERNS.
"""

from __future__ import annotations

# Small per-channel tensors that steer the residual stream: fp32, Adam, never quantized below fp32.
# Matching is by substring, so these cover every name of the reference's own list (attn_scales,
# resid_mixes, skip_weights, ...).
CONTROL_TENSOR_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "skip_gate", "smear",
                           "parallel_", "attn_gate", "canon_", "dwa_weights", "s4d_")


def is_control_name(name: str) -> bool:
    return any(p in name for p in CONTROL_TENSOR_PATTERNS)


def tensor_group(name: str) -> str | None:
    """The group quantization may give its own bits and clip (quantize.embed_bits, attn_k, ...): embed
    (tok_emb, lm_head), attn (c_q, c_k, c_v, proj), mlp (fc, proj), or None."""
    if name.startswith(("tok_emb.", "lm_head.")):
        return "embed"
    if any(f".attn.{m}." in f".{name}" for m in ("c_q", "c_k", "c_v", "proj")):
        return "attn"
    if any(f".mlp.{m}." in f".{name}" for m in ("fc", "proj")):
        return "mlp"
    return None
