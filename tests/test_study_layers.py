"""The seed studies' layers (pgolf.nn.studies): memory tokens (PR #375), DenseFormer, S4D-Lin and a Monarch MLP
(PR #1227), each checked against what its definition says, plus one run of the train, calibrate, quantize,
pack and ttt-eval stages with all four on."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pgolf.config.sections import ModelConfig, TrainConfig
from pgolf.errors import PgolfError
from pgolf.nn.attention import document_mask, mask_for
from pgolf.nn.model import GPT, MLP, build_model
from pgolf.nn.muon import newton_schulz
from pgolf.nn.optim import build_optimizers, group_of
from pgolf.nn.studies import MonarchLinear, MonarchMLP, S4DMixer, SSMInput, _linear_scan, s4d_scan

BASE = ModelConfig(vocab_size=64, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1)
ALL_FOUR = {"memory_tokens": 4, "denseformer": True, "s4d_layers": 2, "s4d_state": 8, "monarch_blocks": 4}


def config(**change) -> ModelConfig:
    cfg = replace(BASE, **change)
    cfg.validate()
    return cfg


def randomized(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model whose every matrix (and stack of matrices) has random content, so zero-initialised output
    projections do not hide what the layers before them compute. 1-D tensors (gains, DenseFormer's weights)
    keep their init."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def documents(cfg: ModelConfig, lengths=(17, 11), seed: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([cfg.bos_id]), torch.randint(4, cfg.vocab_size, (n - 1,), generator=g)])
            for n in lengths]


def assert_causal(model: GPT, cfg: ModelConfig) -> None:
    x = torch.randint(2, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    base = model.logits(x)
    for t in (0, 9, 33):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 5) % cfg.vocab_size
        changed = model.logits(x2)
        assert torch.equal(base[:, :t + 1], changed[:, :t + 1]), f"outputs at <= {t} saw token {t + 1}"
        assert not torch.allclose(base[:, t + 1:], changed[:, t + 1:]), "the changed token had no effect"


def assert_documents_isolated(model: GPT) -> None:
    """A document's logits are the same alone and after another document in the window."""
    doc_a, doc_b = documents(model.cfg)
    alone = model.logits(doc_b[None])[0]
    after_a = model.logits(torch.cat([doc_a, doc_b])[None])[0, len(doc_a):]
    assert torch.allclose(alone, after_a, atol=1e-5), (alone - after_a).abs().max()


def assert_nothing_read_from_other_documents(model: GPT) -> None:
    """A document's logits are the same after any other document of the same length: nothing of its content
    reaches them. (With memory tokens and RoPE, where the document sits relative to the memory is part of its
    input, so this, not `assert_documents_isolated`, is what holds for attention.)"""
    doc_a, doc_b = documents(model.cfg)
    other_a = doc_a.clone()
    other_a[1:] = (other_a[1:] + 7) % (model.cfg.vocab_size - 4) + 4  # no BOS among them
    after_a = model.logits(torch.cat([doc_a, doc_b])[None])[0]
    after_other = model.logits(torch.cat([other_a, doc_b])[None])[0]
    n = len(doc_a)
    assert torch.allclose(after_a[n:], after_other[n:], atol=1e-5), (after_a[n:] - after_other[n:]).abs().max()
    assert not torch.allclose(after_a[:n], after_other[:n], atol=1e-3)  # the changed document did change


def test_every_switch_is_off_by_default():
    cfg = ModelConfig()
    assert (cfg.memory_tokens, cfg.denseformer, cfg.s4d_layers, cfg.monarch_blocks) == (0, False, 0, 0)
    names = [n for n, _ in GPT(BASE).named_parameters()]
    assert not [n for n in names if any(s in n for s in ("memory", "dwa", "s4d", "monarch"))]


