"""The baseline GPT and Muon on real computation."""

import pytest
import torch

from pgolf.config.sections import ModelConfig
from pgolf.nn.model import GPT, build_model
from pgolf.nn.muon import Muon, newton_schulz

def plain_muon(lr: float, row_norm: bool = False, weight_decay: float = 0.0) -> dict:
    """Muon settings without momentum, in float32 (the update is then a pure function of the gradient)."""
    return {"lr": lr, "momentum": 0.0, "backend_steps": 5, "ns_dtype": torch.float32, "coefficients": "classic",
            "row_norm": row_norm, "weight_decay": weight_decay}


TINY = ModelConfig(vocab_size=300, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2)


def randomized(cfg: ModelConfig = TINY, seed: int = 0) -> GPT:
    """A model whose zero-initialised projections are filled too, so every path carries signal."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_causal_changing_a_later_token_never_changes_earlier_outputs():
    model = randomized()
    x = torch.randint(0, TINY.vocab_size, (2, 48))
    base = model.logits(x)
    for t in (0, 1, 17, 46):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 7) % TINY.vocab_size
        changed = model.logits(x2)
        assert torch.equal(base[:, : t + 1], changed[:, : t + 1]), f"outputs at <= {t} saw token {t + 1}"
        assert not torch.allclose(base[:, t + 1 :], changed[:, t + 1 :]), "the changed token had no effect at all"


def test_parameter_names_and_shapes_match_the_challenge_baseline():
    cfg = ModelConfig(vocab_size=1024)  # the baseline preset's dimensions
    names = dict((n, tuple(p.shape)) for n, p in GPT(cfg).named_parameters())
    assert names["tok_emb.weight"] == (1024, 512)
    assert names["skip_weights"] == (4, 512)
    assert names["blocks.0.attn.c_q.weight"] == (512, 512)
    assert names["blocks.0.attn.c_k.weight"] == (256, 512)
    assert names["blocks.8.mlp.fc.weight"] == (1024, 512)
    assert names["blocks.8.mlp.proj.weight"] == (512, 1024)
    assert names["blocks.3.resid_mix"] == (2, 512)
    assert names["blocks.3.attn.q_gain"] == (8,)
    assert sum(p.numel() for p in GPT(cfg).parameters()) == 17_059_912  # 17.06 M in the reference's logs
    assert len([n for n in names if n.startswith("blocks.")]) == 9 * 10


def test_initial_state_follows_the_reference_init():
    torch.manual_seed(0)
    model = GPT(TINY)
    assert model.blocks[0].attn.proj.weight.abs().sum() == 0 and model.blocks[0].mlp.proj.weight.abs().sum() == 0
    assert abs(model.tok_emb.weight.std().item() - TINY.tied_embed_init_std) < 5e-4
    assert torch.all(model.blocks[0].attn.q_gain == TINY.qk_gain_init)
    # Zero output projections make every block the identity, and the final RMSNorm removes the
    # (1 + skip weights) scale the U-Net adds: the hidden state is the normed embedding.
    x = torch.randint(0, TINY.vocab_size, (1, 16))
    emb = torch.nn.functional.rms_norm(model.tok_emb(x), (TINY.model_dim,))
    assert torch.allclose(model.hidden(x), torch.nn.functional.rms_norm(emb, (TINY.model_dim,)), atol=1e-5)


def test_softcap_bounds_logits():
    model = randomized()
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000)
    logits = model.logits(torch.randint(0, TINY.vocab_size, (1, 8)))
    assert logits.abs().max() <= TINY.logit_softcap


def test_loss_is_mean_cross_entropy_of_logits():
    model = randomized()
    x = torch.randint(0, TINY.vocab_size, (2, 10))
    y = torch.randint(0, TINY.vocab_size, (2, 10))
    logp = torch.log_softmax(model.logits(x).double(), -1)
    expected = -logp.gather(-1, y[..., None]).mean()
    assert abs(model(x, y).item() - expected.item()) < 1e-5


def test_build_model_refuses_weights_of_another_shape():
    state = randomized().state_dict()
    with pytest.raises(ValueError, match="wrong shape"):
        build_model(ModelConfig(**{**TINY.__dict__, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1}), state, "cpu")
    state.pop("skip_weights")
    with pytest.raises(ValueError, match="missing"):
        build_model(TINY, state, "cpu")


def test_newton_schulz_output_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in ((64, 256), (256, 64), (96, 160)):
        G = torch.randn(shape) * torch.linspace(0.5, 3.0, shape[1])  # unevenly scaled columns
        X = newton_schulz(G, steps=5, dtype=torch.float32, coefficients="classic")
        s = torch.linalg.svdvals(X)
        # The quintic trades exactness for speed: singular values land in a band around 1, not at 1
        # (directions with tiny singular values would need more steps; gradients rarely have them).
        assert s.min() > 0.5 and s.max() < 1.25, (shape, s.min(), s.max())
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        cos = (X * (U @ Vh)).sum() / (X.norm() * (U @ Vh).norm())
        assert cos > 0.95


def test_muon_step_moves_each_matrix_by_an_orthogonal_update():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 96))
    before = w.detach().clone()
    opt = Muon([w], nesterov=False, **plain_muon(lr=0.1))
    w.grad = torch.randn(32, 96)
    opt.step()
    update = (before - w.detach()) / 0.1
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.5 and s.max() < 1.25
    # Tall matrices are scaled by sqrt(rows/cols).
    t = torch.nn.Parameter(torch.zeros(96, 24))
    opt = Muon([t], nesterov=False, **plain_muon(lr=1.0))
    t.grad = torch.randn(96, 24)
    opt.step()
    s = torch.linalg.svdvals(-t.detach())
    assert 0.5 * 2 < s.min() and s.max() < 1.25 * 2


def test_document_mask_isolates_each_document():
    """With doc_mask a document's logits are the same whether or not another document precedes it."""
    cfg = ModelConfig(**{**TINY.__dict__, "doc_mask": True})
    model = randomized(cfg)
    bos = cfg.bos_id
    torch.manual_seed(1)
    doc_a = torch.cat([torch.tensor([bos]), torch.randint(4, cfg.vocab_size, (20,))])
    doc_b = torch.cat([torch.tensor([bos]), torch.randint(4, cfg.vocab_size, (15,))])
    alone = model.logits(doc_b[None])[0]
    after_a = model.logits(torch.cat([doc_a, doc_b])[None])[0, len(doc_a):]
    assert torch.allclose(alone, after_a, atol=1e-5), (alone - after_a).abs().max()
    # without the mask the preceding document leaks in
    leaky = randomized(TINY)
    assert not torch.allclose(leaky.logits(doc_b[None])[0], leaky.logits(torch.cat([doc_a, doc_b])[None])[0, len(doc_a):], atol=1e-3)
    # and the masked model is still causal within a document
    x = torch.cat([doc_a, doc_b])[None]
    x2 = x.clone()
    x2[0, 30] = (x2[0, 30] + 1) % cfg.vocab_size
    assert torch.equal(model.logits(x)[:, :30], model.logits(x2)[:, :30])


