"""Mixing the LM with an n-gram model of the tokens already scored (`ttt_eval.ngram_mix`; issue 18).

Why: the seed study PR #1227 of openai/parameter-golf mixed its LM with an order-6 context-tree n-gram
model (Dirichlet/KT estimators) and an entropy-adaptive weight. The challenge closed ~33 n-gram-cache PRs
doing the same wrongly: their blend was no distribution (the probability of each target was computed alone,
e.g. from count ratios, and the "distribution" summed to ≈277 over the vocabulary), or their counts held
tokens not yet scored. Here neither can happen, by construction and under test (tests/test_ngram_mix.py):
- normalised: the n-gram predictive is built over the full vocabulary (a hierarchical Dirichlet backoff, so a
  distribution by induction), and the mixture λ·p_LM + (1−λ)·p_ngram with λ ∈ [0, 1] is one too; the ledger
  records −log of its entry at the target, nothing else;
- causal: targets are taken in the ledger's scoring order; target t's row is built from counts (and, for
  ctw, a posterior) of earlier targets only, and t is learnt after; contexts come from the window's own
  inputs, which the LM sees too; nothing of a window not yet scored is ever handed here.
Mixers: `ctw`, a Bayesian mixture over K weights λ_k evenly spaced in [0, 1] (uniform prior), context-tree
style: one posterior per length of the longest context the n-gram model has seen (0 .. order−1). The
prediction at t is Σ_k w_k(t)·p_λk = λ̄·p_LM + (1−λ̄)·p_ngram, w(t) the posterior given the earlier targets
of t's class, so the loss over a class is −ln Σ_k P_λk(its targets)/K, at most ln K above the best fixed λ.
With K = 2 (λ ∈ {0, 1}) this is the plain posterior of the LM vs the n-gram model, which converges to the
better of the two alone, in each class; a blend beats both on real text (the demo data, 101k validation tokens
of V = 1024, a 2.35-BPB model: LM 4.26 nats/token, n-gram alone 4.61, K = 2 3.95, K = 21 3.24, entropy 3.37).
`entropy`: an n-gram weight rising with the LM's entropy H at the position, w_min + (w_max − w_min)·σ(scale·
(H − centre)) (PR #702's form).

The n-gram side is a per-token Python loop (dicts of counts per context). Scoring takes each target's
probability alone, O(order) a target (the dense rows, O(order·V), are for verify and the tests; each window's
first row is still built and checked): 23 µs a target against 553 µs with the rows (ctw, V = 8,192, one core
of a 2-core EPYC), so 150k targets take seconds, but the challenge's 62M-token validation set would take about
24 minutes, over the 600 s eval limit.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pgolf.text.ledger import ComplianceError

NGRAM_MIXERS = ("none", "ctw", "entropy")


class NgramModel:
    """Next-token counts after every context of up to order−1 tokens, and their hierarchical Dirichlet
    predictive (context-tree style: each context's posterior is the prior of the longer ones below it):
    p_{−1} = uniform; p_d(x) = (c_d(x) + α·p_{d−1}(x)) / (n_d + α) along the path of the d most recent
    tokens, down to the longest context seen before (an unseen one would add nothing: n_d = 0)."""

    def __init__(self, vocab_size: int, order: int, alpha: float):
        if order < 1 or alpha <= 0 or vocab_size < 1:
            raise ValueError(f"n-gram order {order} >= 1, alpha {alpha} > 0, vocab {vocab_size} >= 1 needed")
        self.vocab, self.depth, self.alpha = vocab_size, order - 1, alpha
        self.unigram = np.zeros(vocab_size)  # order 0: the empty context's counts, dense
        self.seen = 0
        # context key → [n, {token: count}]; key of the d most recent tokens t_1 (latest) .. t_d:
        # (((t_1 + 1)·(V+1) + t_2 + 1)·(V+1) ...: exact, and distinct across depths (no digit is 0)
        self.contexts: dict[int, list] = {}

    def context(self, history: np.ndarray) -> list[int]:
        """The context of the next token: the last order−1 tokens of `history`, the latest first."""
        return [int(t) for t in history[::-1][:self.depth]] if self.depth else []

    def _keys(self, context: list[int]):
        key = 0
        for token in context:
            key = key * (self.vocab + 1) + token + 1
            yield key

    def predict(self, context: list[int]) -> tuple[np.ndarray, int]:
        """(p(next | context) over the whole vocabulary (float64, sums to 1, every entry > 0), the length of
        the longest context on the path seen before)."""
        p = (self.unigram + self.alpha / self.vocab) / (self.seen + self.alpha)
        depth = 0
        for key in self._keys(context):
            node = self.contexts.get(key)
            if node is None:  # no longer context seen either (every prefix of a seen path was counted)
                break
            n, counts = node
            p *= self.alpha
            p[list(counts)] += list(counts.values())
            p /= n + self.alpha
            depth += 1
        return p, depth

    def predict_at(self, context: list[int], token: int) -> tuple[float, int]:
        """predict's entry at `token` alone, by the same recursion in the same order (so equal to the bit), and
        the depth: O(order) instead of O(order·V), for scoring (NgramMixer.window_nll audits it)."""
        p = (self.unigram[token] + self.alpha / self.vocab) / (self.seen + self.alpha)
        depth = 0
        for key in self._keys(context):
            node = self.contexts.get(key)
            if node is None:
                break
            n, counts = node
            p = (p * self.alpha + counts.get(token, 0)) / (n + self.alpha)
            depth += 1
        return float(p), depth

    def update(self, context: list[int], token: int) -> None:
        """Count `token` after each context on the path (call it after `token` was scored)."""
        self.unigram[token] += 1
        self.seen += 1
        for key in self._keys(context):
            node = self.contexts.get(key)
            if node is None:
                node = self.contexts[key] = [0, {}]
            node[0] += 1
            node[1][token] = node[1].get(token, 0) + 1


class NgramMixer:
    """The LM's distribution mixed with an NgramModel's, target by target in scoring order (module doc)."""

    def __init__(self, vocab_size: int, mixer: str, order: int, alpha: float, weights: int, weight_min: float,
                 weight_max: float, entropy_center: float, entropy_scale: float):
        """The settings are EvalConfig's ngram_* keys (from_config), which hold their defaults and ranges."""
        if mixer not in NGRAM_MIXERS[1:]:
            raise ValueError(f"n-gram mixer {mixer!r}: expected one of {', '.join(NGRAM_MIXERS[1:])}")
        if weights < 2 or not 0 <= weight_min <= weight_max <= 1:
            raise ValueError(f"n-gram weights need K {weights} >= 2 and 0 <= weight_min {weight_min} <= weight_max "
                             f"{weight_max} <= 1")
        self.mixer, self.model = mixer, NgramModel(vocab_size, order, alpha)
        self.settings = {"mixer": mixer, "order": order, "alpha": alpha}
        if mixer == "ctw":
            self.settings["weights"] = weights
        else:
            self.settings.update(weight_min=weight_min, weight_max=weight_max, entropy_center=entropy_center,
                                 entropy_scale=entropy_scale)
        self.lambdas = torch.linspace(0, 1, weights, dtype=torch.float64)  # ctw: the LM's weights λ_k
        self.log_lik = torch.zeros(order, weights, dtype=torch.float64)  # per class: ln P_λk(its targets so far)
        self.scored, self.ngram_weight_sum = 0, 0.0
        self.lm_nats = self.ngram_nats = 0.0  # each model's own loss on the targets scored, for the report
        self.seconds = 0.0  # spent mixing in scoring (window_nll): the n-gram side's cost, which the report gives

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> "NgramMixer | None":
        """The mixer an EvalConfig asks for (None for ngram_mix: none)."""
        if cfg.ngram_mix == "none":
            return None
        return cls(vocab_size, cfg.ngram_mix, cfg.ngram_order, cfg.ngram_alpha, cfg.ngram_weights,
                   cfg.ngram_weight_min, cfg.ngram_weight_max, cfg.ngram_entropy_center, cfg.ngram_entropy_scale)

    def _ngram_predictions(self, inputs: np.ndarray, first: int, targets: np.ndarray, dense: bool
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """For each target in order: the n-gram's probability of it, its context class (the length of the
        longest context seen) and, when `dense`, the whole distribution [T, V]; each built from the counts,
        then the target counted. Not dense, the first target's row is still built and checked against the
        target-only value: normalised to 1e-9 and equal at the target (ComplianceError otherwise)."""
        at, depths = np.empty(targets.size), np.empty(targets.size, dtype=np.int64)
        rows = np.empty((targets.size, self.model.vocab)) if dense else None
        for j, target in enumerate(targets.tolist()):
            context = self.model.context(inputs[:first + j + 1])  # target j follows inputs[first + j]
            if dense:
                rows[j], depths[j] = self.model.predict(context)
                at[j] = rows[j, target]
            else:
                at[j], depths[j] = self.model.predict_at(context, target)
                if j == 0:
                    self._audit(context, target, at[j])
            self.model.update(context, target)
        return at, depths, rows

    def _audit(self, context: list[int], target: int, p_target: float) -> None:
        row, _ = self.model.predict(context)
        total = float(row.sum())
        if abs(total - 1) > 1e-9 or not row.min() > 0 or abs(row[target] - p_target) > 1e-12 * row[target]:
            raise ComplianceError(f"the n-gram distribution is not proper or not the one scored: Σp = {total!r}, "
                                  f"min {row.min():.3g}, p(target) {row[target]!r} scored as {p_target!r}")

    def _ctw_weights(self, lm_at: torch.Tensor, ngram_at: torch.Tensor, depths: np.ndarray) -> torch.Tensor:
        """λ̄_t, the posterior mean of the LM's weight given the earlier targets of t's class; then those of
        this window are added to the posteriors."""
        lam = self.lambdas
        log_lik = torch.logaddexp(lam.log() + lm_at[:, None], (1 - lam).log() + ngram_at[:, None])  # [T, K]
        out = torch.empty(depths.size, dtype=torch.float64)
        for c in np.unique(depths).tolist():
            rows = torch.from_numpy(np.flatnonzero(depths == c))
            ll = log_lik[rows]
            before = self.log_lik[c] + torch.cat([torch.zeros_like(ll[:1]), ll[:-1].cumsum(0)])  # exclusive
            out[rows] = torch.softmax(before, dim=1) @ lam
            self.log_lik[c] += ll.sum(0)
        return out

    def _lm_weights(self, lm_at: torch.Tensor, ngram_at: torch.Tensor, depths: np.ndarray,
                    entropy: torch.Tensor | None) -> torch.Tensor:
        """λ_t, the LM's weight in each target's mixture (ctw: the posterior mean; entropy: from the LM's
        entropy at t), and the report's sums."""
        if self.mixer == "ctw":
            lm_weight = self._ctw_weights(lm_at, ngram_at, depths)
        else:
            s = self.settings
            lm_weight = 1 - (s["weight_min"] + (s["weight_max"] - s["weight_min"])
                             * torch.sigmoid(s["entropy_scale"] * (entropy - s["entropy_center"])))
        self.scored += depths.size
        self.ngram_weight_sum += float((1 - lm_weight).sum())
        self.lm_nats -= float(lm_at.sum())
        self.ngram_nats -= float(ngram_at.sum())
        return lm_weight

    def _lm_side(self, lm_log_probs: torch.Tensor, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ln p_LM(target) and (entropy mixer) the LM's entropy per target, float64 on the CPU, reduced where
        the log-probabilities are (on the GPU only T numbers cross)."""
        if lm_log_probs.shape != (targets.size, self.model.vocab):
            raise ValueError(f"LM log-probabilities of shape {tuple(lm_log_probs.shape)} for {targets.size} targets "
                             f"over {self.model.vocab} tokens")
        lm = lm_log_probs.detach().double()
        y = torch.from_numpy(targets).to(lm.device)[:, None]
        lm_at = lm.gather(1, y).squeeze(1).cpu()
        entropy = None if self.mixer == "ctw" else (-(lm.exp() * lm).sum(1)).cpu()
        return lm_at, entropy

    def mix_window(self, lm_log_probs: torch.Tensor, inputs: np.ndarray, first: int, targets: np.ndarray
                   ) -> torch.Tensor:
        """The mixed distributions [T, V] (float64, CPU) of one window's scored targets, in scoring order: what
        window_nll scores, whole (verify's normalisation check and the tests read it).

        lm_log_probs: the LM's log-softmax over the full vocabulary for those targets; inputs: the window's
        input tokens (what the LM saw); targets: the tokens scored, targets[j] = inputs[first + j + 1] where
        the window goes on. Each target updates the n-gram counts (and ctw's posterior) after its row is built.
        """
        targets = np.asarray(targets, dtype=np.int64)
        lm_at, entropy = self._lm_side(lm_log_probs, targets)
        ngram_at, depths, rows = self._ngram_predictions(np.asarray(inputs), first, targets, dense=True)
        lm_weight = self._lm_weights(lm_at, torch.from_numpy(ngram_at).log(), depths, entropy)
        lm = lm_log_probs.detach().to("cpu", torch.float64).exp()
        return lm_weight[:, None] * lm + (1 - lm_weight)[:, None] * torch.from_numpy(rows)

    def window_nll(self, lm_log_probs: torch.Tensor, inputs: np.ndarray, first: int, targets: np.ndarray
                   ) -> torch.Tensor:
        """−ln p_mix(target) of each scored target of one window (float64, CPU): mix_window's entries at the
        targets, computed from the targets' probabilities alone (each window's first row built whole and
        checked, _ngram_predictions)."""
        started = time.perf_counter()
        targets = np.asarray(targets, dtype=np.int64)
        lm_at, entropy = self._lm_side(lm_log_probs, targets)
        ngram_p, depths, _ = self._ngram_predictions(np.asarray(inputs), first, targets, dense=False)
        ngram_p = torch.from_numpy(ngram_p)
        lm_weight = self._lm_weights(lm_at, ngram_p.log(), depths, entropy)
        nll = -(lm_weight * lm_at.exp() + (1 - lm_weight) * ngram_p).log()
        self.seconds += time.perf_counter() - started
        return nll

    def report(self) -> dict:
        """What ran, for the metrics report: the settings, the mean n-gram weight, each model's own loss, and
        the seconds the mixing took in scoring (with its rate, to judge a full validation set by)."""
        n = max(self.scored, 1)
        out = {**self.settings, "targets": self.scored, "contexts": len(self.model.contexts),
               "mean_ngram_weight": self.ngram_weight_sum / n, "lm_alone_loss": self.lm_nats / n,
               "ngram_alone_loss": self.ngram_nats / n, "mixing_seconds": round(self.seconds, 6),
               "mixed_targets_per_second": round(self.scored / self.seconds) if self.seconds else None}
        if self.mixer == "ctw":  # where the posteriors ended, by context length
            out["ngram_weight_by_context"] = (1 - torch.softmax(self.log_lik, dim=1) @ self.lambdas).tolist()
        return out
