"""What a challenge submission claims, read from the files it ships: training logs and submission.json.

Why: reviewers check submissions by reading these files by hand (a score line, the token count the
loader printed, `caseops_enabled`, the total size) and doing the arithmetic; `verify` does the same.
Logs are parsed as text, line by line, with the patterns below (nothing in them is executed); JSON is
parsed size- and depth-bounded. A log yields one run; several logs (seeds) a mean and a sample std; a
submission.json its stated mean and, per seed, its `seed_results`.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from pgolf.errors import PgolfError
from pgolf.formats.files import loads_bounded

MAX_LOG_BYTES = 64 * 2**20  # a record's log is ~100 KB
MAX_JSON_BYTES = 2**20

_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def _score_line(name: str, loss_optional: bool = False) -> re.Pattern:
    """`NAME val_loss:X val_bpb:Y` (or `=`), NAME a regex group."""
    loss = rf"(?:val_loss[:=]\s*{_NUM}\s+)" + ("?" if loss_optional else "")
    return re.compile(rf"^({name})\s+{loss}val_bpb[:=]\s*{_NUM}")


# The score lines, best first: a file's claim is the last line of the first kind it holds.
SCORE_LINES = (
    ("TTT score (the record scripts)", _score_line(r"quantized_ttt\w*", loss_optional=True)),
    ("int8 round trip (the baseline script)", _score_line(r"final_\w*roundtrip\w*")),
    ("sliding-window score", _score_line(r"final_\w*sliding\w*|quantized_sliding\w*")),
    ("quantized diagnostic (the record scripts)", _score_line(r"diagnostic quantized")),
)
TOKEN_LINES = (re.compile(r"^val_loader:.*\btokens:\s*([0-9]+)"), re.compile(r"^val_tokens:\s*([0-9]+)\s*$"))
SIZE_LINE = re.compile(r"^Total submission size[^:]*:\s*([0-9]+)\s*bytes")
CASEOPS_LINE = re.compile(r"^\s*caseops_enabled:\s*(True|False)\s*$")


RECORD_EVAL = ("world_size", "grad_accum_steps", "val_batch_tokens", "eval_seq_len")  # its log's names


@dataclass
class Run:
    """One run's claim, with where each number was read (file:line: text)."""

    source: str
    metric: str
    val_bpb: float
    val_loss: float | None = None
    tokens: int | None = None  # targets scored, as the loader printed them
    total_bytes: int | None = None  # artifact + code, as claimed
    caseops: bool | None = None  # the script's caseops_enabled
    decimals: tuple[int, int] = (8, 8)  # printed decimals of val_loss and val_bpb: the arithmetic's precision
    evidence: dict[str, str] = field(default_factory=dict)
    hyperparameters: dict[str, str] = field(default_factory=dict)  # the log's "Hyperparameters:" block, as printed

    def record_eval(self) -> tuple[int, int, int] | None:
        """(ranks, windows per batch, window length) of the record scripts' eval_val when this is one of its
        "diagnostic" scores and the log prints the settings: it scores, on each rank, whole batches of
        val_batch_tokens / (world_size × grad_accum_steps) tokens and drops the rest (its own "TODO: Don't
        truncate this")."""
        h = self.hyperparameters
        try:
            world, accum, batch, seq_len = (int(h[k]) for k in RECORD_EVAL)
        except (KeyError, ValueError):
            return None
        if not self.metric.startswith("diagnostic") or min(world, accum, seq_len) < 1 or batch < world * accum * seq_len:
            return None
        return world, batch // (world * accum) // seq_len, seq_len


@dataclass
class Claims:
    runs: list[Run]
    stated: list[Run] = field(default_factory=list)  # submission.json's own mean (checked against the runs)

    @property
    def val_bpb(self) -> float:
        """The claimed score: submission.json's stated mean, else the mean over the runs."""
        return self.stated[0].val_bpb if self.stated else statistics.fmean(r.val_bpb for r in self.runs)

    def summary(self) -> str:
        values = [r.val_bpb for r in self.runs]
        spread = f", std {statistics.stdev(values):.6f} (sample)" if len(values) > 1 else ""
        return f"{len(values)} run(s), mean val_bpb {statistics.fmean(values):.8f}{spread}"


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


HYPER_LINE = re.compile(r"^  ([A-Za-z_][A-Za-z0-9_]*): (.*)$")


def hyperparameters(lines: list[str]) -> dict[str, str]:
    """The record scripts' "Hyperparameters:" block: two-space-indented `name: value` lines after it."""
    found: dict[str, str] = {}
    for i, line in enumerate(lines):
        if line.strip() == "Hyperparameters:":
            for entry in lines[i + 1:]:
                m = HYPER_LINE.match(entry)
                if not m:
                    break
                found[m.group(1)] = m.group(2).strip()
            break
    return found