@pytest.mark.parametrize("bad, message", [
    ({"memory_tokens": 4, "attn_backend": "fa4"}, "memory_tokens"),
    ({"memory_tokens": -1}, "memory_tokens"),
    ({"denseformer": True, "num_loops": 1, "loop_start": 1, "loop_end": 1}, "denseformer"),
    ({"denseformer": True, "parallel_from": 3}, "denseformer"),
    ({"s4d_layers": 5}, "s4d_layers"),
    ({"s4d_layers": 3, "xsa_layers": 2}, "s4d_layers"),  # XSA needs attention in its layers
    ({"s4d_layers": 1, "s4d_state": 7}, "s4d_state"),
    ({"monarch_blocks": 1}, "monarch_blocks"),
    ({"monarch_blocks": 3}, "monarch_blocks"),  # does not divide 32
    ({"monarch_blocks": 8}, "monarch_blocks"),  # 8² > 32: an output would not read every input
])
def test_combinations_that_cannot_work_are_refused(bad, message):
    with pytest.raises(PgolfError, match=message):
        replace(BASE, **bad).validate()
    config(**ALL_FOUR, doc_mask=True, canon_k=3, skip_gates=True)  # all four together are valid


# ---- memory tokens


def test_the_memory_mask_gives_every_token_the_memory_and_its_own_document():
    ids = torch.tensor([[5, 1, 7, 8, 1, 9]])
    P = 3
    mask = document_mask(ids, 1, prefix=P)[0, 0]
    doc = torch.cumsum(ids[0] == 1, 0)
    n = P + ids.size(1)
    for q in range(n):
        for k in range(n):
            if q < P:  # a memory token: the memory up to itself
                want = k <= q
            else:  # a token: all memory, and its own document's past
                want = k < P or (k <= q and doc[q - P] == doc[k - P])
            assert bool(mask[q, k]) == want, (q, k)
    # without a prefix the mask is the document mask as before: causal within documents
    plain = document_mask(ids, 1)[0, 0]
    assert torch.equal(plain, torch.tril(torch.ones(6, 6, dtype=torch.bool)) & (doc[:, None] == doc[None, :]))
    with pytest.raises(PgolfError, match="fa4"):
        mask_for("fa4", ids, 1, prefix=P)


@torch.no_grad()
def test_memory_tokens_keep_the_logits_shape_and_every_token_reads_them():
    cfg = config(memory_tokens=4)
    model = randomized(cfg)
    x = torch.randint(2, cfg.vocab_size, (2, 24))
    logits = model.logits(x)
    assert logits.shape == (2, 24, cfg.vocab_size)
    assert model.memory_tokens.shape == (4, cfg.model_dim)
    state = model.state_dict()
    assert torch.equal(state["memory_tokens"], model.memory_tokens)  # a parameter: in the checkpoint
    restored = build_model(cfg, state, "cpu").eval()
    assert torch.equal(restored.logits(x), logits)
    with torch.no_grad():
        model.memory_tokens[2].add_(torch.randn(cfg.model_dim))
    moved = model.logits(x)
    assert not torch.isclose(moved, logits, atol=1e-6).all(dim=-1).any(), "a position did not read the memory"
    assert_causal(model, cfg)


@pytest.mark.parametrize("extra", [{}, {"attn_backend": "flex"}, {"canon_k": 3, "smear_gate": True},
                                   {"s4d_layers": 1, "s4d_state": 8}, {**ALL_FOUR, "canon_k": 3}],
                         ids=("sdpa", "flex", "canon+smear", "s4d", "all-four"))
@torch.no_grad()
def test_with_doc_mask_each_document_sees_the_memory_and_no_other_document(extra):
    cfg = config(**{"memory_tokens": 4, "doc_mask": True, **extra})
    model = randomized(cfg)
    assert_nothing_read_from_other_documents(model)
    doc_b = documents(cfg)[1][None]
    before = model.logits(doc_b)
    model.memory_tokens.mul_(-1)
    assert not torch.isclose(model.logits(doc_b), before, atol=1e-6).all(dim=-1).any()  # every position reads it


@torch.no_grad()
def test_flex_and_dense_masks_agree_with_memory_tokens():
    dense, flex = (randomized(config(memory_tokens=3, doc_mask=True, attn_backend=b)) for b in ("sdpa", "flex"))
    ids = torch.randint(2, BASE.vocab_size, (2, 30))
    ids[0, [0, 9, 21]] = BASE.bos_id
    ids[1, 13] = BASE.bos_id
    assert torch.allclose(dense.logits(ids), flex.logits(ids), atol=1e-5)


