"""Read training logs: ours (logs/<RUN_ID>.txt from train_gpt.py) and the public record logs.

The records tools (package.py, significance.py, compare.py) all read logs through `parse_log`, so the
line formats are spelled once, here. Our logs start with the script's source between a
`==== source: ... ====` header and `==== end of source ====`, then one `setting NAME=value` line per
setting; public record logs lack both. The March 2026 records share our `step:` and `final_*` lines;
the later ones (e.g. 2026-04-27) print a `Hyperparameters:` block (`  seed: 42`), step lines without
`step:` (`4500/20000 train_loss: 2.2771 train_time: 9.0m`), `diagnostic ...` evaluations and a
`quantized_ttt_phased` score. Unknown lines are ignored and numbers may carry any number of decimals.

`RunLog.final_score()` is the only way a tool takes a score: it refuses a failed run (an `error:` line,
a log that ends before its final score lines, a score that is not a finite number).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# The limits of the 10-minute track (decimal bytes, milliseconds).
MAX_TOTAL_BYTES = 16_000_000
MAX_TRAIN_TIME_MS = 600_000
MAX_EVAL_TIME_MS = 600_000

# The submission score of our script: quantized round trip, sliding-window evaluation, 8 decimals; or, when the
# script evaluates with test-time training, the `final_ttt_exact` line it prints after the sliding window.
SCORE_LINE = "final_quant_sliding_window_exact"
TTT_SCORE_LINE = "final_ttt_exact"
# Our lines under their current names; `final_int6_*` (earlier versions, or another integer width) is read as the same line.
OUR_LINE_ALIASES = re.compile(r"^final_(?:int\d+|quant)_(?P<kind>roundtrip|sliding_window)(?P<exact>_exact)?$")

SOURCE_HEADER = re.compile(rb"^==== source: (?P<name>\S+) bytes:(?P<size>\d+) sha256:(?P<sha>[0-9a-f]{64}) ====\r?\n", re.M)
SOURCE_END = b"==== end of source ===="

STEP_LINE = re.compile(r"^step:(?P<step>\d+)/(?P<total>\d+)\s+(?P<rest>.*)$")
# The later records: `4500/20000 train_loss: 2.2771 train_time: 9.0m tok/s: 6589668`, `4945/20000 val_loss: 2.3539 val_bpb: 1.0756`
BARE_STEP_LINE = re.compile(r"^(?P<step>\d+)/(?P<total>\d+)\s+(?P<rest>(?:train_loss|val_loss):.*)$")
# `<name> val_loss:X val_bpb:Y ...`: final_*, post_average_prequant, legal_ttt, "DIAGNOSTIC post_ema",
# "diagnostic pre-quantization post-ema", quantized_ttt_phased, ...
EVAL_LINE = re.compile(r"^(?P<name>[A-Za-z_][\w \-]*?)\s+val_loss:\s*(?P<loss>\S+)\s+val_bpb:\s*(?P<bpb>\S+)(?P<rest>.*)$")
KEY_VALUE = re.compile(r"(\w+):\s*([^\s:]\S*)")
SETTING_LINE = re.compile(r"^setting (?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")
MODEL_BYTES_LINE = re.compile(r"^Serialized model (?P<format>\S+): (?P<n>\d+) bytes")
# `Code size: N bytes` (ours, the March records); `Code size (compressed): N bytes` is the counted one of the
# later records, which also print `Code size (uncompressed): N bytes`.
CODE_BYTES_LINE = re.compile(r"^Code size(?: \((?P<kind>[^)]*)\))?: (?P<n>\d+) bytes")
TOTAL_BYTES_LINE = re.compile(r"^Total submission size (?P<format>\S+): (?P<n>\d+) bytes")
WORLD_SIZE_LINE = re.compile(r"^world_size:\s*(?P<n>\d+)")
GPU_LINE = re.compile(r"^gpu (?P<index>\d+): (?P<name>.+?)\s*$")
PUBLIC_SEED_LINE = re.compile(r"^seed:\s*(?P<seed>\d+)\s*$")
# `stopping_early: wallclock_cap train_time: 599592ms step: 4945/20000` (ours says `(estimated)` and is not read)
STOP_LINE = re.compile(r"^stopping_early:.*?train_time:\s*(?P<ms>[\d.]+)ms\s+step:\s*(?P<step>\d+)/")
ERROR_LINE = re.compile(r"^error:\s*(?P<message>.*)$")
# The tokenizer: `setting VOCAB_SIZE=` / `setting TOKENIZER_PATH=` (ours), `  vocab_size: 8192` and
# `  tokenizer_path: ...` (the later records' Hyperparameters block), `val_bpb:enabled ... tokenizer_path=...`
# and `train_loader:dataset:fineweb10B_sp1024` (the March records).
VOCAB_LINE = re.compile(r"^vocab_size:\s*(?P<n>\d+)\s*$")
TOKENIZER_LINE = re.compile(r"^(?:tokenizer_path:\s*|val_bpb:enabled\b.*?\btokenizer_path=)(?P<path>\S+)")
DATASET_LINE = re.compile(r"^train_loader:dataset:\S*?_sp(?P<n>\d+)\b")
# The pre-quantization evaluation: ours, the later records' (with and without `diagnostic`).
PREQUANT_NAMES = ("post_average_prequant", "diagnostic pre-quantization post-ema", "pre-quantization post-ema")
# Lines of a test-time-training evaluation in progress (`ttt_chunk [1/1893] ...`, `ttp: ...`, `beginning TTT eval timer`).
TTT_PROGRESS = re.compile(r"^(?:ttt|ttp)\w*[:\s\[]|^beginning ttt", re.I)
# Evaluations that are not a submission score: the pre-quantization model, the post-EMA diagnostics.
DIAGNOSTIC_NAME = re.compile(r"^diagnostic\b|pre.?quant|post.?ema|post_average", re.I)


class RecordsError(Exception):
    """A problem with the input files or a rule they break: the tools print it as one line and exit non-zero."""


class InputError(RecordsError):
    """A file or setting that cannot be used at all (unreadable, malformed, a failed run): `error: ...`, status 2."""


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
    line: int = 0                        # its line number in the log (after the source block)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.val_loss) and math.isfinite(self.val_bpb)


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
    budget_total_ms: float | None = None  # `training_budget: ... total:` = training + export quantization (GPTQ)
    last_step_avg_ms: float | None = None
    stopped_early: bool = False
    evals: dict[str, Eval] = field(default_factory=dict)  # in log order; a repeated name keeps the last
    model_bytes: int | None = None
    code_bytes: int | None = None        # the counted code: `Code size:` or `Code size (compressed):`
    total_bytes: int | None = None
    size_format: str | None = None       # e.g. quant+zstd, from the `Total submission size` line
    errors: list[str] = field(default_factory=list)  # `error: ...` lines: the run failed
    public_vocab_size: int | None = None
    public_tokenizer: str | None = None
    last_ttt_progress_line: int = 0      # the last line of a test-time-training evaluation in progress
    evaluation_ms: float | None = None   # ours: `evaluation_time: total:`, every score's wall time, compiling included
    lines: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ours(self) -> bool:
        return self.source is not None

    @property
    def training_ms(self) -> float | None:
        """Time charged to the 600 s training budget: the training loop plus, in our logs, the export
        quantization that uses training data (GPTQ calibration); the last `step:` line otherwise."""
        return self.budget_total_ms if self.budget_total_ms is not None else self.last_train_time_ms

    @property
    def seed(self) -> int | None:
        value = self.settings.get("SEED", "")
        if value.strip().isdigit():
            return int(value)
        return self.public_seed

    @property
    def step_avg_ms(self) -> float | None:
        """The last `step:` line's step_avg; training time / steps where the log prints none (later records)."""
        if self.last_step_avg_ms is not None:
            return self.last_step_avg_ms
        if self.last_train_time_ms is not None and self.last_step:
            return self.last_train_time_ms / self.last_step
        return None

    @property
    def vocab_size(self) -> int | None:
        value = self.settings.get("VOCAB_SIZE", "")
        return int(value) if value.strip().isdigit() else self.public_vocab_size

    @property
    def tokenizer(self) -> str | None:
        """The tokenizer model's file name (e.g. fineweb_1024_bpe.model): the folder it lies in does not matter."""
        path = self.settings.get("TOKENIZER_PATH") or self.public_tokenizer
        return os.path.basename(path.rstrip("/")) or None if path else None

    def prequant(self) -> Eval | None:
        """The evaluation of the trained weights before quantization: ours, or the later records' diagnostic line."""
        return next((self.evals[n] for n in PREQUANT_NAMES if n in self.evals), None)

    def eval(self, name: str) -> Eval | None:
        """One of our lines by its current name, also under an alias: `final_quant_sliding_window_exact`, ..."""
        if name in self.evals:
            return self.evals[name]
        m = OUR_LINE_ALIASES.match(name)
        if m is None:
            return None
        found = [e for e in self.evals.values() if (a := OUR_LINE_ALIASES.match(e.name))
                 and (a["kind"], a["exact"]) == (m["kind"], m["exact"])]
        return found[-1] if found else None

    def score(self) -> Eval | None:
        """The score line, or None. Our logs: `final_ttt_exact` when the script evaluated with test-time
        training, else `final_quant_sliding_window_exact`. Public logs: their last evaluation that is not a
        diagnostic one (the record scripts print their submission score last: legal_ttt_exact after the
        sliding window, quantized_ttt_phased after `diagnostic quantized`), as its `_exact` twin where it has one.
        It may still be a failed run's: the tools take scores through `final_score()`."""
        if self.ours:
            return self.evals.get(TTT_SCORE_LINE) or self.eval(SCORE_LINE)
        for e in reversed(self.evals.values()):
            if not DIAGNOSTIC_NAME.search(e.name):
                return self.evals.get(f"{e.name}_exact", e)
        return None

    def failure(self) -> str | None:
        """Why this log gives no usable score, or None when its score stands."""
        if self.errors:
            return f"the run failed (error: {self.errors[-1][:200]})"
        score = self.score()
        if score is None:
            if not (self.train or self.val or self.evals):
                return "no log lines that this tool reads (an empty file, or not a training log)"
            return "no final score line (the log ends before its final scores: did the run finish?)"
        if not score.finite:
            return f"the score is not a finite number ({score.name} val_loss:{score.val_loss} val_bpb:{score.val_bpb})"
        if self.ours and "final_ttt" in self.evals and TTT_SCORE_LINE not in self.evals:
            return f"the log ends after `final_ttt` without its `{TTT_SCORE_LINE}` line"
        if not score.name.endswith("_exact") and any(n.endswith("_exact") for n in self.evals):
            return f"the log ends after `{score.name}` without its `{score.name}_exact` line"
        if self.last_ttt_progress_line > score.line:
            return f"the log ends during a test-time-training evaluation after `{score.name}` (line {self.last_ttt_progress_line})"
        return None

    def final_score(self) -> Eval:
        """The score of a complete run; InputError naming the file when the run failed or is cut short."""
        if reason := self.failure():
            raise InputError(f"{self.path}: {reason}; expected a complete run with a finite score")
        return self.score()

    def hardware(self) -> str | None:
        """`8xNVIDIA H100 80GB HBM3` when every GPU has the same name."""
        if not self.gpus:
            return None
        names = sorted(set(self.gpus))
        return f"{len(self.gpus)}x{names[0]}" if len(names) == 1 else " + ".join(f"{self.gpus.count(n)}x{n}" for n in names)


