"""The baseline GPT and Muon on real computation."""

import pytest
import torch

from stages.config import ModelConfig
from stages.model import GPT, build_model
from stages.muon import Muon, newton_schulz

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
        build_model(ModelConfig(**{**TINY.__dict__, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1}), state)
    state.pop("skip_weights")
    with pytest.raises(ValueError, match="missing"):
        build_model(TINY, state)


def test_newton_schulz_output_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in ((64, 256), (256, 64), (96, 160)):
        G = torch.randn(shape) * torch.linspace(0.5, 3.0, shape[1])  # unevenly scaled columns
        X = newton_schulz(G, steps=5, dtype=torch.float32)
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
    opt = Muon([w], lr=0.1, momentum=0.0, nesterov=False, ns_dtype=torch.float32)
    w.grad = torch.randn(32, 96)
    opt.step()
    update = (before - w.detach()) / 0.1
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.5 and s.max() < 1.25
    # Tall matrices are scaled by sqrt(rows/cols).
    t = torch.nn.Parameter(torch.zeros(96, 24))
    opt = Muon([t], lr=1.0, momentum=0.0, nesterov=False, ns_dtype=torch.float32)
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


OPTIONS = [{"activation": "leaky_relu2"}, {"smear_gate": True}, {"rope_dims": 8}, {"ln_scale": True}, {"xsa_layers": 2},
           {"doc_mask": True, "xsa_layers": 3, "rope_dims": 4, "ln_scale": True, "activation": "leaky_relu2"}]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: ",".join(o))
def test_every_option_keeps_the_model_causal_and_changes_its_function(option):
    cfg = ModelConfig(**{**TINY.__dict__, **option})
    model, plain = randomized(cfg), randomized(TINY)  # same seed: same weights
    x = torch.randint(2, cfg.vocab_size, (2, 32))
    x2 = x.clone()
    x2[:, 20] = (x2[:, 20] + 5) % cfg.vocab_size
    assert torch.equal(model.logits(x)[:, :20], model.logits(x2)[:, :20])
    assert not torch.allclose(model.logits(x), plain.logits(x), atol=1e-4)  # the option is really applied


def test_xsa_removes_each_heads_component_along_its_own_value():
    from stages.model import exclusive

    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 8, 2, 5, 16
    y, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D)
    out = exclusive(y, v)
    for h in range(H):
        g = h // (H // Hkv)  # the KV head serving query head h
        vn = v[:, g] / v[:, g].norm(dim=-1, keepdim=True)
        assert torch.allclose((out[:, h] * vn).sum(-1), torch.zeros(B, T), atol=1e-5)
        assert torch.allclose(out[:, h], y[:, h] - (y[:, h] * vn).sum(-1, keepdim=True) * vn, atol=1e-6)


def test_partial_rope_rotates_only_the_first_dims():
    from stages.model import Rotary, apply_rotary

    x = torch.randn(1, 2, 6, 16)
    cos, sin = Rotary(4, 10000.0)(6, torch.float32)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert torch.allclose(out[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1), atol=1e-6)
    assert torch.equal(out[:, :, 0], x[:, :, 0])  # position 0 is not rotated
    assert not torch.allclose(out[:, :, 3, :4], x[:, :, 3, :4])


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
