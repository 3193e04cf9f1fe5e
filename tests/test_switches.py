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


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_pruning_zeroes_the_smallest_weights_and_the_packed_size_shows_it(method):
    """quantize.prune_sparsity (PR #212): that fraction of each quantized matrix's smallest-|w| weights decode to
    exactly 0 (GPTQ's error feedback cannot move them), the rest as without pruning would; zeros pack smaller."""
    from pgolf.config.sections import QuantizeConfig
    from pgolf.formats import codecs
    from pgolf.formats.blob_writer import encode_payload
    from pgolf.formats.dequant import decode_entry
    from pgolf.quant.encode import encode_tensor, store_encoded

    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 128, generator=g) * 0.02
    x = torch.randn(512, 128, generator=g)
    h = x.T @ x / 512
    sizes = {}
    for sparsity in (0.0, 0.5):
        cfg = QuantizeConfig(bits=6, method=method, clip="sdclip", keep_float_max_numel=16, prune_sparsity=sparsity)
        enc = encode_tensor("blocks.0.mlp.fc.weight", w, cfg, h)
        tensors, schema = store_encoded({"blocks.0.mlp.fc.weight": enc}, {"blocks.0.mlp.fc.weight": w})
        restored = decode_entry("blocks.0.mlp.fc.weight", schema["blocks.0.mlp.fc.weight"], tensors, "test")
        small = w.abs() <= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values if sparsity else None
        if sparsity:
            assert bool((restored[small] == 0).all()) and int(small.sum()) == int(sparsity * w.numel())
            assert enc.entry["pruned"] == pytest.approx(sparsity)
        else:
            assert "pruned" not in enc.entry
        sizes[sparsity] = len(codecs.compress("ans", encode_payload(tensors)[0]))
    assert sizes[0.5] < 0.8 * sizes[0.0]
    with pytest.raises(PgolfError, match="prune_sparsity"):
        build(QuantizeConfig, [({"prune_sparsity": 1.0}, "params.yaml")], "quantize")