def number(text: str) -> float | None:
    """`599912ms` -> 599912.0; None if it is not a number. `nan` and `inf` are numbers here: `failure()` refuses them."""
    text = text.rstrip(",;")
    if text.endswith("ms"):
        text = text[:-2]
    try:
        return float(text)
    except ValueError:
        return None


def duration_ms(text: str) -> float | None:
    """`599912ms`, `12.5s`, `9.0m` (the later records' step lines) in milliseconds; None if not a duration."""
    text = text.rstrip(",;")
    for suffix, scale in (("ms", 1.0), ("s", 1000.0), ("m", 60_000.0)):
        if text.endswith(suffix):
            value = number(text[:-len(suffix)])
            return None if value is None else value * scale
    return number(text)


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
        raise InputError(f"{path}: the source block is cut short ({len(source)} of {size} bytes)")
    if hashlib.sha256(source).hexdigest() != sha:
        raise InputError(f"{path}: the embedded source does not match the sha256 in its header")
    rest = data[start + size:]
    if not rest.startswith(SOURCE_END) and rest.startswith(b"\n"):
        rest = rest[1:]  # the newline that puts the end marker on its own line after a source without one
    if not rest.startswith(SOURCE_END):
        raise InputError(f"{path}: the {size}-byte source block is not followed by '{SOURCE_END.decode()}'")
    return source, sha, data[:header.start()] + rest[len(SOURCE_END):]


