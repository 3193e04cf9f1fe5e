"""N-gram mixing (ttt_eval.ngram_mix) is a proper distribution and strictly causal by construction: every mixed
row sums to 1 over the full vocabulary with every entry > 0; a row never depends on its own target or anything
after it (and the check catches planted cheats: counting a target before its row is built, a posterior that
includes it); ctw's loss is exactly the Bayesian mixture's; on repetitive text the mixture beats the LM alone;
and ttt-eval, verify and the config run it end to end, refusing the combinations it cannot do right."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import asdict, fields, replace

import numpy as np
import pytest
import torch
from conftest import filled_gpt

from pgolf.config.sections import ConfigError, EvalConfig, ModelConfig, PackConfig, QuantizeConfig
from pgolf.text.bpb import ByteLUTs
from pgolf.text.ledger import ComplianceError, Ledger
from pgolf.ttt.modes import no_adaptation
from pgolf.ttt.ngram_mix import NGRAM_MIXERS, NgramMixer, NgramModel

V = 1024  # the challenge's vocabulary size, for the mixer-level tests
MIXERS = {"ctw": {}, "ctw_k2": {"ngram_weights": 2}, "entropy": {}}


def mixer(name: str, vocab: int = V, cls: type = NgramMixer, **settings) -> NgramMixer:
    """The mixer ttt-eval builds for ngram_mix=name (config defaults, MIXERS' and `settings`' overrides)."""
    return cls.from_config(EvalConfig(ngram_mix=name.split("_")[0], **{**MIXERS[name], **settings}), vocab)


def repetitive(n: int, vocab: int = V, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """A few phrases repeated in random order, with some random tokens: what an n-gram model learns."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, vocab, rng.integers(4, 12)) for _ in range(5)]
    out: list[int] = []
    while len(out) < n:
        out.extend(int(t) if rng.random() > noise else int(rng.integers(0, vocab)) for t in phrases[rng.integers(5)])
    return np.array(out[:n], dtype=np.int64)


def lm_rows(n: int, vocab: int = V, seed: int = 1) -> torch.Tensor:
    """An LM's log-probabilities at n positions: some flat, some very peaked (logits up to ±40)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 20
    return torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale, dim=-1)


def mixed_rows(m: NgramMixer, tokens: np.ndarray, lm: torch.Tensor, window: int = 64) -> torch.Tensor:
    """Every target 1..N-1 of `tokens`, in windows of `window` inputs scored in order (the first target of each
    window has no context in it): the mixed rows, stacked."""
    rows = []
    for start in range(0, tokens.size - 1, window):
        end = min(start + window, tokens.size - 1)
        rows.append(m.mix_window(lm[start:end], tokens[start:end], 0, tokens[start + 1:end + 1]))
    return torch.cat(rows)


# ---- a distribution over the full vocabulary, at every position

def test_the_ngram_model_predicts_a_distribution_over_the_whole_vocabulary():
    tokens = repetitive(600)
    model = NgramModel(V, order=6, alpha=0.5)  # max(depths) below is order − 1
    depths = []
    for t in range(tokens.size - 1):
        context = model.context(tokens[:t + 1])
        p, depth = model.predict(context)
        assert abs(p.sum() - 1) < 1e-12 and p.min() > 0 and p.shape == (V,), t
        depths.append(depth)
        model.update(context, int(tokens[t + 1]))
    assert max(depths) == 5 and min(depths) == 0  # it backs off from the longest context seen to none


@pytest.mark.parametrize("name", MIXERS)
def test_every_mixed_row_sums_to_one_over_the_full_vocabulary(name):
    tokens = repetitive(700)
    rows = mixed_rows(mixer(name), tokens, lm_rows(tokens.size - 1))
    assert rows.shape == (tokens.size - 1, V)
    assert float((rows.sum(1) - 1).abs().max()) < 1e-6
    assert float(rows.min()) > 0


@pytest.mark.parametrize("name", MIXERS)
def test_the_ledger_records_minus_log_of_the_mixed_row_at_the_target(name):
    """The scored loss is the mixture's, through the ledger's one scoring path (the audit check re-does this)."""
    tokens = repetitive(300, vocab=64)
    logits = torch.randn(1, tokens.size - 1, 64, generator=torch.Generator().manual_seed(3)) * 3
    rows = mixer(name, 64).mix_window(torch.log_softmax(logits[0].double(), -1), tokens[:-1], 0, tokens[1:])
    ledger = Ledger(tokens, None, luts(64), "cpu", keep_losses=True, mixer=mixer(name, 64))
    ledger.score([no_window(tokens.size - 1)], lambda x: logits)
    expected = -rows.gather(1, torch.from_numpy(tokens[1:])[:, None]).squeeze(1).log()
    assert np.allclose(ledger.losses[1:], expected.numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", MIXERS)
def test_scoring_from_the_targets_alone_gives_the_mixed_rows_entries(name):
    """window_nll takes each target's probability alone (O(order), not O(order·V)): over several windows its
    losses are −ln of mix_window's rows at the targets, and the n-gram model's entry is predict's to the bit."""
    tokens, lm = repetitive(400), lm_rows(399)
    rows = mixed_rows(mixer(name), tokens, lm)
    fast, losses = mixer(name), []
    for start in range(0, tokens.size - 1, 64):
        end = min(start + 64, tokens.size - 1)
        losses.append(fast.window_nll(lm[start:end], tokens[start:end], 0, tokens[start + 1:end + 1]))
    expected = -rows.gather(1, torch.from_numpy(tokens[1:])[:, None]).squeeze(1).log()
    torch.testing.assert_close(torch.cat(losses), expected, rtol=1e-12, atol=0)
    model = NgramModel(V, 6, 0.5)
    for t in range(1, 300):
        context = model.context(tokens[:t])
        assert model.predict_at(context, int(tokens[t])) == (float(model.predict(context)[0][tokens[t]]),
                                                              model.predict(context)[1])
        model.update(context, int(tokens[t]))


