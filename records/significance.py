"""Is our improvement over the previous record significant? A one-sided Welch t-test on val_loss.

    python records/significance.py --ours logs/s1337.txt logs/s42.txt logs/s2025.txt \\
        --previous records/track_10min_16mb/2026-03-25_Previous/submission.json

The improvement is the previous mean val_loss minus ours (nats per token; the score line of each
log, or a submission.json's seed_results). The test is H0: improvement <= 0.005 nats against
H1: improvement > 0.005 nats, with unequal variances and Welch-Satterthwaite degrees of freedom.
The challenge asks new records to show this at p < 0.01. A previous record known only by its mean
is treated as an exact number (a one-sample t-test of our seeds). The Student-t tail is computed
here (regularised incomplete beta function) so that no statistics package is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from logparse import RecordsError, parse_logs

MARGIN_NATS = 0.005  # the improvement a new record must show
ALPHA = 0.01         # ... at this significance level


# ---------------------------------------------------------------------------------------------
# Student's t distribution
# ---------------------------------------------------------------------------------------------

def beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function, evaluated by the modified Lentz method
    (Numerical Recipes, 3rd ed., section 6.4); converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15

    def nonzero(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),             # even step
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 / nonzero(1.0 + numerator * d)
            c = nonzero(1.0 + numerator / c)
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df > 0 (not necessarily whole) degrees of freedom."""
    upper_tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return upper_tail if t > 0 else 1.0 - upper_tail


# ---------------------------------------------------------------------------------------------
# Samples and the test
# ---------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """val_loss over the seeds of one side; std is None when it cannot be known (one seed, or a mean alone)."""
    what: str
    n: int
    mean: float
    std: float | None
    mean_bpb: float | None


def sample_of_values(what: str, losses: list[float], bpbs: list[float]) -> Sample:
    std = statistics.stdev(losses) if len(losses) > 1 else None
    return Sample(what, len(losses), statistics.fmean(losses), std, statistics.fmean(bpbs) if bpbs else None)


def sample_from_submission(path: Path) -> Sample:
    try:
        sub = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RecordsError(f"{path}: cannot read it as JSON ({e})") from None
    per_seed = list((sub.get("seed_results") or {}).values())
    if per_seed and all(isinstance(r, dict) and "val_loss" in r for r in per_seed):
        return sample_of_values(f"{path}, seed_results", [float(r["val_loss"]) for r in per_seed],
                                [float(r["val_bpb"]) for r in per_seed if "val_bpb" in r])
    if "val_loss" not in sub:
        raise RecordsError(f"{path} gives no val_loss (nats), only {', '.join(k for k in ('val_bpb',) if k in sub) or 'no score'}; "
                           "pass the record's train logs instead")
    bpb = float(sub["val_bpb"]) if "val_bpb" in sub else None
    seeds = sub.get("seeds") or []
    if sub.get("val_loss_std") is not None and len(seeds) > 1:
        return Sample(f"{path}, mean and std", len(seeds), float(sub["val_loss"]), float(sub["val_loss_std"]), bpb)
    return Sample(f"{path}, mean only", 1, float(sub["val_loss"]), None, bpb)


def read_sample(paths: list[Path]) -> Sample:
    """A submission.json, or the logs of the seeds (ours or the public record format)."""
    if len(paths) == 1 and paths[0].suffix == ".json":
        return sample_from_submission(paths[0])
    if any(p.suffix == ".json" for p in paths):
        raise RecordsError("give either one submission.json or log files, not both")
    runs = parse_logs(paths)
    scores = [(r, r.score()) for r in runs]
    if unscored := [r.name for r, s in scores if s is None]:
        raise RecordsError(f"no final score line in {', '.join(unscored)}")
    return sample_of_values(f"{len(runs)} log{'s' if len(runs) > 1 else ''}", [s.val_loss for _, s in scores],
                            [s.val_bpb for _, s in scores])


@dataclass
class Result:
    improvement: float           # previous mean - our mean, nats
    method: str
    t: float | None = None
    df: float | None = None
    p: float | None = None
    reason: str = ""             # why there is no p-value


def one_sided_test(ours: Sample, previous: Sample, margin: float = MARGIN_NATS) -> Result:
    """One-sided test of H0: previous - ours <= margin (Welch; one-sample when the previous spread is unknown)."""
    improvement = previous.mean - ours.mean
    if ours.n < 2:
        return Result(improvement, "none", reason=f"too few seeds for a t-test: ours has {ours.n}, at least 2 are needed (records show 3)")
    terms = [(ours.std ** 2 / ours.n, ours.n - 1)]
    method = "one-sided Welch t-test"
    if previous.std is None:
        method = "one-sided one-sample t-test (the previous record's spread is unknown: its mean is taken as exact)"
    else:
        terms.append((previous.std ** 2 / previous.n, previous.n - 1))
    variance = sum(v for v, _ in terms)
    if variance == 0.0:
        return Result(improvement, method, reason="the seeds do not vary at all, so the t statistic is undefined")
    t = (improvement - margin) / math.sqrt(variance)
    df = variance ** 2 / sum(v ** 2 / dof for v, dof in terms)  # Welch-Satterthwaite
    return Result(improvement, method, t, df, student_t_sf(t, df))


def verdict(result: Result, margin: float = MARGIN_NATS, alpha: float = ALPHA) -> str:
    if result.p is None:
        return f"no test: {result.reason}. The mean improvement is {result.improvement:.5f} nats."
    if result.p < alpha:
        return f"significant: the improvement exceeds {margin} nats at p = {result.p:.3g} < {alpha}."
    if result.improvement <= margin:
        return f"not significant: the mean improvement ({result.improvement:.5f} nats) is not above the required {margin} nats (p = {result.p:.3g})."
    return f"not significant: p = {result.p:.3g} >= {alpha}; more seeds or a larger gain are needed to show {margin} nats."


def report(ours: Sample, previous: Sample, margin: float = MARGIN_NATS, alpha: float = ALPHA) -> str:
    result = one_sided_test(ours, previous, margin)

    def side(name: str, s: Sample) -> str:
        std = "unknown" if s.std is None else f"{s.std:.8f}"
        return f"{name:<9}{s.n} seed{'s' if s.n != 1 else ' '}  val_loss mean {s.mean:.8f}  std {std}  ({s.what})"

    lines = [side("ours", ours), side("previous", previous),
             f"improvement (previous - ours): {result.improvement:.8f} nats"
             + (f", {previous.mean_bpb - ours.mean_bpb:.8f} bpb" if None not in (ours.mean_bpb, previous.mean_bpb) else "")]
    if result.p is not None:
        lines += [f"{result.method}, H0: improvement <= {margin} nats, H1: improvement > {margin} nats",
                  f"t = {result.t:.4f}  df = {result.df:.2f}  p = {result.p:.4g}"]
    lines.append(f"verdict: {verdict(result, margin, alpha)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", nargs="+", type=Path, required=True, help="our logs (one per seed) or our submission.json")
    parser.add_argument("--previous", nargs="+", type=Path, required=True, help="the previous record's submission.json or its logs")
    parser.add_argument("--threshold", type=float, default=MARGIN_NATS, help="required improvement in nats (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="significance level (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        print(report(read_sample(args.ours), read_sample(args.previous), args.threshold, args.alpha))
    except RecordsError as e:
        sys.exit(f"significance.py: {e}")


if __name__ == "__main__":
    main()
