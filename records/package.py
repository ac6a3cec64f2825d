"""Build a records folder from the logs of one or more seeds, after checking the rules.

    python records/package.py logs/s1337.txt logs/s42.txt logs/s2025.txt \\
        --name "11L XSA4 EMA int6" --author "Ada Lovelace" --github-id ada --blurb "What changed"

writes records/track_10min_16mb/<date>_<name>/ holding train_gpt.py (the self-extracting form that
the logs count as Code size), train_gpt_source.py (the readable source it unpacks to, the one in the
logs), train_seed<SEED>.log per log, submission.json, README.md (a skeleton with the results table)
and requirements.txt. Every figure is read from the logs. When a log breaks a rule, nothing is written:
the command prints the problems on one line and exits with status 1. A file that cannot be used at all
(unreadable, a failed run with an `error:` line, a score that is not a finite number) or a bad option is
one `error: ...` line, status 2.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import functools
import json
import linecache
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from logparse import (MAX_EVAL_TIME_MS, MAX_TOTAL_BYTES, MAX_TRAIN_TIME_MS, SCORE_LINE, TTT_SCORE_LINE, ArgumentParser,
                      InputError, RecordsError, RunLog, fail, fmt, parse_logs)

REPO = Path(__file__).resolve().parent.parent
TRACKS = {"10min_16mb": "track_10min_16mb", "non_record_16mb": "track_non_record_16mb"}
RECORD_TRACK = "10min_16mb"
RECORD_GPUS = 8
# Lines after training that a complete log of ours has (besides the final `step:` validation line).
PREQUANT_LINE = "post_average_prequant"
SCORE_EVAL_LINE = "final_quant_sliding_window"  # the non-exact score line carries eval_time
FINAL_EVALS = (PREQUANT_LINE, "final_quant_roundtrip_exact", SCORE_EVAL_LINE, SCORE_LINE)
TTT_EVAL_LINE = "final_ttt"  # with test-time training, the score is final_ttt_exact, after the sliding window
# Settings that may differ between the seeds of one submission.
PER_RUN_SETTINGS = {"SEED", "RUN_ID", "DATA_PATH", "TOKENIZER_PATH"}


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def missing_lines(run: RunLog) -> list[str]:
    missing = [name for name in FINAL_EVALS if run.eval(name) is None]
    if TTT_EVAL_LINE in run.evals or TTT_SCORE_LINE in run.evals:
        missing += [name for name in (TTT_EVAL_LINE, TTT_SCORE_LINE) if name not in run.evals]
    if not run.val or run.val[-1].step != run.last_step:
        missing.insert(0, "the validation `step:` line after the last step")
    for what, value in (("Serialized model", run.model_bytes), ("Code size", run.code_bytes),
                        ("Total submission size", run.total_bytes)):
        if value is None:
            missing.append(what)
    return missing


def first_difference(a: bytes, b: bytes) -> int:
    """1-based number of the first line where a and b differ."""
    for number, (x, y) in enumerate(zip(a.splitlines(), b.splitlines()), start=1):
        if x != y:
            return number
    return min(len(a.splitlines()), len(b.splitlines())) + 1


def score_eval_line(run: RunLog):
    """The non-exact line of the score, which carries its eval_time: final_ttt, or final_quant_sliding_window."""
    return run.evals.get(TTT_EVAL_LINE) if TTT_SCORE_LINE in run.evals else run.eval(SCORE_EVAL_LINE)


def check_usable(runs: list[RunLog]) -> None:
    """InputError for a log that cannot make a submission at all: a failed run, a figure that is not finite."""
    for run in runs:
        if run.errors:
            raise InputError(f"{run.path}: the run failed (error: {run.errors[-1][:200]}); expected the log of a complete run")
        for e in run.evals.values():
            if not e.finite:
                raise InputError(f"{run.path}: {e.name} val_loss:{e.val_loss} val_bpb:{e.val_bpb}; expected finite numbers")
        for what, value in (("train_time", run.training_ms), ("step_avg", run.last_step_avg_ms)):
            if value is not None and not math.isfinite(value):
                raise InputError(f"{run.path}: {what} is {value}; expected a finite number of milliseconds")


def check_runs(runs: list[RunLog], script: bytes, track: str) -> None:
    """Raise RecordsError naming every broken rule; return when the logs make a valid submission."""
    not_ours = [r.name for r in runs if not r.ours or not r.settings]
    if not_ours:
        raise RecordsError(f"not logs of our train_gpt.py (no '==== source' block or no `setting` lines): {', '.join(not_ours)}")
    problems = []
    for run in runs:
        if missing := missing_lines(run):
            problems.append(f"{run.name} lacks the final lines: {', '.join(missing)} (did the run finish?)")
    shas = {r.source_sha256 for r in runs}
    if len(shas) > 1:
        problems.append("the logs come from different code: " + ", ".join(f"{r.name} sha256 {r.source_sha256[:12]}" for r in runs))
    elif script != runs[0].source:
        problems.append(f"the train_gpt.py to copy differs from the source embedded in the logs (first at line {first_difference(script, runs[0].source)})")
    else:
        problems += script_problems(runs, script)
    seeds = [r.seed for r in runs]
    if None in seeds:
        problems.append(f"no `setting SEED=` line in {', '.join(r.name for r in runs if r.seed is None)}")
    elif len(set(seeds)) < len(seeds):
        problems.append(f"a seed appears twice: {', '.join(map(str, seeds))}")
    problems += differing_settings(runs)
    for what, values in (("hardware", {r.hardware() for r in runs}), ("torch versions", {r.versions.get("torch") for r in runs})):
        if len(values) > 1:
            problems.append(f"the logs ran on different {what}: {', '.join(sorted(map(str, values)))}")
    for run in runs:
        problems += rule_problems(run, track)
    if problems:
        raise RecordsError("; ".join(problems))


# The submission's train_gpt.py is the self-extracting form of the logged source, made by that source's
# own self_extracting() (train_gpt.py counts its bytes as `Code size`); SOURCE_FILE holds the readable source.
FORM_FUNCTION = "self_extracting"
SOURCE_FILE = "train_gpt_source.py"


@functools.lru_cache(maxsize=4)
def self_extracting_form(source: bytes) -> bytes:
    """The counted train_gpt.py: the source's self_extracting(source), run alone (no torch needed)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise RecordsError(f"the source in the logs does not parse ({e})") from None
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == FORM_FUNCTION]
    if not defs:
        raise RecordsError(f"the source in the logs has no {FORM_FUNCTION}() to build its self-extracting train_gpt.py with")
    namespace = {}
    try:
        import __future__
        exec(compile(ast.Module(body=defs, type_ignores=[]), "train_gpt.py", "exec", flags=__future__.annotations.compiler_flag), namespace)
        form = namespace[FORM_FUNCTION](source)
    except Exception as e:
        raise RecordsError(f"{FORM_FUNCTION}() of the source in the logs failed ({type(e).__name__}: {e})") from None
    if not isinstance(form, bytes):
        raise RecordsError(f"{FORM_FUNCTION}() of the source in the logs returned {type(form).__name__}, not bytes")
    return form


