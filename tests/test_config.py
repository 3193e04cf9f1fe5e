"""The one config resolver: parsing, coercion, precedence, every spelling of a key, and errors that blame the
right source; and the full params.yaml that DVC users drive."""

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from pgolf.config.build import build, coerce
from pgolf.config.params_file import OVERRIDE_MARK, render
from pgolf.config.presets import PRESETS
from pgolf.config.resolve import STAGE_SECTIONS, load_params, parse_sets, resolve
from pgolf.config.sections import SECTIONS, QuantizeConfig, TrainConfig
from pgolf.errors import PgolfError

REPO = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_parse_sets_reads_values_as_yaml_and_keeps_dotted_keys():
    assert parse_sets(["iterations=5", "train.matrix_lr=0.02", "codec=zstd", "compile=false", "budget_bits=4,5"]) == {
        "iterations": 5, "train.matrix_lr": 0.02, "codec": "zstd", "compile": False, "budget_bits": "4,5"}
    with pytest.raises(PgolfError, match="expected KEY=VALUE"):
        parse_sets(["iterations"])


def test_coercion_accepts_shell_and_yaml_spellings_and_refuses_the_rest():
    assert coerce("1_000", int, "k") == 1000 and coerce(4.0, int, "k") == 4
    assert coerce("1e-3", float, "k") == 0.001 and coerce(3, float, "k") == 3.0
    assert coerce("True", bool, "k") is True and coerce(7, str, "k") == "7"
    for value, typ in (("abc", int), (4.5, int), (True, int), ("yes please", bool), (None, str)):
        with pytest.raises(PgolfError, match="where: expected"):
            coerce(value, typ, "where")


def test_precedence_defaults_then_preset_then_params_then_command_line(tmp_path):
    base = resolve("train", None)
    assert base.train.iterations == TrainConfig.iterations and base.sources["train"] == {}
    tiny = resolve("train", None, ["preset=tiny"])
    assert tiny.train.iterations == PRESETS["tiny"]["train"]["iterations"]
    params = write_params(tmp_path, {"preset": "tiny", "train": {"iterations": 77, "seed": 3}})
    from_file = resolve("train", params)
    assert (from_file.train.iterations, from_file.train.seed) == (77, 3)
    assert from_file.train.train_seq_len == PRESETS["tiny"]["train"]["train_seq_len"]  # the rest from the preset
    cli = resolve("train", params, ["iterations=5"])
    assert (cli.train.iterations, cli.train.seed) == (5, 3)
    assert cli.sources["train"]["iterations"] == "command line"
    assert cli.sources["train"]["seed"] == str(params)
    assert cli.sources["train"]["train_seq_len"] == "preset 'tiny'"


def test_every_spelling_reaches_its_key(tmp_path):
    params = write_params(tmp_path, {"preset": "tiny"})
    # the dotted spelling of the stage's own section (once dropped silently), plain keys, other sections
    assert resolve("train", params, ["train.iterations=5"]).train.iterations == 5
    assert resolve("train", params, ["iterations=6"]).train.iterations == 6
    assert resolve("train", params, ["model.num_layers=3"]).model.num_layers == 3
    assert resolve("train", params, ["num_layers=2"]).model.num_layers == 2
    assert resolve("quantize", params, ["quantize.bits=5"]).quantize.bits == 5
    assert resolve("quantize", params, ["codec=zstd"]).pack.codec == "zstd"  # quantize reads pack's section too
    assert resolve("train", params, {"train.iterations": 9}).train.iterations == 9  # named options
    assert resolve("train", params, named={"train.iterations": None}).train.iterations == 200  # not given


def test_unknown_keys_and_sections_fail_naming_them_and_the_valid_ones(tmp_path):
    with pytest.raises(PgolfError, match=r"--set iteratons: unknown key for pgolf train; known keys \(train: .*iterations"):
        resolve("train", None, ["iteratons=5"])
    with pytest.raises(PgolfError, match="unknown key 'iteratons' in section train; known: .*iterations"):
        resolve("train", None, ["train.iteratons=5"])
    with pytest.raises(PgolfError, match=r"pgolf train does not read section 'quantize' \(it reads train, model\)"):
        resolve("train", None, ["quantize.bits=5"])
    with pytest.raises(PgolfError, match="unknown section 'trian'"):
        resolve("train", None, ["trian.iterations=5"])
    bad_key = write_params(tmp_path, {"train": {"iteratons": 5}})
    with pytest.raises(PgolfError, match="unknown key train.iteratons; train has: .*iterations"):
        resolve("pack", bad_key)  # a typo anywhere in params.yaml is refused, whichever stage runs
    with pytest.raises(PgolfError, match="unknown section 'trian'"):
        resolve("pack", write_params(tmp_path, {"trian": {}}))
    with pytest.raises(PgolfError, match="section 'train' must be a mapping"):
        resolve("pack", write_params(tmp_path, {"train": [1, 2]}))
    with pytest.raises(PgolfError, match="unknown preset 'recrod'"):
        resolve("train", None, ["preset=recrod"])


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path):
    with pytest.raises(PgolfError, match=r"^command line: train.warmup_steps=-3 must be >= 0"):
        resolve("train", None, ["warmup_steps=-3"])
    params = write_params(tmp_path, {"train": {"warmup_steps": -3}})
    with pytest.raises(PgolfError, match=rf"^{re.escape(str(params))}: train.warmup_steps=-3 must be >= 0"):
        resolve("train", params)
    with pytest.raises(PgolfError, match=r"command line: quantize.bits=9 must be in \[2, 8\]"):
        resolve("quantize", None, ["bits=9"])
    with pytest.raises(PgolfError, match=r"chunk_bytes=100 must be 0 \(off\) or >= 65536"):
        resolve("pack", None, ["chunk_bytes=100"])
    with pytest.raises(PgolfError, match="ema_decay and swa_every"):
        resolve("train", None, ["ema_decay=0.9", "swa_every=5"])


