"""The fused LeakyReLU² up-projection (pgolf.nn.fused_mlp) against the plain expression it replaces: the
eager fallback through the custom op and autograd, opcheck, torch.compile, the model switch, and the Triton
kernels themselves on CPU under Triton's interpreter."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import run_in_triton_interpreter
from pgolf.config.sections import ModelConfig
from pgolf.errors import PgolfError
from pgolf.nn import model as model_mod
from pgolf.nn.fused_mlp import leaky_relu2_linear
from pgolf.nn.model import GPT, enable_qat

M, D, HIDDEN = 37, 48, 80  # odd sizes, none a multiple of the kernel's 128 × 128 × 64 blocks


def plain(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What MLP computes today: CastedLinear (weight cast to x's dtype), LeakyReLU(0.5), square."""
    return F.leaky_relu(x @ weight.to(x.dtype).T, 0.5).square()


def make(dtype, shape=(M, D), hidden=HIDDEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(hidden, shape[-1], generator=g) / shape[-1] ** 0.5  # an fp32 master, as in the model
    up = torch.randn(*shape[:-1], hidden, generator=g).to(dtype)  # upstream grad: checks grad_a is used
    return x, w, up


def out_and_grads(fn, x, w, up):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(x, w)
    out.backward(up)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(M, D), (3, 13, D), (5, 1)], ids=["2d", "3d", "d1"])
def test_fallback_matches_plain(dtype, shape):
    x, w, up = make(dtype, shape)
    out, gx, gw = out_and_grads(leaky_relu2_linear, x, w, up)
    ref, rgx, rgw = out_and_grads(plain, x, w, up)
    assert out.dtype == gx.dtype == dtype and gw.dtype == torch.float32
    assert out.shape == (*shape[:-1], HIDDEN) and (out < 0).sum() == 0 < (ref > 0).sum()
    # The same torch ops in the same dtype: equal up to the matmul's summation order in grad_w.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, rgx, **tol)
    torch.testing.assert_close(gw, rgw, **tol)


def test_autocast_casts_like_f_linear():
    """Under autocast x (fp32 here) and the weight go to the autocast dtype, as F.linear's inputs would."""
    x, w, up = make(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, gx, gw = out_and_grads(leaky_relu2_linear, x, w, up.bfloat16())
    ref, rgx, rgw = out_and_grads(lambda x, w: plain(x.bfloat16(), w), x, w, up.bfloat16())
    assert out.dtype == torch.bfloat16 and gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, rgx, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gw, rgw, rtol=1e-2, atol=1e-2)


def test_h_is_stored_only_when_a_gradient_is_needed():
    x, w, _ = make(torch.float32)
    fwd = torch.ops.pgolf.leaky_relu2_linear_fwd
    a, h = fwd(x, w, True)
    torch.testing.assert_close(h, x @ w.T, rtol=0, atol=0)
    torch.testing.assert_close(a, plain(x, w), rtol=0, atol=0)
    assert fwd(x, w, False)[1].numel() == 0
    with torch.no_grad():  # inference: the wrapper asks for no h, and still computes a
        torch.testing.assert_close(leaky_relu2_linear(x, w.requires_grad_()), plain(x, w), rtol=0, atol=0)
    a, _ = fwd(x.requires_grad_(), w, False)
    with pytest.raises(RuntimeError, match="save_h=False"):
        a.sum().backward()