def unpacked(form: bytes) -> tuple[bytes, str] | None:
    """(the source, the file name) the form would compile and run, found by running it with compile and
    exec replaced by recorders; None when it does not compile exactly one program and run it."""
    compiled, ran = [], []
    saved = dict(linecache.cache)  # the form registers its lines there
    try:
        exec(form, {"compile": lambda text, name, mode, *a, **k: compiled.append((text, name)) or len(compiled),
                    "exec": lambda code, *a, **k: ran.append(code)})
    except Exception:
        return None
    finally:
        linecache.cache.clear()
        linecache.cache.update(saved)
    return compiled[0] if len(compiled) == 1 and ran == [1] else None


def script_problems(runs: list[RunLog], source: bytes) -> list[str]:
    """The self-extracting form must unpack byte for byte to the logged source, and be as long as each log's Code size."""
    try:
        form = self_extracting_form(source)
    except RecordsError as e:
        return [str(e)]
    problems = []
    if unpacked(form) != (source, "train_gpt.py"):
        problems.append("the self-extracting train_gpt.py does not unpack to the source embedded in the logs (compiled as train_gpt.py)")
    for run in runs:
        if run.code_bytes is not None and run.code_bytes != len(form):
            problems.append(f"seed {run.seed} ({run.name}): Code size {run.code_bytes} bytes but the self-extracting train_gpt.py "
                            f"built from its source has {len(form)} (its self_extracting() gives other bytes here: another lzma library?)")
    return problems