def parse_log(path) -> RunLog:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    source, sha, rest = split_source(data, path)
    run = RunLog(path=path, source=source, source_sha256=sha)
    for number_, line in enumerate(rest.decode("utf-8", errors="replace").splitlines(), start=1):
        run.lines = number_
        read_line(run, line.strip())
    return run


def read_line(run: RunLog, line: str) -> None:
    if (m := STEP_LINE.match(line)) or (m := BARE_STEP_LINE.match(line)):
        read_step_line(run, int(m["step"]), m["rest"])
    elif line.startswith("stopping_early:"):
        run.stopped_early = True
        # The later records' step lines give minutes: their stop line has the training time in ms.
        # Ours is an estimate made before the last step (`(estimated)`); the last `step:` line has the time.
        if (m := STOP_LINE.match(line)) and "estimated" not in line and int(m["step"]) == run.last_step:
            run.last_train_time_ms = float(m["ms"])
    elif line.startswith("training_budget:"):
        run.budget_total_ms = number(dict(KEY_VALUE.findall(line)).get("total", ""))
    elif line.startswith("evaluation_time:"):
        run.evaluation_ms = number(dict(KEY_VALUE.findall(line.removeprefix("evaluation_time:"))).get("total", ""))
    elif m := ERROR_LINE.match(line):
        run.errors.append(m["message"])
    elif m := EVAL_LINE.match(line):
        loss, bpb = number(m["loss"]), number(m["bpb"])
        if loss is not None and bpb is not None:
            extra = dict(KEY_VALUE.findall(m["rest"]))
            name = " ".join(m["name"].split())
            run.evals.pop(name, None)  # re-insert so that dict order is the order of the last occurrences
            run.evals[name] = Eval(name, loss, bpb, duration_ms(extra["eval_time"]) if "eval_time" in extra else None, run.lines)
    elif TTT_PROGRESS.match(line):
        run.last_ttt_progress_line = run.lines
    elif m := VOCAB_LINE.match(line):
        run.public_vocab_size = int(m["n"])
    elif m := TOKENIZER_LINE.match(line):
        run.public_tokenizer = m["path"]
    elif m := DATASET_LINE.match(line):
        run.public_vocab_size = run.public_vocab_size or int(m["n"])
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
        if m["kind"] is None or m["kind"].strip().lower() == "compressed":
            run.code_bytes = int(m["n"])
    elif m := TOTAL_BYTES_LINE.match(line):
        run.total_bytes, run.size_format = int(m["n"]), m["format"]
    elif m := PUBLIC_SEED_LINE.match(line):
        run.public_seed = int(m["seed"])


