"""Proxy ablations, one run per GPU at a time: every ARM at every seed, each the 300 s one-GPU proxy
run (bench/RESULTS.md, command P) plus the arm's settings, then a markdown table of the submission score (the
quantized round trip's test-time-training score, or its sliding window with TTT_MODE=off) against the first arm.

    DATA_PATH=... TOKENIZER_PATH=... python3 bench/ablate.py --seeds 1337,42 \\
        defaults QK_GAIN_INIT=1.5 "ROPE_DIMS=16 LN_SCALE=1"

An arm is `defaults` or space-separated SETTING=VALUE pairs; every name and value is checked before
any run starts. Settings in the environment other than DATA_PATH and TOKENIZER_PATH are ignored:
--base applies settings to every arm. Run k of a GPU machine gets GPU k modulo the GPU count (CUDA_VISIBLE_DEVICES), and
the runs of one slot follow each other; on a machine without GPUs, `--slots` runs go side by side.
train_gpt.py writes logs/<RUN_ID>.txt under --workdir, RUN_ID = <tag>_<arm>_s<seed>; its console
goes to logs/<RUN_ID>.out. Each row also shows the sliding window's val_bpb (with TTT on, the model's part
of the score), the steps and the sliding evaluation's and TTT's times, so that a slower machine shows itself:
rows whose runs differ there do not isolate their setting.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "records"))
import train_gpt  # noqa: E402
from logparse import MAX_TOTAL_BYTES, SCORE_LINE, TTT_SCORE_LINE, parse_log  # noqa: E402

PROXY = dict(TRAIN_BATCH_TOKENS="131072", GRAD_ACCUM_STEPS="1", TRAIN_SEQ_LEN="2048", EVAL_SEQ_LEN="2048",
             MAX_WALLCLOCK_SECONDS="300", ITERATIONS="100000", WARMDOWN_ITERS="950",
             MUON_MOMENTUM_WARMUP_STEPS="470", WARMUP_STEPS="20", VAL_LOSS_EVERY="0", EVAL_STRIDE="64")


def parse_arm(text: str) -> dict[str, str]:
    if text.strip() == "defaults":
        return {}
    settings = {}
    for pair in text.split():
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"arm {text!r}: expected 'defaults' or SETTING=VALUE pairs, got {pair!r}")
        if name not in train_gpt.setting_names():
            raise SystemExit(f"arm {text!r}: {train_gpt.setting_problem(name) or f'{name} is not a setting of train_gpt.py'}")
        if name in ("SEED", "RUN_ID"):
            raise SystemExit(f"arm {text!r}: {name} is set by the runner (--seeds, --tag)")
        settings[name] = value
    return settings


def run_id(tag: str, arm: str, seed: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", arm.strip()).strip("-") or "defaults"
    return f"{tag}_{slug}_s{seed}"


def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 (no torch or no driver: run on the CPU)
        return 0


def thread_limits(env: dict, slots: int, cores: int) -> dict:
    """The CPU threads of each of `slots` runs side by side: an equal share of the cores for OpenMP and
    for inductor's compile workers, unless the environment sets them. Left at their defaults, 8 runs on
    a 128-core machine each start a pool of compile workers sized for the whole machine."""
    share = str(max(1, cores // slots))
    return dict(OMP_NUM_THREADS=share, TORCHINDUCTOR_COMPILE_THREADS=share) | env


def run_all(jobs: list[tuple[str, dict]], slots: int, gpus: int, workdir: Path) -> None:
    """jobs: (RUN_ID, environment). At most `slots` at once; slot k uses GPU k modulo the GPU count."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    waiting, running = list(jobs), {}
    while waiting or running:
        for slot in range(slots):
            if slot not in running and waiting:
                rid, env = waiting.pop(0)
                env = thread_limits(env, slots, os.cpu_count() or 1)
                if gpus:
                    env = env | dict(CUDA_VISIBLE_DEVICES=str(slot % gpus))
                out = open(workdir / "logs" / f"{rid}.out", "w")
                proc = subprocess.Popen([sys.executable, str(REPO / "train_gpt.py")], cwd=workdir, env=env,
                                        stdout=out, stderr=subprocess.STDOUT)
                running[slot] = (rid, proc, out, time.time())
                print(f"{time.strftime('%H:%M:%S')} started {rid} on {f'GPU {slot % gpus}' if gpus else 'the CPU'}", flush=True)
        time.sleep(0.5)
        for slot, (rid, proc, out, t0) in list(running.items()):
            if proc.poll() is not None:
                out.close()
                del running[slot]
                print(f"{time.strftime('%H:%M:%S')} finished {rid}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)


def eval_seconds(run, score_line: str) -> str:
    """An evaluation's time, from its line without `_exact` (which has none); `-` for a run without it."""
    line = run.evals.get(score_line.removesuffix("_exact"))
    return "-" if line is None else f"{line.eval_time_ms / 1000:.1f}" if line.eval_time_ms is not None else "?"


def per_seed(runs, cell) -> str:
    """One table cell: `cell` of each seed's run, joined."""
    return " / ".join(cell(run) for run in runs)


def sliding_bpb(run) -> str:
    """The sliding window's val_bpb: the score with TTT_MODE=off, the model's part of it otherwise."""
    line = run.evals.get(SCORE_LINE)
    return f"{line.val_bpb:.4f}" if line else "?"


def table(arms: list[str], seeds: list[int], tag: str, workdir: Path) -> tuple[str, bool]:
    """The markdown table and whether every run produced a score."""
    rows = ["| arm | val_bpb per seed | mean | delta | sliding val_bpb | steps | step ms | sliding eval s | TTT s | total bytes |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    complete, base = True, None
    for arm in arms:
        logs = [workdir / "logs" / f"{run_id(tag, arm, seed)}.txt" for seed in seeds]
        runs = [parse_log(p) if p.exists() else None for p in logs]
        scores = [r.score() if r else None for r in runs]
        if any(s is None for s in scores):
            complete = False
            missing = [str(p.with_suffix(".out")) for p, s in zip(logs, scores) if s is None]
            rows.append(f"| {arm} | no score: see {', '.join(missing)} | | | | | | | | |")
            continue
        bpb = [s.val_bpb for s in scores]
        mean = statistics.fmean(bpb)
        if arm == arms[0]:
            base, delta = mean, ""
        else:
            delta = f"{mean - base:+.4f}" if base is not None else "(no reference)"
        total = max(r.total_bytes or 0 for r in runs)
        size = f"{total:,}" + (" (over the cap)" if total > MAX_TOTAL_BYTES else "")
        cells = [" / ".join(f"{b:.4f}" for b in bpb), f"{mean:.4f}", delta, per_seed(runs, sliding_bpb),
                 per_seed(runs, lambda r: str(r.last_step)), per_seed(runs, lambda r: f"{r.last_step_avg_ms:.1f}"),
                 per_seed(runs, lambda r: eval_seconds(r, SCORE_LINE)), per_seed(runs, lambda r: eval_seconds(r, TTT_SCORE_LINE)), size]
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows), complete


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arms", nargs="+", help="'defaults' or 'SETTING=VALUE ...'; the first is the reference")
    parser.add_argument("--seeds", default="1337", help="comma-separated seeds (default 1337)")
    parser.add_argument("--tag", default="ablate", help="RUN_ID prefix (default ablate)")
    parser.add_argument("--base", default="", help="SETTING=VALUE pairs applied to every arm on top of the proxy (e.g. shorter tests)")
    parser.add_argument("--slots", type=int, default=0, help="runs at once (default: one per GPU, else 1)")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where logs/ goes (default .)")
    parser.add_argument("--table-only", action="store_true", help="only print the table from existing logs")
    args = parser.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",")]
    base = PROXY | parse_arm(args.base or "defaults")
    environ = train_gpt.without_settings(os.environ) | {k: os.environ[k] for k in ("DATA_PATH", "TOKENIZER_PATH") if k in os.environ}
    jobs = []
    for arm in args.arms:
        env = environ | base | parse_arm(arm)
        for seed in seeds:
            env_seed = env | dict(SEED=str(seed), RUN_ID=run_id(args.tag, arm, seed))
            try:
                train_gpt.Hyperparameters.from_env(env_seed)
            except train_gpt.ConfigError as e:
                raise SystemExit(f"arm {arm!r}: {e}")
            jobs.append((env_seed["RUN_ID"], env_seed))
    if len({rid for rid, _ in jobs}) != len(jobs):
        raise SystemExit("two arms give the same RUN_ID: make them differ in more than punctuation")
    if not args.table_only:
        gpus = gpu_count()
        run_all(jobs, args.slots or max(gpus, 1), gpus, args.workdir)
    text, complete = table(args.arms, seeds, args.tag, args.workdir)
    print(text)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