def parse_log(text: str, source: str) -> Run:
    """One training log → its run; a PgolfError naming the patterns it looked for if none matched."""
    lines = text.splitlines()
    found: dict[str, tuple[int, re.Match]] = {}

    def last(pattern: re.Pattern) -> tuple[int, re.Match] | None:
        hit = None
        for number, line in enumerate(lines, 1):
            m = pattern.search(line)
            if m:
                hit = (number, m)
        return hit

    for label, pattern in SCORE_LINES:
        hit = last(pattern)
        if hit:
            found["score"] = hit
            break
    else:
        looked = "; ".join(f"{label}: /{p.pattern}/" for label, p in SCORE_LINES)
        raise PgolfError(f"{source}: no score line found; looked for {looked}")
    number, m = found["score"]
    metric, loss, bpb = m.group(1), m.group(2), m.group(3)
    run = Run(source, metric, float(bpb), float(loss) if loss else None,
              decimals=(_decimals(loss) if loss else 0, _decimals(bpb)))
    run.evidence["score"] = f"{source}:{number}: {lines[number - 1].strip()}"
    for pattern in TOKEN_LINES:
        hit = last(pattern)
        if hit:
            run.tokens = int(hit[1].group(1))
            run.evidence["tokens"] = f"{source}:{hit[0]}: {lines[hit[0] - 1].strip()[:160]}"
            break
    hit = last(SIZE_LINE)
    if hit:
        run.total_bytes = int(hit[1].group(1))
        run.evidence["size"] = f"{source}:{hit[0]}: {lines[hit[0] - 1].strip()}"
    run.hyperparameters = hyperparameters(lines)
    hit = last(CASEOPS_LINE)
    if hit:
        run.caseops = hit[1].group(1) == "True"
        run.evidence["caseops"] = f"{source}:{hit[0]}: {lines[hit[0] - 1].strip()}"
    return run


def _number(obj: dict, key: str, source: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PgolfError(f"{source}: '{key}' is {value!r}, not a number")
    return float(value)


def parse_submission(obj: dict, source: str) -> Claims:
    """The challenge's submission.json: the stated mean (with its size) and a run per seed_results entry."""
    bpb = _number(obj, "val_bpb", source)
    if bpb is None or bpb <= 0:
        raise PgolfError(f"{source}: a submission.json needs a positive 'val_bpb'")
    size = _number(obj, "bytes_total", source) or _number(obj, "artifact_bytes_max", source)
    stated = Run(f"{source} (stated mean)", "val_bpb", bpb, _number(obj, "val_loss", source),
                 total_bytes=int(size) if size is not None else None,
                 evidence={"score": f"{source}: val_bpb {bpb}"})
    runs = []
    seeds = obj.get("seed_results") if isinstance(obj.get("seed_results"), dict) else {}
    for seed, result in seeds.items():
        if not isinstance(result, dict) or _number(result, "val_bpb", source) is None:
            raise PgolfError(f"{source}: seed_results[{seed!r}] has no numeric val_bpb")
        seed_size = _number(result, "artifact_bytes", source)
        runs.append(Run(f"{source} seed {seed}", "val_bpb", _number(result, "val_bpb", source),
                        _number(result, "val_loss", source), total_bytes=int(seed_size) if seed_size else None,
                        evidence={"score": f"{source}: seed_results[{seed}]"}))
    return Claims(runs or [stated], [stated])


def is_submission_json(obj: object) -> bool:
    return isinstance(obj, dict) and ("seed_results" in obj or "track" in obj or "bytes_total" in obj)


def read_text_capped(path: Path, max_bytes: int, what: str) -> str:
    if not path.is_file():
        raise PgolfError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PgolfError(f"{path}: {what} larger than {max_bytes:,} bytes; not read")
    return data.decode("utf-8", errors="replace")


def read_claims_json(path: Path, what: str = "claims file", text: str | None = None) -> object:
    """A submitter's JSON (its `text` if already read), size- and depth-bounded."""
    text = read_text_capped(Path(path), MAX_JSON_BYTES, what) if text is None else text
    return loads_bounded(text, str(path), "give pgolf metrics, a submission.json or the logs", MAX_JSON_BYTES)


def load_challenge_claims(paths: list[Path]) -> Claims:
    """Logs and submission.json files → the runs they claim: the logs' when any are given (one run each),
    else submission.json's seed_results; submission.json's stated mean is kept apart, to be checked."""
    logged: list[Run] = []
    listed: list[Run] = []
    stated: list[Run] = []
    for path in paths:
        text = read_text_capped(path, MAX_LOG_BYTES, "claims file")
        if text.lstrip().startswith("{"):
            obj = read_claims_json(path, text=text)
            if not is_submission_json(obj):
                raise PgolfError(f"{path}: not a challenge submission.json (pgolf metrics are a claim of their "
                                 "own: give them alone as --claims)")
            found = parse_submission(obj, str(path))
            stated += found.stated
            listed += found.runs
        else:
            logged.append(parse_log(text, str(path)))
    return Claims(logged or listed, stated)
