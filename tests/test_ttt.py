"""Test-time training is legal by construction: the same harness holds every registered mode to
score-before-update, exactly-once scoring with the sidecar's bytes, document isolation (per-document
modes) and learning rate 0 being plain scoring — and it catches a planted cheat, so these tests can fail."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import filled_gpt

from pgolf.config.sections import NONCOMPLIANT_TTT, EvalConfig, ModelConfig
from pgolf.nn.model import GPT
from pgolf.text.bpb import ByteLUTs, plan_windows, scored_targets
from pgolf.text.ledger import ComplianceError, Ledger, batches_of
from pgolf.ttt.lora import chunk_rounds, document_batches
from pgolf.ttt.modes import MODES as ALL_MODES, no_adaptation
from pgolf.ttt.phased import phase_segments
from pgolf.ttt.score_first import adapted_parameters, chunk_windows

VOCAB, BOS = 64, 1
PLAIN = ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
BASE = EvalConfig(seq_len=32, stride=0, batch_seqs=4, device="cpu")
# Every registered TTT mode is held to the harness (a new one cannot skip it), each with small settings.
LORA = dict(ttt_lora_lr=0.02, ttt_lora_chunk_tokens=8, ttt_lora_rank=4, ttt_lora_alpha=8.0, ttt_lora_batch_docs=3)
SETTINGS = {"score_first": dict(ttt_lr=0.05, ttt_chunk_tokens=64, ttt_epochs=2, ttt_batch_seqs=2),
            "lora": LORA,
            # pauses after the batches where 3 and 6 documents are done; each global SGD trains on 2+ chunks
            "phased_lora": dict(LORA, ttt_prefix_docs=6, ttt_phases=2, ttt_global_lr=0.05, ttt_chunk_tokens=48,
                                ttt_batch_seqs=2)}
# The compliant modes are held to the harness; the flagged one (train_then_score) must fail it.
MODES = {name: mode for name, mode in ALL_MODES.items() if name != "none" and name not in NONCOMPLIANT_TTT}
assert set(MODES) == set(SETTINGS), "a new TTT mode needs its settings here"
PER_DOCUMENT = {"lora", "phased_lora"}  # scored in each document's own windows
ISOLATED = {"lora"}  # and nothing else learned from other documents (phased_lora's pauses do, by design)


def cfg_for(name: str, **extra) -> EvalConfig:
    return replace(BASE, ttt=name, **{**SETTINGS[name], **extra})


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
    return filled_gpt(cfg)


def run(mode, tokens: np.ndarray, sidecar: np.ndarray, cfg: EvalConfig, model_cfg: ModelConfig = PLAIN,
        deadline: float | None = None) -> tuple[Ledger, dict, dict]:
    """(the ledger, with every target's loss and scoring order; the BPB result; what the mode reports)."""
    ledger = Ledger(tokens, sidecar, luts(), "cpu", keep_losses=True)
    info = mode(model(model_cfg), ledger, cfg, torch.device("cpu"), deadline)
    return ledger, ledger.result(info["expected_targets"]), info


def document_windows_plain(m: GPT, ledger: Ledger, cfg: EvalConfig, device, deadline) -> dict:
    """No adaptation, but the per-document modes' windows and batches: each chunk in its document's context."""
    batches = document_batches(ledger, BOS, cfg)
    m.eval()
    for batch in batches:
        for _, windows, _ in chunk_rounds(batch, cfg):
            ledger.score(windows, m.logits)
    return {"expected_targets": sum(b - a - 1 for batch in batches for a, b in batch)}


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
    return {"expected_targets": scored_targets(windows)}


def earlier_losses_survive_a_future_change(mode, cfg: EvalConfig, position: int) -> bool:
    """Harness: change token `position`. Every loss recorded before that target was scored (earlier in the
    scoring order, or earlier in the same window) must stay bit-identical."""
    tokens, sidecar = stream()
    before, _, _ = run(mode, tokens, sidecar, cfg)
    changed = tokens.copy()
    changed[position] = 4 + (int(changed[position]) + 17) % (VOCAB - 4)
    after, _, _ = run(mode, changed, sidecar, cfg)
    assert not np.array_equal(before.losses, after.losses, equal_nan=True)  # the change is visible
    at = before.order[position]
    earlier = (before.order < at) | ((before.order == at) & (np.arange(tokens.size) < position))
    earlier[0] = False
    assert earlier.sum() > 20
    return bool(np.array_equal(before.losses[earlier], after.losses[earlier]))


@pytest.mark.parametrize("name", sorted(MODES))
def test_a_future_token_never_changes_an_earlier_loss(name):
    for position in (90, 150, 300):  # updates have happened before each is scored
        assert earlier_losses_survive_a_future_change(MODES[name], cfg_for(name), position), position


def test_the_harness_catches_a_planted_cheat():
    assert not earlier_losses_survive_a_future_change(cheat_trains_then_scores, cfg_for("score_first"), 150)
    # and the flagged protocol: the harness sees it, and the ledger says why it is not a valid score
    flagged = replace(cfg_for("score_first"), ttt="train_then_score")
    assert not earlier_losses_survive_a_future_change(ALL_MODES["train_then_score"], flagged, 150)
    ledger, _, info = run(ALL_MODES["train_then_score"], *stream(), flagged)
    assert info["steps"] > 0 and ledger.violation == NONCOMPLIANT_TTT["train_then_score"]
    # and the ledger itself refuses the two shortcuts a mode could try through it
    tokens, sidecar = stream()
    ledger = Ledger(tokens, sidecar, luts(), "cpu")
    with pytest.raises(ComplianceError, match="has not been scored yet"):
        ledger.training_tokens(0, 65)
    windows = plan_windows(ledger.n_tokens, 32, 0)
    ledger.score(windows[:2], model().logits)
    with pytest.raises(ComplianceError, match="scored a second time"):
        ledger.score(windows[1:3], model().logits)
    assert ledger.training_tokens(0, 65).numel() == 65  # targets 1..64: scored by the first two windows
    with pytest.raises(ComplianceError, match="target 65"):
        ledger.training_tokens(0, 66)


@pytest.mark.parametrize("name, stride", [("score_first", 0), ("score_first", 8), ("lora", 0), ("phased_lora", 0)])
def test_every_target_is_scored_once_with_the_sidecars_bytes(name, stride):
    tokens, sidecar = stream()
    ledger, result, info = run(MODES[name], tokens, sidecar, cfg_for(name, stride=stride))
    targets = np.flatnonzero(~np.isnan(ledger.losses))
    per_window = name == "score_first" and stride == 0  # non-overlapping windows drop the stream's tail
    expected_last = (tokens.size - 1) // 32 * 32 if per_window else tokens.size - 1
    assert targets.tolist() == list(range(1, expected_last + 1))
    assert result["tokens_scored"] == expected_last and result["sidecar_bytes"] == int(sidecar[1:expected_last + 1].sum())
    assert result["val_loss"] == pytest.approx(ledger.losses[1:expected_last + 1].mean(), rel=1e-12)
    assert info["steps"] > 0  # it did adapt


@pytest.mark.parametrize("name", sorted(ISOLATED))
def test_a_documents_losses_do_not_depend_on_the_documents_beside_it(name):
    tokens, sidecar = stream()
    cfg = cfg_for(name, ttt_lora_warm_a=False)  # warm A carries earlier batches' (scored) documents on purpose
    alone, _, _ = run(MODES[name], tokens, sidecar, replace(cfg, ttt_lora_batch_docs=1))
    together, _, _ = run(MODES[name], tokens, sidecar, replace(cfg, ttt_lora_batch_docs=4))
    assert np.allclose(alone.losses[1:], together.losses[1:], rtol=0, atol=1e-5)
    assert not np.array_equal(alone.order, together.order)  # the batches really were different


OPTIONS = {"smear_gate": True, "bigram_buckets": 64, "xsa_layers": 2, "skip_gates": True, "sparse_attn_gate": True,
           "ln_scale": True, "rope_dims": 8, "num_loops": 1, "loop_start": 0, "loop_end": 0, "doc_mask": True,
           "activation": "leaky_relu2"}
EVERY_OPTION = ModelConfig(**{**PLAIN.__dict__, **OPTIONS, "num_layers": 3, "parallel_from": 2})


@pytest.mark.parametrize("name", sorted(MODES))
@pytest.mark.parametrize("model_cfg", [PLAIN, EVERY_OPTION], ids=["plain", "every_option"])
def test_ttt_at_learning_rate_zero_is_plain_scoring(name, model_cfg):
    """The adapted forward is the model's own (every option applied), and lr 0 changes nothing."""
    tokens, sidecar = stream()
    plain = document_windows_plain if name in PER_DOCUMENT else no_adaptation
    cfg = cfg_for(name, ttt_lr=0.0, ttt_lora_lr=0.0, ttt_global_lr=0.0)
    none, none_result, _ = run(plain, tokens, sidecar, cfg, model_cfg)
    ttt, result, _ = run(MODES[name], tokens, sidecar, cfg, model_cfg)
    assert np.array_equal(ttt.losses, none.losses, equal_nan=True) and result == none_result


@pytest.mark.parametrize("name", sorted(MODES))
def test_adapting_lowers_the_loss(name):
    tokens, sidecar = stream(n=1025)
    cfg = cfg_for(name, ttt_chunk_tokens=128, ttt_epochs=3, ttt_lr=0.1, ttt_lora_lr=0.05, ttt_global_lr=0.1)
    plain = document_windows_plain if name in PER_DOCUMENT else no_adaptation
    _, none, _ = run(plain, tokens, sidecar, cfg)
    _, adapted, info = run(MODES[name], tokens, sidecar, cfg)
    assert info["tokens_adapted"] > 0 and adapted["val_bpb"] < none["val_bpb"] - 0.02, (adapted, none)


@pytest.mark.parametrize("name", sorted(MODES))
def test_time_budget_stops_adapting_and_scoring_goes_on(name):
    tokens, sidecar = stream()
    plain = document_windows_plain if name in PER_DOCUMENT else no_adaptation
    ledger, result, info = run(MODES[name], tokens, sidecar, cfg_for(name), deadline=0.0)  # long past
    assert info["steps"] == 0
    _, none, _ = run(plain, tokens, sidecar, cfg_for(name))
    assert result == none


def test_what_score_first_adapts():
    m = model(ModelConfig(**{**PLAIN.__dict__, "num_layers": 4}))
    cfg = cfg_for("score_first")
    count = lambda c: sum(p.numel() for p in adapted_parameters(m, c))  # noqa: E731
    assert count(cfg) == sum(p.numel() for p in m.parameters())
    assert count(replace(cfg, ttt_freeze_blocks=2)) == sum(p.numel() for p in m.blocks[2:].parameters())
    assert count(replace(cfg, ttt_freeze_blocks=3, ttt_mlp_only=True)) == sum(p.numel() for p in m.blocks[3].mlp.parameters())
    assert not m.tok_emb.weight.requires_grad and m.blocks[3].mlp.fc.weight.requires_grad


def test_lora_leaves_the_model_as_it_found_it():
    from pgolf.ttt.lora import document_lora

    tokens, sidecar = stream()
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ledger = Ledger(tokens, sidecar, luts(), "cpu")
    document_lora(m, ledger, cfg_for("lora"), torch.device("cpu"), None)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the base stays frozen
    assert m.head_adapter is None and m.blocks[0].attn.c_q.adapter is None and all(p.requires_grad for p in m.parameters())


def test_lora_adapts_a_model_whose_bottom_layer_is_an_s4d_layer():
    """An S4D layer's attention slot has no q, k, v projections: LoRA adapts its output ("o") and everything else."""
    from pgolf.ttt.lora import document_lora

    tokens, sidecar = stream()
    m = model(ModelConfig(**{**PLAIN.__dict__, "s4d_layers": 1, "s4d_state": 4}))
    ledger = Ledger(tokens, sidecar, luts(), "cpu")
    info = document_lora(m, ledger, cfg_for("lora"), torch.device("cpu"), None)
    assert ledger.recorded[1:].all() and info["steps"] > 0
    assert m.blocks[0].attn.adapter is None and m.blocks[1].attn.c_q.adapter is None  # detached again
    plain = document_lora(model(), Ledger(tokens, sidecar, luts(), "cpu"), cfg_for("lora"), torch.device("cpu"), None)
    dim, rank = PLAIN.model_dim, LORA["ttt_lora_rank"]
    kv = PLAIN.num_kv_heads * dim // PLAIN.num_heads
    qkv = rank * (dim + dim) + 2 * rank * (dim + kv)  # the S4D slot's missing q, k and v adapters
    assert plain["adapter_params_per_document"] - info["adapter_params_per_document"] == qkv


def test_phased_pauses_fall_where_the_documents_done_reach_each_boundary():
    batches = [[(0, 2)] * n for n in (3, 3, 3, 2)]  # 3, 6, 9, 11 documents done
    assert phase_segments(batches, 6, 2) == [((0, 1), 3), ((1, 2), 6), ((2, 4), 0)]
    assert phase_segments(batches, 7, 2) == [((0, 1), 3), ((1, 3), 7), ((3, 4), 0)]  # 3 and 7: reached at 9
    assert phase_segments(batches, 11, 1) == [((0, 4), 0)]  # nothing left after the last batch: no pause
    assert phase_segments(batches, 0, 3) == phase_segments(batches, 6, 0) == [((0, 4), 0)]


def test_phased_lora_trains_the_base_model_on_documents_already_scored(monkeypatch):
    tokens, sidecar = stream()
    cfg = cfg_for("phased_lora")
    spans = []  # (targets a pause asked for, how many score() calls had been made then)
    real = Ledger.training_tokens

    def watched(self, start, end):
        spans.append((start + 1, end, self.calls))
        return real(self, start, end)

    monkeypatch.setattr(Ledger, "training_tokens", watched)
    ledger, result, info = run(MODES["phased_lora"], tokens, sidecar, cfg)
    assert [p["documents"] for p in info["phases"]] == [3, 6] and all(p["steps"] > 0 for p in info["phases"])
    # every target a pause trained on was scored before the pause, and scoring went on after it
    assert len(spans) == 9 and all((ledger.order[a:b] < calls).all() for a, b, calls in spans)
    assert all(calls < ledger.calls for _, _, calls in spans)
    monkeypatch.undo()
    _, lora, _ = run(MODES["lora"], tokens, sidecar, cfg_for("lora"))
    assert result["val_bpb"] != lora["val_bpb"]  # the pauses changed the model


@pytest.mark.parametrize("name", ["none", "score_first"])
def test_scoring_and_ttt_give_the_same_losses_on_the_fa4_backend(name, monkeypatch):
    """A checkpoint trained with attn_backend fa4 is scored, and adapted by score_first TTT, through the varlen
    op too (pgolf.nn.attention.mask_for follows the model's backend; on CPU the op's float32 reference runs).
    It is the same function as the dense document mask: every target's loss agrees, through the TTT updates.
    (The per-document LoRA modes run plain causal attention whatever the backend: a window holds one document.)"""
    import pgolf.nn.attention as attention

    varlen_calls = []
    varlen = attention.varlen_bthd
    monkeypatch.setattr(attention, "varlen_bthd", lambda *a: varlen_calls.append(1) or varlen(*a))
    masked = replace(PLAIN, doc_mask=True, bos_id=BOS)
    tokens, sidecar = stream(seed=3)
    cfg = BASE if name == "none" else cfg_for(name)
    mode = ALL_MODES[name]
    dense, dense_result, _ = run(mode, tokens, sidecar, cfg, replace(masked, attn_backend="sdpa"))
    assert not varlen_calls
    fa4, fa4_result, _ = run(mode, tokens, sidecar, cfg, replace(masked, attn_backend="fa4"))
    assert varlen_calls  # the fa4 run went through the varlen op
    assert np.isfinite(dense.losses[1:]).all()
    np.testing.assert_allclose(fa4.losses, dense.losses, atol=2e-4, rtol=0)
    assert fa4_result["val_bpb"] == pytest.approx(dense_result["val_bpb"], abs=1e-5)
