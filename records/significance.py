"""Is our improvement over the previous record significant? A one-sided Welch t-test on val_loss.

    python records/significance.py --ours logs/s1337.txt logs/s42.txt logs/s2025.txt \\
        --previous records/track_10min_16mb/2026-03-25_Previous/submission.json

The improvement is the previous mean val_loss minus ours (nats per token; the score line of each
log, or a submission.json's seed_results). The test is H0: improvement <= 0.005 nats against
H1: improvement > 0.005 nats, with unequal variances and Welch-Satterthwaite degrees of freedom.
The challenge asks new records to show this at p < 0.01. A previous record known only by the mean of
several seeds is treated as an exact number (a one-sample t-test of our seeds); one seed's val_loss is
not a mean, and gives no test. Nats per token of different tokenizers do not compare: runs of different
tokenizers are refused unless --across-tokenizers, which tests val_bpb instead. The Student-t tail is
computed here (regularised incomplete beta function) so that no statistics package is needed.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from logparse import ArgumentParser, InputError, RecordsError, finite_float, parse_logs, run_main, warn

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

METRICS = {"val_loss": "nats", "val_bpb": "bpb"}


@dataclass
class Tokenizer:
    """What a side's nats are per: the vocabulary size and the tokenizer model's file name, each where known."""
    vocab_size: int | None = None
    name: str | None = None
    source: str = ""

    def known(self) -> bool:
        return self.vocab_size is not None or self.name is not None

    def differs_from(self, other: "Tokenizer") -> bool:
        return ((None not in (self.vocab_size, other.vocab_size) and self.vocab_size != other.vocab_size)
                or (None not in (self.name, other.name) and self.name != other.name))

    def __str__(self) -> str:
        parts = ([f"vocab {self.vocab_size}"] if self.vocab_size is not None else []) + ([self.name] if self.name else [])
        return ", ".join(parts) + (f" ({self.source})" if self.source else "") if parts else "unknown"


@dataclass
class Sample:
    """One side's scores over its seeds: mean and std of the tested metric (val_loss, or val_bpb with
    --across-tokenizers), mean_bpb for the report. std is None when it is not known: one seed, or a mean alone."""
    what: str
    n: int
    mean: float
    std: float | None
    mean_bpb: float | None
    tokenizer: Tokenizer | None = None


def finite_number(value, where: str) -> float:
    """A number from a submission.json: a finite int or float (not a bool, a string or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: expected a number, got {json.dumps(value)[:40]}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{where}: expected a finite number, got {value}")
    return value


def sample_of_values(what: str, values: list[float], bpbs: list[float], tokenizer: Tokenizer | None = None) -> Sample:
    try:
        std = statistics.stdev(values) if len(values) > 1 else None
        mean = statistics.fmean(values)
        mean_bpb = statistics.fmean(bpbs) if bpbs else None
    except (OverflowError, ValueError) as e:
        raise InputError(f"{what}: the scores are out of range ({e}); expected scores of a few nats") from None
    if not math.isfinite(mean) or (std is not None and not math.isfinite(std)):
        raise InputError(f"{what}: the scores are out of range; expected scores of a few nats")
    return Sample(what, len(values), mean, std, mean_bpb, tokenizer)


SP_VOCAB = re.compile(r"(?<![A-Za-z0-9])sp(\d{2,7})(?![0-9])", re.I)


def submission_tokenizer(sub: dict, path: Path) -> Tokenizer:
    """`tokenizer` and `vocab_size` in the submission.json (package.py writes them); else `SP8192` and the
    like in its name or folder name, as the record folders spell their tokenizer."""
    vocab = sub.get("vocab_size")
    vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
    name = sub.get("tokenizer") if isinstance(sub.get("tokenizer"), str) else None
    if vocab is not None or name:
        return Tokenizer(vocab, Path(name).name if name else None, "submission.json")
    for text in (sub.get("name"), path.resolve().parent.name):
        if isinstance(text, str) and (m := SP_VOCAB.search(text)):
            return Tokenizer(int(m[1]), None, f"'{m[0]}' in the name")
    return Tokenizer()


def sample_from_submission(path: Path, metric: str = "val_loss") -> Sample:
    try:
        sub = json.loads(path.read_bytes())
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: expected a submission.json (JSON), but it does not parse ({str(e)[:80]})") from None
    if not isinstance(sub, dict):
        raise InputError(f"{path}: expected a JSON object with {metric} or seed_results, got a JSON {type(sub).__name__}")
    tokenizer = submission_tokenizer(sub, path)
    per_seed = sub.get("seed_results")
    per_seed = list(per_seed.items()) if isinstance(per_seed, dict) else list(enumerate(per_seed)) if isinstance(per_seed, list) else []
    if per_seed and all(isinstance(r, dict) and metric in r for _, r in per_seed):
        values = [finite_number(r[metric], f"{path}: seed_results.{k}.{metric}") for k, r in per_seed]
        bpbs = [finite_number(r["val_bpb"], f"{path}: seed_results.{k}.val_bpb") for k, r in per_seed if "val_bpb" in r]
        return sample_of_values(f"{path}, seed_results", values, bpbs if len(bpbs) == len(values) else [], tokenizer)
    if metric not in sub:
        have = ", ".join(k for k in METRICS if k in sub) or "no score"
        hint = "pass --across-tokenizers to compare val_bpb, or the record's train logs" if metric == "val_loss" and "val_bpb" in sub \
            else "pass the record's train logs instead"
        raise InputError(f"{path}: gives no {metric} ({METRICS[metric]}), only {have}; expected {metric} or seed_results with {metric}: {hint}")
    mean = finite_number(sub[metric], f"{path}: {metric}")
    bpb = finite_number(sub["val_bpb"], f"{path}: val_bpb") if "val_bpb" in sub else None
    seeds = sub.get("seeds")
    n = len(seeds) if isinstance(seeds, list) else 1
    std = sub.get(f"{metric}_std")
    if n > 1:
        if std is None:
            return Sample(f"{path}, mean of {n} seeds without a std", n, mean, None, bpb, tokenizer)
        std = finite_number(std, f"{path}: {metric}_std")
        if std < 0:
            raise InputError(f"{path}: {metric}_std: expected a standard deviation (0 or more), got {std}")
        return Sample(f"{path}, mean and std", n, mean, std, bpb, tokenizer)
    return Sample(f"{path}, one run's {metric}" + (" (one seed listed)" if isinstance(seeds, list) else " (no seeds listed)"),
                  1, mean, None, bpb, tokenizer)


def logs_tokenizer(runs, what: str) -> Tokenizer:
    tokenizers = [Tokenizer(r.vocab_size, r.tokenizer, "logs") for r in runs]
    for t in tokenizers[1:]:
        if t.differs_from(tokenizers[0]):
            raise InputError(f"{what}: the logs come from different tokenizers: "
                             + ", ".join(f"{r.name} ({Tokenizer(r.vocab_size, r.tokenizer)})" for r in runs)
                             + "; expected the seeds of one run configuration")
    vocab = next((t.vocab_size for t in tokenizers if t.vocab_size is not None), None)
    name = next((t.name for t in tokenizers if t.name), None)
    return Tokenizer(vocab, name, "logs")


def read_sample(paths: list[Path], metric: str = "val_loss", what: str = "the inputs") -> Sample:
    """A submission.json, or the logs of the seeds (ours or the public record format)."""
    if len(paths) == 1 and paths[0].suffix == ".json":
        return sample_from_submission(paths[0], metric)
    if any(p.suffix == ".json" for p in paths):
        raise InputError(f"{what}: expected either one submission.json or log files, not both")
    runs = parse_logs(paths)
    scores = [r.final_score() for r in runs]  # refuses failed runs and non-finite scores
    values = [getattr(s, metric) for s in scores]
    return sample_of_values(f"{len(runs)} log{'s' if len(runs) > 1 else ''}", values, [s.val_bpb for s in scores],
                            logs_tokenizer(runs, what))


@dataclass
class Result:
    improvement: float           # previous mean - our mean, in the tested metric's unit
    method: str
    t: float | None = None
    df: float | None = None
    p: float | None = None
    reason: str = ""             # why there is no p-value


def one_sided_test(ours: Sample, previous: Sample, margin: float = MARGIN_NATS) -> Result:
    """One-sided test of H0: previous - ours <= margin (Welch; one-sample when the previous record is a
    mean of several seeds whose spread is unknown). One previous seed, or fewer than two of ours: no test."""
    improvement = previous.mean - ours.mean
    if ours.n < 2:
        return Result(improvement, "none", reason=f"too few seeds for a t-test: ours has {ours.n}, at least 2 are needed (records show 3)")
    if ours.std is None:
        return Result(improvement, "none", reason="our spread is unknown (a mean without its std): pass our logs or seed_results")
    if previous.n < 2:
        return Result(improvement, "none", reason="the previous record is one run's score with no known spread "
                      "(a single seed is not a mean whose spread is known): pass its logs, or a submission.json with the seed_results of its seeds")
    method = "one-sided Welch t-test"
    if previous.std is None:
        method = (f"one-sided one-sample t-test (the previous record is the mean of {previous.n} seeds with no std: "
                  "its spread is unknown and its mean is taken as exact)")
    try:
        terms = [(ours.std ** 2 / ours.n, ours.n - 1)]
        if previous.std is not None:
            terms.append((previous.std ** 2 / previous.n, previous.n - 1))
        variance = sum(v for v, _ in terms)
        if variance == 0.0:
            return Result(improvement, method, reason="the seeds do not vary at all, so the t statistic is undefined")
        t = (improvement - margin) / math.sqrt(variance)
        df = variance ** 2 / sum(v ** 2 / dof for v, dof in terms)  # Welch-Satterthwaite
        if not (math.isfinite(t) and math.isfinite(df) and df > 0):
            raise ArithmeticError("out of range")
        return Result(improvement, method, t, df, student_t_sf(t, df))
    except (ArithmeticError, ValueError) as e:
        return Result(improvement, method, reason=f"the t statistic cannot be computed from these figures ({e})")


def verdict(result: Result, margin: float = MARGIN_NATS, alpha: float = ALPHA, unit: str = "nats") -> str:
    if result.p is None:
        return f"no test: {result.reason}. The mean improvement is {result.improvement:.5f} {unit}."
    if result.p < alpha:
        return f"significant: the improvement exceeds {margin} {unit} at p = {result.p:.3g} < {alpha}."
    if result.improvement <= margin:
        return f"not significant: the mean improvement ({result.improvement:.5f} {unit}) is not above the required {margin} {unit} (p = {result.p:.3g})."
    return f"not significant: p = {result.p:.3g} >= {alpha}; more seeds or a larger gain are needed to show {margin} {unit}."


def report(ours: Sample, previous: Sample, margin: float = MARGIN_NATS, alpha: float = ALPHA, metric: str = "val_loss") -> str:
    unit = METRICS[metric]
    result = one_sided_test(ours, previous, margin)

    def side(name: str, s: Sample) -> str:
        std = ("unknown (one seed)" if s.n < 2 else "unknown") if s.std is None else f"{s.std:.8f}"
        return f"{name:<9}{s.n} seed{'s' if s.n != 1 else ' '}  {metric} mean {s.mean:.8f}  std {std}  ({s.what})"

    extra = (f", {previous.mean_bpb - ours.mean_bpb:.8f} bpb" if unit == "nats" and None not in (ours.mean_bpb, previous.mean_bpb) else "")
    lines = [side("ours", ours), side("previous", previous), f"improvement (previous - ours): {result.improvement:.8f} {unit}{extra}"]
    if result.p is not None:
        lines += [f"{result.method}, H0: improvement <= {margin} {unit}, H1: improvement > {margin} {unit}",
                  f"t = {result.t:.4f}  df = {result.df:.2f}  p = {result.p:.4g}"]
    lines.append(f"verdict: {verdict(result, margin, alpha, unit)}")
    return "\n".join(lines)


def check_tokenizers(ours: Sample, previous: Sample, across: bool) -> None:
    """Refuse nats of different tokenizers; warn where a side's tokenizer is not known."""
    a, b = ours.tokenizer or Tokenizer(), previous.tokenizer or Tokenizer()
    if across:
        return
    if a.differs_from(b):
        raise InputError(f"--previous: its tokenizer ({b}) is not ours ({a}): val_loss is in nats per token, and tokens of "
                         "different tokenizers differ; expected runs of one tokenizer, or --across-tokenizers to compare val_bpb")
    for name, t in (("--ours", a), ("--previous", b)):
        if not t.known():
            warn(f"{name}: its tokenizer is not known (no vocab_size or tokenizer in it): val_loss compares only between runs of one tokenizer")


def body(argv) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    parser.add_argument("--ours", nargs="+", type=Path, required=True, help="our logs (one per seed) or our submission.json")
    parser.add_argument("--previous", nargs="+", type=Path, required=True, help="the previous record's submission.json or its logs")
    parser.add_argument("--threshold", type=finite_float, default=MARGIN_NATS,
                        help="required improvement, in nats (in bpb with --across-tokenizers) (default %(default)s)")
    parser.add_argument("--alpha", type=finite_float, default=ALPHA, help="significance level (default %(default)s)")
    parser.add_argument("--across-tokenizers", action="store_true",
                        help="compare runs of different tokenizers in val_bpb (bits per byte) instead of refusing")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha: expected a level between 0 and 1, got {args.alpha}")
    if args.threshold < 0:
        parser.error(f"--threshold: expected 0 or more, got {args.threshold}")
    metric = "val_bpb" if args.across_tokenizers else "val_loss"
    ours, previous = read_sample(args.ours, metric, "--ours"), read_sample(args.previous, metric, "--previous")
    check_tokenizers(ours, previous, args.across_tokenizers)
    if args.across_tokenizers:
        warn(f"--across-tokenizers: comparing val_bpb (bits per byte), not val_loss; ours {ours.tokenizer or 'unknown'}, "
             f"previous {previous.tokenizer or 'unknown'}; the threshold {args.threshold} is in bpb, so the challenge's "
             f"{MARGIN_NATS}-nat rule is not what is tested")
    print(report(ours, previous, args.threshold, args.alpha, metric))


def main(argv=None) -> None:
    run_main(body, argv)


if __name__ == "__main__":
    main()