class CountRatio(NgramModel):
    """Planted cheat: the target's probability from its count ratio alone (the closed n-gram-cache PRs': summed
    over the vocabulary it is no distribution), while the dense rows stay proper."""

    def predict_at(self, context, token):
        p, depth = super().predict_at(context, token)
        node = self.contexts.get(next(self._keys(context), None)) if context else None
        return (node[1].get(token, 0) / node[0] if node and node[1].get(token) else p), depth


def test_scoring_checks_each_windows_first_row_against_the_target_only_value():
    m = mixer("ctw")
    m.model.__class__ = CountRatio
    tokens = repetitive(300)
    with pytest.raises(ComplianceError, match="not the one scored"):
        for start in range(0, 256, 64):
            m.window_nll(lm_rows(64), tokens[start:start + 64], 0, tokens[start + 1:start + 65])


# ---- causal: a row depends on earlier targets only

def future_leak(make, k: int = 200, seed: int = 0) -> float:
    """How much the rows of targets 0..k move when target k and every later token are changed (the LM rows kept:
    a causal LM's rows up to k see tokens up to k only). 0 for a causal mixer.

    The LM's rows are about as good as the n-gram model's (half of them sure of the original target), so that
    ctw's posterior stays spread over its weights and a leak into it shows."""
    tokens = repetitive(400, seed=seed)
    changed = tokens.copy()
    changed[k + 1:] = (tokens[k + 1:] + 1 + np.arange(tokens.size - k - 1)) % V  # target k is token k + 1
    lm = lm_rows(tokens.size - 1).exp()
    knows = torch.from_numpy(np.random.default_rng(seed).random(tokens.size - 1) < 0.5)
    lm[knows] = 0.5 * lm[knows] + 0.5 * torch.nn.functional.one_hot(torch.from_numpy(tokens[1:]), V)[knows]
    lm = lm.log()
    before, after = mixed_rows(make(), tokens, lm), mixed_rows(make(), changed, lm)
    assert not torch.allclose(before[k + 1:], after[k + 1:])  # the change reaches the later rows
    return float((before[:k + 1] - after[:k + 1]).abs().max())


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("k", [0, 63, 64, 200])  # the first target, a window's last and first, one inside
def test_a_row_never_depends_on_its_target_or_later_tokens(name, k):
    assert future_leak(lambda: mixer(name), k) < 1e-12


