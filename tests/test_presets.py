"""Presets: every section of every preset is a valid config, and the precedence rules hold."""

from dataclasses import replace

import pytest
import torch

from stages.artifacts import PgolfError
from stages.config import (CalibrateConfig, EvalConfig, ModelConfig, PackConfig, QuantizeConfig, TokenizeConfig,
                           TrainConfig, stage_config)
from stages.presets import PRESETS

SECTIONS = {"tokenize": TokenizeConfig, "model": ModelConfig, "train": TrainConfig, "calibrate": CalibrateConfig,
            "quantize": QuantizeConfig, "pack": PackConfig, "ttt_eval": EvalConfig}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_section_is_a_valid_config(name):
    from stages.model import GPT
    from stages.quant import validate_config
    from stages.train import validate_train_config

    assert set(PRESETS[name]) <= set(SECTIONS)
    cfgs = {section: stage_config(cls, section, {"preset": name}, {}) for section, cls in SECTIONS.items()}
    validate_train_config(cfgs["train"])
    validate_config(cfgs["quantize"])
    for section, values in PRESETS[name].items():  # each value really arrives in its stage's config
        for key, value in values.items():
            assert getattr(cfgs[section], key) == value, (section, key)
    model = replace(cfgs["model"], vocab_size=cfgs["tokenize"].vocab_size)
    with torch.device("meta"):  # shapes only: the init's orthogonalisations would take seconds on CPU
        assert sum(p.numel() for p in GPT(model).parameters()) > 0


def test_record_preset_has_the_records_dimensions():
    from stages.model import GPT

    cfg = replace(stage_config(ModelConfig, "model", {"preset": "record"}, {}), vocab_size=8192)
    with torch.device("meta"):
        model = GPT(cfg)
    # The record's log says 35,945,671; it also allocates parallel-lane lambdas (4 + 2 per layer) for
    # layers 0–7, which never run in parallel: 8 × 6 = 48 parameters that pgolf does not create.
    assert sum(p.numel() for p in model.parameters()) == 35_945_671 - 48
    assert model.looped_order == (0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10)
    train = stage_config(TrainConfig, "train", {"preset": "record"}, {})
    assert train.train_batch_tokens // (train.grad_accum_steps // 8) == 786_432  # one micro-step per GPU on 8


def test_params_yaml_overrides_the_preset_and_set_overrides_both():
    params = {"preset": "record", "quantize": {"bits": 5}, "train": {"seed": 7}}
    q = stage_config(QuantizeConfig, "quantize", params, {})
    assert q.bits == 5 and q.method == "gptq" and q.embed_bits == 7  # the rest still from the preset
    assert stage_config(QuantizeConfig, "quantize", params, {"bits": 4}).bits == 4
    assert stage_config(TrainConfig, "train", params, {"preset": "baseline"}).matrix_lr == 0.04
    with pytest.raises(PgolfError, match="unknown preset 'recrod'"):
        stage_config(TrainConfig, "train", {"preset": "recrod"}, {})


def test_ttt_settings_are_recorded_but_refused_until_implemented(tmp_path):
    from stages.ttt_eval import check_ttt

    cfg = stage_config(EvalConfig, "ttt_eval", {"preset": "record"}, {})
    assert cfg.ttt == "phased_lora" and cfg.ttt_lora_rank == 80
    with pytest.raises(PgolfError, match="not implemented.*--set ttt=none"):
        check_ttt(cfg)
    check_ttt(replace(cfg, ttt="none"))
    with pytest.raises(PgolfError, match="choose one of"):
        check_ttt(replace(cfg, ttt="slot"))