# ---- DenseFormer


def shared_weights_equal(a: GPT, b: GPT) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    return [n for n in sa if n in sb and not torch.equal(sa[n], sb[n])]


@pytest.mark.parametrize("extra", [{}, {"skip_gates": True, "canon_k": 3, "doc_mask": True}])
@torch.no_grad()
def test_denseformer_starts_as_the_model_without_it(extra):
    torch.manual_seed(0)
    plain = GPT(config(**extra))
    torch.manual_seed(0)
    dense = GPT(config(denseformer=True, **extra))
    assert shared_weights_equal(plain, dense) == []  # its weights draw no random number
    plain = randomized(config(**extra))
    dense = GPT(config(denseformer=True, **extra)).eval()
    missing, unexpected = dense.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(n.startswith("denseformer.dwa_weights.") for n in missing) and missing
    x = torch.randint(2, BASE.vocab_size, (2, 24))
    x[:, 10] = BASE.bos_id
    assert torch.equal(dense.logits(x), plain.logits(x))


def test_denseformer_weights_learn_and_can_reach_back_to_the_embedding():
    cfg = config(denseformer=True)
    model = randomized(cfg)
    x = torch.randint(2, cfg.vocab_size, (2, 24))
    model(x[:, :-1], x[:, 1:]).backward()
    weights = list(model.denseformer.dwa_weights)
    for i, w in enumerate(weights[:-1]):
        assert w.grad is not None and bool((w.grad != 0).all()), (i, w.grad)  # every α_ij, the past outputs' too
    # The last average feeds the final RMSNorm, which is scale-invariant: at the identity, scaling the stream
    # (its own α) changes nothing, so only that one weight has no gradient; it has one once the others move.
    assert bool((weights[-1].grad[:-1] != 0).all()) and weights[-1].grad[-1].abs() < 1e-6
    with torch.no_grad():  # the last average taken wholly from the embedding output X_0: the blocks are bypassed
        last = model.denseformer.dwa_weights[-1]
        last.zero_()
        last[0] = 1.0
        embedded = F.rms_norm(model.tok_emb(x), (cfg.model_dim,))
        assert torch.allclose(model.hidden(x), F.rms_norm(embedded, (cfg.model_dim,)), atol=1e-6)
        last.zero_()  # the mean of X_0 and the last block's output
        last[0] = last[-1] = 0.5
        assert not torch.allclose(model.hidden(x), F.rms_norm(embedded, (cfg.model_dim,)), atol=1e-3)


# ---- S4D


