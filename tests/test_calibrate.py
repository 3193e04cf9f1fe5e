"""calibrate on real computation: the Hessians are the second moments of each weight's inputs, and the
output-gradient moments those of the loss's gradient at each weight's outputs."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pgolf.formats.files import load_tensors
from pgolf.calibrate import run
from pgolf.config.sections import CalibrateConfig, ModelConfig, TrainConfig
from pgolf.nn.model import CastedLinear, build_model
from pgolf.quant.calibration import split_statistics
from pgolf.formats.shards import DistributedTokenLoader
from pgolf import train

CAL = CalibrateConfig(n_batches=3, batch_seqs=2, seq_len=32, device="cpu")


@pytest.fixture(scope="module")
def ckpt(tokenized_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cal")
    cfg = TrainConfig(iterations=8, max_wallclock_seconds=0, warmdown_iters=2, warmup_steps=0, train_batch_tokens=1024,
                      train_seq_len=64, grad_accum_steps=1, val_tokens=512, device="cpu")
    train.run(tokenized_dir, out / "ckpt.safetensors", ModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2),
              cfg, out / "m.json", out / "log.csv")
    return out / "ckpt.safetensors"


def calibrate(ckpt: Path, data: Path, out: Path, cfg: CalibrateConfig = CAL) -> tuple[dict, dict]:
    """(Hessians, metadata) of a calibrate run; its output-gradient moments in the metadata's `out_grads`."""
    run(ckpt, data, out / "h.safetensors", cfg, out / "cal.json")
    stats, meta = load_tensors(out / "h.safetensors", "hessians")
    hessians, meta["out_grads"] = split_statistics(stats)
    return hessians, meta


def test_hessians_are_input_second_moments(ckpt, tokenized_dir, tmp_path):
    hessians, meta = calibrate(ckpt, tokenized_dir, tmp_path)
    state, ckpt_meta = load_tensors(ckpt, "checkpoint")
    model = build_model(ModelConfig(**ckpt_meta["model_config"]), state, "cpu")
    # One H per linear weight plus the tied embedding (the LM head's input).
    linear = {n for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim == 2 and n != "tok_emb.weight"}
    assert set(hessians) == linear | {"tok_emb.weight"}
    # The LM head's H, recomputed by hand from the same training batches.
    loader = DistributedTokenLoader(tokenized_dir, 0, 1, "cpu")
    with torch.no_grad():
        hs = [model.hidden(loader.next_batch(CAL.batch_seqs * CAL.seq_len, CAL.seq_len, 1)[0]).reshape(-1, 64)
              for _ in range(CAL.n_batches)]
    h = torch.cat(hs)
    assert torch.allclose(hessians["tok_emb.weight"], h.T @ h / h.shape[0], atol=1e-5)
    assert meta["tokens"] == CAL.n_batches * CAL.batch_seqs * CAL.seq_len
    for name, H in hessians.items():
        assert H.shape[0] == H.shape[1] == state[name].shape[1]
        assert torch.allclose(H, H.T, atol=1e-6) and torch.linalg.eigvalsh(H.double()).min() > -1e-6
    # q, k and v read the same normed input
    assert torch.equal(hessians["blocks.0.attn.c_q.weight"], hessians["blocks.0.attn.c_v.weight"])


