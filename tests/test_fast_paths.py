"""The faster paths of a training step compute what the plain ones do: Muon orthogonalising a stack of
same-shaped matrices at once, and the weight average's fused update."""

from __future__ import annotations

import torch

from pgolf.nn.average import WeightAverage
from pgolf.nn.muon import Muon, newton_schulz


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    torch.manual_seed(0)
    for shape in ((3, 24, 16), (4, 16, 40)):
        G = torch.randn(*shape)
        batched = newton_schulz(G, 5, torch.float32, "polar_express")
        for g, b in zip(G, batched):
            assert torch.allclose(newton_schulz(g, 5, torch.float32, "polar_express"), b, atol=1e-5)


def test_muon_stepping_a_mixed_group_equals_stepping_each_matrix_alone():
    torch.manual_seed(1)
    shapes = [(16, 8), (8, 16), (16, 8), (16, 8), (8, 16)]
    together = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    kw = dict(lr=0.05, momentum=0.9, backend_steps=5, ns_dtype=torch.float32, coefficients="polar_express",
              row_norm=True, weight_decay=0.01)
    opt = Muon(together, **kw)
    singles = [Muon([p], **kw) for p in alone]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(together, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for o in singles:
            o.step()
    for p, q in zip(together, alone):
        assert torch.allclose(p, q, atol=1e-5), (p - q).abs().max()


def test_the_fused_ema_update_is_the_per_tensor_lerp():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)
    avg = WeightAverage(model, "ema", decay=0.9)
    expected = {k: v.clone() for k, v in avg.shadow.items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.update(model)
        for k, v in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v.float()
    for k in expected:
        assert torch.allclose(avg.shadow[k], expected[k], atol=1e-6), k