# Every option of the record stack on TINY's three layers, all at once (looping on: a model starts looped).
ALL_OPTIONS = {"doc_mask": True, "xsa_layers": 3, "rope_dims": 4, "ln_scale": True, "activation": "leaky_relu2",
               "smear_gate": True, "skip_gates": True, "parallel_from": 2, "loop_start": 0, "loop_end": 1,
               "num_loops": 1, "sparse_attn_gate": True, "gated_attn_dim": 4, "ortho_init": True, "mlp_mult": 2.5}
OPTIONS = [{"activation": "leaky_relu2"}, {"smear_gate": True}, {"rope_dims": 8}, {"ln_scale": True}, {"xsa_layers": 2},
           {"doc_mask": True, "xsa_layers": 3, "rope_dims": 4, "ln_scale": True, "activation": "leaky_relu2"},
           {"skip_gates": True}, {"parallel_from": 1}, {"parallel_from": 2},
           {"loop_start": 1, "loop_end": 1, "num_loops": 2}, {"loop_start": 0, "loop_end": 2, "num_loops": 1},
           {"sparse_attn_gate": True}, {"sparse_attn_gate": True, "sparse_gate_scale": 2.0},
           {"gated_attn_dim": 4}, {"gated_attn_dim": 8}, {"ortho_init": True}, {"mlp_mult": 3.5},
           {"smear_gate_perdim": True}, {"bigram_buckets": 64, "bigram_dim": 16}, ALL_OPTIONS]