def test_output_grad_moments_match_autograd(ckpt, tokenized_dir, tmp_path):
    """G = E[(∂L/∂y)²] per output row, L the batch's summed loss: calibrate's hooks against autograd on a zero
    tensor added to every linear's output (and to the tied head's logits)."""
    _, meta = calibrate(ckpt, tokenized_dir, tmp_path)
    grads = meta["out_grads"]
    state, ckpt_meta = load_tensors(ckpt, "checkpoint")
    model = build_model(ModelConfig(**ckpt_meta["model_config"]), state, "cpu")
    model.eval()
    probes: dict[str, list[torch.Tensor]] = {}

    def probe(name: str, y: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(y, requires_grad=True)
        probes.setdefault(name, []).append(z)
        return y + z

    for name, module in model.named_modules():
        if isinstance(module, CastedLinear):
            module.register_forward_hook(lambda m, i, y, name=f"{name}.weight": probe(name, y))
    head = model.head_logits
    model.head_logits = lambda h: probe("tok_emb.weight", head(h))
    sums: dict[str, torch.Tensor] = {}
    loader = DistributedTokenLoader(tokenized_dir, 0, 1, "cpu")
    for _ in range(CAL.n_batches):
        x, y = loader.next_batch(CAL.batch_seqs * CAL.seq_len, CAL.seq_len, 1)
        probes.clear()
        (model(x, y) * y.numel()).backward()  # the summed loss
        for name, (z,) in probes.items():
            sq = z.grad.reshape(-1, z.shape[-1]).pow(2).sum(0)
            sums[name] = sums.get(name, 0) + sq
    tokens = CAL.n_batches * CAL.batch_seqs * CAL.seq_len
    assert set(grads) == set(sums) and "tok_emb.weight" in grads
    for name, g in grads.items():
        assert g.shape == (state[name].shape[0],)
        torch.testing.assert_close(g, sums[name] / tokens, rtol=1e-4, atol=1e-9)
        assert bool((g > 0).any())
    # Switched off, calibrate writes Hessians alone.
    _, without = calibrate(ckpt, tokenized_dir, tmp_path, replace(CAL, output_grads=False))
    assert without["out_grads"] == {}


def test_self_generated_calibration_reads_no_data(ckpt, tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    cfg = replace(CAL, source="self", seq_len=16)
    other, _ = calibrate(ckpt, empty, tmp_path, replace(cfg, seed=1))
    a, _ = calibrate(ckpt, empty, tmp_path, cfg)
    again, _ = calibrate(ckpt, empty, tmp_path, cfg)
    assert all(torch.equal(a[k], again[k]) for k in a)  # a fixed seed gives the same text
    assert not torch.equal(a["tok_emb.weight"], other["tok_emb.weight"])
    # H is that of the generated batches alone: the forwards that generate them are not counted.
    from pgolf.nn.distributed import Dist
    from pgolf.quant.calibration import calibration_batches

    state, ckpt_meta = load_tensors(ckpt, "checkpoint")
    model = build_model(ModelConfig(**ckpt_meta["model_config"]), state, "cpu")
    with torch.no_grad():
        h = torch.cat([model.hidden(x).reshape(-1, 64) for x, _ in calibration_batches(cfg, model, empty, Dist("cpu"))])
    torch.testing.assert_close(a["tok_emb.weight"], h.T @ h / h.shape[0], rtol=1e-4, atol=1e-6)


def test_bad_calibrate_params_are_clear_errors(ckpt, tokenized_dir, tmp_path):
    from typer.testing import CliRunner

    from pgolf.cli import app

    for bad, message in (("source=val", "source='val' must be one of train, self"), ("n_batches=0", "n_batches=0 must be >= 1")):
        result = CliRunner().invoke(app, ["calibrate", str(ckpt), "--data", str(tokenized_dir), "--out",
                                          str(tmp_path / "h.safetensors"), "--params", str(tmp_path / "none.yaml"),
                                          "--set", bad])
        assert result.exit_code == 2 and f"command line: calibrate.{message}" in result.output, result.output
    assert not (tmp_path / "h.safetensors").exists()


@pytest.mark.slow
def test_two_process_torchrun_calibration_matches_one_process(ckpt, tokenized_dir, tmp_path):
    def launch(prefix: list[str], out: Path) -> dict:
        out.mkdir()
        cmd = [*prefix, "-m", "pgolf.cli", "calibrate", str(ckpt), "--data", str(tokenized_dir),
               "--out", str(out / "h.safetensors"), "--metrics", str(out / "m.json"), "--params", str(out / "none.yaml"),
               "--set", "n_batches=4", "--set", "batch_seqs=2", "--set", "seq_len=32", "--set", "device=cpu"]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        return load_tensors(out / "h.safetensors", "hessians")[0]

    one = launch([sys.executable], tmp_path / "one")
    two = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], tmp_path / "two")
    assert json.loads((tmp_path / "two" / "m_report.json").read_text())["world_size"] == 2
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=1e-4), name
