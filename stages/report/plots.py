"""Charts as PNG files: the training loss curve and quantize's bits and bytes per tensor.

`dvc plots show` renders its charts in an HTML page whose plotting library loads from the internet, so
offline it is blank; these are plain images that any viewer opens (and DVC lists them as image plots).
matplotlib is imported only here, when a chart is drawn, and through its Agg canvas: no display, no
global backend switch, and `pgolf --help` does not pay for it. Files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import importlib.util
import sys

from pgolf.formats.files import atomic_path

DPI = 100


def drawable(path: str | Path) -> bool:
    """Whether matplotlib (a pgolf dependency) is here to draw `path`. A chart is a view of results that are
    already written, so where it is missing (a bare GPU machine) the chart alone is skipped, with a note."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    print(f"pgolf: note: matplotlib is not installed, so {path} was not drawn (pip install matplotlib)",
          file=sys.stderr)
    return False


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def loss_chart(path: str | Path, rows: Sequence[Sequence[float]], val_points: Sequence[dict[str, Any]],
               title: str) -> None:
    """Training loss by step (rows: step, train_loss, lr_scale, ...), the LR multiplier on a second axis,
    and the validation loss at the steps it was measured (val_points: step, val_loss, val_bpb)."""
    if not drawable(path):
        return
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    steps = [r[0] for r in rows]
    ax.plot(steps, [r[1] for r in rows], color="tab:blue", linewidth=1.2, label="train loss")
    val = [v for v in val_points if v.get("val_loss") is not None]
    if val:
        ax.plot([v["step"] for v in val], [v["val_loss"] for v in val], "o", color="tab:red", label="val loss")
        last = val[-1]
        ax.annotate(f"val_bpb {last['val_bpb']:.4f}", (last["step"], last["val_loss"]), textcoords="offset points",
                    xytext=(-8, 10), ha="right", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(steps, [r[2] for r in rows], color="tab:gray", linewidth=0.8, linestyle="--", label="LR multiplier")
    lr.set_ylabel("LR multiplier")
    lr.set_ylim(0, 1.05 * max([1.0] + [r[2] for r in rows]))
    lines = ax.get_legend_handles_labels()
    more = lr.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    ax.set_title(title)
    _save(fig, path)


def bits_chart(path: str | Path, tensors: Sequence[dict[str, Any]], title: str) -> None:
    """Per tensor (rows of quantize's report): stored bits per weight (scales and corrections included),
    labelled with how it is stored, and stored bytes. Float tensors' bars (16 or 32 bits) are cut at 1.5×
    the widest quantized one, so that the widths that differ (2..8 bits) stay readable."""
    if not drawable(path):
        return
    from matplotlib.ticker import EngFormatter, MaxNLocator

    names = [t["name"] for t in tensors]
    bits = [8 * t["stored_bytes"] / max(t["numel"], 1) for t in tensors]
    quantized = [t["method"] not in ("keep_float", "passthrough") for t in tensors]
    colors = ["tab:blue" if q else "tab:gray" for q in quantized]
    q_bits = [b for b, q in zip(bits, quantized) if q]
    top = 1.5 * max(q_bits) if q_bits else 1.15 * max(bits, default=1)
    fig = _figure(11, 0.9 + 0.2 * len(names))
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    y = range(len(names))
    left.barh(y, bits, color=colors)
    for i, t in enumerate(tensors):
        cut = bits[i] > top
        label = f"{t['stored_as']} ({bits[i]:.0f} bits) " if cut else f" {t['stored_as']}"
        left.text(min(bits[i], top), i, label, va="center", ha="right" if cut else "left", fontsize=7,
                  color="white" if cut else "black")
    left.set_yticks(list(y), names, fontsize=7)
    left.set_ylim(len(names) - 0.5, -0.5)  # first tensor on top, no empty margin
    left.set_xlabel("stored bits per weight (blue: quantized, grey: kept float)")
    left.set_xlim(0, top)
    right.barh(y, [t["stored_bytes"] for t in tensors], color=colors)
    right.set_xlabel("stored bytes (before compression)")
    right.xaxis.set_major_locator(MaxNLocator(4))
    right.xaxis.set_major_formatter(EngFormatter(unit="B", places=0))
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