def read_step_line(run: RunLog, step: int, rest: str) -> None:
    pairs = dict(KEY_VALUE.findall(rest))
    values = {k: number(v) for k, v in pairs.items()}
    train_time, step_avg = duration_ms(pairs.get("train_time", "")), values.get("step_avg")
    if values.get("val_loss") is not None and values.get("val_bpb") is not None:
        run.val.append(ValPoint(step, values["val_loss"], values["val_bpb"], train_time))
    elif values.get("train_loss") is not None:
        run.train.append(TrainPoint(step, values["train_loss"], train_time))
    else:
        return
    run.last_step, run.last_train_time_ms, run.last_step_avg_ms = step, train_time, step_avg


def parse_logs(paths) -> list[RunLog]:
    return [parse_log(p) for p in paths]


# ---------------------------------------------------------------------------------------------
# One-line errors and warnings, shared by the tools
# ---------------------------------------------------------------------------------------------

def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def fail(message: str):
    """`error: <file or setting>: <what was expected>` on stderr, exit status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `error: ...` line and status 2 (no usage block)."""

    def error(self, message):
        fail(message.removeprefix("argument "))


def finite_float(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def run_main(body, argv=None) -> None:
    """Run a tool's body; a RecordsError or any unexpected failure becomes one `error:` line and status 2."""
    try:
        body(argv)
    except RecordsError as e:
        fail(str(e))
    except (OSError, ValueError, TypeError, KeyError, IndexError, ArithmeticError, RecursionError) as e:
        fail(f"unexpected {type(e).__name__}: {e}")


def write_atomically(path: Path, write) -> None:
    """Call write(temp_path) on a temporary file beside `path`, then rename it to `path`: a reader sees the
    whole file or none (no half-written file under the final name)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