class CountsFirst(NgramMixer):
    """Planted cheat: each target is counted before its own row is built (the closed n-gram-cache PRs' bug)."""

    def _ngram_predictions(self, inputs, first, targets, dense):
        at, depths = np.empty(targets.size), np.empty(targets.size, dtype=np.int64)
        rows = np.empty((targets.size, self.model.vocab))
        for j, target in enumerate(targets.tolist()):
            context = self.model.context(inputs[:first + j + 1])
            self.model.update(context, target)
            rows[j], depths[j] = self.model.predict(context)
            at[j] = rows[j, target]
        return at, depths, rows if dense else None


class PosteriorWithTarget(NgramMixer):
    """Planted cheat: ctw's posterior at t includes target t's own likelihoods (an inclusive cumulative sum)."""

    def _ctw_weights(self, lm_at, ngram_at, depths):
        lam = self.lambdas
        log_lik = torch.logaddexp(lam.log() + lm_at[:, None], (1 - lam).log() + ngram_at[:, None])
        out = torch.empty(depths.size, dtype=torch.float64)
        for c in np.unique(depths).tolist():
            rows = torch.from_numpy(np.flatnonzero(depths == c))
            out[rows] = torch.softmax(self.log_lik[c] + log_lik[rows].cumsum(0), dim=1) @ lam
            self.log_lik[c] += log_lik[rows].sum(0)
        return out


@pytest.mark.parametrize("cheat,name", [(CountsFirst, "ctw"), (CountsFirst, "entropy"), (PosteriorWithTarget, "ctw")])
def test_the_causality_check_catches_a_planted_cheat(cheat, name):
    assert future_leak(lambda: mixer(name, cls=cheat), 200) > 1e-3
    assert future_leak(lambda: mixer(name, cls=cheat), 64) > 1e-3


# ---- what ctw computes

def test_ctw_loss_is_the_bayesian_mixture_of_fixed_weights_per_context_length():
    """Σ_t −ln p_mix(y_t) = Σ_c −ln (1/K) Σ_k Π_{t in class c} (λ_k p_LM(y_t) + (1 − λ_k) p_ngram(y_t)), with
    p_ngram and the classes (the longest context seen) recomputed here by a model of their own."""
    tokens, k = repetitive(500), 11
    lm = lm_rows(tokens.size - 1)
    m = mixer("ctw", ngram_weights=k)
    total = -float(sum(torch.log(r[y]) for r, y in zip(mixed_rows(m, tokens, lm), tokens[1:])))
    model, lams = NgramModel(V, EvalConfig().ngram_order, EvalConfig().ngram_alpha), np.linspace(0, 1, k)
    per_class: dict[int, np.ndarray] = {}
    for start in range(0, tokens.size - 1, 64):  # the same windows: contexts never reach before a window
        for t in range(start, min(start + 64, tokens.size - 1)):
            context = model.context(tokens[start:t + 1])
            p, depth = model.predict(context)
            y = int(tokens[t + 1])
            mix = lams * math.exp(float(lm[t, y])) + (1 - lams) * p[y]
            per_class[depth] = per_class.get(depth, np.zeros(k)) + np.log(mix)
            model.update(context, y)
    bayes = -sum(np.logaddexp.reduce(ll) - math.log(k) for ll in per_class.values())
    assert abs(total - bayes) < 1e-6 * abs(bayes)
    assert m.report()["targets"] == tokens.size - 1


# ---- through the ledger and a model: lower loss on repetitive text, causal, batch-independent

VOCAB, BOS = 64, 1
PLAIN = ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
BASE = EvalConfig(seq_len=32, stride=16, batch_seqs=4, device="cpu")


def luts(vocab: int = VOCAB) -> ByteLUTs:
    base = (1 + np.arange(vocab) % 3).astype(np.int16)
    return ByteLUTs(base, np.zeros(vocab, dtype=bool), np.arange(vocab) == BOS)


def no_window(n: int):
    from pgolf.text.bpb import Window
    return Window(0, n, 0)


def scored(tokens: np.ndarray, cfg: EvalConfig) -> tuple[np.ndarray, dict]:
    """(every target's loss, the result) of plain scoring with cfg's mixer, by a small random model."""
    ledger = Ledger(tokens, None, luts(), "cpu", keep_losses=True, mixer=NgramMixer.from_config(cfg, VOCAB))
    info = no_adaptation(filled_gpt(PLAIN), ledger, cfg, torch.device("cpu"), None)
    return ledger.losses, ledger.result(info["expected_targets"])


