"""records/significance.py: the Student-t tail, the one-sided Welch test on a hand-computed case, and the inputs it reads."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records_testlogs import RECORDS, write_log, write_public_log  # noqa: E402

import significance  # noqa: E402
from logparse import RecordsError  # noqa: E402
from significance import Sample, one_sided_test, read_sample, student_t_sf  # noqa: E402

# P(T > t) for Student's t, computed once with SciPy 1.17.1 (not a project dependency):
#   python -c "from scipy import stats; print(repr(stats.t.sf(t, df)))"
SCIPY_T_SF = [
    (1.0, 1.0, 0.25000000000000006),
    (-2.0, 3.0, 0.9303370157205785),
    (2.5, 3.4844, 0.03800803253594556),
    (2.0, 10.0, 0.03669401738537018),
    (0.5, 2.5, 0.3288489599348574),
    (-1.3, 7.7, 0.8844186511740483),
    (4.0, 30.0, 0.0001909228180418782),
    (12.0, 4.0, 0.0001382142742514865),
    (1.96, 1e6, 0.024998033792634926),
]


@pytest.mark.parametrize("t, df, expected", SCIPY_T_SF)
def test_student_t_tail_matches_scipy(t, df, expected):
    assert student_t_sf(t, df) == pytest.approx(expected, rel=1e-9, abs=1e-13)


@pytest.mark.parametrize("t", [-30.0, -3.0, -0.7, 0.0, 0.3, 1.0, 2.2, 9.0, 250.0])
def test_student_t_tail_closed_forms(t):
    # df = 1 is the Cauchy distribution; df = 2 has P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)).
    assert student_t_sf(t, 1.0) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-10, abs=1e-14)
    assert student_t_sf(t, 2.0) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-10, abs=1e-14)


def sample(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return Sample("test", len(values), mean, std, None)


def test_welch_hand_computed_case():
    # ours 1.880, 1.882, 1.884 (mean 1.882, sd 0.002); previous 1.890, 1.893, 1.896 (mean 1.893, sd 0.003).
    # improvement 0.011; se^2 = 0.002^2/3 + 0.003^2/3 = 13e-6/3; t = (0.011 - 0.005) / sqrt(13e-6/3) = 2.88231
    # df = (13e-6/3)^2 / ((4e-6/3)^2/2 + (9e-6/3)^2/2) = 3.48454. p = 0.0264900 from
    # scipy.stats.ttest_ind(previous - 0.005, ours, equal_var=False, alternative="greater") (SciPy 1.17.1).
    result = one_sided_test(sample([1.880, 1.882, 1.884]), sample([1.890, 1.893, 1.896]))
    assert result.improvement == pytest.approx(0.011, abs=1e-12)
    assert result.t == pytest.approx(0.006 / math.sqrt(13e-6 / 3), rel=1e-9)
    assert result.df == pytest.approx((13e-6 / 3) ** 2 / ((4e-6 / 3) ** 2 / 2 + (9e-6 / 3) ** 2 / 2), rel=1e-9)
    assert (result.t, result.df) == pytest.approx((2.8823067684916754, 3.4845360824742264), rel=1e-9)
    assert result.p == pytest.approx(0.026489958478560803, rel=1e-7)
    assert significance.verdict(result).startswith("not significant: p = 0.0265 >= 0.01")


def test_previous_known_only_by_its_mean_is_a_one_sample_test():
    # t = 0.006 / (0.002 / sqrt 3) with 2 degrees of freedom: P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)) = 0.0175494
    result = one_sided_test(sample([1.880, 1.882, 1.884]), Sample("mean", 1, 1.893, None, None))
    t = 0.006 / (0.002 / math.sqrt(3))
    assert (result.t, result.df) == pytest.approx((t, 2.0))
    assert result.p == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-9)
    assert "one-sample" in result.method


def test_too_few_seeds_is_said_plainly():
    result = one_sided_test(Sample("one", 1, 1.88, None, None), sample([1.890, 1.893, 1.896]))
    assert result.p is None
    assert significance.verdict(result).startswith("no test: too few seeds for a t-test: ours has 1")


def test_no_improvement_is_not_significant():
    result = one_sided_test(sample([1.890, 1.892, 1.894]), sample([1.890, 1.893, 1.896]))
    assert result.p > 0.5 and "is not above the required 0.005 nats" in significance.verdict(result)


def write_seeds(folder, losses, public=False):
    folder.mkdir()
    writer = write_public_log if public else write_log
    return [writer(folder / f"s{seed}.log", seed=seed, val_loss=loss, val_bpb=loss * 0.5923)
            for seed, loss in zip((1337, 42, 2025), losses)]


def test_command_on_our_logs_against_public_logs(tmp_path):
    ours = write_seeds(tmp_path / "ours", [1.880, 1.881, 1.882])
    previous = write_seeds(tmp_path / "prev", [1.900, 1.901, 1.902], public=True)
    result = subprocess.run([sys.executable, str(RECORDS / "significance.py"), "--ours", *map(str, ours),
                             "--previous", *map(str, previous)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # scipy.stats.ttest_ind([1.895, 1.896, 1.897], [1.880, 1.881, 1.882], equal_var=False, alternative="greater")
    # gives t = 18.3712, df = 4.0, p = 2.5825e-05.
    assert "improvement (previous - ours): 0.02000000 nats" in result.stdout
    assert "t = 18.3712  df = 4.00  p = 2.583e-05" in result.stdout
    assert "verdict: significant: the improvement exceeds 0.005 nats at p = 2.58e-05 < 0.01." in result.stdout


def test_previous_submission_json_forms(tmp_path):
    per_seed = {"val_loss": 1.893, "val_bpb": 1.12,
                "seed_results": {"1": {"val_loss": 1.890}, "2": {"val_loss": 1.893}, "3": {"val_loss": 1.896}}}
    summary = {"val_loss": 1.893, "val_loss_std": 0.003, "seeds": [1, 2, 3]}
    mean_only = {"val_loss": 1.893, "val_bpb": 1.12}
    ours = sample([1.880, 1.882, 1.884])
    for name, sub, expected_p in (("per_seed", per_seed, 0.026489958478560803), ("summary", summary, 0.026489958478560803),
                                  ("mean_only", mean_only, 0.017549359322992324)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(sub))
        assert one_sided_test(ours, read_sample([path])).p == pytest.approx(expected_p, rel=1e-6), name


def test_refuses_a_previous_record_without_val_loss(tmp_path):
    path = tmp_path / "submission.json"
    path.write_text(json.dumps({"val_bpb": 1.1194, "bytes_total": 15990006}))
    with pytest.raises(RecordsError, match="gives no val_loss"):
        read_sample([path])
    with pytest.raises(SystemExit) as exc:
        significance.main(["--ours", str(path), "--previous", str(path)])
    assert str(exc.value.code).startswith("significance.py: ") and "\n" not in str(exc.value.code)
