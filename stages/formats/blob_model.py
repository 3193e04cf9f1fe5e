"""A blob's model config, held to its schema before anything is decoded.

Separate from pgolf.formats.blob, which reads bytes and never needs the model: here the model the header
describes is built on the meta device (no memory) and must have exactly the schema's tensors, so a forged
config can neither make the scorer allocate a model bigger than the blob nor fail half-way through.
"""

from __future__ import annotations

from typing import Any

import torch

from pgolf.config.sections import ModelConfig
from pgolf.formats.blob import CORRUPT, build_model_config, fail, field_error
from pgolf.nn.model import GPT


def model_config(header: dict[str, Any], source: Any) -> ModelConfig:
    """The header's model config, validated, whose model has exactly the schema's tensors."""
    cfg = build_model_config(header, source)
    schema = header["schema"]
    # Building costs time per layer: a config running more layers than the schema stores tensors (each
    # layer stores several) is refused first.
    layers = cfg.num_layers + cfg.num_loops * max(0, cfg.loop_end - cfg.loop_start + 1)
    if layers > len(schema):
        raise field_error(source, "model_config", f"runs {layers:,} layers (loops included) but the schema stores only "
                                             f"{len(schema):,} tensors")
    try:
        with torch.device("meta"):
            own = {name: list(t.shape) for name, t in GPT(cfg).state_dict().items()}
    except Exception as exc:  # noqa: BLE001 — whatever the model makes of a forged config is the config's fault
        raise field_error(source, "model_config", f"does not build a model ({type(exc).__name__}: {str(exc)[:200]})") from None
    declared = {name: entry["shape"] for name, entry in schema.items()}
    if own != declared:
        missing, extra = sorted(set(own) - set(declared)), sorted(set(declared) - set(own))
        wrong = [f"{n} {declared[n]} (model {own[n]})" for n in own if n in declared and own[n] != declared[n]]
        raise fail(source, f"the schema's tensors do not fit header field model_config: missing {missing[:5]}, "
                            f"unexpected {extra[:5]}, wrong shape {wrong[:5]}; {CORRUPT}")
    return cfg