# The older input side of the 03-19/03-20 records instead of the BOS-fixed SmearGate.
OLDER_INPUT = {"smear_gate": False, "smear_gate_perdim": True, "bigram_buckets": 64, "bigram_dim": 16}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: ",".join(o))
@torch.no_grad()  # flex_attention has no CPU backward
def test_every_option_keeps_the_model_causal_and_changes_its_function(option):
    cfg = ModelConfig(**{**TINY.__dict__, **option})
    model, plain = randomized(cfg), randomized(TINY)  # same seed: same weights
    x = torch.randint(2, cfg.vocab_size, (2, 32))
    x2 = x.clone()
    x2[:, 20] = (x2[:, 20] + 5) % cfg.vocab_size
    assert torch.equal(model.logits(x)[:, :20], model.logits(x2)[:, :20])
    assert not torch.allclose(model.logits(x), plain.logits(x), atol=1e-4)  # the option is really applied


def test_xsa_removes_each_heads_component_along_its_own_value():
    from pgolf.nn.model import exclusive

    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 8, 2, 5, 16
    y, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D)
    out = exclusive(y, v)
    for h in range(H):
        g = h // (H // Hkv)  # the KV head serving query head h
        vn = v[:, :, g] / v[:, :, g].norm(dim=-1, keepdim=True)
        assert torch.allclose((out[:, :, h] * vn).sum(-1), torch.zeros(B, T), atol=1e-5)
        assert torch.allclose(out[:, :, h], y[:, :, h] - (y[:, :, h] * vn).sum(-1, keepdim=True) * vn, atol=1e-6)


def test_partial_rope_rotates_only_the_first_dims():
    from pgolf.nn.model import Rotary, apply_rotary

    x = torch.randn(1, 6, 2, 16)  # [B, T, H, D]
    cos, sin = Rotary(4, 10000.0)(6, torch.float32)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert torch.allclose(out[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1), atol=1e-6)
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is not rotated
    assert not torch.allclose(out[:, 3, :, :4], x[:, 3, :, :4])


def test_layerwise_norm_scale_and_leaky_activation():
    model = GPT(ModelConfig(**{**TINY.__dict__, "ln_scale": True, "activation": "leaky_relu2"}))
    assert [b.norm_scale for b in model.blocks] == pytest.approx([1.0, 2 ** -0.5, 3 ** -0.5])
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.fc.weight.copy_(torch.eye(TINY.model_dim).repeat(2, 1))  # pre-activation = x
        mlp.proj.weight.copy_(torch.eye(TINY.model_dim).repeat(1, 2) / 2)
    x = torch.full((1, 1, TINY.model_dim), -2.0)
    assert torch.allclose(mlp(x), torch.full_like(x, 1.0))  # (0.5 · −2)² = 1, where relu² gives 0


def test_smear_gate_mixes_the_previous_token_but_never_across_bos():
    cfg = ModelConfig(**{**TINY.__dict__, "smear_gate": True, "doc_mask": True})
    model = randomized(cfg)
    with torch.no_grad():
        model.smear.smear_lambda.fill_(1.0)
    torch.manual_seed(2)
    doc_a = torch.cat([torch.tensor([cfg.bos_id]), torch.randint(4, cfg.vocab_size, (12,))])
    doc_b = torch.cat([torch.tensor([cfg.bos_id]), torch.randint(4, cfg.vocab_size, (9,))])
    alone = model.logits(doc_b[None])[0]
    after_a = model.logits(torch.cat([doc_a, doc_b])[None])[0, len(doc_a):]
    assert torch.allclose(alone, after_a, atol=1e-5)  # the BOS of doc b did not take doc a's last token
    # inside a document the previous token does flow in
    e = model.tok_emb(doc_b[None])
    assert not torch.allclose(model.smear(e, doc_b[None])[:, 1:], e[:, 1:])
    assert torch.equal(model.smear(e, doc_b[None])[:, 0], e[:, 0])
    # zero-initialised: a fresh gate is the identity
    fresh = GPT(cfg)
    assert torch.equal(fresh.smear(e, doc_b[None]), e)


