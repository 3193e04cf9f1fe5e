"""Knowledge distillation (PR #1227's study; Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"),
`train.distill_teacher`: the student's training loss becomes

    (1 − α)·CE(student) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)),

the KL over the full vocabulary, per position, averaged over positions, both sides on the softcapped logits
(`GPT.logits`' path). T² keeps the soft term's gradient on the scale of the hard one's as T grows (Hinton et
al., section 2). The CE term is `GPT.loss_from_logits`, so label smoothing applies to it as without a teacher.

The teacher is a checkpoint `pgolf train` wrote: its own model config (from the file's metadata; any shape, the
same vocabulary and tokenizer), loaded once, frozen, in eval mode, run under no_grad on each micro-batch.

Speed: with a teacher the student's loss is computed un-fused (`fused_ce` avoids materialising the float32
logits; the KL needs them, for the student and the teacher), and every micro-batch adds the teacher's forward,
run eagerly (not compiled). On one H200 a `pr2071` step with its own base as teacher took 2.24× the base's
(634.8 against 283.5 ms; bench/README.md, the seed studies, 2026-12-01); which of the two costs more was not
measured. Training without a teacher is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.config.build import build_section
from pgolf.config.sections import ModelConfig
from pgolf.errors import PgolfError
from pgolf.formats.files import load_tensors, sha256_file
from pgolf.nn.model import GPT, autocast_for, build_model


def distillation_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)): summed over the vocabulary, averaged over positions."""
    vocab = student_logits.size(-1)
    log_student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return temperature * temperature * kl


def distilled_loss(ce: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float, alpha: float) -> torch.Tensor:
    """(1 − α)·CE + α·T²·KL(teacher ‖ student)."""
    return (1.0 - alpha) * ce + alpha * distillation_term(student_logits, teacher_logits, temperature)


class DistilledObjective(nn.Module):
    """The student's training objective with a teacher: what the trainer compiles and DDP-wraps instead of the
    bare GPT (the parameters are the student's; the teacher's logits come in as an input, computed outside
    the graph under no_grad). Returns the loss GPT.forward would, with the distillation term mixed in."""

    def __init__(self, model: GPT, temperature: float, alpha: float):
        super().__init__()
        self.model = model
        self.temperature, self.alpha = temperature, alpha

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor, teacher_logits: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        h = m.hidden(input_ids, cu_seqlens)
        logits = m.softcap(m.head_logits(h))  # un-fused: the KL needs the student's full logits
        loss = distilled_loss(m.loss_from_logits(logits, target_ids), logits, teacher_logits, self.temperature,
                              self.alpha)
        return m.with_extra_heads(loss, h, target_ids)  # the multi-token heads learn from the data alone


@dataclass
class Teacher:
    """A frozen GPT loaded from a checkpoint, and what the train stage records of it."""

    model: GPT
    path: str
    sha256: str

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with autocast_for(input_ids.device):
            return self.model.logits(input_ids)

    def describe(self) -> dict:
        cfg = self.model.cfg
        return {"path": self.path, "sha256": self.sha256, "num_layers": cfg.num_layers, "model_dim": cfg.model_dim,
                "params": sum(p.numel() for p in self.model.parameters())}


def load_teacher(path: str, student: ModelConfig, tokenizer_sha256: str | None,
                 device: torch.device | str) -> Teacher:
    """The teacher of `train.distill_teacher`, refused with the fix when the file is missing, not a pgolf
    checkpoint, or of another vocabulary or tokenizer than the student's data."""
    fix = ("set train.distill_teacher to a checkpoint `pgolf train` wrote on the same tokenized data, or to '' "
           "to train without a teacher")
    try:
        state, meta = load_tensors(path, "checkpoint")
        cfg = build_section(ModelConfig, meta.get("model_config"), f"{path}: model config")
    except PgolfError as exc:
        raise PgolfError(f"train.distill_teacher: {exc}; {fix}") from None
    if cfg.vocab_size != student.vocab_size:
        raise PgolfError(f"train.distill_teacher: {path} has a {cfg.vocab_size}-token vocabulary and the student "
                         f"{student.vocab_size} (the data's): distillation matches the two distributions token for "
                         f"token; {fix}")
    theirs = meta.get("tokenizer_sha256")
    if theirs and tokenizer_sha256 and theirs != tokenizer_sha256:
        raise PgolfError(f"train.distill_teacher: {path} was trained on text of another tokenizer (sha256 "
                         f"{theirs[:12]}…, the data's {tokenizer_sha256[:12]}…): the same vocabulary size, other "
                         f"tokens; {fix}")
    try:
        model = build_model(cfg, state, device)
    except ValueError as exc:
        raise PgolfError(f"train.distill_teacher: {path}: {exc}; {fix}") from None
    model.requires_grad_(False)
    model.eval()
    return Teacher(model, str(path), sha256_file(path))
