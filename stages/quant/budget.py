"""Bit allocation to a byte budget (`quantize --budget BYTES`).

Every quantized tensor is encoded once at every width of `budget_bits`, and (with `budget_lqer`) once
more at each width with an LQER correction (pgolf.quant.lqer). Each encoding is scored by an error and by
the compressed size of its stored parts. The error (`budget_objective`) is, by default, the loss it costs:
½ Σ_r G_r (W − Ŵ)_r H (W − Ŵ)_rᵀ with calibrate's output-gradient moments G (pgolf.quant.gptq.loss_error).
Layer errors alone, trace((W − Ŵ) H (W − Ŵ)ᵀ) (`layer`), are not comparable across layers: on the record
stack they moved bits from late MLP projections to early value projections and lost 0.07 BPB
(bench/README.md). Where no Hessian fits a tensor the error is ‖W − Ŵ‖²_F. From the lowest widths everywhere, the search keeps taking the
move (one tensor to any of its encodings with a lower error) with the largest error reduction per extra
byte. That path does not depend on the budget; the budget only says where to stop on it.

Sizes along the path are predicted from the per-tensor sizes (a fast setting of the codec), calibrated
by two real builds of the packed artifact at the path's ends (pack's header, codec and code measurement,
via pgolf.formats.blob_writer and pgolf.formats.code). The stop is then found among real builds: probes around the
predicted point, then bisection, each round's builds in parallel threads (the codecs release the GIL),
until the last upgrade that fits and the first that does not are neighbours. A slow codec (brotli
quality 11; bench/README.md has the timings) costs a few rounds, not one per undone upgrade.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch

from pgolf.config.sections import PackConfig, QuantizeConfig, budget_widths
from pgolf.errors import PgolfError
from pgolf.formats import codecs
from pgolf.formats.blob_writer import build_blob, encode_payload
from pgolf.formats.code import measure_code
from pgolf.formats.dequant import decode_entry
from pgolf.formats.submission import blob_header_fields
from pgolf.nn.names import tensor_group
from pgolf.quant.encode import Encoded, encode_tensor, is_quantized, store_encoded
from pgolf.quant.gptq import loss_error, weighted_error
from pgolf.quant.lqer import hessian_roots, with_lqer
from pgolf.report.progress import Bar

# The quantized file's sha256 goes into pack's header but is not known while searching: a stand-in of the
# same length and, like a real hash, incompressible (format 3 compresses the header).
PLACEHOLDER_SHA = hashlib.sha256(b"pgolf --budget: a sha256 not known yet").hexdigest()
# A compressed header's size still varies by a few bytes with the hashes it holds: held back in format 3.
HEADER_SLACK = 64
# Relative distances from the predicted stop at which the first round of real builds probes.
PROBE_MARGINS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032)


def placeholder_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """data_identity's fields with same-length stand-ins, for when quantize does not see the data:
    one val shard (the challenge has one); budget_reserve covers the names and hashes of more."""
    return {"tokenizer_sha256": meta.get("tokenizer_sha256") or PLACEHOLDER_SHA,
            "vocab_size": (meta.get("model_config") or {}).get("vocab_size"),
            "val_shards": {"fineweb_val_000000.bin": PLACEHOLDER_SHA}, "manifest_sha256": PLACEHOLDER_SHA}


@dataclass
class Option:
    """One tensor at one width (with or without LQER): its encoding, error and estimated compressed bytes."""

    bits: int
    lqer: bool
    enc: Encoded
    err: float
    est_bytes: int


def tensor_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None, g: torch.Tensor | None = None
                 ) -> tuple[float, str]:
    """(error, its kind): the loss estimate given H and G, the layer output error given H, else ‖W − Ŵ‖²."""
    if h is not None and w.ndim == 2 and tuple(h.shape) == (w.shape[1],) * 2:
        if g is not None and tuple(g.shape) == (w.shape[0],):
            return loss_error(w, w_hat, h, g), "loss"
        return weighted_error(w, w_hat, h), "hessian"
    return float((w.double() - w_hat.double()).pow(2).sum()), "plain"


def upgrade_path(options: dict[str, list[Option]]) -> list[tuple[str, int]]:
    """(tensor, option index) moves from option 0 everywhere, each the best error reduction per extra byte.

    Only moves that lower a tensor's error count, so the path ends at each tensor's lowest-error option.
    """
    at = {name: 0 for name in options}
    path: list[tuple[str, int]] = []
    while True:
        best, best_key = None, None
        for name, opts in options.items():
            cur = opts[at[name]]
            for i, opt in enumerate(opts):
                gain, cost = cur.err - opt.err, opt.est_bytes - cur.est_bytes
                if gain <= 0:
                    continue
                key = (math.inf if cost <= 0 else gain / cost, gain)  # smaller and better: take it first
                if best_key is None or key > best_key:
                    best, best_key = (name, i), key
        if best is None:
            return path
        path.append(best)
        at[best[0]] = best[1]


@dataclass
class Allocation:
    encoded: dict[str, Encoded]  # every tensor of the state dict, as it will be stored
    report: dict[str, Any]


class BudgetSearch:
    """The encodings, the upgrade path and its measured ends for one checkpoint; `fit(budget)` picks."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: QuantizeConfig, pack: PackConfig,
                 hessians: dict[str, torch.Tensor] | None, meta: dict[str, Any], ident: dict[str, Any] | None,
                 out_grads: dict[str, torch.Tensor] | None = None) -> None:
        """pack: how pack will compress (its codec and chunking), which the sizes are measured with;
        meta: the quantized file's metadata less the schema; ident: data_identity of the data, or None
        (a placeholder, with cfg.budget_reserve bytes held back); out_grads: calibrate's output-gradient
        moments G, used when cfg.budget_objective is `loss`."""
        self.state, self.cfg, self.meta = state, cfg, meta
        self.pack = pack
        self.codec, self.chunk_bytes = pack.codec, pack.chunk_bytes
        self.exact = ident is not None
        self.ident = ident or placeholder_identity(meta)
        self.reserve = 0 if ident else cfg.budget_reserve
        self.slack = HEADER_SLACK if pack.container == "pergroup" else 0
        self.estimate_codec = codecs.estimator(self.codec)
        hessians = hessians or {}
        if not hessians:
            print("quantize: note: --budget without --hessians minimises the plain squared error ‖W − Ŵ‖² "
                  "(every input direction weighted alike); give --hessians for the output error")
        self.out_grads = (out_grads or {}) if cfg.budget_objective == "loss" else {}
        self.fixed, self.options, self.error_kind = self._encode(hessians)
        self.path = upgrade_path(self.options)
        self.code = measure_code(self.codec)
        est = [sum(opts[0].est_bytes for opts in self.options.values())]
        at = {name: 0 for name in self.options}
        for name, i in self.path:
            est.append(est[-1] + self.options[name][i].est_bytes - self.options[name][at[name]].est_bytes)
            at[name] = i
        self._real: dict[int, int] = {}
        # Calibrate the estimate by the real sizes at both ends (an affine map; independent of the budget).
        lo, hi = self.measure_many([0, len(self.path)])
        span = est[-1] - est[0]
        slope = (hi - lo) / span if span and (hi - lo) * span > 0 else 1.0
        self.predicted = [lo + (e - est[0]) * slope for e in est]

    def _encode(self, hessians: dict[str, torch.Tensor]):
        widths = budget_widths(self.cfg)
        free = replace(self.cfg, embed_bits=0, attn_bits=0, mlp_bits=0)  # config_for then uses `bits`
        fixed: dict[str, Encoded] = {}
        searched = []
        for name, t in self.state.items():
            group = tensor_group(name)
            if is_quantized(t, self.cfg) and not (group and self.cfg.group_overrides(group)[0]):
                searched.append(name)
            else:  # kept float, or pinned by a group override: one encoding
                fixed[name] = encode_tensor(name, t, self.cfg, hessians.get(name))
        jobs = [(name, b) for name in searched for b in widths]
        found: dict[tuple[str, int, bool], tuple[Encoded, float]] = {}
        kinds, roots = {}, {}
        lqer_note = " (+ LQER)" if self.cfg.budget_lqer else ""
        with Bar(f"budget: {len(searched)} tensors × widths {widths}{lqer_note}", len(jobs), "encodings",
                 enabled=bool(jobs)) as bar:
            for name, b in bar.track(jobs):
                w, h = self.state[name].detach().cpu(), hessians.get(name)
                enc = encode_tensor(name, self.state[name], replace(free, bits=b), h)
                candidates = [(False, enc)]
                if self.cfg.budget_lqer:
                    fits = h is not None and tuple(h.shape) == (w.shape[-1],) * 2
                    if fits and self.cfg.lqer_weighted and name not in roots:
                        roots[name] = hessian_roots(h, self.cfg.gptq_damp)
                    corrected = with_lqer(enc, w, self.cfg, h if fits else None, roots.get(name))
                    if corrected is not None:
                        candidates.append((True, corrected))
                for lqer, e in candidates:
                    tensors, schema = store_encoded({name: e}, {name: self.state[name]})
                    restored = decode_entry(name, schema[name], tensors, "budget")
                    err, kinds[name] = tensor_error(w, restored, h, self.out_grads.get(name))
                    found[name, b, lqer] = (e, err)
        # The codec libraries release the GIL: compress the encodings in parallel.
        keys = list(found)
        with ThreadPoolExecutor() as pool, \
                Bar(f"budget: sizes by {self.estimate_codec}", len(keys), "encodings") as bar:
            sizes = dict(zip(keys, bar.track(pool.map(
                lambda key: codecs.estimate_size(self.estimate_codec, encode_payload(found[key][0].parts)[0]), keys))))
        options = {name: [Option(b, lqer, *found[name, b, lqer], sizes[name, b, lqer])
                          for (n, b, lqer) in keys if n == name] for name in searched}
        return fixed, options, kinds

    def choice(self, k: int) -> dict[str, int]:
        """Option index per searched tensor after the first k upgrades."""
        at = {name: 0 for name in self.options}
        for name, i in self.path[:k]:
            at[name] = i
        return at

    def encoded_at(self, k: int) -> dict[str, Encoded]:
        at = self.choice(k)
        return {name: self.fixed[name] if name in self.fixed else self.options[name][at[name]].enc
                for name in self.state}

    def _build(self, k: int) -> int:
        import tempfile

        from safetensors.torch import load_file, save_file

        tensors, schema = store_encoded(self.encoded_at(k), self.state)
        with tempfile.TemporaryDirectory() as tmp:  # the order in which pack reads them from the file
            save_file(tensors, f"{tmp}/q.safetensors")
            tensors = load_file(f"{tmp}/q.safetensors")
        fields = blob_header_fields({**self.meta, "schema": schema}, self.ident, PLACEHOLDER_SHA, self.code)
        blob = build_blob(tensors, fields, self.codec, self.chunk_bytes, self.pack.container, self.pack.sort_rows)[0]
        return len(blob) + self.code["bytes"] + self.reserve + self.slack

    def measure_many(self, ks: list[int]) -> list[int]:
        """Packed bytes (blob + code, + the reserve) after each k upgrades: blobs built as pack builds them,
        those not built yet in parallel."""
        todo = sorted({k for k in ks if k not in self._real})
        if todo:
            with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool, \
                    Bar(f"budget: packing with {self.codec}", len(todo), "builds") as bar:
                self._real.update(zip(todo, bar.track(pool.map(self._build, todo))))
        return [self._real[k] for k in ks]

    def measure(self, k: int) -> int:
        return self.measure_many([k])[0]

    def stop_at(self, target: float) -> int:
        """The most upgrades whose predicted size is at most `target` (0 if none)."""
        k = 0
        while k < len(self.path) and self.predicted[k + 1] <= target:
            k += 1
        return k

    def fit(self, budget: int) -> Allocation:
        """The most upgrades that fit, found among real builds: fits at k, over at k + 1 (or the path's end)."""
        smallest = self.measure(0)
        if smallest > budget:
            raise PgolfError(
                f"--budget {budget:,} bytes is below the smallest packed size this checkpoint reaches: "
                f"{smallest:,} bytes (every searched tensor at {min(budget_widths(self.cfg))} bits, codec "
                f"{self.codec}, code {self.code['bytes']:,} bytes"
                + (f", reserve {self.reserve:,}" if self.reserve else "") + "); raise the budget, allow fewer "
                "bits in budget_bits, or keep fewer tensors float")
        end = len(self.path)
        predicted = self.stop_at(budget)
        probes = {predicted, end} | {self.stop_at(budget * (1 + s * m)) for m in PROBE_MARGINS for s in (-1, 1)}
        fits, over = 0, end + 1  # k = fits is measured to fit, k = over not to (end + 1: past the path)
        built = len(self._real)
        while over - fits > 1:
            inside = sorted(k for k in probes if fits < k < over)
            sizes = dict(zip(inside, self.measure_many(inside)))
            fits = max([fits] + [k for k in inside if sizes[k] <= budget])
            over = min([over] + [k for k in inside if k > fits and sizes[k] > budget])
            width = min(os.cpu_count() or 1, 8)  # next round: evenly spaced probes between the bounds
            probes = {fits + max(1, (over - fits) * i // (width + 1)) for i in range(1, width + 1)}
        builds = len(self._real) - built
        k = fits
        at = self.choice(k)
        tensors = {}
        for name, opts in self.options.items():
            opt = opts[at[name]]
            tensors[name] = {"bits": opt.bits, "lqer": opt.lqer, "est_bytes": opt.est_bytes, "err": opt.err,
                             "error": self.error_kind[name]}
        report = {
            "budget": budget, "codec": self.codec, "chunk_bytes": self.chunk_bytes, "estimate_codec": self.estimate_codec,
            "candidate_bits": budget_widths(self.cfg), "lqer_candidates": self.cfg.budget_lqer,
            "upgrades": k, "path_length": len(self.path), "predicted_upgrades": predicted,
            "real_builds": builds, "predicted_bytes": round(self.predicted[k]), "measured_bytes": self.measure(k),
            "code_bytes": self.code["bytes"], "reserve_bytes": self.reserve, "header_slack_bytes": self.slack,
            "data_identity": "exact" if self.exact else "placeholder",
            "smallest_bytes": smallest, "largest_bytes": self.measure(end),
            "error": sum(t["err"] for t in tensors.values()),
            "objective": self.cfg.budget_objective,
            "error_kind": next(iter(kinds)) if len(kinds := set(self.error_kind.values())) == 1 else "mixed",
            "lqer_tensors": sorted(n for n, t in tensors.items() if t["lqer"]),
            "fixed_tensors": sorted(n for n in self.fixed if is_quantized(self.state[n], self.cfg)),
            "tensors": tensors,
        }
        return Allocation(self.encoded_at(k), report)