def slow_reference(mixer: S4DMixer, u: torch.Tensor, starts: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """SSM(u) + D·u by the recurrence itself, in complex128, one position at a time: h ← Ā h + B̄ u_t,
    y_t = 2·Re(C·h) + D u_t, with Ā = exp(ΔA) and B̄ = (Ā − 1)/A · B (Gu et al. 2022, zero-order hold). The
    state before a document's first token is the state the memory left (zero without memory)."""
    dt = torch.exp(mixer.s4d_log_dt.double())[:, None]
    A = -torch.exp(mixer.s4d_A_log.double()) + 1j * mixer.s4d_A_im.double()
    dA = torch.exp(dt * A)
    dB = (dA - 1) / A * torch.view_as_complex(mixer.s4d_B.double().contiguous())
    C = torch.view_as_complex(mixer.s4d_C.double().contiguous())
    D = mixer.s4d_D.double()
    u = u.double()
    B, T, H = u.shape
    h = torch.zeros(B, H, A.size(1), dtype=torch.complex128)
    after_memory = h.clone()
    y = torch.zeros(B, T, H, dtype=torch.float64)
    for t in range(T):
        if t == prefix:
            after_memory = h.clone()
        if t >= prefix:
            start = torch.zeros(B, dtype=torch.bool) if starts is None else starts[:, t - prefix].clone()
            if prefix and t == prefix:  # with memory, the window's first token starts from the memory's state
                start[:] = True
            h = torch.where(start[:, None, None], after_memory, h)
        h = dA * h + dB * u[:, t, :, None]
        y[:, t] = 2 * (C * h).sum(-1).real + D * u[:, t]
    return y


def generic_mixer(state: int = 8, dim: int = 6) -> S4DMixer:
    """An S4D layer with parameters away from their init: decays from slow to fast, B and C anything."""
    torch.manual_seed(0)
    mixer = S4DMixer(config(s4d_layers=1, s4d_state=state, model_dim=dim * 2, num_heads=2, num_kv_heads=1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mixer.s4d_log_dt.uniform_(math.log(0.01), math.log(0.5), generator=g)
        mixer.s4d_A_log.add_(0.3 * torch.randn(mixer.s4d_A_log.shape, generator=g))
        mixer.s4d_A_im.add_(torch.randn(mixer.s4d_A_im.shape, generator=g))
        for p in (mixer.s4d_B, mixer.s4d_C, mixer.s4d_D):
            p.copy_(torch.randn(p.shape, generator=g))
    return mixer


@pytest.mark.parametrize("prefix", [0, 5])
@pytest.mark.parametrize("resets", [False, True])
@torch.no_grad()
def test_s4d_equals_the_recurrence_it_defines(resets, prefix):
    mixer = generic_mixer()
    g = torch.Generator().manual_seed(2)
    T = 70  # not a multiple of the chunk: the padding is exercised too
    u = torch.randn(3, prefix + T, mixer.s4d_D.numel(), generator=g)
    starts = None
    if resets:
        starts = torch.zeros(3, T, dtype=torch.bool)
        starts[0, [0, 31, 32, 50]] = True  # at a chunk edge, twice in a row, mid-chunk
        starts[1, [7, 69]] = True
    want = slow_reference(mixer, u, starts, prefix)
    got = mixer.ssm(u, SSMInput(starts, prefix))
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4), (got.double() - want).abs().max()
    # any chunk length computes the same thing
    dta, db, c = mixer.coefficients()
    for chunk in (1, 8, 128):
        if prefix:
            _, state = s4d_scan(u[:, :prefix], dta, db, c, chunk=chunk)
            y = s4d_scan(u[:, prefix:], dta, db, c, starts, state, chunk=chunk)[0]
            y = torch.cat([s4d_scan(u[:, :prefix], dta, db, c, chunk=chunk)[0], y], dim=1)
        else:
            y = s4d_scan(u, dta, db, c, starts, chunk=chunk)[0]
        y = y + mixer.s4d_D * u
        assert torch.allclose(y.double(), want, atol=1e-4, rtol=1e-4), (chunk, (y.double() - want).abs().max())


def test_s4d_starts_as_s4d_lin():
    torch.manual_seed(0)
    mixer = S4DMixer(config(s4d_layers=1, s4d_state=16))
    modes = torch.arange(8, dtype=torch.float32)
    assert torch.allclose(-torch.exp(mixer.s4d_A_log), torch.full((32, 8), -0.5), rtol=1e-2)  # Re A = −1/2
    assert torch.allclose(mixer.s4d_A_im, math.pi * modes.expand(32, 8), rtol=1e-2)  # Im A = πn
    dt = torch.exp(mixer.s4d_log_dt)
    assert bool(((dt >= 1e-3) & (dt <= 1e-1)).all()) and dt.std() > 0
    assert torch.equal(mixer.s4d_B[..., 0], torch.ones(32, 8)) and not mixer.s4d_B[..., 1].any()
    torch.manual_seed(0)
    assert not GPT(config(s4d_layers=1)).blocks[0].attn.proj.weight.any()  # zero output projection, as attention's


@torch.no_grad()
def test_an_s4d_model_is_causal_and_resets_its_state_at_every_bos():
    cfg = config(s4d_layers=2, s4d_state=8, doc_mask=True)
    model = randomized(cfg)
    assert [type(b.attn).__name__ for b in model.blocks] == ["S4DMixer", "S4DMixer", "CausalSelfAttention",
                                                             "CausalSelfAttention"]
    assert_causal(model, cfg)
    assert_documents_isolated(model)
    # without doc_mask the state carries across the BOS (attention does too): the reset is what isolates
    carried = randomized(replace(cfg, doc_mask=False))
    doc_a, doc_b = documents(cfg)
    after_a = carried.logits(torch.cat([doc_a, doc_b])[None])[0, len(doc_a):]
    assert not torch.allclose(carried.logits(doc_b[None])[0], after_a, atol=1e-4)


@pytest.mark.parametrize("memory", [0, 4])
@torch.no_grad()
def test_s4d_only_model_resets_at_bos_too(memory):
    """Every layer an SSM: no attention is left to mask, so isolation is the scan's reset alone. With memory
    tokens every document starts from the state the memory leaves, wherever it sits in the window."""
    cfg = config(s4d_layers=4, s4d_state=8, doc_mask=True, memory_tokens=memory)
    model = randomized(cfg)
    assert_documents_isolated(model)
    assert_causal(model, cfg)


# ---- Monarch


def permutation_matrix(k: int, m: int) -> torch.Tensor:
    """P of the Monarch product: R's outputs, a grid [k blocks, m rows], are read as [m, k] (the transpose)."""
    P = torch.zeros(k * m, k * m)
    for block in range(k):
        for row in range(m):
            P[row * k + block, block * m + row] = 1.0
    return P


@pytest.mark.parametrize("n_in, n_out, k", [(32, 64, 4), (64, 32, 4), (48, 48, 3), (16, 16, 4)])
def test_monarch_is_block_diagonal_times_permutation_times_block_diagonal(n_in, n_out, k):
    torch.manual_seed(0)
    layer = MonarchLinear(n_in, n_out, k)
    with torch.no_grad():
        layer.monarch_l.normal_()
    R = torch.block_diag(*layer.monarch_r.detach())
    L = torch.block_diag(*layer.monarch_l.detach())
    m = min(n_in, n_out) // k
    dense = L @ permutation_matrix(k, m) @ R
    assert dense.shape == (n_out, n_in)
    x = torch.randn(2, 5, n_in)
    assert torch.allclose(layer(x), x @ dense.T, atol=1e-5)
    assert bool((dense != 0).all())  # with k² <= min(n_in, n_out) every output reads every input
    assert sum(p.numel() for p in layer.parameters()) < n_in * n_out


@pytest.mark.parametrize("activation", ["relu2", "leaky_relu2"])
def test_the_monarch_mlp_has_the_mlps_activation_and_fewer_parameters(activation):
    cfg = config(monarch_blocks=4, activation=activation)
    torch.manual_seed(0)
    mlp = MonarchMLP(cfg)
    with torch.no_grad():
        mlp.proj.monarch_l.normal_()
    x = torch.randn(3, 7, cfg.model_dim)
    h = mlp.fc(x)
    act = F.leaky_relu(h, 0.5) if activation == "leaky_relu2" else torch.relu(h)
    assert torch.allclose(mlp(x), mlp.proj(act.square()))
    assert bool((h < 0).any())  # so the two activations differ here
    dense = sum(p.numel() for p in MLP(cfg).parameters())
    assert sum(p.numel() for p in mlp.parameters()) < dense
    torch.manual_seed(0)
    assert not GPT(cfg).blocks[0].mlp.proj.monarch_l.any()  # zero output projection: a block starts as identity
    assert isinstance(GPT(cfg).blocks[3].mlp, MonarchMLP)


def test_muon_orthogonalises_each_block_of_a_stacked_factor():
    """A Monarch factor [K, rows, cols] under Muon: each block takes the step a matrix of its own would take
    (momentum, orthogonalisation, the √(rows/cols) scale, decay): Muon's step of the block-diagonal matrix."""
    from pgolf.nn.muon import Muon

    g = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0))
    stacked = newton_schulz(g, 5, torch.float32, "classic")
    for i in range(4):
        assert torch.allclose(stacked[i], newton_schulz(g[i], 5, torch.float32, "classic"), atol=1e-5)
    gen = torch.Generator().manual_seed(1)
    factor = torch.nn.Parameter(torch.randn(3, 12, 4, generator=gen))  # tall blocks: the scale is √3
    blocks = [torch.nn.Parameter(factor.detach()[i].clone()) for i in range(3)]
    settings = dict(lr=0.1, momentum=0.9, backend_steps=5, ns_dtype=torch.float32, coefficients="classic",
                    row_norm=False, weight_decay=0.1)
    stacked_opt, separate_opt = Muon([factor], **settings), Muon(blocks, **settings)
    for _ in range(2):
        grad = torch.randn(3, 12, 4, generator=gen)
        factor.grad = grad.clone()
        for i, b in enumerate(blocks):
            b.grad = grad[i].clone()
        stacked_opt.step()
        separate_opt.step()
    for i, b in enumerate(blocks):
        assert torch.allclose(factor.detach()[i], b.detach(), atol=1e-5), i


