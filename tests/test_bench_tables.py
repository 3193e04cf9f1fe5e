"""The benchmark tables' own logic, on CPU: every seed-study row is a valid configuration before any GPU time is
spent on it, the ablation summary computes its deltas against the right base, and the trace summary separates
kernels from labels and host from device time."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from pgolf.config.resolve import resolve

BENCH = Path(__file__).resolve().parents[1] / "bench"
STAGE_OF_ROW = {"train": "train", "quantize": "quantize", "eval": "ttt-eval"}


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


studies = bench_module("seed_studies_summary")


def overrides(row: dict) -> dict:
    if row["overrides"] == "-":
        return {}
    pairs = (kv.split("=", 1) for kv in row["overrides"].replace("BASE_CKPT", "teacher.safetensors").split(";"))
    return {k: v for k, v in pairs}


@pytest.mark.parametrize("row", studies.rows(), ids=lambda r: r["row"])
def test_every_seed_study_row_is_a_valid_configuration(row):
    """What bench/seed_studies.sh passes with --set resolves for the stage it goes to (a refused combination,
    such as S4D layers under XSA, fails here and not after a device call's training)."""
    assert row["stage"] in STAGE_OF_ROW and row["base"] in ("pr2071", "pr398") and row["claim"]
    base_row = {r["row"]: r for r in studies.rows()}[f"{row['base']}_base"]
    inherited = overrides(base_row) if row["stage"] == "train" else {}  # a train row runs on its base's settings
    sets = {"preset": row["base"], **({"ttt": "none"} if row["stage"] == "eval" else {}), **inherited, **overrides(row)}
    params = resolve(STAGE_OF_ROW[row["stage"]], None, sets)
    if row["stage"] == "train" and not row["row"].endswith("_base"):
        base = resolve("train", None, {"preset": row["base"]})
        assert (params.model, params.train) != (base.model, base.train)  # the row changes something
    if row["stage"] == "eval":  # the plain score beside it: the same settings with the mixing off
        resolve("ttt-eval", None, {**sets, "ngram_mix": "none"})


def test_seed_study_rows_are_unique_and_each_base_has_its_base_row():
    rows = studies.rows()
    names = [r["row"] for r in rows]
    assert len(names) == len(set(names))
    for base in {r["base"] for r in rows}:
        assert f"{base}_base" in names


def test_the_ablation_summary_measures_each_row_against_its_own_base():
    results = {
        "pr2071_base_eval_metrics": {"val_bpb": 1.20}, "pr2071_base_pack_metrics": {"bytes": 16_000_000},
        "pr2071_base_train_report": {"steps": 700, "ms_per_step": 300.0, "peak_memory_bytes": 2 ** 33},
        "pr398_base_eval_metrics": {"val_bpb": 1.30}, "pr398_base_pack_metrics": {"bytes": 17_000_000},
        "pr398_base_train_report": {"steps": 400, "ms_per_step": 600.0},
        "kmeans_eval_metrics": {"val_bpb": 1.19}, "kmeans_pack_metrics": {"bytes": 20_000_000},
        "mtp2_eval_metrics": {"val_bpb": 1.35}, "mtp2_pack_metrics": {"bytes": 17_100_000},
        "mtp2_train_report": {"steps": 380, "ms_per_step": 630.0},
        "ctw_eval_metrics": {"val_bpb": 1.10, "val_tokens": 500_000},
        "ctw_plain_eval_metrics": {"val_bpb": 1.21, "val_tokens": 500_000},
        "monarch4_eval_metrics": {"val_bpb": 1.5},  # no pack metrics: the row did not finish
        "reptile_eval_metrics": {"val_bpb": 1.34}, "reptile_pack_metrics": {"bytes": 16_900_000},
        "reptile_train_report": {"steps": 550, "ms_per_step": 430.0, "reptile": {"from_step": 330, "steps": 220}},
    }
    table = {e["row"]: e for e in studies.table(results)}
    assert table["kmeans"]["delta_bpb"] == pytest.approx(-0.01) and table["kmeans"]["delta_bytes"] == 4_000_000
    assert table["mtp2"]["delta_bpb"] == pytest.approx(0.05) and table["mtp2"]["ms_per_step_ratio"] == 1.05
    assert table["ctw"]["delta_bpb"] == pytest.approx(-0.11)  # against the base blob on the same tokens
    assert table["monarch4"]["measured"] is None and "delta_bpb" not in table["monarch4"]
    text = studies.markdown(list(table.values()))
    assert "| kmeans | PR #212 | pr2071 |" in text and "monarch4" in text.split("Not run yet:")[1]
    # Reptile's steps are of two kinds: the table says how many were Reptile's (their ms/step is a mix)
    assert table["reptile"]["measured"]["reptile_steps"] == 220 and "| 550 (220 Reptile) | 430.0 |" in text
    assert "Reptile" not in text.split("| mtp2 |")[1].split("\n")[0]


def test_the_trace_summary_counts_kernels_not_labels_and_host_time_per_micro_batch(tmp_path):
    """Two micro-batches: their labels' host time, their compiled forward and backward, and the device's kernels
    (overlapping ones counted once, a label's device span not at all, NCCL apart from compute)."""
    trace = bench_module("trace_summary")

    def x(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}
    events = [
        x("user_annotation", "pgolf.micro_batch", 0, 3000), x("user_annotation", "pgolf.micro_batch", 3000, 5000),
        x("gpu_user_annotation", "pgolf.micro_batch", 0, 8000),  # a label's device span: not work
        x("cpu_op", "CompiledFunction", 10, 100), x("cpu_op", "CompiledFunction", 3010, 100),
        x("cpu_op", "CompiledFunctionBackward", 200, 400), x("cpu_op", "CompiledFunctionBackward", 3200, 400),
        x("kernel", "gemm", 1000, 1000), x("kernel", "gemm", 1500, 1000),  # overlapping: 1.5 ms busy
        x("kernel", "ncclDevKernel_AllReduce", 6000, 500), x("kernel", "rmsnorm", 7000, 1000),
        x("cpu_op", "pgolf::varlen_attention", 20, 50), x("cpu_op", "pgolf::varlen_attention", 3020, 70),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = trace.summarize(path, steps=1)
    assert s["kernels_busy_ms_per_step"] == 3.0 and s["nccl_busy_ms_per_step"] == 0.5
    assert s["device_span_ms_per_step"] == 7.0 and s["device_idle_ms_per_step"] == 4.0
    assert s["largest_gaps_ms"] == [3.5, 0.5]
    assert s["host_ms_per_micro_batch"] == 4.0 and s["compiled_graphs_per_micro_batch"] == 1.0
    assert s["host_ms_compiled_forward_per_micro_batch"] == 0.1 and s["host_ms_compiled_backward_per_micro_batch"] == 0.4
    assert s["compute_kernels_ms_per_micro_batch"] == pytest.approx(1.25, abs=0.06)  # the NCCL kernel left out
    assert s["kernel_ms_per_step_by_kind"] == {"matmul": 2.0, "other": 1.0, "nccl": 0.5}  # summed, not a union
    assert s["top_kernels"][0] == {"kernel": "gemm", "ms_per_step": 2.0, "calls_per_step": 2.0}
    assert [k["kernel"] for k in s["top_kernels"]] == ["gemm", "rmsnorm", "ncclDevKernel_AllReduce"]
    assert s["host_us_per_pgolf_op_call"] == {"pgolf::varlen_attention": {"calls": 2, "host_us_per_call": 60.0}}
    assert trace.top_kernels([x("kernel", "triton_poi_fused_add_7", 0, 1000), x("kernel", "triton_poi_fused_add_12", 0, 3000)],
                             steps=2) == [{"kernel": "triton_poi_fused_add", "ms_per_step": 2.0, "calls_per_step": 1.0}]
    assert [trace.kind(n) for n in ("triton_tem_fused_flex_attention_backward_10", "triton_poi_fused_leaky_relu_7",
                                     "nvjet_sm90_tst_256x128", "void cublasLt::splitKreduce_kernel<32>", "_ce_fwd_kernel",
                                     "flash_fwd_kernel")] == ["attention", "compiled_elementwise", "matmul", "matmul",
                                                              "cross_entropy", "attention"]


def test_rows_of_several_groups_are_measured_against_their_own_groups_base():
    """Each held machine trains its own base runs: a row's delta is against its group's base, never another's."""
    def group(base_bpb: float, base_bytes: int, **rows: tuple[float, int]) -> dict:
        out = {"pr2071_base_eval_metrics": {"val_bpb": base_bpb}, "pr2071_base_pack_metrics": {"bytes": base_bytes}}
        for name, (bpb, size) in rows.items():
            out |= {f"{name}_eval_metrics": {"val_bpb": bpb}, f"{name}_pack_metrics": {"bytes": size}}
        return out

    first = group(1.20, 16_000_000, kmeans=(1.19, 20_000_000), prune5=(1.25, 15_000_000))
    second = group(1.30, 17_000_000, prune5=(1.31, 16_900_000))
    entries = studies.grouped_table([("first", first), ("second", second)])
    bases = [(e["group"], e["measured"]["val_bpb"]) for e in entries if e["row"] == "pr2071_base"]
    assert bases == [("first", 1.20), ("second", 1.30)]
    table = {e["row"]: e for e in entries if e["row"] != "pr2071_base"}
    assert table["kmeans"]["group"] == "first" and table["kmeans"]["delta_bpb"] == pytest.approx(-0.01)
    assert table["prune5"]["group"] == "second" and table["prune5"]["delta_bpb"] == pytest.approx(0.01)
    assert table["prune5"]["delta_bytes"] == -100_000 and table["mtp2"]["measured"] is None
    assert "| kmeans | PR #212 | pr2071 |" in studies.markdown(entries)


def test_a_train_row_on_another_schedule_than_its_base_is_kept_out_of_the_deltas():
    """A row that trained without its base's schedule_scale (three pr398 rows on 2026-11-30) is listed as not
    comparable, with its score, and is given no delta; a row on the base's schedule is measured as usual."""
    scaled = {"steps": 409, "ms_per_step": 588.0, "schedule": {"factor": 0.057}}
    results = {
        "pr398_base_eval_metrics": {"val_bpb": 1.30}, "pr398_base_pack_metrics": {"bytes": 17_000_000},
        "pr398_base_train_report": scaled,
        "mtp2_eval_metrics": {"val_bpb": 1.86}, "mtp2_pack_metrics": {"bytes": 17_500_000},
        "mtp2_train_report": {"steps": 393, "ms_per_step": 611.0, "schedule": None},
        "canon3_eval_metrics": {"val_bpb": 1.31}, "canon3_pack_metrics": {"bytes": 17_100_000},
        "canon3_train_report": scaled,
    }
    table = {e["row"]: e for e in studies.table(results)}
    assert table["mtp2"]["measured"] is None and "delta_bpb" not in table["mtp2"]
    assert table["mtp2"]["not_comparable"] == "trained without its base's schedule_scale"
    assert table["canon3"]["delta_bpb"] == pytest.approx(0.01) and "not_comparable" not in table["canon3"]
    text = studies.markdown(list(table.values()))
    assert "mtp2 (trained without its base's schedule_scale, 1.8600)" in text
    assert "mtp2" not in text.split("Not run yet:")[1].split("\n")[0]
    # a later group that measured the row properly replaces the excluded run; one that did not, does not hide it
    later = {k: v for k, v in results.items() if not k.startswith("mtp2")}
    later |= {"mtp2_eval_metrics": {"val_bpb": 1.33}, "mtp2_pack_metrics": {"bytes": 17_200_000},
              "mtp2_train_report": scaled}
    merged = {e["row"]: e for e in studies.grouped_table([("a", results), ("b", later)]) if e["row"] == "mtp2"}
    assert merged["mtp2"]["delta_bpb"] == pytest.approx(0.03)
    merged = {e["row"]: e for e in studies.grouped_table([("a", results), ("b", {})]) if e["row"] == "mtp2"}
    assert merged["mtp2"]["not_comparable"]


def test_the_communication_volume_counts_the_real_parameters_in_their_training_dtypes():
    """The gradient all-reduce carries every parameter (the embedding in bf16, the rest fp32 masters), Muon's
    all-reduce the block matrices in bf16; a ring moves 2(N−1)/N of a payload, nothing on one GPU."""
    comm = bench_module("comm_volume")
    from pgolf.nn.model import GPT
    from pgolf.nn.optim import grouped_parameters

    p = resolve("train", None, {"preset": "tiny"})
    model = GPT(type(p.model)(**{**p.model.__dict__, "vocab_size": 1024}))
    embed = model.tok_emb.weight.numel()
    matrices = sum(t.numel() for t in grouped_parameters(model)["matrix"])
    b = comm.step_bytes("tiny", vocab=1024)
    assert b["params"] == sum(t.numel() for t in model.parameters())
    assert b["gradient_allreduce_bytes"] == 4 * b["params"] - 2 * embed
    assert b["muon_update_allreduce_bytes"] == 2 * matrices > 0
    assert comm.ring_ms(10**9, 1, 100.0) == 0.0
    assert comm.ring_ms(10**9, 2, 100.0) == pytest.approx(10.0) and comm.ring_ms(10**9, 8, 100.0) == pytest.approx(17.5)
    row = comm.projection("tiny", [8], 100.0, one_gpu_ms=800.0)["worlds"][8]
    assert row["projected_ms_per_step"] == pytest.approx(100.0 + row["exposed_ms"], abs=0.05)


def test_the_speed_summary_takes_a_jobs_preset_from_its_job_file_not_its_name(tmp_path, monkeypatch):
    """A side-by-side job may have any name (ab_fast_gpu0): its MFU counts the FLOPs of the preset the job
    trained, which speed_sidebyside.sh writes beside it; a job without that file (older results) falls back to
    the head of its name."""
    monkeypatch.syspath_prepend(str(BENCH))
    speed = bench_module("speed_summary")
    from summarize import PEAK, flops_per_token

    elapsed = {1: 700.0, 10: 7000.0, 20: 14000.0, 30: 21000.0, 40: 31000.0, 50: 41000.0, 60: 51000.0}
    for name in ("ab_fast_gpu0", "pr2071_plain"):
        (tmp_path / f"{name}_loss.csv").write_text("step,train_loss,lr_scale,elapsed_ms,tokens\n" + "".join(
            f"{s},4.0,1.0,{ms},{s * 196608}\n" for s, ms in elapsed.items()))
        (tmp_path / f"speed_pgolf_{name}_report.json").write_text(json.dumps(
            {"world_size": 1, "looping_enabled_at_step": 30, "peak_memory_bytes": 2**30}))

    def job(preset: str) -> dict:
        (tmp_path / "speed_job_ab_fast_gpu0.json").write_text(json.dumps({"preset": preset, "sets": "", "gpus": "0"}))
        return speed.summarize_run(tmp_path / "speed_pgolf_ab_fast_gpu0_report.json")

    named, fallback = job("pr2071"), speed.summarize_run(tmp_path / "speed_pgolf_pr2071_plain_report.json")
    assert named["preset"] == fallback["preset"] == "pr2071"
    assert named["ms_per_step_looped"] == pytest.approx(1000.0)  # steps 40..60: the switch's first interval skipped
    assert named["mfu_looped"] == pytest.approx(
        flops_per_token(speed.model_config("pr2071"), True, 2048) * 196608 / (1000.0 / 1000) / PEAK)
    assert named["mfu"] == fallback["mfu"] != job("record")["mfu"]