def test_polar_express_coefficients_converge_tighter():
    torch.manual_seed(0)
    G = torch.randn(64, 256) * torch.linspace(0.5, 3.0, 256)
    classic = torch.linalg.svdvals(newton_schulz(G, 5, dtype=torch.float32, coefficients="classic"))
    polar = torch.linalg.svdvals(newton_schulz(G, 5, torch.float32, "polar_express"))
    assert polar.min() > classic.min() + 0.1 and polar.max() < 1.2


def test_muon_row_normalisation_and_decoupled_weight_decay():
    torch.manual_seed(0)
    grad = torch.randn(16, 48)
    scaled = grad.clone()
    scaled[3] *= 1000.0  # one row dominates the raw gradient

    def update(g, row_norm):
        w = torch.nn.Parameter(torch.zeros(16, 48))
        w.grad = g.clone()
        Muon([w], nesterov=False, **plain_muon(lr=1.0, row_norm=row_norm)).step()
        return w.detach()

    assert torch.allclose(update(scaled, True), update(grad, True), atol=1e-5)  # MuonEq-R: row scale is gone
    assert not torch.allclose(update(scaled, False), update(grad, False), atol=1e-3)
    w = torch.nn.Parameter(torch.ones(8, 8))
    w.grad = torch.zeros(8, 8)  # no gradient: only the decay acts
    Muon([w], nesterov=False, **plain_muon(lr=0.5, weight_decay=0.1)).step()
    assert torch.allclose(w.detach(), torch.full((8, 8), 1 - 0.5 * 0.1))


# ---------------------------------------------------------------------------------------------------
# Record-stack components (the record stack of PR #1855)

def rms(x):
    return torch.nn.functional.rms_norm(x, (x.size(-1),))