@pytest.mark.parametrize("option", [{"memory_tokens": 4}, {"denseformer": True}, {"s4d_layers": 2, "s4d_state": 8},
                                    {"monarch_blocks": 4}, ALL_FOUR], ids=lambda o: ",".join(o))
def test_every_parameter_is_in_exactly_one_optimizer_group_and_a_step_moves_them(option):
    model = randomized(config(**option))
    optimizers, muon = build_optimizers(model, TrainConfig(), torch.float32)  # raises if a parameter is left out
    assert sum(len(g["params"]) for o in optimizers for g in o.param_groups) == len(list(model.parameters()))
    matrices = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if "monarch_" in name or name.endswith("attn.proj.weight"):
            assert id(p) in matrices and group_of(name, p) == "matrix", name
        if any(s in name for s in ("memory_tokens", "dwa_weights", "s4d_")):
            assert group_of(name, p) == "scalar", name  # Adam, like the other control tensors
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(2, BASE.vocab_size, (2, 17))
    model.train()
    model(x[:, :-1], x[:, 1:]).backward()
    for opt in optimizers:
        opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    new = [n for n in before if any(s in n for s in ("memory_tokens", "dwa_weights", "s4d_", "monarch_"))]
    assert new and set(new) <= set(moved)


def test_the_switches_trace_under_torch_compile_fullgraph():
    cfg = config(**ALL_FOUR, doc_mask=True, attn_backend="sdpa")
    model = randomized(cfg)
    x = torch.randint(2, cfg.vocab_size, (2, 40))
    x[:, [0, 13]] = cfg.bos_id
    compiled = torch.compile(model.hidden, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x), model.hidden(x), atol=1e-6)