def test_adamw_for_the_block_matrices_takes_muons_place():
    """train.matrix_optimizer=adamw (PR #1227): the block matrices get AdamW with matrix_lr and muon_wd, and its
    step is torch's AdamW step; every other group is as before and no parameter is left out."""
    cfg = TrainConfig(matrix_optimizer="adamw", matrix_lr=3e-4, muon_wd=0.1)
    m, (x, y) = model(), batch()
    optimizers, matrix_opt = build_optimizers(m, cfg, torch.float32)
    _, muon = build_optimizers(model(), TrainConfig(), torch.float32)
    assert isinstance(matrix_opt, torch.optim.AdamW) and isinstance(muon, Muon)
    mine = [p for g in matrix_opt.param_groups for p in g["params"]]
    assert [p.shape for p in mine] == [p.shape for g in muon.param_groups for p in g["params"]]
    group = matrix_opt.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (3e-4, 0.1)
    reference = [p.detach().clone().requires_grad_(True) for p in mine]
    ref_opt = torch.optim.AdamW(reference, lr=3e-4, weight_decay=0.1, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    m(x, y).backward()
    for p, r in zip(mine, reference):
        r.grad = p.grad.clone()
    matrix_opt.step()
    ref_opt.step()
    assert all(torch.equal(p, r) for p, r in zip(mine, reference))
    assert len(optimizers) == 3 and not any(isinstance(o, Muon) for o in optimizers)


def test_cosine_schedule_runs_from_one_to_min_lr():
    from pgolf.nn.schedule import Schedule

    cfg = TrainConfig(lr_schedule="cosine", min_lr=0.1, iterations=100, max_wallclock_seconds=0, warmdown_iters=30)
    s = Schedule(cfg)
    assert s.lr_scale(0, 0) == pytest.approx(1.0)
    assert s.lr_scale(50, 0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.lr_scale(100, 0) == pytest.approx(0.1)
    values = [s.lr_scale(k, 0) for k in range(101)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    linear = Schedule(TrainConfig(iterations=100, max_wallclock_seconds=0, warmdown_iters=30))
    assert linear.lr_scale(50, 0) == 1.0  # the default is unchanged


def test_a_short_run_trains_with_adamw_matrices(tokenized_dir, tmp_path):
    from pgolf import train
    from pgolf.formats.files import read_json

    cfg = TrainConfig(iterations=6, max_wallclock_seconds=0, warmdown_iters=0, warmup_steps=0, train_batch_tokens=1024,
                      train_seq_len=64, grad_accum_steps=1, val_tokens=512, device="cpu", matrix_optimizer="adamw",
                      matrix_lr=3e-3, muon_wd=0.1, lr_schedule="cosine", min_lr=0.1)
    train.run(tokenized_dir, tmp_path / "ckpt.safetensors", ModelConfig(num_layers=2, model_dim=32, num_heads=2,
                                                                        num_kv_heads=1), cfg, tmp_path / "m.json",
              tmp_path / "log.csv")
    report = read_json(tmp_path / "m_report.json")
    assert report["steps"] == 6 and report["train_loss"] < 10


def test_gradient_guided_bits_give_the_most_sensitive_tensors_the_most_bits(calibrated_model, tmp_path):
    """quantize.gradient_bits (PR #375): tensors ranked by (Σ_r G_r)·trace(H) = E‖∂L/∂W‖² per token (K-FAC) take
    the listed widths in turn; the quantized file's schema records them; bad specs are config errors."""
    from pgolf import quantize
    from pgolf.config.sections import PackConfig, QuantizeConfig
    from pgolf.formats.files import load_tensors
    from pgolf.quant.recipe import gradient_guided_bits

    state, h, g = calibrated_model["state"], calibrated_model["hessians"], calibrated_model["out_grads"]
    cfg = QuantizeConfig(keep_float_max_numel=256, device="cpu", gradient_bits="7:0.25,6:0.5,5:0.25")
    bits = gradient_guided_bits(state, cfg, h, g)
    score = {n: float(g[n].double().sum() * torch.trace(h[n].double())) for n in bits}
    order = sorted(bits, key=lambda n: -score[n])
    n = len(order)
    want = [7] * round(0.25 * n) + [6] * round(0.5 * n)
    want += [5] * (n - len(want))
    assert [bits[name] for name in order] == want and n == 13
    out = tmp_path / "q.safetensors"
    quantize.run(calibrated_model["ckpt"], out, cfg, PackConfig(codec="zlib"), calibrated_model["hess"],
                 tmp_path / "q.json", None)
    schema = load_tensors(out, "quantized")[1]["schema"]
    assert {name: schema[name]["bits"] for name in bits} == bits
    pinned = QuantizeConfig(keep_float_max_numel=256, gradient_bits="6:1", embed_bits=8)
    assert "tok_emb.weight" not in gradient_guided_bits(state, pinned, h, g)  # a group pin wins
    for bad in ("7:0.5,6:0.4", "9:1", "x"):
        with pytest.raises(PgolfError, match="gradient_bits"):
            build(QuantizeConfig, [({"gradient_bits": bad}, "params.yaml")], "quantize")
    with pytest.raises(PgolfError, match="lack"):
        gradient_guided_bits(state, cfg, h, {})
    with pytest.raises(PgolfError, match="lack"):
        gradient_guided_bits(state, cfg, {}, {})
    # a tensor calibrate has no H for (a lookup table, as PR #398's bigram embedding) keeps quantize.bits, unranked
    lookup = order[0]
    without = gradient_guided_bits(state, cfg, {k: v for k, v in h.items() if k != lookup}, g)
    assert lookup not in without and len(without) == n - 1
    with pytest.raises(PgolfError, match="no tensor to rank"):  # only lookup tables: nothing to rank, said so
        gradient_guided_bits(state, cfg, {"not.a.candidate": h[lookup]}, g)


def test_schedule_scale_multiplies_every_step_counted_length():
    """Presets' lengths are for 8 GPUs × 600 s: scaled, a warmdown of 3,000 steps fits a run of hundreds."""
    from pgolf.nn.schedule import run_length, scaled

    cfg = TrainConfig(warmdown_iters=3000, muon_momentum_warmup_steps=1500, lr_warmup_steps=10, ema_decay=0.997,
                      iterations=20000, max_wallclock_seconds=150)
    s = scaled(cfg, 0.1)
    assert (s.warmdown_iters, s.muon_momentum_warmup_steps, s.lr_warmup_steps, s.swa_every) == (300, 150, 1, 0)
    assert 1 / (1 - s.ema_decay) == pytest.approx(0.1 / (1 - 0.997))  # the EMA's horizon, 333 → 33 steps
    assert scaled(cfg, 1e-6).ema_decay == pytest.approx(0.5) and scaled(TrainConfig(swa_every=50), 0.1).swa_every == 5
    assert scaled(cfg, 1.0) == cfg
    assert run_length(cfg, 600.0) == 250  # 150 s at 600 ms a step
    assert run_length(cfg, 1.0) == 20000 and run_length(TrainConfig(max_wallclock_seconds=0, iterations=77), 5.0) == 77
    with pytest.raises(PgolfError, match="schedule_steps"):
        build(TrainConfig, [({"schedule_scale": "auto"}, "params.yaml: train")], "train")
    with pytest.raises(PgolfError, match="warmup_steps"):
        build(TrainConfig, [({"schedule_scale": "auto", "schedule_steps": 100, "warmup_steps": 1}, "t")], "train")


@pytest.mark.parametrize("mode", ["factor", "auto"])
def test_a_run_follows_its_scaled_schedule(tokenized_dir, tmp_path, mode):
    """Through the train stage: the LR multiplier logged every step shows the warmdown the factor gave (an
    explicit one, or auto's steps over schedule_steps, from the timed priming steps), and the report says so."""
    from pgolf import train
    from pgolf.formats.files import read_json

    change = {"schedule_scale": "0.25"} if mode == "factor" else {
        "schedule_scale": "auto", "schedule_steps": 100_000, "max_wallclock_seconds": 3600.0, "warmup_steps": 2}
    cfg = TrainConfig(**{**dict(iterations=12, max_wallclock_seconds=0, warmdown_iters=40, warmup_steps=0,
                                train_batch_tokens=1024, train_seq_len=64, grad_accum_steps=1, val_tokens=512,
                                device="cpu", log_every=1), **change})
    train.run(tokenized_dir, tmp_path / "ckpt.safetensors", ModelConfig(num_layers=2, model_dim=32, num_heads=2,
                                                                        num_kv_heads=1), cfg, tmp_path / "m.json",
              tmp_path / "log.csv")
    report = read_json(tmp_path / "m_report.json")
    sched = report["schedule"]
    lr = [float(line.split(",")[2]) for line in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    if mode == "factor":
        assert sched["factor"] == 0.25 and sched["warmdown_iters"] == 10
        assert lr[:2] == [1.0, 1.0] and lr[2] == pytest.approx(10 / 10)  # steps 0-2 before the last 10 steps
        assert lr[3] == pytest.approx(9 / 10) and lr[-1] == pytest.approx(1 / 10)
    else:  # a CPU step takes milliseconds: the hour holds far more than `iterations`, so the run is 12 steps
        assert sched["primed_step_ms"] > 0 and sched["estimated_steps"] == 12
        assert sched["factor"] == pytest.approx(12 / 100_000) and sched["warmdown_iters"] == 1
    assert TrainConfig().schedule_scale == "off"


def test_kmeans_codebooks_decode_to_their_levels_and_beat_the_uniform_grid():
    """quantize.method=kmeans (PR #212): every weight decodes to one of 2^bits stored fp16 levels, the
    squared error is at most the uniform grid's over [min, max] (Lloyd starts there), and a code outside the
    codebook is refused."""
    from pgolf.config.sections import QuantizeConfig
    from pgolf.formats.dequant import decode_entry
    from pgolf.quant.encode import encode_tensor, store_encoded

    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 96, generator=g) * 0.02
    name = "blocks.0.mlp.fc.weight"
    for bits in (3, 5):
        enc = encode_tensor(name, w, QuantizeConfig(method="kmeans", bits=bits, keep_float_max_numel=16))
        assert enc.entry["encoding"] == "codebook" and enc.parts["codebook"].numel() == 2 ** bits
        assert enc.parts["codes"].dtype == torch.int8
        tensors, schema = store_encoded({name: enc}, {name: w})
        restored = decode_entry(name, schema[name], tensors, "test")
        assert set(restored.unique().tolist()) <= set(enc.parts["codebook"].float().tolist())
        step = (w.max() - w.min()) / (2 ** bits - 1)
        uniform = w.min() + torch.round((w - w.min()) / step) * step
        assert float(((restored - w) ** 2).mean()) < float(((uniform - w) ** 2).mean())
    tensors[f"{name}#codes"] = tensors[f"{name}#codes"].clone()
    tensors[f"{name}#codes"][0, 0] = 100  # beyond a 32-level codebook
    with pytest.raises(PgolfError, match="outside the 32-level codebook"):
        decode_entry(name, schema[name], tensors, "test")
    with pytest.raises(PgolfError, match="prune_sparsity"):
        build(QuantizeConfig, [({"method": "kmeans", "prune_sparsity": 0.5}, "params.yaml")], "quantize")


def test_a_kmeans_checkpoint_packs_and_reads_back_through_the_blob(calibrated_model, tokenized_dir, tmp_path):
    """Through the quantize and pack stages: the blob holds codebooks and codes (and, with embed_rank, the
    embedding's SVD factors), and decodes to the weights quantize reported."""
    from pgolf import pack, quantize
    from pgolf.config.sections import PackConfig, QuantizeConfig
    from pgolf.formats import blob
    from pgolf.formats.dequant import dequantize
    from pgolf.formats.files import load_tensors

    q, b = tmp_path / "q.safetensors", tmp_path / "m.pgolf"
    cfg = QuantizeConfig(method="kmeans", bits=5, keep_float_max_numel=256, device="cpu", embed_rank=16)
    quantize.run(calibrated_model["ckpt"], q, cfg, PackConfig(codec="zlib"), None, tmp_path / "q.json", None)
    stored, meta = load_tensors(q, "quantized")
    pack.run(q, tokenized_dir, b, PackConfig(codec="ans"), tmp_path / "pack.json")
    header, back = blob.read_blob(b, 16_000_000)
    from_blob = dequantize(back, header["schema"], "blob")
    from_file = dequantize(stored, meta["schema"], "file")
    kinds = {e["encoding"] for e in header["schema"].values()}
    assert {"codebook", "lowrank"} <= kinds and all(torch.equal(from_blob[k], from_file[k]) for k in from_file)
    fc = from_blob["blocks.0.mlp.fc.weight"]
    assert fc.unique().numel() <= 32


def test_multi_token_heads_add_their_weighted_loss_in_training_only():
    """model.mtp_heads (PR #375): head k predicts token t+1+k through its own projection and the LM head; the
    objective is CE + mtp_weight × the heads' mean CE; scoring (logits) is the model without them."""
    import torch.nn.functional as F
    from dataclasses import replace

    from pgolf.nn.model import rms_norm
    from pgolf.nn.optim import group_of

    torch.manual_seed(3)
    m = GPT(replace(CFG, mtp_heads=2))
    assert all(torch.equal(h.weight, torch.eye(CFG.model_dim)) for h in m.mtp)  # identity at init
    with torch.no_grad():
        for h in m.mtp:
            h.weight.add_(0.05 * torch.randn_like(h.weight))
    x, y = batch()
    with torch.no_grad():
        plain = m(x, y)
        m.mtp_weight = 0.3
        total = m(x, y)
        h = m.hidden(x)
        main = F.cross_entropy(m.logits(x).flatten(0, 1), y.flatten())
        extra = [F.cross_entropy(m.softcap(m.head_logits(rms_norm(head(h[:, :-k])))).flatten(0, 1), y[:, k:].flatten())
                 for k, head in enumerate(m.mtp, 1)]
    assert float(plain) == pytest.approx(float(main), rel=1e-6)  # mtp_weight 0: the plain objective
    assert float(total) == pytest.approx(float(main + 0.3 * (extra[0] + extra[1]) / 2), rel=1e-6)
    assert float(total) != float(plain)
    assert {group_of(n, p) for n, p in m.named_parameters() if n.startswith("mtp.")} == {"matrix"}


def test_a_run_with_multi_token_heads_saves_the_model_without_them(tokenized_dir, tmp_path):
    """Through the train stage: the heads train the trunk (its weights differ from a run without them) and the
    checkpoint is the plain model — no mtp.* tensors, mtp_heads 0 — which scoring builds and loads as is."""
    from dataclasses import replace

    from test_train import MODEL, TRAIN, train_once

    cfg, model = replace(TRAIN, iterations=6), replace(MODEL, mtp_heads=2)
    base, _, _ = train_once(tokenized_dir, tmp_path / "base", replace(cfg, mtp_weight=0.0), model)  # same init
    state, meta, _ = train_once(tokenized_dir, tmp_path / "mtp", cfg, model)
    assert not any(k.startswith("mtp.") for k in state) and meta["model_config"]["mtp_heads"] == 0
    assert set(state) == set(base) and not torch.equal(state["blocks.0.mlp.fc.weight"], base["blocks.0.mlp.fc.weight"])
    GPT(ModelConfig(**meta["model_config"])).load_state_dict(state)  # what scoring builds, strictly


@pytest.mark.parametrize("doc_mask", [False, True])
def test_canon_layers_mix_the_last_k_positions_causally_and_within_documents(doc_mask):
    """model.canon_k (PR #375: 3): n_t + Σ_{i<K} w_i ⊙ n_{t−i} on each sublayer's normed input, zero-init (the
    model starts as it would without), never reaching before the sequence or, with doc_mask, across a BOS."""
    from dataclasses import replace

    from pgolf.audit import model_checks
    from pgolf.nn.model import Canon, canon_taps
    from pgolf.nn.optim import group_of

    layer = Canon(3, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))
    n = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[5, 6, 1, 7, 8, 9]])  # a BOS (1) at position 2
    out = layer(n, canon_taps(ids, 3, 1, doc_mask, n.dtype))
    w = layer.weight.detach()
    for t in range(6):
        want = n[0, t] + w[0] * n[0, t]
        for i in (1, 2):
            if t - i >= 0 and not (doc_mask and t - i < 2 <= t):  # t−i before the BOS that starts t's document
                want = want + w[i] * n[0, t - i]
        assert torch.allclose(out[0, t], want, atol=1e-6), t

    cfg = replace(CFG, canon_k=3, doc_mask=doc_mask)
    plain = filled_gpt(replace(cfg, canon_k=0))  # non-zero everywhere: the blocks' outputs reach the logits
    m = GPT(cfg)
    missing = m.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("canon_" in k for k in missing)
    x = torch.randint(2, CFG.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    x[0, 17] = CFG.bos_id
    with torch.no_grad():
        assert torch.allclose(m.logits(x), plain.logits(x), atol=1e-6)  # zero-init: the identity
        for name, p in m.named_parameters():
            if "canon_" in name:
                p.normal_(0, 0.5)
        assert not torch.allclose(m.logits(x), plain.logits(x), atol=1e-3)
    tokens = torch.cat([x[0], x[0, :1]]).numpy()
    model_checks.causality(m, tokens, torch.device("cpu"))  # raises if an earlier logit moves
    if doc_mask:
        model_checks.document_isolation(m, tokens, torch.device("cpu"))  # raises on a leak across the BOS
    assert {group_of(k, p) for k, p in m.named_parameters() if "canon_" in k} == {"scalar"}


def test_a_run_with_canon_layers_trains_them(tokenized_dir, tmp_path):
    from dataclasses import replace

    from test_train import MODEL, TRAIN, train_once

    state, meta, _ = train_once(tokenized_dir, tmp_path, replace(TRAIN, iterations=6), replace(MODEL, canon_k=3))
    canon = [k for k in state if "canon_" in k]
    assert len(canon) == 2 * MODEL.num_layers and meta["model_config"]["canon_k"] == 3
    assert all(state[k].abs().sum() > 0 for k in canon)  # they left zero: the loss reaches them


def test_embed_rank_stores_the_embedding_as_a_truncated_svd():
    """quantize.embed_rank (PR #212: 64): the embedding decodes to A·B, within int8 rounding of the best rank-r
    approximation, from far fewer stored values; other tensors are quantized as before."""
    from pgolf.config.sections import QuantizeConfig
    from pgolf.formats.dequant import decode_entry
    from pgolf.quant.encode import encode_tensor, store_encoded

    g = torch.Generator().manual_seed(11)
    w = torch.randn(300, 8, generator=g) @ torch.randn(8, 64, generator=g) * 0.01 + 1e-3 * torch.randn(300, 64,
                                                                                                      generator=g)
    cfg = QuantizeConfig(bits=6, embed_rank=8, keep_float_max_numel=16)
    enc = encode_tensor("tok_emb.weight", w, cfg)
    assert enc.entry["encoding"] == "lowrank" and enc.entry["rank"] == 8
    assert sum(p.numel() for p in enc.parts.values()) < 0.2 * w.numel()
    tensors, schema = store_encoded({"tok_emb.weight": enc}, {"tok_emb.weight": w})
    restored = decode_entry("tok_emb.weight", schema["tok_emb.weight"], tensors, "test")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    assert float((restored - w).norm()) <= float((best - w).norm()) + 0.02 * float(w.norm())
    assert encode_tensor("blocks.0.mlp.fc.weight", w, cfg).entry["encoding"] == "int_per_row"  # not the embedding
    with pytest.raises(PgolfError, match="embed_rank"):
        build(QuantizeConfig, [({"embed_rank": 64, "budget": 16_000_000}, "params.yaml")], "quantize")