def test_skip_gates_merge_as_a_lerp_starting_half_way():
    cfg = ModelConfig(**{**TINY.__dict__, "skip_gates": True})
    fresh = GPT(cfg)
    assert torch.equal(fresh.skip_gates, torch.zeros_like(fresh.skip_weights))
    x, skip = torch.randn(2, 5, cfg.model_dim), torch.randn(2, 5, cfg.model_dim)
    with torch.no_grad():
        fresh.skip_weights.mul_(torch.rand_like(fresh.skip_weights))  # w ≠ 1, so the test sees where w goes
    w = fresh.skip_weights[0]
    assert torch.allclose(fresh.merge_skip(0, x, skip), 0.5 * x + 0.5 * w * skip, atol=1e-6)
    # Trained gates: the whole forward by hand (3 layers: encoder [0], decoder [1, 2], one skip).
    model = randomized(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    x0 = rms(model.tok_emb(ids))
    b = model.blocks
    h1 = b[0](x0, x0)
    g = torch.sigmoid(model.skip_gates[0])
    x = g * h1 + (1 - g) * (model.skip_weights[0] * h1)
    expected = rms(b[2](b[1](x, x0), x0))
    assert torch.allclose(model.hidden(ids), expected, atol=1e-5)


def test_parallel_lanes_route_attention_to_lane0_and_the_mlp_to_lane1():
    cfg = ModelConfig(**{**TINY.__dict__, "num_layers": 2, "parallel_from": 1})
    fresh = GPT(cfg)
    assert not fresh.blocks[0].parallel and fresh.blocks[1].parallel
    assert not hasattr(fresh.blocks[0], "parallel_post_lambdas")
    block = fresh.blocks[1]
    assert torch.equal(block.parallel_post_lambdas, torch.ones(2, 2))
    assert torch.allclose(block.parallel_resid_lambdas, torch.full((2,), 1.1), atol=2e-3)  # 1.1 rounded to bf16
    model = randomized(cfg)
    block = model.blocks[1]
    with torch.no_grad():  # back to the documented inits, so the hand computation below is the init's
        block.parallel_post_lambdas.fill_(1.0)
        block.parallel_resid_lambdas.fill_(1.1)
    torch.manual_seed(3)
    lane0, lane1, x0 = (torch.randn(2, 10, cfg.model_dim) for _ in range(3))
    seen = {}
    block.attn.register_forward_hook(lambda m, inp, out: seen.__setitem__("attn", inp[0]))
    block.mlp.register_forward_hook(lambda m, inp, out: seen.__setitem__("mlp", inp[0]))
    m0, m1 = block.resid_mix
    a = block.attn_scale * block.attn(rms(m0 * lane0 + m1 * x0))
    f = block.mlp_scale * block.mlp(rms(lane1))
    out0, out1 = block.forward_lanes(lane0, lane1, x0)
    assert torch.allclose(out0, 1.1 * lane0 + a + f, atol=1e-5) and torch.allclose(out1, 1.1 * lane1 + a + f, atol=1e-5)
    attn_in, mlp_in = seen["attn"], seen["mlp"]
    block.forward_lanes(lane0 + 1.0, lane1, x0)  # perturb the attention lane: the MLP input stays
    assert torch.equal(seen["mlp"], mlp_in) and not torch.allclose(seen["attn"], attn_in)
    block.forward_lanes(lane0, lane1 + 1.0, x0)  # perturb the MLP lane: the attention input stays
    assert torch.equal(seen["attn"], attn_in) and not torch.allclose(seen["mlp"], mlp_in)
    # The whole model: lanes start equal, the skip goes into lane 0 only, the output is the lanes' mean.
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    x0 = rms(model.tok_emb(ids))
    h = model.blocks[0](x0, x0)
    l0, l1 = block.forward_lanes(h + model.skip_weights[0] * h, h, x0)
    assert torch.allclose(model.hidden(ids), rms(0.5 * (l0 + l1)), atol=1e-5)


def test_depth_recurrence_order_switch_and_shared_weights():
    from pgolf.nn.model import layer_order

    cfg = ModelConfig(vocab_size=64, num_layers=11, model_dim=32, num_heads=2, num_kv_heads=1,
                      loop_start=3, loop_end=5, num_loops=2)
    assert list(layer_order(cfg, looping=True)) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert list(layer_order(cfg, looping=False)) == list(range(11))
    model = GPT(cfg)
    assert model.skip_weights.shape[0] == 8  # 17 virtual layers: 8 encoder, 9 decoder (§2.6)
    # Looped model on TINY: order [0, 1, 1, 2], encoder [0, 1], decoder [1, 2]; check by hand.
    cfg = ModelConfig(**{**TINY.__dict__, "loop_start": 1, "loop_end": 1, "num_loops": 1})
    model = randomized(cfg)
    assert model.looping  # built looped: evaluation and TTT run the full architecture
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    x0 = rms(model.tok_emb(ids))
    b, w = model.blocks, model.skip_weights
    s0 = b[0](x0, x0)
    s1 = b[1](s0, x0)
    x = b[1](s1 + w[0] * s1, x0)
    expected = rms(b[2](x + w[1] * s0, x0))
    looped = model.hidden(ids)
    assert torch.allclose(looped, expected, atol=1e-5)
    model.set_looping(False)
    plain = model.hidden(ids)
    s0 = b[0](x0, x0)
    assert torch.allclose(plain, rms(b[2](b[1](s0 + w[0] * s0, x0), x0)), atol=1e-5)
    assert not torch.allclose(plain, looped, atol=1e-4)
    assert sum(p.numel() for p in model.parameters()) == n_params
    no_loops = GPT(TINY)
    no_loops.set_looping(True)  # nothing to loop: stays plain
    assert not no_loops.looping


def test_looping_switch_retraces_under_torch_compile_fullgraph():
    """`looping` is read at trace time; compile guards on it, so a switch must not reuse a stale graph."""
    torch._dynamo.reset()
    cfg = ModelConfig(**{**TINY.__dict__, "loop_start": 0, "loop_end": 1, "num_loops": 1})
    model = randomized(cfg)
    compiled = torch.compile(model.logits, backend="eager", fullgraph=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        model.set_looping(False)
        eager_off, compiled_off = model.logits(ids), compiled(ids)
        model.set_looping(True)
        eager_on, compiled_on = model.logits(ids), compiled(ids)
    assert not torch.allclose(eager_off, eager_on, atol=1e-4)
    assert torch.allclose(compiled_off, eager_off, atol=1e-5) and torch.allclose(compiled_on, eager_on, atol=1e-5)
    torch._dynamo.reset()


def _attention_pair(option: dict):
    """An attention with `option` and a plain one with the same Q/K/V weights and an identity out-projection,
    so each output is the concatenated head outputs."""
    from pgolf.nn.model import CausalSelfAttention

    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.__dict__, **option})
    gated, plain = CausalSelfAttention(cfg), CausalSelfAttention(TINY)
    with torch.no_grad():
        for name in ("c_k", "c_v"):
            getattr(plain, name).weight.copy_(getattr(gated, name).weight)
        plain.c_q.weight.copy_(gated.c_q.weight[:TINY.model_dim])
        for att in (gated, plain):
            att.proj.weight.copy_(torch.eye(TINY.model_dim))
    return cfg, gated, plain


