"""Document-masked attention backends compute the same thing: the fa4 varlen op (its CPU reference here; the
FlashAttention-4 kernel itself is checked on the GPU by bench/speed_sidebyside.sh), its backward, the host-side
segment plan, and training through it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf.config.sections import ModelConfig
from pgolf.nn.attention import (SegmentPlanner, document_mask, segment_starts, segments_of, varlen_attention,
                                varlen_bthd)
from test_model import ALL_OPTIONS, TINY, randomized


def packed_documents(seed: int = 0):
    torch.manual_seed(seed)
    ids = torch.randint(2, TINY.vocab_size, (3, 40))
    ids[0, [0, 9, 25]] = TINY.bos_id
    ids[1, [13, 14]] = TINY.bos_id  # a one-token document
    return ids  # row 2 holds one document cut by the window


def test_segments_start_at_every_row_and_every_bos_and_pad_with_empty_ones():
    ids = packed_documents().numpy()
    starts = segment_starts(ids, TINY.bos_id)
    assert starts.tolist() == [0, 9, 25, 40, 53, 54, 80]
    planner = SegmentPlanner(TINY.bos_id)
    cu = planner.plan(ids)
    assert cu.numel() == planner.capacity + 1 and cu.dtype == torch.int32
    assert cu[:7].tolist() == starts.tolist() and set(cu[7:].tolist()) == {ids.size}  # empty segments after
    # a batch with more segments than the capacity grows it (one new shape), and never drops a boundary
    many = np.full((3, 40), 5)
    many[:, ::2] = TINY.bos_id
    cu_many = planner.plan(many)
    assert planner.capacity >= 60 and cu_many[:60].tolist() == segment_starts(many, TINY.bos_id).tolist()


@pytest.mark.parametrize("gqa", [1, 2])
def test_the_varlen_op_and_its_backward_equal_dense_masked_attention(gqa):
    ids = packed_documents()
    B, T, H, D = 3, 40, 4, 16
    torch.manual_seed(1)
    q = torch.randn(B, H, T, D, requires_grad=True)
    k = torch.randn(B, H // gqa, T, D, requires_grad=True)
    v = torch.randn(B, H // gqa, T, D, requires_grad=True)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(ids, TINY.bos_id), enable_gqa=gqa > 1)
    varlen = varlen_bthd(*(t.transpose(1, 2) for t in (q, k, v)), segments_of(ids, TINY.bos_id)).transpose(1, 2)
    assert torch.allclose(dense, varlen, atol=1e-5)
    grad = torch.randn_like(dense)
    want = torch.autograd.grad(dense, (q, k, v), grad)
    got = torch.autograd.grad(varlen, (q, k, v), grad)
    for w, g in zip(want, got):
        assert torch.allclose(w, g, atol=1e-5), (w - g).abs().max()


def test_the_varlen_op_passes_torch_library_opcheck():
    torch.manual_seed(2)
    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu = torch.tensor([0, 5, 12, 12], dtype=torch.int32)
    torch.library.opcheck(varlen_attention, (q, k, v, cu, 12))


def test_a_query_never_sees_another_segment_or_the_future():
    """A planted violation: change a token in one segment; no output outside that segment (or before it) moves."""
    torch.manual_seed(3)
    q, k, v = torch.randn(20, 2, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    cu = torch.tensor([0, 7, 15, 20], dtype=torch.int32)
    out, _ = varlen_attention(q, k, v, cu, 20)
    k2, v2 = k.clone(), v.clone()
    k2[10], v2[10] = 5.0, -5.0  # position 10 is in segment [7, 15)
    out2, _ = varlen_attention(q, k2, v2, cu, 20)
    moved = (out - out2).abs().amax(dim=(1, 2)) > 1e-6
    assert moved[10:15].all() and not moved[:10].any() and not moved[15:].any()


def test_the_fa4_backend_gives_the_models_logits_and_loss_of_the_dense_mask():
    ids = packed_documents()
    dense = randomized(ModelConfig(**{**TINY.__dict__, **ALL_OPTIONS, "attn_backend": "sdpa"}))
    fa4 = randomized(ModelConfig(**{**TINY.__dict__, **ALL_OPTIONS, "attn_backend": "fa4"}))
    with torch.no_grad():
        assert torch.allclose(dense.logits(ids), fa4.logits(ids), atol=1e-5)
    targets = torch.roll(ids, -1, dims=1)
    planned = SegmentPlanner(TINY.bos_id).plan(ids.numpy())  # as the trainer passes it, padded
    loss_dense, loss_fa4 = dense(ids, targets), fa4(ids, targets, planned)
    assert abs(loss_dense.item() - loss_fa4.item()) < 1e-5
    g_dense = torch.autograd.grad(loss_dense, dense.blocks[0].attn.c_q.weight)[0]
    g_fa4 = torch.autograd.grad(loss_fa4, fa4.blocks[0].attn.c_q.weight)[0]
    assert torch.allclose(g_dense, g_fa4, atol=1e-5)


def test_training_with_the_fa4_backend_matches_sdpa(tokenized_dir, tmp_path):
    """The trainer plans segments on the host for fa4; the run equals one with the dense mask."""
    from test_train import MODEL, TRAIN, train_once

    cfg = replace(TRAIN, iterations=4, val_tokens=512)
    model = replace(MODEL, doc_mask=True)
    sdpa, _, _ = train_once(tokenized_dir, tmp_path / "sdpa", cfg, replace(model, attn_backend="sdpa"))
    fa4, _, _ = train_once(tokenized_dir, tmp_path / "fa4", cfg, replace(model, attn_backend="fa4"))
    for name in sdpa:
        assert torch.allclose(sdpa[name], fa4[name], atol=1e-4), name


def test_sdpa_pinned_to_one_kernel_gives_the_same_attention_and_compiles_whole():
    """attn_backend sdpa_flash (PR #375's comparison): SDPA restricted to its flash kernel, here PyTorch's CPU one;
    the restriction traces into one graph (no break) and changes nothing but the kernel."""
    from pgolf.nn.attention import attend

    torch.manual_seed(4)
    q, k, v = torch.randn(2, 24, 4, 16), torch.randn(2, 24, 2, 16), torch.randn(2, 24, 2, 16)  # [B, T, H, D]
    plain = attend(q, k, v, None, "sdpa")
    assert torch.allclose(attend(q, k, v, None, "sdpa_flash"), plain, atol=1e-5)
    compiled = torch.compile(lambda a, b, c: attend(a, b, c, None, "sdpa_flash"), fullgraph=True, backend="eager")
    assert torch.allclose(compiled(q, k, v), plain, atol=1e-5)


def test_a_pinned_sdpa_kernel_is_refused_with_document_masks():
    from pgolf.config.sections import ConfigError

    ModelConfig(**{**TINY.__dict__, "attn_backend": "sdpa_cudnn"}).check()
    with pytest.raises(ConfigError, match="document mask"):
        ModelConfig(**{**TINY.__dict__, "doc_mask": True, "attn_backend": "sdpa_flash"}).check()