def test_opcheck():
    x, w, up = make(torch.float32, (9, 16), hidden=24)
    fwd, bwd = torch.ops.pgolf.leaky_relu2_linear_fwd.default, torch.ops.pgolf.leaky_relu2_linear_bwd.default
    torch.library.opcheck(fwd, (x.clone().requires_grad_(), w.clone().requires_grad_(), True))
    torch.library.opcheck(fwd, (x, w, False))
    h = x @ w.T
    torch.library.opcheck(bwd, (up, h))
    expected = up * torch.where(h > 0, 2 * h, 0.5 * h)  # d(lr(h)²)/dh = 2·lr(h)·lr'(h)
    torch.testing.assert_close(bwd(up, h), expected, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    """One opaque op under fullgraph compile (aot_eager: dynamo, fake impls and AOT autograd without
    inductor's slow C++ build), matching eager forward and backward."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(lambda x, w: leaky_relu2_linear(x * 2.0, w), fullgraph=True, backend=backend)
    x, w, up = make(torch.float32, (2, 7, D))
    out, gx, gw = out_and_grads(compiled, x, w, up)
    ref, rgx, rgw = out_and_grads(lambda x, w: plain(x * 2.0, w), x, w, up)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)
    targets = [node.target for gm in graphs for node in gm.graph.nodes]
    assert targets.count(torch.ops.pgolf.leaky_relu2_linear_fwd.default) == 1
    assert F.leaky_relu not in targets
    torch._dynamo.reset()


TINY = dict(vocab_size=300, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.5,
            activation="leaky_relu2")


def _model(fused: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, fused_mlp=fused))
    with torch.no_grad():  # fill the zero-initialised projections too, so every MLP carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_model_with_fused_mlp_matches_the_plain_model(monkeypatch):
    calls = []
    real = model_mod.leaky_relu2_linear
    monkeypatch.setattr(model_mod, "leaky_relu2_linear", lambda x, w: calls.append(1) or real(x, w))
    fused, plain_model = _model(True), _model(False)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24))
    targets = torch.randint(0, TINY["vocab_size"], (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(fused.logits(ids), plain_model.logits(ids))
    assert len(calls) == TINY["num_layers"]  # the fused op really ran, once per MLP
    losses = []
    for m in (fused, plain_model):
        loss = m(ids, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    grads = dict(plain_model.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    assert fused.blocks[0].mlp.fc.weight.grad.abs().sum() > 0
    calls.clear()
    enable_qat(fused, 4)  # QAT's fake quantizer sits on fc's weight: the plain path
    with torch.no_grad():
        fused.logits(ids)
    assert not calls


@pytest.mark.parametrize("bad", [{"activation": "relu2"}, {"monarch_blocks": 4}])
def test_fused_mlp_config_is_refused_where_it_cannot_apply(bad):
    with pytest.raises(PgolfError, match="fused_mlp"):
        ModelConfig(**{**TINY, "fused_mlp": True, **bad}).validate()
    ModelConfig(**{**TINY, "fused_mlp": True}).validate()
    ModelConfig(**{**TINY, **bad}).validate()


TRITON_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from pgolf.nn import fused_mlp as fm
    assert fm.HAS_TRITON and fm._INTERPRET
    m, d, n = 37, 48, 80

    def check(dtype, seed):
        g = torch.Generator().manual_seed(seed)
        xw = torch.randn(m, 2 * d, generator=g).to(dtype)
        x = xw[:, :d]  # row stride 2d: the kernel reads strides, not a contiguous layout
        w = (torch.randn(d, n, generator=g) / d ** 0.5).T  # an fp32 master [n, d] with column stride n
        up = torch.randn(m, n, generator=g).to(dtype)
        bf16 = dtype == torch.bfloat16
        # The interpreter rounds fp32 to bf16 toward zero (the GPU to nearest): up to one bf16 ulp, 2^-7.
        rtol = 2 ** -7 if bf16 else 1e-5
        h_ref = x.double() @ w.to(dtype).double().T
        a_ref = F.leaky_relu(h_ref, 0.5).square()
        a, h = fm._triton_forward(x, w.to(dtype), True)
        assert a.dtype == h.dtype == dtype and a.shape == h.shape == (m, n)
        torch.testing.assert_close(h.double(), h_ref, rtol=rtol, atol=1e-5)
        torch.testing.assert_close(a.double(), a_ref, rtol=rtol, atol=1e-5)
        a2, h2 = fm._triton_forward(x, w.to(dtype), False)
        assert torch.equal(a2, a) and h2.numel() == 0
        gh = fm._triton_backward(up, h)
        torch.testing.assert_close(gh, fm._eager_backward(up, h), rtol=rtol, atol=0)
        # The whole op (custom op, autograd, both kernels) against autograd of the plain expression.
        fm._use_triton = lambda t: True
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out = fm.leaky_relu2_linear(xr, wr)
        out.backward(up)
        xd, wd = x.double().requires_grad_(), w.to(dtype).double().requires_grad_()
        F.leaky_relu(xd @ wd.T, 0.5).square().backward(up.double())
        fm._use_triton = lambda t: False
        assert xr.grad.dtype == dtype and wr.grad.dtype == torch.float32
        torch.testing.assert_close(out, a)
        # bf16: grad_h is rounded, then two bf16 matmuls: a few % of the largest entries.
        tol = 3e-2 if bf16 else 1e-5
        for got, want in ((xr.grad, xd.grad), (wr.grad, wd.grad)):
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())

    # The tuned-for-GPU blocks (one tile; K masked), then small ones: 3 × 3 tiles in groups of 2 row tiles
    # (the last group short), K = 48 over two 32-wide steps (the second masked), 12 backward blocks.
    for blocks in ((128, 128, 64, 8, 4096), (16, 32, 32, 2, 256)):
        fm._BLOCK_M, fm._BLOCK_N, fm._BLOCK_K, fm._GROUP_M, fm._BWD_BLOCK = blocks
        for seed, dtype in enumerate((torch.float32, torch.bfloat16)):
            check(dtype, seed)
    print("ok")
""")


def test_triton_kernels_in_interpreter():
    """The Triton kernels (not the fallback) on CPU tensors, run by Triton's interpreter."""
    run_in_triton_interpreter(TRITON_SCRIPT)