def differing_settings(runs: list[RunLog]) -> list[str]:
    names = sorted(set().union(*(r.settings for r in runs)) - PER_RUN_SETTINGS)
    differing = [n for n in names if len({r.settings.get(n) for r in runs}) > 1]
    return [f"the logs differ in settings other than the seed: {', '.join(differing)}"] if differing else []


def rule_problems(run: RunLog, track: str) -> list[str]:
    who = f"seed {run.seed} ({run.name})"
    problems = []
    if None not in (run.model_bytes, run.code_bytes, run.total_bytes) and run.total_bytes != run.model_bytes + run.code_bytes:
        problems.append(f"{who}: total {run.total_bytes} bytes is not model {run.model_bytes} + code {run.code_bytes}")
    if run.total_bytes is not None and run.total_bytes > MAX_TOTAL_BYTES:
        problems.append(f"{who}: total submission size {run.total_bytes:,} bytes is over {MAX_TOTAL_BYTES:,}")
    if track != RECORD_TRACK:
        return problems
    if run.training_ms is None or run.training_ms > MAX_TRAIN_TIME_MS:
        problems.append(f"{who}: training took {fmt(run.training_ms, '.0f')}ms, over {MAX_TRAIN_TIME_MS}ms")
    score_eval = score_eval_line(run)
    if score_eval and score_eval.eval_time_ms is not None and score_eval.eval_time_ms > MAX_EVAL_TIME_MS:
        problems.append(f"{who}: the scoring evaluation took {score_eval.eval_time_ms:.0f}ms, over {MAX_EVAL_TIME_MS}ms")
    if run.evaluation_ms is not None and run.evaluation_ms > MAX_EVAL_TIME_MS:
        problems.append(f"{who}: the evaluation took {run.evaluation_ms:.0f}ms (its evaluation_time line: every score, "
                        f"compiling included), over {MAX_EVAL_TIME_MS}ms")
    if run.world_size != RECORD_GPUS or len(run.gpus) != RECORD_GPUS or not all("H100" in g for g in run.gpus):
        problems.append(f"{who}: ran on {run.hardware() or 'no logged GPU'} (world_size {run.world_size}); "
                        f"the record track needs {RECORD_GPUS}xH100 (use --track non_record_16mb otherwise)")
    return problems


# ---------------------------------------------------------------------------------------------
# submission.json and README.md
# ---------------------------------------------------------------------------------------------

