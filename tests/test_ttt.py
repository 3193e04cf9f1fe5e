"""Test-time training is legal by construction: the same harness holds every mode to score-before-update,
exactly-once scoring with the sidecar's bytes, and TTT at learning rate 0 being plain scoring — and it
catches a planted cheat, so these tests can fail."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pgolf.config.sections import EvalConfig, ModelConfig
from pgolf.nn.model import GPT
from pgolf.text.bpb import ByteLUTs, plan_windows
from pgolf.text.ledger import ComplianceError, Ledger, batches_of
from pgolf.ttt.modes import MODES as ALL_MODES, no_adaptation
from pgolf.ttt.score_first import adapted_parameters, chunk_windows, score_first

VOCAB, BOS = 64, 1
PLAIN = ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
CFG = EvalConfig(seq_len=32, stride=0, batch_seqs=4, device="cpu", ttt="score_first", ttt_lr=0.05,
                 ttt_chunk_tokens=64, ttt_epochs=2, ttt_batch_seqs=2)


def luts() -> ByteLUTs:
    base = (1 + np.arange(VOCAB) % 3).astype(np.int16)
    base[BOS] = 0
    return ByteLUTs(base, np.zeros(VOCAB, dtype=bool), np.arange(VOCAB) == BOS)


def stream(seed: int = 0, n: int = 353) -> tuple[np.ndarray, np.ndarray]:
    """Documents of a repeated phrase with noise (so adapting helps), BOS-separated; and a byte sidecar."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(4, VOCAB, 9)
    tokens = []
    while len(tokens) < n:
        tokens.append(BOS)
        for _ in range(rng.integers(2, 6)):
            tokens.extend(int(t) if rng.random() > 0.1 else int(rng.integers(4, VOCAB)) for t in phrase)
    tokens = np.array(tokens[:n], dtype=np.uint16)
    return tokens, (1 + rng.integers(0, 4, n)).astype(np.uint16) * (tokens != BOS)


def model(cfg: ModelConfig = PLAIN) -> GPT:
    torch.manual_seed(0)
    m = GPT(cfg)
    with torch.no_grad():  # zero-initialised projections would make the model ignore its context
        for p in m.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def run(mode, tokens: np.ndarray, sidecar: np.ndarray, cfg: EvalConfig = CFG, model_cfg: ModelConfig = PLAIN,
        deadline: float | None = None) -> tuple[np.ndarray, dict, dict]:
    """(every target's recorded loss, the BPB result, what the mode reports)."""
    ledger = Ledger(tokens, sidecar, luts(), "cpu", keep_losses=True)
    info = mode(model(model_cfg), ledger, cfg, torch.device("cpu"), deadline)
    return ledger.losses, ledger.result(info["expected_targets"]), info