@pytest.mark.parametrize("name", ["ctw", "entropy"])
def test_on_repetitive_text_the_mixture_lowers_the_loss(name):
    tokens = repetitive(700, vocab=VOCAB, seed=2)
    _, plain = scored(tokens, BASE)
    _, mixed = scored(tokens, replace(BASE, ngram_mix=name))
    assert mixed["tokens_scored"] == plain["tokens_scored"] == tokens.size - 1
    assert mixed["val_loss"] < 0.8 * plain["val_loss"], (mixed["val_loss"], plain["val_loss"])


def test_score_first_ttt_scores_the_mixture_too():
    """score_first adapts on scored chunks as before (the ledger hands out only scored tokens); what it scores is
    the mixture, which learns every target once, in order."""
    from pgolf.ttt.score_first import score_first

    tokens = repetitive(500, vocab=VOCAB, seed=4)
    cfg = replace(BASE, ttt="score_first", ttt_lr=0.05, ttt_chunk_tokens=128, ttt_epochs=1, ttt_batch_seqs=2)
    results = {}
    for name in ("none", "ctw"):
        m = NgramMixer.from_config(replace(cfg, ngram_mix=name), VOCAB)
        ledger = Ledger(tokens, None, luts(), "cpu", mixer=m)
        info = score_first(filled_gpt(PLAIN), ledger, cfg, torch.device("cpu"), None)
        results[name] = ledger.result(info["expected_targets"])
        assert info["steps"] > 0
    report = m.report()
    assert report["targets"] == results["ctw"]["tokens_scored"] == tokens.size - 1
    assert results["ctw"]["val_loss"] < 0.8 * results["none"]["val_loss"]
    # the mixing's own time, measured in scoring, and the rate it gives
    assert report["mixing_seconds"] > 0
    assert report["mixed_targets_per_second"] == pytest.approx(report["targets"] / report["mixing_seconds"], rel=0.01)


