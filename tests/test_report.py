"""What a run shows a person: plain progress lines where no terminal is, metrics rows that stay a table."""

from __future__ import annotations

import io
import re
import time

import pytest

from pgolf.config.sections import ModelConfig, TrainConfig
from pgolf.report import progress
from pgolf.report.metrics import companion, write_metrics

MODEL = ModelConfig(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)
TRAIN = TrainConfig(iterations=6, max_wallclock_seconds=0, warmup_steps=0, train_batch_tokens=1024, train_seq_len=64,
                    grad_accum_steps=1, log_every=100, val_tokens=1024, device="cpu")


def test_training_without_a_terminal_prints_plain_progress_lines(tokenized_dir, tmp_path, capsys, monkeypatch):
    """Captured output is no terminal (as in DVC's logs and CI): status lines, no escape codes, for the steps
    (with loss and tokens/s) and for the final validation, which once showed nothing at all."""
    from pgolf import train

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line at every update: every step is seen
    train.run(tokenized_dir, tmp_path / "ckpt.safetensors", MODEL, TRAIN, tmp_path / "m.json", tmp_path / "log.csv")
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "\r" not in out
    lines = out.splitlines()
    step = re.compile(r"train: 3/6 steps \(50%\), loss \d+\.\d{4}, [\d,]+ tokens/s, \d:\d\d:\d\d, ~\d:\d\d:\d\d left")
    assert any(step.fullmatch(line) for line in lines), out
    assert any(re.match(r"scoring: \d+/\d+ windows \(\d+%\), bpb \d+\.\d{4} so far", line) for line in lines), out
    assert any(re.fullmatch(r"train: done, 6/6 steps in \d:\d\d:\d\d", line) for line in lines), out


def test_a_bar_told_the_fraction_done_follows_it_and_not_its_count(monkeypatch):
    """A 240 s capped run of a preset with 20,000 iterations once printed `218/20,000 steps (1%) … ~3:13:36
    left` two minutes into its four. Told the fraction done, the bar shows it and the time left from it (from the
    fraction at its start: a resumed run starts part-way), and drops the count's total."""
    out = io.StringIO()
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 3600.0)  # no ticker lines: the test reads _line itself
    with progress.Bar("train", 20_000, "steps", file=out) as bar:
        bar.update(1, "loss 6.9", done=0.30)  # resumed at 30 %
        bar.update(218, "loss 2.6", done=0.55)
        assert bar._line(bar.t0 + 60.0) == "train: 218 steps (55%), loss 2.6, 0:01:00, ~0:01:48 left"
        bar.update(409, done=1.2)  # the last step runs past the cap: at most 100 %
        assert bar._line(bar.t0 + 120.0) == "train: 409 steps (100%), loss 2.6, 0:02:00"
        bar.lines = 1  # as if it had printed: its closing line is then written
    assert out.getvalue() == "train: done, 409 steps in 0:00:00\n"
    with progress.Bar("plain", 200, "steps", file=out) as bar:  # without a fraction: the count as before
        bar.update(50)
        assert bar._line(bar.t0 + 10.0) == "plain: 50/200 steps (25%), 0:00:10, ~0:00:30 left"
    out = io.StringIO()
    with progress.Bar("train", 6, "steps", file=out) as bar:  # a capped run that reaches its steps first
        bar.update(6, done=0.4)
        bar.lines = 1
    assert out.getvalue() == "train: done, 6 steps in 0:00:00\n"


def test_capped_training_shows_the_clock_not_the_iterations(tokenized_dir, tmp_path, capsys, monkeypatch):
    """A run capped at 2 s with 100,000 iterations: its lines carry no step total, and its percentage grows
    with the clock to the end."""
    from dataclasses import replace

    from pgolf import train

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    capped = replace(TRAIN, iterations=100_000, max_wallclock_seconds=2.0)
    train.run(tokenized_dir, tmp_path / "ckpt.safetensors", MODEL, capped, tmp_path / "m.json", tmp_path / "log.csv")
    lines = capsys.readouterr().out.splitlines()
    shown = [int(m.group(1)) for m in (re.match(r"train: [\d,]+ steps \((\d+)%\)", line) for line in lines) if m]
    assert shown and shown == sorted(shown) and shown[-1] >= 90, lines
    assert not any("/100,000 steps" in line for line in lines), [l for l in lines if "/100,000" in l]
    assert any(re.fullmatch(r"train: done, [\d,]+ steps in \d:\d\d:\d\d", line) for line in lines), lines


def test_work_that_cannot_count_is_still_seen_to_be_alive(monkeypatch):
    """A single long call (a codec compressing) gets time lines from the ticker; quick work prints nothing."""
    out = io.StringIO()
    with progress.Bar("quick", 3, "items", file=out) as bar:
        for _ in bar.track(range(3)):
            pass
    assert out.getvalue() == ""
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.05)
    with progress.Bar("pack: compressing with zlib", None, file=out):
        time.sleep(0.3)
    *alive, done = out.getvalue().splitlines()
    assert alive and all(line == "pack: compressing with zlib: 0:00:00" for line in alive)
    assert done == "pack: compressing with zlib: done in 0:00:00"


def test_a_metrics_row_refuses_what_is_no_table_cell(tmp_path):
    metrics = tmp_path / "quantize_metrics.json"
    assert companion(metrics, "report", ".json") == tmp_path / "quantize_report.json"
    assert companion(tmp_path / "m.json", "bits", ".png") == tmp_path / "m_bits.png"
    for bad in ({"params": {"bits": 6}}, {"tensors": [1, 2]}, {"blob": "x" * 64}):
        with pytest.raises(ValueError, match="details go to the report"):
            write_metrics(metrics, bad, {})
        assert not metrics.exists()
    assert write_metrics(metrics, {"bytes": 1, "fits": True, "codec": "zlib", "val_bpb": None}, {"a": {"b": 1}}) \
        == tmp_path / "quantize_report.json"


def test_without_matplotlib_the_chart_alone_is_skipped(tmp_path, monkeypatch, capsys):
    """A bare machine without matplotlib still trains and quantizes: only the picture is missing, said so."""
    import importlib.util

    from pgolf.report import plots

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    plots.loss_chart(tmp_path / "log.png", [(1, 4.0, 1.0), (2, 3.5, 0.5)], [], "t")
    assert not (tmp_path / "log.png").exists() and "matplotlib is not installed" in capsys.readouterr().err
