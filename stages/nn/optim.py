"""Which optimizer updates which parameter, as a table: the grouping rule in one place.

The reference recipe (the challenge's train_gpt.py): Muon on the block matrices, Adam on the embedding
(and an untied head) and on the small control tensors. `train.matrix_optimizer: adamw` gives the block
matrices AdamW instead (PR #1227's study), with the same LR and decay keys. Every parameter falls in exactly one group, so a
new model component is optimized the moment its name fits a rule (or joins "scalar" by default); the
build refuses a parameter left out. Each group's `base_lr` is what the schedule scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.config.sections import TrainConfig
from pgolf.nn.model import GPT
from pgolf.nn.muon import Muon
from pgolf.nn.names import is_control_name


@dataclass(frozen=True)
class OptimizerGroup:
    name: str
    optimizer: str  # adam (AdamW when its weight decay is > 0) | muon
    lr: str  # the TrainConfig key of its learning rate
    weight_decay: str  # the TrainConfig key of its decoupled weight decay
    tied_lr: str | None = None  # the LR key instead, when the embedding is also the LM head


# In the order the optimizers step (the reference's).
OPTIMIZER_GROUPS = (
    OptimizerGroup("embed", "adam", lr="embed_lr", weight_decay="embed_wd", tied_lr="tied_embed_lr"),
    OptimizerGroup("head", "adam", lr="head_lr", weight_decay="embed_wd"),
    OptimizerGroup("matrix", "muon", lr="matrix_lr", weight_decay="muon_wd"),
    OptimizerGroup("scalar", "adam", lr="scalar_lr", weight_decay="scalar_wd"),
)


def group_of(name: str, param: torch.Tensor) -> str:
    """The optimizer group of a parameter, by its name and shape."""
    if name in ("tok_emb.weight", "bigram.embed.weight"):  # token and hashed-bigram embedding tables
        return "embed"
    if name == "lm_head.weight":
        return "head"
    if name == "bigram.proj.weight" or name.startswith("mtp.") or (
            name.startswith("blocks.") and param.ndim >= 2 and not is_control_name(name)):
        return "matrix"  # the block matrices, and the projections of the hashed bigrams and multi-token heads
    return "scalar"  # control tensors in the blocks, and every model-level one (skip weights and gates, smear gate)


def grouped_parameters(model: GPT) -> dict[str, list[torch.Tensor]]:
    """{group: parameters}, block parameters first within each group (the reference's order)."""
    named = list(model.named_parameters())
    ordered = [x for x in named if x[0].startswith("blocks.")] + [x for x in named if not x[0].startswith("blocks.")]
    groups: dict[str, list[torch.Tensor]] = {g.name: [] for g in OPTIMIZER_GROUPS}
    for name, param in ordered:
        groups[group_of(name, param)].append(param)
    return groups


def build_optimizers(model: GPT, cfg: TrainConfig, ns_dtype: torch.dtype
                     ) -> tuple[list[torch.optim.Optimizer], torch.optim.Optimizer]:
    """One optimizer per non-empty group, in table order; returns them and the block matrices' one (Muon, whose
    momentum is scheduled, or AdamW)."""
    fused = next(model.parameters()).is_cuda
    params = grouped_parameters(model)
    optimizers: list[torch.optim.Optimizer] = []
    muon = None
    for group in OPTIMIZER_GROUPS:
        if not params[group.name]:
            continue
        lr = getattr(cfg, group.tied_lr if group.tied_lr and model.cfg.tie_embeddings else group.lr)
        wd = getattr(cfg, group.weight_decay)
        if group.optimizer == "muon" and cfg.matrix_optimizer == "muon":
            muon = Muon(params[group.name], lr=lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                        ns_dtype=ns_dtype, coefficients=cfg.muon_ns, row_norm=cfg.muon_row_norm, weight_decay=wd,
                        cautious=cfg.cautious_wd)
            for g in muon.param_groups:
                g["base_lr"] = lr
            optimizers.append(muon)
        else:  # AdamW's decay is decoupled (W ← W·(1 − lr·wd)); without decay, plain Adam as the reference
            kind, extra = (torch.optim.AdamW, {"weight_decay": wd}) if wd > 0 else (torch.optim.Adam, {})
            optimizers.append(kind([{"params": params[group.name], "lr": lr, "base_lr": lr}],
                                   betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused, **extra))
            if group.optimizer == "muon":  # the block matrices under matrix_optimizer=adamw
                muon = optimizers[-1]
    grouped = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    if sorted(grouped) != sorted(id(p) for p in model.parameters()):
        raise RuntimeError("every parameter must be in exactly one optimizer group")
    assert muon is not None, "the model has no block matrices"
    return optimizers, muon