def log_name(run: RunLog) -> str:
    return f"train_seed{run.seed}.log"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single seed), rounded like the `_exact` lines."""
    std = round(statistics.stdev(values), 8) if len(values) > 1 else None
    return round(statistics.fmean(values), 8), std


def seed_result(run: RunLog) -> dict:
    score, pre = run.score(), run.evals[PREQUANT_LINE]
    return {
        "val_loss": score.val_loss,
        "val_bpb": score.val_bpb,
        "pre_quant_val_loss": pre.val_loss,
        "pre_quant_val_bpb": pre.val_bpb,
        "artifact_bytes": run.model_bytes,   # compressed weights alone
        "bytes_total": run.total_bytes,      # weights + code: the figure the 16,000,000-byte cap applies to
        "steps": run.last_step,
        "step_avg_ms": run.last_step_avg_ms,
        "train_time_ms": run.training_ms,
        "eval_time_ms": score_eval_line(run).eval_time_ms,
        "log": log_name(run),
    }


def submission_json(runs: list[RunLog], *, author: str, github_id: str, name: str, blurb: str, date: str, track: str) -> dict:
    results = {str(r.seed): seed_result(r) for r in runs}
    figures = {}
    for key in ("val_loss", "val_bpb"):
        figures[key], figures[f"{key}_std"] = mean_std([r[key] for r in results.values()])
    for key in ("pre_quant_val_loss", "pre_quant_val_bpb"):
        figures[key] = mean_std([r[key] for r in results.values()])[0]
    return {
        "author": author, "github_id": github_id, "name": name, "blurb": blurb, "date": date, "track": track,
        **figures,
        "seeds": [r.seed for r in runs],
        "seed_results": results,
        "bytes_total": max(r.total_bytes for r in runs),
        "bytes_code": runs[0].code_bytes,
        "score_line": runs[0].score().name,
        "vocab_size": runs[0].vocab_size,
        "tokenizer": runs[0].tokenizer,
        "hardware": runs[0].hardware(),
        "pytorch_version": known(runs[0].versions.get("torch")),
        "cuda_version": known(runs[0].versions.get("cuda")),  # a CPU build of torch logs cuda:None: null here
        "train_gpt_sha256": runs[0].source_sha256,
    }


def known(value: str | None) -> str | None:
    """A version as logged; None (JSON null) where the log has none or says `None`."""
    return None if value is None or value.strip() in ("", "None", "none", "null") else value


def submission_bytes(sub: dict) -> bytes:
    """Strict JSON: a NaN or infinity (which json.dumps writes as bare NaN by default) is refused."""
    try:
        return (json.dumps(sub, indent=2, allow_nan=False) + "\n").encode()
    except ValueError:
        bad = [k for k, v in sub.items() if isinstance(v, float) and not math.isfinite(v)]
        raise InputError(f"submission.json: {', '.join(bad) or 'a figure'} is not a finite number; expected finite figures") from None


def readme_text(sub: dict, runs: list[RunLog], track: str) -> str:
    rows = [f"| {seed} | {r['steps']} | {fmt(r['step_avg_ms'], '.2f')} | {fmt(r['train_time_ms'], '.1f', 1e-3)} "
            f"| {fmt(r['pre_quant_val_bpb'], '.4f')} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} "
            f"| {r['artifact_bytes']:,} | {r['bytes_total']:,} |" for seed, r in sub["seed_results"].items()]
    settings = {k: v for k, v in runs[0].settings.items() if k not in PER_RUN_SETTINGS}
    command = " \\\n".join([f"{k}={shlex.quote(v)}" for k, v in sorted(settings.items())] +
                           ["SEED=<seed> torchrun --standalone --nproc_per_node=8 train_gpt.py"])
    seeds = " ".join(str(s) for s in sub["seeds"])
    score_kind = ("quantized round trip, test-time training after the sliding-window evaluation" if sub["score_line"] == TTT_SCORE_LINE
                  else "quantized round trip, sliding-window evaluation")
    time_rule = ("- [x] training at most 600 s and the evaluation at most 600 s for every seed (checked by `records/package.py`: "
                 "the whole evaluation where the log has `evaluation_time`, else the scoring evaluation)"
                 if track == RECORD_TRACK else "- [ ] non-record track: the 600 s limits are not checked; say here how long training took")
    return f"""# {sub['name']}

**val_bpb {sub['val_bpb']:.4f}** (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''}, std {fmt(sub['val_bpb_std'], '.4f')}),
val_loss {sub['val_loss']:.4f} nats; largest total submission size {sub['bytes_total']:,} bytes
(code {sub['bytes_code']:,}). {sub['hardware']}, PyTorch {sub['pytorch_version']}.

{sub['blurb']}

## Results

Score: `{sub['score_line']}` ({score_kind}). Every figure is copied
from the logs by `records/package.py`.

| seed | steps | step_avg (ms) | train time (s) | pre-quant val_bpb | val_loss | val_bpb | artifact bytes | total bytes |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
| **mean** | | | | {sub['pre_quant_val_bpb']:.4f} | {sub['val_loss']:.8f} | {sub['val_bpb']:.8f} | | |
| std | | | | | {fmt(sub['val_loss_std'], '.8f')} | {fmt(sub['val_bpb_std'], '.8f')} | | |