def test_sparse_attention_gate_halves_heads_at_init_and_reads_the_first_12_dims():
    cfg, gated, plain = _attention_pair({"sparse_attn_gate": True, "sparse_gate_scale": 0.5})
    x = torch.randn(2, 9, cfg.model_dim)
    assert torch.equal(gated.attn_gate_w, torch.zeros(cfg.num_heads, 12))
    assert torch.allclose(gated(x), 0.5 * plain(x), atol=1e-6)  # σ(0) = 0.5 on every head
    with torch.no_grad():
        gated.attn_gate_w.normal_()
    heads = plain(x).view(2, 9, cfg.num_heads, -1)
    gate = torch.sigmoid(0.5 * x[..., :12] @ gated.attn_gate_w.T)  # [B, T, H]
    assert torch.allclose(gated(x).view_as(heads), gate[..., None] * heads, atol=1e-5)


def test_headwise_gated_attention_widens_q_and_gates_each_head():
    cfg, gated, plain = _attention_pair({"gated_attn_dim": 8})  # 4 heads: 2 gate rows per head
    assert gated.c_q.weight.shape == (cfg.model_dim + 8, cfg.model_dim)
    x = torch.randn(2, 9, cfg.model_dim)
    heads = plain(x).view(2, 9, cfg.num_heads, -1)
    logits = (x @ gated.c_q.weight[cfg.model_dim:].T).view(2, 9, cfg.num_heads, 2).mean(-1)
    assert torch.allclose(gated(x).view_as(heads), torch.sigmoid(logits)[..., None] * heads, atol=1e-5)


def test_ortho_init_gives_orthonormal_rows_or_columns():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.__dict__, "ortho_init": True, "gated_attn_dim": 4})
    model = GPT(cfg)

    def orthonormal(w):  # rows when wide, columns when tall; bf16 rounding leaves ~1e-3 error
        g = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
        return torch.allclose(g, torch.eye(g.size(0)), atol=1e-2)

    for block in model.blocks:
        att = block.attn
        assert orthonormal(att.c_q.weight[:cfg.model_dim]) and orthonormal(att.c_q.weight[cfg.model_dim:])
        assert orthonormal(att.c_k.weight) and orthonormal(att.c_v.weight) and orthonormal(block.mlp.fc.weight)
        assert att.proj.weight.abs().sum() == 0 and block.mlp.proj.weight.abs().sum() == 0
    assert not orthonormal(GPT(TINY).blocks[0].attn.c_q.weight)  # PyTorch's default init is not


