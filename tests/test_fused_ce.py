"""The fused softcapped cross-entropy (pgolf.nn.fused_ce) against the plain expression it replaces:
the eager fallback through the custom op and autograd, opcheck, torch.compile, and the Triton
kernels themselves on CPU under Triton's interpreter."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import run_in_triton_interpreter
from pgolf.nn import fused_ce
from pgolf.nn.fused_ce import softcapped_cross_entropy

CAP = 30.0
N, V = 37, 1001  # odd V, not a multiple of the kernels' block of 1024 columns (nor of 2)


def plain(z: torch.Tensor, t: torch.Tensor, cap: float, eps: float) -> torch.Tensor:
    """What the model computes today (pgolf.nn.model: softcap, then loss_from_logits)."""
    return F.cross_entropy((cap * torch.tanh(z / cap)).float(), t, label_smoothing=eps)


def make(dtype, seed=0, n=N, v=V, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * scale).to(dtype)  # ×20: many logits in tanh's bend and tail
    t = torch.randint(0, v, (n,), generator=g)
    return z, t


def loss_and_grad(fn, z, t, eps, upstream=1.7):
    """fn's loss at z and d(upstream·loss)/dz (upstream ≠ 1 checks that the incoming grad is used)."""
    z = z.detach().clone().requires_grad_()
    loss = fn(z, t, CAP, eps)
    (loss * upstream).backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fallback_matches_plain_float32(eps):
    z, t = make(torch.float32)
    loss, grad = loss_and_grad(softcapped_cross_entropy, z, t, eps)
    ref_loss, ref_grad = loss_and_grad(plain, z, t, eps)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fallback_matches_plain_bfloat16(eps):
    z, t = make(torch.bfloat16)
    loss, grad = loss_and_grad(softcapped_cross_entropy, z, t, eps)
    assert grad.dtype == torch.bfloat16
    # The plain expression takes tanh (and its backward) in bf16: s off by up to cap·2⁻⁹ ≈ 0.06, and
    # the grad by a few bf16 ulps of its largest entries; the op upcasts z first.
    ref_loss, ref_grad = loss_and_grad(plain, z, t, eps)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=2e-2)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=0, atol=2e-2 * ref_grad.abs().max().item())
    # Against the plain expression on the upcast z the only difference left is grad's bf16 rounding.
    ref_loss, ref_grad = loss_and_grad(plain, z.float(), t, eps)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-7)


def test_fallback_chunks_batched_and_noncontiguous(monkeypatch):
    """Rows split over several chunks; [B, T, V] input; a non-contiguous z (a transposed view)."""
    monkeypatch.setattr(fused_ce, "_EAGER_CHUNK", 5 * V)  # 37 rows → 8 chunks, the last one short
    z, t = make(torch.float32, seed=1)
    zt = z.t().contiguous().t()  # same values, column-major: stride (1, N)
    assert not zt.is_contiguous()
    for eps in (0.0, 0.1):
        loss, grad = loss_and_grad(softcapped_cross_entropy, zt, t, eps)
        ref_loss, ref_grad = loss_and_grad(plain, z, t, eps)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    z3, t3 = z[:36].reshape(4, 9, V), t[:36].reshape(4, 9)
    loss, grad = loss_and_grad(softcapped_cross_entropy, z3, t3, 0.1)
    ref_loss, ref_grad = loss_and_grad(plain, z[:36], t[:36], 0.1)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.reshape(36, V), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_opcheck(eps):
    z, t = make(torch.float32, n=9, v=101)
    torch.library.opcheck(torch.ops.pgolf.softcapped_ce_fwd.default, (z.requires_grad_(), t, CAP, eps))
    loss, lse = torch.ops.pgolf.softcapped_ce_fwd(z.detach(), t, CAP, eps)
    torch.testing.assert_close(lse, torch.logsumexp(CAP * torch.tanh(z.detach() / CAP), dim=1))
    torch.library.opcheck(torch.ops.pgolf.softcapped_ce_bwd.default, (torch.tensor(0.5), z.detach(), t, lse, CAP, eps))


def test_torch_compile_fullgraph():
    """The op stays one node: fullgraph compile succeeds and matches eager, forward and backward.
    aot_eager runs dynamo, the fake impls and AOT autograd (register_autograd) without inductor's
    C++ build, which takes ~25 s on a 2-core CPU."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def step(z, t):
        return softcapped_cross_entropy(z * 2.0, t, CAP, 0.1)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    z, t = make(torch.float32, n=16, v=257, seed=2)
    loss, grad = loss_and_grad(lambda z, t, cap, eps: compiled(z, t), z, t, 0.1)
    ref_loss, ref_grad = loss_and_grad(lambda z, t, cap, eps: plain(z * 2.0, t, cap, eps), z, t, 0.1)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    targets = [node.target for gm in graphs for node in gm.graph.nodes]
    assert targets.count(torch.ops.pgolf.softcapped_ce_fwd.default) == 1
    assert torch.tanh not in targets and F.cross_entropy not in targets


TRITON_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from pgolf.nn import fused_ce
    assert fused_ce.HAS_TRITON
    cap, upstream = 30.0, 1.7
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    # V = 1000: one masked block; V = 2500: three blocks (the online max rescales), the last masked.
    # Scale 20 puts logits in tanh's tail; scale 1 keeps max s small, so stray masked lanes would show.
    cases = [(1000, 20.0, dtype, eps) for dtype in (torch.float32, torch.bfloat16) for eps in (0.0, 0.1)]
    cases += [(2500, 1.0, torch.float32, 0.1), (2500, 1.0, torch.bfloat16, 0.0)]
    for v, scale, dtype, eps in cases:
        z = (torch.randn(37, v, generator=g) * scale).to(dtype)
        t = torch.randint(0, v, (37,), generator=g)
        zs = torch.cat([z, z], 1)[:, :v]  # row stride 2v, not v (the kernels take stride(0))
        loss, lse = fused_ce._triton_forward(zs, t, cap, eps)
        grad = fused_ce._triton_backward(torch.tensor(upstream), zs, t, lse, cap, eps)
        zr = z.float().requires_grad_()
        ref = F.cross_entropy(cap * torch.tanh(zr / cap), t, label_smoothing=eps)
        (ref * upstream).backward()
        assert grad.dtype == dtype and grad.shape == z.shape
        torch.testing.assert_close(lse, torch.logsumexp(cap * torch.tanh(zr.detach() / cap), 1), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(grad, zr.grad.to(dtype), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-7)
        worst = max(worst, (grad.float() - zr.grad).abs().max().item())
    print("ok", worst)
""")


def test_triton_kernels_in_interpreter():
    """The Triton kernels (not the fallback) on CPU tensors, run by Triton's interpreter."""
    run_in_triton_interpreter(TRITON_SCRIPT)