## What changed

TODO: what this submission changes against the record it builds on, and why.

## Significance

TODO: paste the output of
`python records/significance.py --ours {' '.join(log_name(r) for r in runs)} --previous <previous record>/submission.json`

## Rules

- [x] total submission size (weights + code) at most 16,000,000 bytes for every seed (checked)
{time_rule}
- [x] `{SOURCE_FILE}` is byte-identical to the source embedded in every log (sha256 `{sub['train_gpt_sha256']}`), and
  `train_gpt.py`, the code counted, is its self-extracting form: it unpacks to exactly that source and runs it (checked)
- [ ] no validation data is used in training (the author confirms)
- [ ] test-time training, if any, adapts only on validation tokens already scored (the author confirms)

## Command

Seeds: {seeds}. Every setting as the logs record it:

```bash
{command}
```

## Files

`train_gpt.py` (self-extracting, the code counted), `{SOURCE_FILE}` (its readable source),
{', '.join(f'`{log_name(r)}`' for r in runs)}, `submission.json`, `requirements.txt`.
"""


# ---------------------------------------------------------------------------------------------
# Writing the folder
# ---------------------------------------------------------------------------------------------

def write_folder(target: Path, files: dict[str, bytes]) -> None:
    """Write every file into a temporary folder beside the target, then rename it into place."""
    if target.exists():
        raise RecordsError(f"{target} already exists; remove it or choose another --name or --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_name(date: str, name: str) -> str:
    return f"{date}_{re.sub(r'[^A-Za-z0-9.-]+', '_', name).strip('_')}"


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def package(args) -> Path:
    runs = parse_logs(args.logs)
    script = read_file(args.script, "script")
    check_usable(runs)
    check_runs(runs, script, args.track)
    sub = submission_json(runs, author=args.author, github_id=args.github_id, name=args.name,
                          blurb=args.blurb, date=args.date, track=args.track)
    target = args.out or REPO / "records" / TRACKS[args.track] / folder_name(args.date, args.name)
    files = {"train_gpt.py": self_extracting_form(script), SOURCE_FILE: script,
             "submission.json": submission_bytes(sub),
             "README.md": readme_text(sub, runs, args.track).encode(),
             "requirements.txt": read_file(args.requirements, "requirements file")}
    files.update({log_name(r): read_file(r.path, "log") for r in runs})
    write_folder(Path(target), files)
    return Path(target)


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="logs/<RUN_ID>.txt of each seed, written by train_gpt.py")
    parser.add_argument("--name", required=True, help="the submission's name; also names the folder")
    parser.add_argument("--author", required=True)
    parser.add_argument("--github-id", required=True)
    parser.add_argument("--blurb", required=True, help="one or two sentences on what the submission does")
    parser.add_argument("--track", choices=sorted(TRACKS), default=RECORD_TRACK,
                        help="10min_16mb (default) enforces 600 s training and evaluation on 8xH100")
    parser.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                        help="YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--script", type=Path, default=REPO / "train_gpt.py", help="the readable train_gpt.py that ran (default: %(default)s)")
    parser.add_argument("--requirements", type=Path, default=REPO / "requirements.txt", help="default: %(default)s")
    parser.add_argument("--out", type=Path, help="the folder to create (default: records/<track>/<date>_<name>)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        parser.error(f"--date: expected YYYY-MM-DD, got {args.date!r}")
    if folder_name(args.date, args.name) == f"{args.date}_":
        parser.error(f"--name: expected at least one letter or digit to name the folder, got {args.name!r}")
    try:
        target = package(args)
    except InputError as e:
        fail(str(e))
    except RecordsError as e:
        sys.exit(f"package.py: refused: {e}")
    except (OSError, ValueError, TypeError, KeyError, IndexError, ArithmeticError) as e:
        fail(f"unexpected {type(e).__name__}: {e}")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