def test_mlp_mult_is_a_float_and_int_configs_still_load():
    from pgolf.errors import PgolfError
    from pgolf.config.build import build

    assert GPT(ModelConfig(**{**TINY.__dict__, "mlp_mult": 2.5})).blocks[0].mlp.fc.weight.shape == (160, 64)
    assert GPT(ModelConfig(**{**TINY.__dict__, "mlp_mult": 3})).blocks[0].mlp.fc.weight.shape == (192, 64)
    assert build(ModelConfig, [({"mlp_mult": 3}, "params.yaml")])[0].mlp_mult == 3.0
    with pytest.raises(PgolfError, match="mlp_mult"):
        ModelConfig(**{**TINY.__dict__, "mlp_mult": 0.001}).validate()


@pytest.mark.parametrize("bad, message", [
    ({"num_loops": -1}, "num_loops"),
    ({"num_loops": 1, "loop_start": 2, "loop_end": 1}, "loop_start"),
    ({"num_loops": 1, "loop_end": 3}, "loop_end"),
    ({"parallel_from": 3}, "parallel_from"),  # no such layer
    ({"num_layers": 6, "parallel_from": 2}, "parallel_from"),  # an encoder layer
    ({"num_layers": 6, "parallel_from": 4, "num_loops": 1, "loop_start": 3, "loop_end": 4}, "parallel_from"),
    ({"sparse_gate_scale": 0.0}, "sparse_gate_scale"),
    ({"gated_attn_dim": 6}, "gated_attn_dim"),
    ({"gated_attn_dim": -4}, "gated_attn_dim"),
    ({"smear_gate": True, "smear_gate_perdim": True}, "smear_gate"),
    ({"bigram_buckets": -1}, "bigram_buckets"),
    ({"attn_backend": "fa5"}, "attn_backend"),
])
def test_bad_component_params_are_refused(bad, message):
    from pgolf.errors import PgolfError

    with pytest.raises(PgolfError, match=message):
        ModelConfig(**{**TINY.__dict__, **bad}).validate()
    ModelConfig(**{**TINY.__dict__, **ALL_OPTIONS}).validate()  # the full stack is valid


@pytest.mark.parametrize("variant", [{}, OLDER_INPUT, {"attn_backend": "flex"}], ids=("stack", "older-input", "flex"))
@torch.no_grad()
def test_document_isolation_holds_with_every_option_on(variant):
    cfg = ModelConfig(**{**TINY.__dict__, **ALL_OPTIONS, **variant})
    model = randomized(cfg)
    assert model.looping
    torch.manual_seed(4)
    doc_a = torch.cat([torch.tensor([cfg.bos_id]), torch.randint(4, cfg.vocab_size, (17,))])
    doc_b = torch.cat([torch.tensor([cfg.bos_id]), torch.randint(4, cfg.vocab_size, (11,))])
    for looping in (True, False):
        model.set_looping(looping)
        alone = model.logits(doc_b[None])[0]
        after_a = model.logits(torch.cat([doc_a, doc_b])[None])[0, len(doc_a):]
        assert torch.allclose(alone, after_a, atol=1e-5), (looping, (alone - after_a).abs().max())


def test_new_small_tensors_are_control_tensors():
    from pgolf.nn.optim import group_of

    model = GPT(ModelConfig(**{**TINY.__dict__, **ALL_OPTIONS}))
    names = {n for n, p in model.named_parameters() if group_of(n, p) == "scalar"}
    for expected in ("skip_gates", "blocks.2.parallel_post_lambdas", "blocks.2.parallel_resid_lambdas",
                     "blocks.0.attn.attn_gate_w"):
        assert expected in names
    assert group_of("blocks.0.attn.c_q.weight", model.blocks[0].attn.c_q.weight) == "matrix"  # the widened Q too


@torch.no_grad()
def test_flex_attention_block_mask_equals_the_dense_document_mask():
    dense_cfg = ModelConfig(**{**TINY.__dict__, **ALL_OPTIONS, "attn_backend": "sdpa"})
    flex_cfg = ModelConfig(**{**TINY.__dict__, **ALL_OPTIONS, "attn_backend": "flex"})
    dense, flex = randomized(dense_cfg), randomized(flex_cfg)  # same seed: same weights
    ids = torch.randint(2, TINY.vocab_size, (2, 40))
    ids[0, [0, 9, 25]] = TINY.bos_id
    ids[1, [13]] = TINY.bos_id
    assert torch.allclose(dense.logits(ids), flex.logits(ids), atol=1e-5)