def test_with_no_ngram_weight_the_mixture_is_plain_scoring():
    tokens = repetitive(300, vocab=VOCAB)
    plain, _ = scored(tokens, BASE)
    zero, _ = scored(tokens, replace(BASE, ngram_mix="entropy", ngram_weight_min=0.0, ngram_weight_max=0.0))
    assert np.allclose(zero[1:], plain[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ctw", "entropy"])
def test_through_the_ledger_a_future_token_never_changes_an_earlier_loss(name):
    tokens = repetitive(400, vocab=VOCAB)
    cfg = replace(BASE, ngram_mix=name)
    at = 150
    changed = tokens.copy()
    changed[at + 1:] = (changed[at + 1:] + 7) % VOCAB
    before, _ = scored(tokens, cfg)
    after, _ = scored(changed, cfg)
    assert np.allclose(before[1:at + 1], after[1:at + 1], rtol=0, atol=1e-5)
    assert not np.allclose(before[at + 1:], after[at + 1:], atol=1e-3)


def test_the_score_does_not_depend_on_the_batch_size():
    """verify re-scores a claim without its batch_seqs: the n-gram follows the scoring order, not the batches."""
    tokens = repetitive(400, vocab=VOCAB)
    one, _ = scored(tokens, replace(BASE, ngram_mix="ctw", batch_seqs=1))
    many, _ = scored(tokens, replace(BASE, ngram_mix="ctw", batch_seqs=5))
    assert np.allclose(one[1:], many[1:], rtol=0, atol=1e-5)


def test_an_update_never_trains_through_the_mixture():
    tokens = repetitive(100, vocab=VOCAB)
    ledger = Ledger(tokens, None, luts(), "cpu", mixer=mixer("ctw", VOCAB))
    with pytest.raises(ComplianceError, match="never trained through"):
        ledger.score_for_update([no_window(32)], filled_gpt(PLAIN).logits)


# ---- config

def test_config_offers_the_mixers_and_refuses_what_it_cannot_do_right():
    assert next(f for f in fields(EvalConfig) if f.name == "ngram_mix").metadata["rule"]["choices"] == NGRAM_MIXERS
    assert EvalConfig().ngram_mix == "none"
    for ok in (dict(ngram_mix="ctw"), dict(ngram_mix="entropy", ttt="score_first")):
        EvalConfig(**ok).validate()
    for bad, key in ((dict(ngram_mix="ctw", windows="record"), "ngram_mix"),
                     (dict(ngram_mix="ctw", ttt="lora"), "ngram_mix"),
                     (dict(ngram_mix="entropy", ttt="phased_lora"), "ngram_mix"),
                     (dict(ngram_mix="ctw", ttt="train_then_score"), "ngram_mix"),
                     (dict(ngram_mix="entropy", ngram_weight_min=0.7), "ngram_weight_min"),
                     (dict(ngram_mix="ctw", ngram_weights=1), "ngram_weights"),
                     (dict(ngram_mix="ctw", ngram_alpha=0.0), "ngram_alpha"),
                     (dict(ngram_mix="kn"), "ngram_mix")):
        with pytest.raises(ConfigError) as err:
            EvalConfig(**bad).validate()
        assert err.value.key == key, bad


# ---- end to end: ttt-eval on the session's tokenized data, and verify re-scoring the claim

def test_ttt_eval_scores_a_blob_with_the_ctw_mixture_and_verify_reproduces_it(tokenized_dir, tmp_path):
    from pgolf import pack, quantize, ttt_eval
    from pgolf.formats.files import read_json, save_tensors

    manifest = read_json(tokenized_dir / "manifest.json")
    cfg = ModelConfig(vocab_size=int(manifest["vocab_size"]), num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    state = {k: v.detach().clone() for k, v in filled_gpt(cfg).state_dict().items()}
    ckpt, quantized, blob = tmp_path / "ckpt.safetensors", tmp_path / "q.safetensors", tmp_path / "model.pgolf"
    save_tensors(ckpt, state, "checkpoint", {"model_config": asdict(cfg), "params": {},
                                             "tokenizer_sha256": manifest["tokenizer_sha256"]})
    quantize.run(ckpt, quantized, QuantizeConfig(bits=8), PackConfig(codec="zlib"), None, tmp_path / "q.json", None)
    pack.run(quantized, tokenized_dir, blob, PackConfig(codec="zlib"), tmp_path / "pack.json")
    ttt_eval.run(blob, tokenized_dir, EvalConfig(seq_len=64, val_tokens=1024, device="cpu", warmup=False),
                 tmp_path / "plain.json")
    plain = read_json(tmp_path / "plain_report.json")

    common = ["--data", str(tokenized_dir), "--params", "none.yaml", "--seq-len", "64", "--val-tokens", "1024",
              "--set", "ttt_eval.ngram_mix=ctw", "--set", "ttt_eval.warmup=false"]
    run = subprocess.run(["pgolf", "ttt-eval", str(blob), *common, "--metrics", "eval.json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    row, report = json.loads((tmp_path / "eval.json").read_text()), read_json(tmp_path / "eval_report.json")
    assert row["ngram_mix"] == "ctw" and math.isfinite(row["val_bpb"]) and row["val_bpb"] > 0
    assert report["ngram_mix"]["mixer"] == "ctw" and report["ngram_mix"]["targets"] == report["tokens_scored"]
    assert report["eval"]["ngram_mix"] == "ctw"
    # the mixer saw the very LM plain scoring scores, and the mixture is not the LM alone
    assert report["tokens_scored"] == plain["tokens_scored"]
    assert abs(report["ngram_mix"]["lm_alone_loss"] - plain["val_loss"]) < 1e-4
    assert report["val_bpb"] != plain["val_bpb"]

    verify = subprocess.run(["pgolf", "verify", str(blob), "--data", str(tokenized_dir), "--params", "none.yaml",
                             "--claims", "eval.json", "--report", "verify.json"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    checks = {c["name"]: c for c in read_json(tmp_path / "verify_report.json")["checks"]}
    assert checks["bpb"]["status"] == "PASS", checks["bpb"]
    assert checks["normalised distribution"]["status"] == "PASS"
    assert "n-gram mixture" in checks["normalised distribution"]["detail"]
    assert verify.returncode == 0, verify.stdout + verify.stderr
