"""The seed studies' training switches (PR #375): label smoothing, L1 regularisation and cautious weight
decay — each off by default, each doing what its definition says, and none of them touching scoring."""

from __future__ import annotations

import pytest
import torch
from conftest import filled_gpt

from pgolf.config.build import build
from pgolf.config.sections import ModelConfig, TrainConfig
from pgolf.errors import PgolfError
from pgolf.nn.muon import Muon
from pgolf.nn.model import GPT, scoring_logits
from pgolf.nn.optim import build_optimizers
from pgolf.nn.trainer import l1_penalty

CFG = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def model() -> GPT:
    return filled_gpt(CFG)


@torch.no_grad()
def test_label_smoothing_is_the_smoothed_objective_and_never_the_score():
    m, (x, y) = model(), batch()
    plain = m(x, y)
    log_p = torch.log_softmax(m.logits(x).double(), dim=-1)
    nll = -log_p.gather(-1, y[..., None]).squeeze(-1)
    assert float(plain) == pytest.approx(float(nll.mean()), rel=1e-5)
    m.label_smoothing = 0.05
    smoothed = m(x, y)
    expected = 0.95 * nll.mean() + 0.05 * (-log_p.mean(-1)).mean()  # (1 − ε)·CE + ε·CE against uniform
    assert float(smoothed) == pytest.approx(float(expected), rel=1e-5) and float(smoothed) != float(plain)
    logits = scoring_logits(m, torch.device("cpu"))(x)  # what the ledger scores: unchanged by the switch
    assert torch.equal(logits, GPT.logits(m, x))
    assert GPT(CFG).label_smoothing == 0.0  # a model built for scoring never smooths


def test_l1_adds_lambda_sign_w_to_the_block_matrices_gradients_only():
    m, (x, y) = model(), batch()
    cfg = TrainConfig(l1_lambda=1e-3)
    _, muon = build_optimizers(m, cfg, torch.float32)
    matrices = {id(p) for g in muon.param_groups for p in g["params"]}
    m(x, y).backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (m(x, y) + l1_penalty(muon, cfg.l1_lambda)).backward()
    for name, p in m.named_parameters():
        extra = p.grad - plain[name]
        want = cfg.l1_lambda * torch.sign(p.detach()) if id(p) in matrices else torch.zeros_like(p)
        assert torch.allclose(extra, want, atol=1e-7), name
    assert len(matrices) > 0


@pytest.mark.parametrize("cautious", [False, True])
def test_cautious_weight_decay_decays_only_where_update_and_weight_agree(cautious):
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(8, 8))
    w.grad = torch.randn(8, 8)
    start = w.detach().clone()
    lr, wd = 0.1, 0.5
    opt = Muon([w], lr=lr, momentum=0.0, backend_steps=5, ns_dtype=torch.float32, coefficients="classic",
               row_norm=False, weight_decay=wd, nesterov=False, cautious=cautious)
    reference = Muon([torch.nn.Parameter(start.clone())], lr=lr, momentum=0.0, backend_steps=5,
                     ns_dtype=torch.float32, coefficients="classic", row_norm=False, weight_decay=0.0, nesterov=False)
    reference.param_groups[0]["params"][0].grad = w.grad.clone()
    reference.step()
    update = (start - reference.param_groups[0]["params"][0].detach()) / lr  # the orthogonalised step
    opt.step()
    decayed = (update * start > 0) if cautious else torch.ones_like(start, dtype=torch.bool)
    expected = start - lr * wd * start * decayed - lr * update
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    if cautious:
        assert 0 < int(decayed.sum()) < decayed.numel()  # some entries decayed, some not


def test_the_switches_are_off_by_default_and_ranged():
    cfg = TrainConfig()
    assert (cfg.label_smoothing, cfg.l1_lambda, cfg.cautious_wd) == (0.0, 0.0, False)
    with pytest.raises(PgolfError, match="label_smoothing"):
        build(TrainConfig, [({"label_smoothing": 1.5}, "params.yaml: train")], "train")


def test_a_training_run_uses_the_switches(tokenized_dir, tmp_path):
    """Through the train stage: each switch changes the trained weights; L1 shrinks the block matrices."""
    from dataclasses import replace

    from test_train import TRAIN, train_once

    cfg = replace(TRAIN, iterations=6, muon_wd=0.5)
    base, _, _ = train_once(tokenized_dir, tmp_path / "base", cfg)
    runs = {name: train_once(tokenized_dir, tmp_path / name, replace(cfg, **change))[0]
            for name, change in {"smooth": {"label_smoothing": 0.3}, "l1": {"l1_lambda": 1e-3},
                                 "cautious": {"cautious_wd": True}}.items()}
    matrix = "blocks.0.mlp.fc.weight"
    for name, state in runs.items():
        assert not torch.equal(state[matrix], base[matrix]), name
    assert runs["l1"][matrix].abs().mean() < base[matrix].abs().mean()
    # cautious decay skips entries where the update opposes the weight: less shrinkage than plain decay
    assert runs["cautious"][matrix].abs().mean() > base[matrix].abs().mean()