def test_perdim_smear_gate_blends_the_previous_token_from_sigma_3_and_never_across_bos():
    cfg = ModelConfig(**{**TINY.__dict__, "smear_gate_perdim": True})
    model = GPT(cfg)
    e = torch.randn(1, 6, cfg.model_dim)
    ids = torch.tensor([[cfg.bos_id, 5, 6, cfg.bos_id, 7, 8]])
    out = model.smear(e, ids)
    g = torch.sigmoid(torch.tensor(3.0))
    assert torch.allclose(out[0, 1], g * e[0, 1] + (1 - g) * e[0, 0], atol=1e-6)
    assert torch.equal(out[0, 3], e[0, 3]) and torch.equal(out[0, 0], e[0, 0])  # BOS rows are untouched


def test_bigram_hash_buckets_pairs_within_documents_and_starts_as_a_no_op():
    from pgolf.nn.model import BIGRAM_HASH_MULT

    cfg = ModelConfig(**{**TINY.__dict__, "bigram_buckets": 97, "bigram_dim": 8})
    model = GPT(cfg)
    ids = torch.tensor([[9, 5, cfg.bos_id, 7, 8]])
    buckets = model.bigram.bucket_ids(ids)[0].tolist()
    bos = cfg.bos_id
    pairs = [(bos, 9), (9, 5), (bos, bos), (bos, 7), (7, 8)]  # a BOS never pairs with the last document
    assert buckets == [(p * BIGRAM_HASH_MULT + c) % 97 for p, c in pairs]
    assert model.bigram.embed.weight.shape == (97, 8) and model.bigram.proj.weight.shape == (cfg.model_dim, 8)
    plain = GPT(TINY)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("bigram.")})
    assert torch.allclose(model.logits(ids), plain.logits(ids))  # zero projection: no effect at init


def test_qat_fake_quantizes_block_matrices_with_a_straight_through_gradient():
    from pgolf.nn.layers import fake_quantize
    from pgolf.nn.model import CastedLinear, enable_qat, set_qat

    model = randomized(TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    float_logits = model.logits(ids)
    enable_qat(model, 4)
    assert torch.equal(model.logits(ids), float_logits)  # enabled but off: unchanged
    set_qat(model, True)
    quantized = randomized(TINY)
    with torch.no_grad():
        for module in quantized.blocks.modules():
            if isinstance(module, CastedLinear):
                module.weight.copy_(fake_quantize(module.weight, 4))
    assert torch.allclose(model.logits(ids), quantized.logits(ids), atol=1e-5)
    w = model.blocks[0].mlp.fc.weight
    q = fake_quantize(w, 4)
    assert len(torch.unique(torch.round(q / (w.abs().amax(1, keepdim=True) / 7)))) <= 15
    # straight-through: the float weight's gradient is the quantized forward's gradient
    model.logits(ids).square().mean().backward()
    quantized.logits(ids).square().mean().backward()
    assert torch.allclose(w.grad, quantized.blocks[0].mlp.fc.weight.grad, atol=1e-5)
    assert not any("qat" in k for k in model.state_dict())  # the toggle is never saved


def test_qat_toggle_is_data_not_a_constant_under_torch_compile():
    """A flag read inside a compiled graph must not be constant-folded (late QAT that never fired)."""
    from pgolf.nn.model import enable_qat, set_qat

    torch._dynamo.reset()
    model = randomized(TINY)
    enable_qat(model, 3)
    compiled = torch.compile(model.logits, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, TINY.vocab_size, (1, 16))
    with torch.no_grad():
        off = compiled(ids)
        set_qat(model, True)
        on = compiled(ids)
        assert torch.allclose(on, model.logits(ids), atol=1e-5)
    assert not torch.allclose(off, on, atol=1e-4)
    torch._dynamo.reset()
