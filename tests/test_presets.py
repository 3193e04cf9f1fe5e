"""Presets: every section of every preset is a valid config, and reaches the stage that reads it."""

from dataclasses import replace

import pytest
import torch

from pgolf.config.build import build
from pgolf.config.presets import PRESETS
from pgolf.config.resolve import STAGE_SECTIONS, resolve
from pgolf.config.sections import SECTIONS, TTT_MODES, EvalConfig
from pgolf.errors import PgolfError


def preset_params(name: str) -> dict:
    """Every section of `name` as the stages resolve it (no params.yaml)."""
    out = {}
    for stage, sections in STAGE_SECTIONS.items():
        resolved = resolve(stage, None, {"preset": name})
        out.update({s: resolved.sections[s] for s in sections})
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_section_is_a_valid_config(name):
    from pgolf.nn.model import GPT

    assert set(PRESETS[name]) <= set(SECTIONS)
    cfgs = preset_params(name)
    assert set(cfgs) == set(SECTIONS)
    for section, values in PRESETS[name].items():  # each value really arrives in its stage's config
        for key, value in values.items():
            assert getattr(cfgs[section], key) == value, (section, key)
    model = replace(cfgs["model"], vocab_size=cfgs["tokenize"].vocab_size)
    with torch.device("meta"):  # shapes only: the init's orthogonalisations would take seconds on CPU
        assert sum(p.numel() for p in GPT(model).parameters()) > 0


def test_record_preset_has_the_records_dimensions():
    from pgolf.nn.model import GPT

    params = resolve("train", None, {"preset": "record"})
    with torch.device("meta"):
        model = GPT(replace(params.model, vocab_size=8192))
    # The record's log says 35,945,671; it also allocates parallel-lane lambdas (4 + 2 per layer) for
    # layers 0–7, which never run in parallel: 8 × 6 = 48 parameters that pgolf does not create.
    assert sum(p.numel() for p in model.parameters()) == 35_945_671 - 48
    assert model.looped_order == (0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10)
    train = params.train
    assert train.train_batch_tokens // (train.grad_accum_steps // 8) == 786_432  # one micro-step per GPU on 8


def test_every_ttt_mode_runs_and_the_records_settings_are_its_phased_lora():
    from pgolf.ttt.modes import MODES

    assert set(MODES) == set(TTT_MODES)  # no mode a preset can name is left without an implementation
    cfg = resolve("ttt-eval", None, {"preset": "record"}).ttt_eval
    assert (cfg.ttt, cfg.ttt_lora_rank, cfg.ttt_prefix_docs, cfg.ttt_phases, cfg.ttt_global_lr) == \
        ("phased_lora", 80, 2500, 3, 1e-3)
    with pytest.raises(PgolfError, match="ttt='slot' must be one of none, score_first, lora, phased_lora"):
        build(EvalConfig, [({"ttt": "slot"}, "params.yaml: ttt_eval")], "ttt_eval")
