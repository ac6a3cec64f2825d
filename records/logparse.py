"""Read training logs: ours (logs/<RUN_ID>.txt from train_gpt.py) and the public record logs.

The records tools (package.py, significance.py, compare.py) all read logs through `parse_log`, so the
line formats are spelled once, here. Our logs start with the script's source between a
`==== source: ... ====` header and `==== end of source ====`, then one `setting NAME=value` line per
setting; public record logs lack both but share the `step:` and `final_*` lines. Unknown lines are
ignored and numbers may carry any number of decimals.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

# The limits of the 10-minute track (decimal bytes, milliseconds).
MAX_TOTAL_BYTES = 16_000_000
MAX_TRAIN_TIME_MS = 600_000
MAX_EVAL_TIME_MS = 600_000

# The submission score of our script: int6 round trip, sliding-window evaluation, 8 decimals.
SCORE_LINE = "final_int6_sliding_window_exact"

SOURCE_HEADER = re.compile(rb"^==== source: (?P<name>\S+) bytes:(?P<size>\d+) sha256:(?P<sha>[0-9a-f]{64}) ====\r?\n", re.M)
SOURCE_END = b"==== end of source ===="

STEP_LINE = re.compile(r"^step:(?P<step>\d+)/(?P<total>\d+)\s+(?P<rest>.*)$")
# `<name> val_loss:X val_bpb:Y ...`: final_*, post_average_prequant, legal_ttt, "DIAGNOSTIC post_ema", ...
EVAL_LINE = re.compile(r"^(?P<name>[A-Za-z_][\w ]*?)\s+val_loss:(?P<loss>\S+)\s+val_bpb:(?P<bpb>\S+)(?P<rest>.*)$")
KEY_VALUE = re.compile(r"(\w+):(\S+)")
SETTING_LINE = re.compile(r"^setting (?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")
MODEL_BYTES_LINE = re.compile(r"^Serialized model (?P<format>\S+): (?P<n>\d+) bytes")
CODE_BYTES_LINE = re.compile(r"^Code size: (?P<n>\d+) bytes")
TOTAL_BYTES_LINE = re.compile(r"^Total submission size (?P<format>\S+): (?P<n>\d+) bytes")
WORLD_SIZE_LINE = re.compile(r"^world_size:(?P<n>\d+)")
GPU_LINE = re.compile(r"^gpu (?P<index>\d+): (?P<name>.+?)\s*$")
PUBLIC_SEED_LINE = re.compile(r"^seed:(?P<seed>\d+)\s*$")


class RecordsError(Exception):
    """A problem with the input files or a rule they break: the tools print it as one line and exit non-zero."""


@dataclass
class TrainPoint:
    step: int
    train_loss: float
    train_time_ms: float | None


@dataclass
class ValPoint:
    step: int
    val_loss: float
    val_bpb: float
    train_time_ms: float | None


@dataclass
class Eval:
    """One `<name> val_loss:X val_bpb:Y [eval_time:Tms] [stride:S]` line."""
    name: str
    val_loss: float
    val_bpb: float
    eval_time_ms: float | None = None


@dataclass
class RunLog:
    path: Path
    source: bytes | None = None          # the embedded train_gpt.py, checked against its sha256
    source_sha256: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # python, torch, cuda
    gpus: list[str] = field(default_factory=list)
    world_size: int | None = None
    public_seed: int | None = None       # the `seed:N` line of the public record scripts
    train: list[TrainPoint] = field(default_factory=list)
    val: list[ValPoint] = field(default_factory=list)
    last_step: int | None = None         # from the last `step:` line of either kind
    last_train_time_ms: float | None = None
    budget_total_ms: float | None = None  # `training_budget: ... total:` = training + export quantisation (GPTQ)
    last_step_avg_ms: float | None = None
    stopped_early: bool = False
    evals: dict[str, Eval] = field(default_factory=dict)  # in log order; a repeated name keeps the last
    model_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None
    size_format: str | None = None       # e.g. int6+zstd, from the `Total submission size` line

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ours(self) -> bool:
        return self.source is not None

    @property
    def training_ms(self) -> float | None:
        """Time charged to the 600 s training budget: the training loop plus, in our logs, the export
        quantisation that uses training data (GPTQ calibration); the last `step:` line otherwise."""
        return self.budget_total_ms if self.budget_total_ms is not None else self.last_train_time_ms

    @property
    def seed(self) -> int | None:
        if "SEED" in self.settings:
            return int(self.settings["SEED"])
        return self.public_seed

    def score(self) -> Eval | None:
        """Our logs: the `final_int6_sliding_window_exact` line. Public logs: their last `*_exact` line
        (the record scripts print their submission score last, e.g. legal_ttt_exact after the sliding window)."""
        if self.ours:
            return self.evals.get(SCORE_LINE)
        exact = [e for e in self.evals.values() if e.name.endswith("_exact")]
        return exact[-1] if exact else None

    def hardware(self) -> str | None:
        """`8xNVIDIA H100 80GB HBM3` when every GPU has the same name."""
        if not self.gpus:
            return None
        names = sorted(set(self.gpus))
        return f"{len(self.gpus)}x{names[0]}" if len(names) == 1 else " + ".join(f"{self.gpus.count(n)}x{n}" for n in names)


def number(text: str) -> float | None:
    """`599912ms` -> 599912.0; None if it is not a number."""
    text = text.rstrip(",;")
    if text.endswith("ms"):
        text = text[:-2]
    try:
        return float(text)
    except ValueError:
        return None


def fmt(value, spec: str, scale: float = 1.0) -> str:
    """A logged figure for a table; "-" where the log lacks it."""
    return "-" if value is None else format(value if scale == 1 else value * scale, spec)


def split_source(data: bytes, path: Path) -> tuple[bytes | None, str | None, bytes]:
    """Cut the embedded source out of a log. Return (source, sha256, the log without the source block)."""
    header = SOURCE_HEADER.search(data)
    if header is None:
        return None, None, data
    size, sha = int(header["size"]), header["sha"].decode()
    start = header.end()
    source = data[start:start + size]
    if len(source) != size:
        raise RecordsError(f"{path}: the source block is cut short ({len(source)} of {size} bytes)")
    if hashlib.sha256(source).hexdigest() != sha:
        raise RecordsError(f"{path}: the embedded source does not match the sha256 in its header")
    rest = data[start + size:]
    if not rest.startswith(SOURCE_END) and rest.startswith(b"\n"):
        rest = rest[1:]  # the newline that puts the end marker on its own line after a source without one
    if not rest.startswith(SOURCE_END):
        raise RecordsError(f"{path}: the {size}-byte source block is not followed by '{SOURCE_END.decode()}'")
    return source, sha, data[:header.start()] + rest[len(SOURCE_END):]


def parse_log(path) -> RunLog:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecordsError(f"{path}: cannot read ({e.strerror})") from None
    source, sha, rest = split_source(data, path)
    run = RunLog(path=path, source=source, source_sha256=sha)
    for line in rest.decode("utf-8", errors="replace").splitlines():
        read_line(run, line.strip())
    return run


def read_line(run: RunLog, line: str) -> None:
    if m := STEP_LINE.match(line):
        read_step_line(run, int(m["step"]), m["rest"])
    elif line.startswith("stopping_early:"):
        run.stopped_early = True
    elif line.startswith("training_budget:"):
        run.budget_total_ms = number(dict(KEY_VALUE.findall(line)).get("total", ""))
    elif m := EVAL_LINE.match(line):
        loss, bpb = number(m["loss"]), number(m["bpb"])
        if loss is not None and bpb is not None:
            extra = dict(KEY_VALUE.findall(m["rest"]))
            name = m["name"].strip()
            run.evals.pop(name, None)  # re-insert so that dict order is the order of the last occurrences
            run.evals[name] = Eval(name, loss, bpb, number(extra["eval_time"]) if "eval_time" in extra else None)
    elif m := SETTING_LINE.match(line):
        run.settings[m["name"]] = m["value"]
    elif line.startswith("versions "):
        run.versions.update(KEY_VALUE.findall(line))
    elif m := GPU_LINE.match(line):
        run.gpus.append(m["name"])
    elif m := WORLD_SIZE_LINE.match(line):
        run.world_size = int(m["n"])
    elif m := MODEL_BYTES_LINE.match(line):
        run.model_bytes = int(m["n"])
    elif m := CODE_BYTES_LINE.match(line):
        run.code_bytes = int(m["n"])
    elif m := TOTAL_BYTES_LINE.match(line):
        run.total_bytes, run.size_format = int(m["n"]), m["format"]
    elif m := PUBLIC_SEED_LINE.match(line):
        run.public_seed = int(m["seed"])


def read_step_line(run: RunLog, step: int, rest: str) -> None:
    values = {k: number(v) for k, v in KEY_VALUE.findall(rest)}
    train_time, step_avg = values.get("train_time"), values.get("step_avg")
    if values.get("val_loss") is not None and values.get("val_bpb") is not None:
        run.val.append(ValPoint(step, values["val_loss"], values["val_bpb"], train_time))
    elif values.get("train_loss") is not None:
        run.train.append(TrainPoint(step, values["train_loss"], train_time))
    else:
        return
    run.last_step, run.last_train_time_ms, run.last_step_avg_ms = step, train_time, step_avg


def parse_logs(paths) -> list[RunLog]:
    return [parse_log(p) for p in paths]