def cheat_trains_then_scores(m: GPT, ledger: Ledger, cfg: EvalConfig, device, deadline) -> dict:
    """A planted violation: it reads the raw stream and trains on each chunk *before* scoring it."""
    windows = plan_windows(ledger.n_tokens, cfg.seq_len, cfg.stride, cfg.val_tokens)
    optimizer = torch.optim.SGD(m.parameters(), lr=cfg.ttt_lr)
    for c, chunk in enumerate(chunk_windows(windows, cfg.ttt_chunk_tokens)):
        peeked = torch.from_numpy(ledger._tokens[c * cfg.ttt_chunk_tokens:(c + 1) * cfg.ttt_chunk_tokens + 1]
                                  .astype(np.int64))
        m.train()
        m(peeked[None, :-1], peeked[None, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
        m.eval()
        for batch in batches_of(chunk, cfg.batch_seqs):
            ledger.score(batch, m.logits)
    return {"expected_targets": sum(w.end - w.start - w.first_scored for w in windows)}


# Every registered TTT mode is held to the harness: a new one cannot skip it.
MODES = {name: mode for name, mode in ALL_MODES.items() if name != "none"}


def earlier_losses_survive_a_future_change(mode, position: int) -> bool:
    """Harness: change token `position`; every loss recorded for an earlier target must stay bit-identical."""
    tokens, sidecar = stream()
    before, _, _ = run(mode, tokens, sidecar)
    changed = tokens.copy()
    changed[position] = 4 + (int(changed[position]) + 17) % (VOCAB - 4)
    after, _, _ = run(mode, changed, sidecar)
    assert not np.array_equal(before[position:], after[position:], equal_nan=True)  # the change is visible
    return bool(np.array_equal(before[1:position], after[1:position]))


@pytest.mark.parametrize("name", sorted(MODES))
def test_a_future_token_never_changes_an_earlier_loss(name):
    for position in (90, 150, 300):  # inside chunks 1, 2 and 4: updates have happened before each
        assert earlier_losses_survive_a_future_change(MODES[name], position), position


def test_the_harness_catches_a_planted_cheat():
    assert not earlier_losses_survive_a_future_change(cheat_trains_then_scores, 150)
    # and the ledger itself refuses the two shortcuts a mode could try through it
    tokens, sidecar = stream()
    ledger = Ledger(tokens, sidecar, luts(), "cpu")
    with pytest.raises(ComplianceError, match="has not been scored yet"):
        ledger.training_tokens(0, 65)
    windows = plan_windows(ledger.n_tokens, 32, 0)
    ledger.score(windows[:2], model().logits)
    with pytest.raises(ComplianceError, match="scored a second time"):
        ledger.score(windows[1:3], model().logits)
    assert ledger.training_tokens(0, 65).numel() == 65 and ledger.frontier() == 65


@pytest.mark.parametrize("name", sorted(MODES))
@pytest.mark.parametrize("stride", [0, 8])
def test_every_target_is_scored_once_with_the_sidecars_bytes(name, stride):
    tokens, sidecar = stream()
    losses, result, info = run(MODES[name], tokens, sidecar, replace(CFG, stride=stride))
    targets = np.flatnonzero(~np.isnan(losses))
    expected_last = (tokens.size - 1) // 32 * 32 if stride == 0 else tokens.size - 1
    assert targets.tolist() == list(range(1, expected_last + 1))
    assert result["tokens_scored"] == expected_last and result["sidecar_bytes"] == int(sidecar[1:expected_last + 1].sum())
    assert result["val_loss"] == pytest.approx(losses[1:expected_last + 1].mean(), rel=1e-12)
    assert info["steps"] > 0  # it did adapt


OPTIONS = {"smear_gate": True, "bigram_buckets": 64, "xsa_layers": 2, "skip_gates": True, "sparse_attn_gate": True,
           "ln_scale": True, "rope_dims": 8, "num_loops": 1, "loop_start": 0, "loop_end": 0, "doc_mask": True,
           "activation": "leaky_relu2"}


@pytest.mark.parametrize("name", sorted(MODES))
@pytest.mark.parametrize("model_cfg", [PLAIN, ModelConfig(**{**PLAIN.__dict__, **OPTIONS, "num_layers": 3,
                                                             "parallel_from": 2})], ids=["plain", "every_option"])
def test_ttt_at_learning_rate_zero_is_no_adaptation(name, model_cfg):
    """The adapted forward is the model's own (every option applied), and lr 0 changes nothing."""
    tokens, sidecar = stream()
    none_losses, none_result, _ = run(no_adaptation, tokens, sidecar, CFG, model_cfg)
    losses, result, _ = run(MODES[name], tokens, sidecar, replace(CFG, ttt_lr=0.0), model_cfg)
    assert np.array_equal(losses, none_losses, equal_nan=True) and result == none_result


def test_score_first_adapting_lowers_the_loss_of_later_chunks():
    tokens, sidecar = stream(n=1025)
    cfg = replace(CFG, ttt_lr=0.1, ttt_chunk_tokens=128, ttt_epochs=3)
    _, none, _ = run(no_adaptation, tokens, sidecar, cfg)
    _, adapted, info = run(score_first, tokens, sidecar, cfg)
    assert info["tokens_adapted"] > 0 and adapted["val_bpb"] < none["val_bpb"] - 0.05, (adapted, none)


def test_time_budget_stops_adapting_and_scoring_goes_on():
    tokens, sidecar = stream()
    losses, result, info = run(score_first, tokens, sidecar, deadline=0.0)  # long past
    assert info["steps"] == 0 and info["stopped_adapting_at_chunk"] == 0
    _, none, _ = run(no_adaptation, tokens, sidecar)
    assert result == none


def test_what_adapts():
    m = model(ModelConfig(**{**PLAIN.__dict__, "num_layers": 4}))
    count = lambda cfg: sum(p.numel() for p in adapted_parameters(m, cfg))  # noqa: E731
    total = sum(p.numel() for p in m.parameters())
    assert count(CFG) == total
    frozen2 = count(replace(CFG, ttt_freeze_blocks=2))
    assert frozen2 == sum(p.numel() for p in m.blocks[2:].parameters())
    assert count(replace(CFG, ttt_freeze_blocks=3, ttt_mlp_only=True)) == sum(p.numel() for p in m.blocks[3].mlp.parameters())
    assert not m.tok_emb.weight.requires_grad and m.blocks[3].mlp.fc.weight.requires_grad