def test_every_numeric_key_has_a_declared_range():
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            rule = f.metadata.get("rule", {})
            assert f.metadata.get("doc"), (name, f.name)  # the params.yaml comment
            if f.type in ("int", "float") and f.name != "qk_gain_init":  # any finite gain is valid
                assert rule, f"{name}.{f.name} has no range"


def test_cross_section_needs_are_resolved_for_the_stage(tmp_path):
    params = write_params(tmp_path, {"pack": {"codec": "zstd", "container": "single", "chunk_bytes": 1 << 20}, "ttt_eval": {"stride": 64}})
    quantize = resolve("quantize", params)
    assert (quantize.pack.codec, quantize.pack.chunk_bytes) == ("zstd", 1 << 20)
    verify = resolve("verify", params, ["val_tokens=4096", "tolerance=0.01"])
    assert verify.ttt_eval.stride == 64 and verify.verify.tolerance == 0.01
    assert verify.from_command_line("ttt_eval") == {"val_tokens": 4096}
    assert set(STAGE_SECTIONS) == {"tokenize", "train", "calibrate", "quantize", "pack", "ttt-eval", "verify"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_full_params_file_of_a_preset_resolves_to_the_preset(tmp_path, preset):
    path = tmp_path / "params.yaml"
    path.write_text(render(preset))
    data = load_params(path)
    assert "preset" not in data  # every key is listed, so a preset would fill nothing
    for section, cls in SECTIONS.items():
        assert set(data[section]) == {f.name for f in fields(cls)}, section
    for stage in STAGE_SECTIONS:
        assert resolve(stage, path).sections == resolve(stage, None, {"preset": preset}).sections
    with pytest.raises(PgolfError, match="preset 'record' has no effect"):
        resolve("train", path, ["preset=record"])


def test_overrides_are_marked_and_a_dvc_style_edit_reaches_the_stage(tmp_path):
    text = render("tiny", ["tokenize.val_docs=2", "quantize.bits=6"])
    marked = [line for line in text.splitlines() if OVERRIDE_MARK in line and not line.startswith("#")]
    assert [line.split(":")[0].strip() for line in marked] == ["val_docs", "bits"]
    assert "tiny: 50000" in marked[0]
    path = tmp_path / "params.yaml"
    path.write_text(text)
    data = yaml.safe_load(text)
    data["train"]["iterations"] = 5  # what `dvc exp run -S train.iterations=5` does to the file
    path.write_text(yaml.safe_dump(data))
    assert resolve("train", path).train.iterations == 5
    assert resolve("quantize", path).quantize.bits == 6
    with pytest.raises(PgolfError, match="name the section"):
        render("tiny", ["val_docs=2"])


def test_the_repository_params_file_lists_every_key(tmp_path):
    """So that `dvc exp run -S section.key=value` works for every key. Read from the commit, never the working
    tree, where a user's experiments may have edited it."""
    import subprocess

    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip("not a git checkout")
    (tmp_path / "params.yaml").write_text(shown.stdout)
    data = load_params(tmp_path / "params.yaml")
    for section, cls in SECTIONS.items():
        assert set(data[section]) == {f.name for f in fields(cls)}, section


def test_config_errors_from_files_validate_like_params():
    cfg, sources = build(QuantizeConfig, [({"bits": "6"}, "a.json")], "quantize")
    assert cfg.bits == 6 and sources == {"bits": "a.json"}
    with pytest.raises(PgolfError, match="a.json: quantize.budget_bits='4,9' must list widths in 2..8"):
        build(QuantizeConfig, [({"budget_bits": "4,9"}, "a.json")], "quantize")
