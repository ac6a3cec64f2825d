"""Compare runs: train_loss against step and against training time, with the validation points, and
a table of the final figures. Reads our logs and the public record logs alike.

    python records/compare.py logs/baseline.txt logs/xsa_all.txt \\
        records/track_10min_16mb/2026-03-23_X/train_seed1337.log --out compare.png

writes compare.png and prints the table (also to --table FILE when given). The score is the
`final_quant_sliding_window_exact` line of our logs (`final_ttt_exact` when there is one) and the last
non-diagnostic evaluation of a public log. A log that cannot be read or holds no training lines is left
out with a warning naming it; a failed run (an `error:` line, cut short, a non-finite score) is plotted
with its score left out and a warning saying why.
"""

from __future__ import annotations

import math
from pathlib import Path

from logparse import ArgumentParser, InputError, RunLog, fmt, parse_log, run_main, warn, write_atomically

COLUMNS = ("run", "seed", "steps", "train s", "step ms", "pre-quant bpb", "val_loss", "val_bpb", "score line", "bytes total")


def labels_for(runs: list[RunLog]) -> list[str]:
    """The file names without suffix, with the folder where two runs would share a name."""
    stems = [r.path.stem for r in runs]
    return [f"{r.path.parent.name}/{s}" if stems.count(s) > 1 else s for r, s in zip(runs, stems)]


def usable_score(run: RunLog):
    """The run's score, or None for a failed run (which is never shown as a score)."""
    return None if run.failure() else run.score()


def table_row(run: RunLog, label: str) -> list[str]:
    score, pre = usable_score(run), run.prequant()
    return [label, fmt(run.seed, "d"), fmt(run.last_step, "d"), fmt(run.last_train_time_ms, ".1f", 1e-3), fmt(run.step_avg_ms, ".2f"),
            fmt(pre and pre.val_bpb, ".4f"), fmt(score and score.val_loss, ".8f"), fmt(score and score.val_bpb, ".8f"),
            score.name if score else "-", fmt(run.total_bytes, ",d")]


def table(runs: list[RunLog], labels: list[str]) -> str:
    rows = [list(COLUMNS)] + [table_row(r, label) for r, label in zip(runs, labels)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    text_columns = {0, COLUMNS.index("score line")}
    lines = ["  ".join(cell.ljust(w) if i in text_columns else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def loss_ceiling(runs: list[RunLog]) -> float:
    """Top of the loss axis: the highest train loss after the first 10% of each run, so the first
    steps (near ln(vocab) = 6.9) do not squash the part of the curves that matters."""
    later = [p.train_loss for r in runs if r.train for p in r.train if p.step >= 0.1 * r.train[-1].step and math.isfinite(p.train_loss)]
    return max(later) * 1.02 if later else math.inf


def finite_points(run: RunLog) -> RunLog:
    """The run with only the points that can be plotted (a diverged run logs nan)."""
    from dataclasses import replace
    return replace(run, train=[p for p in run.train if math.isfinite(p.train_loss)],
                   val=[v for v in run.val if math.isfinite(v.val_loss)])


def plot(runs: list[RunLog], labels: list[str], out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--out: the plot needs matplotlib: pip install matplotlib") from None
    runs = [finite_points(r) for r in runs]
    if not any(r.train or r.val for r in runs):
        raise InputError(f"{', '.join(r.name for r in runs) or 'the logs'}: no `step:` lines with train_loss or val_loss in any log: nothing to plot")
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    file_format = out.suffix[1:].lower()
    if file_format not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise InputError(f"--out {out}: expected a file name ending in one of "
                         f"{', '.join('.' + f for f in sorted(fig.canvas.get_supported_filetypes()))}")
    for run, label, color in zip(runs, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(runs)):
        score = usable_score(run)
        legend = f"{label}: {score.val_bpb:.4f} bpb" if score else label
        by_step.plot([p.step for p in run.train], [p.train_loss for p in run.train], color=color, lw=1.1, label=legend)
        by_step.scatter([v.step for v in run.val], [v.val_loss for v in run.val], color=color, s=28, edgecolor="black", zorder=3)
        timed = [p for p in run.train if p.train_time_ms is not None]
        by_time.plot([p.train_time_ms / 1000 for p in timed], [p.train_loss for p in timed], color=color, lw=1.1)
        timed_val = [v for v in run.val if v.train_time_ms is not None]
        by_time.scatter([v.train_time_ms / 1000 for v in timed_val], [v.val_loss for v in timed_val], color=color, s=28,
                        edgecolor="black", zorder=3)
    if any(r.train for r in runs):
        low = min(min(p.train_loss for p in r.train) for r in runs if r.train)
        low = min([low] + [v.val_loss for r in runs for v in r.val])
        by_step.set_ylim(low - 0.05, max(loss_ceiling(runs), low + 0.1))
    by_step.set(xlabel="step", ylabel="loss (nats per token)", title="train_loss (lines), val_loss (dots) by step")
    by_time.set(xlabel="training time (s)", title="by training time (validation pauses excluded)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend(title="run: score", fontsize=8)
    fig.tight_layout()
    try:
        write_atomically(out, lambda tmp: fig.savefig(tmp, dpi=120, format=file_format))
    finally:
        plt.close(fig)


def readable_runs(paths: list[Path], labels: list[str] | None) -> tuple[list[RunLog], list[str] | None]:
    """Parse each log; leave out (with one warning line naming it) a log that cannot be read or holds no
    training lines, and warn of a failed run, whose score is then not shown."""
    runs, kept = [], []
    for i, path in enumerate(paths):
        try:
            run = parse_log(path)
        except InputError as e:
            warn(f"{e}; left out")
            continue
        if not (run.train or run.val or run.evals):
            warn(f"{path}: no `step:` lines and no scores (an empty file, or not a training log); left out")
            continue
        if reason := run.failure():
            warn(f"{path}: {reason}; its score is not shown")
        runs.append(run)
        kept.append(i)
    return runs, [labels[i] for i in kept] if labels else None


def body(argv) -> None:
    import argparse
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="logs to compare (ours or the public record format)")
    parser.add_argument("--out", type=Path, default=Path("compare.png"), help="the PNG to write (default: %(default)s)")
    parser.add_argument("--labels", nargs="+", help="one name per log for the legend and the table (default: file names)")
    parser.add_argument("--table", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.logs):
        parser.error(f"--labels: expected one label per log, got {len(args.labels)} labels for {len(args.logs)} logs")
    runs, labels = readable_runs(args.logs, args.labels)
    if not runs:
        raise InputError(f"{', '.join(map(str, args.logs))}: no readable training log: nothing to plot")
    labels = labels or labels_for(runs)
    plot(runs, labels, args.out)
    text = table(runs, labels)
    print(text)
    if args.table:
        write_atomically(args.table, lambda tmp: tmp.write_text(text + "\n"))
    print(f"wrote {args.out}")


def main(argv=None) -> None:
    run_main(body, argv)


if __name__ == "__main__":
    main()