# ---- through the stages


def test_train_calibrate_quantize_pack_and_score_with_all_four(tokenized_dir, tmp_path):
    """The train stage runs with every switch on; each new parameter learns; calibrate, GPTQ (falling back to RTN
    where there is no Hessian: the memory, the S4D kernels, the Monarch stacks), pack and ttt-eval take the model,
    and its int8 artifact scores as its float checkpoint does."""
    from test_train import MODEL, TRAIN, train_once

    from pgolf import calibrate, pack, quantize, ttt_eval
    from pgolf.config.sections import CalibrateConfig, EvalConfig, PackConfig, QuantizeConfig
    from pgolf.formats.files import load_tensors
    from pgolf.ttt.modes import score_weights

    model_cfg = replace(MODEL, doc_mask=True, memory_tokens=4, denseformer=True, s4d_layers=1, s4d_state=16,
                        monarch_blocks=4)
    state, meta, out = train_once(tokenized_dir, tmp_path / "train", replace(TRAIN, iterations=6), model_cfg)
    assert meta["model_config"]["memory_tokens"] == 4 and meta["model_config"]["monarch_blocks"] == 4
    assert state["memory_tokens"].shape == (4, 64)
    for name in ("blocks.0.attn.proj.weight", "blocks.0.mlp.proj.monarch_l", "blocks.1.mlp.proj.monarch_l"):
        assert state[name].abs().sum() > 0, name  # zero at init: it learnt
    last = state["denseformer.dwa_weights.1"]
    assert not torch.equal(last, torch.tensor([0.0, 0.0, 1.0])), last  # moved from the identity
    # the train metrics carry the averages and their largest move from the one-hot start (PR #1227's claim)
    dense = json.loads((out / "metrics_report.json").read_text())["denseformer"]
    shifts = [(state[f"denseformer.dwa_weights.{i}"] - F.one_hot(torch.tensor(i + 1), i + 2)).abs().max()
              for i in range(2)]
    assert dense["largest_shift_from_init"] == pytest.approx(float(max(shifts)), abs=1e-6) and max(shifts) > 0
    assert dense["weights"][1] == pytest.approx(last.tolist(), abs=1e-4)
    assert "blocks.1.attn.c_q.weight" in state and "blocks.1.attn.s4d_A_log" not in state  # S4D in layer 0 only

    hess = tmp_path / "hessians.safetensors"
    calibrate.run(out / "ckpt.safetensors", tokenized_dir, hess,
                  CalibrateConfig(n_batches=2, batch_seqs=4, seq_len=64, device="cpu"), tmp_path / "calibrate.json")
    hessians, _ = load_tensors(hess, "hessians")
    assert any(n.startswith("blocks.0.attn.proj.weight") for n in hessians)  # the S4D layer's projection

    quantized = tmp_path / "quantized.safetensors"
    qcfg = QuantizeConfig(bits=8, method="gptq", keep_float_max_numel=512)  # the Monarch stacks are quantized too
    quantize.run(out / "ckpt.safetensors", quantized, qcfg, PackConfig(codec="zlib"), hess,
                 tmp_path / "quantize.json", None)
    report = json.loads((tmp_path / "quantize_report.json").read_text())
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["blocks.0.mlp.fc.monarch_r"]["bits"] == 8 and rows["blocks.0.mlp.fc.monarch_r"]["rel_err"] < 0.02
    assert rows["blocks.0.attn.proj.weight"]["method"] == "gptq"
    assert rows["memory_tokens"]["method"] == "keep_float"

    blob = tmp_path / "model.pgolf"
    pack.run(quantized, tokenized_dir, blob, PackConfig(codec="zlib"), tmp_path / "pack.json")
    eval_cfg = EvalConfig(seq_len=64, device="cpu", val_tokens=2048, warmup=False)
    ttt_eval.run(blob, tokenized_dir, eval_cfg, tmp_path / "ttt_eval.json")
    scored = json.loads((tmp_path / "ttt_eval.json").read_text())["val_bpb"]
    float_bpb = score_weights(state, ModelConfig(**meta["model_config"]), tokenized_dir, eval_cfg)["val_bpb"]
    assert math.isfinite(scored) and abs(scored - float_bpb) < 0.01 * float_bpb, (scored, float_bpb)


@pytest.mark.parametrize("n", [1, 2, 5, 9, 16, 70])
def test_linear_scan_equals_the_loop_it_replaces(n):
    """S_i = a_i·S_i−1 + b_i, complex, in the scan's √n groups against the plain loop: any length (a square, one
    past it, one position), a shared across the batch or one per row with zeros that cut the chain."""
    g = torch.Generator().manual_seed(n)
    b = torch.complex(*(torch.randn(3, n, 4, 2, generator=g, dtype=torch.float64) for _ in range(2)))
    shared = 0.9 * torch.exp(1j * torch.rand(1, n, 4, 2, generator=g).double())
    cut = torch.exp(1j * torch.rand(3, n, 4, 2, generator=g).double()) * (torch.rand(3, n, 1, 1, generator=g) > 0.3)
    for a in (shared, cut):
        want, s = [], torch.zeros(3, 4, 2, dtype=torch.complex128)
        for i in range(n):
            s = a[:, i] * s + b[:, i]
            want.append(s)
        got_re, got_im = _linear_scan((a.real, a.imag), (b.real, b.imag))
        assert torch.allclose(torch.complex(got_re, got_im), torch.stack(want, 1), atol=1e-12)
