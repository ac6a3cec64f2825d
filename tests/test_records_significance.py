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
    # The mean of three seeds without a std. t = 0.006 / (0.002 / sqrt 3) with 2 degrees of freedom:
    # P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)) = 0.0175494
    result = one_sided_test(sample([1.880, 1.882, 1.884]), Sample("mean", 3, 1.893, None, None))
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
    mean_only = {"val_loss": 1.893, "val_bpb": 1.12, "seeds": [1, 2, 3]}  # a mean of three seeds without a std
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
def test_refuses_a_previous_record_without_val_loss_in_one_line(tmp_path, capsys):
    path = tmp_path / "submission.json"
    path.write_text(json.dumps({"val_bpb": 1.1194, "bytes_total": 15990006}))
    with pytest.raises(SystemExit) as exc:
        significance.main(["--ours", str(path), "--previous", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"error: {path}: gives no val_loss") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Tokenizers, single seeds, bad input
# ---------------------------------------------------------------------------------------------

from records_testlogs import run_tool, write_april_log  # noqa: E402


def run_main(argv, capsys):
    return run_tool(significance.main, argv, capsys)


def april_seeds(folder, bpbs=(1.05989454, 1.06125, 1.06209)):
    folder.mkdir()
    return [write_april_log(folder / f"train_seed{seed}.log", seed=seed, val_loss=bpb * 2.1884, val_bpb=bpb)
            for seed, bpb in zip((42, 0, 1234), bpbs)]


def test_refuses_nats_of_different_tokenizers(tmp_path, capsys):
    # sp1024 logs of ours (val_loss ~1.88, val_bpb ~1.114) against an sp8192 record (val_loss ~2.32, val_bpb ~1.061):
    # "0.44 nats better" while the bpb is worse.
    ours = write_seeds(tmp_path / "ours", [1.880, 1.881, 1.882])
    previous = april_seeds(tmp_path / "prev")
    code, out, err = run_main(["--ours", *ours, "--previous", *previous], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: --previous: its tokenizer (vocab 8192, fineweb_8192_bpe.model (logs)) is not ours (vocab 1024, fineweb_1024_bpe.model (logs))")
    assert "--across-tokenizers" in err


def test_refuses_a_submission_json_of_another_vocabulary_by_its_folder_name(tmp_path, capsys):
    ours = write_seeds(tmp_path / "ours", [1.880, 1.881, 1.882])
    folder = tmp_path / "2026-04-27_SP8192_LQER_SparseGate_1.0611"
    folder.mkdir()
    (folder / "submission.json").write_text(json.dumps({"val_loss": 2.32202732, "val_bpb": 1.06107587, "val_loss_std": 0.00198,
                                                        "val_bpb_std": 0.0009, "seeds": [42, 0, 1234]}))
    code, out, err = run_main(["--ours", *ours, "--previous", folder / "submission.json"], capsys)
    assert code == 2 and out == "" and "its tokenizer (vocab 8192 ('SP8192' in the name))" in err
    # package.py writes the tokenizer into submission.json: that is read first
    (folder / "submission.json").write_text(json.dumps({"val_loss": 1.9, "val_loss_std": 0.001, "seeds": [1, 2, 3],
                                                        "vocab_size": 1024, "tokenizer": "fineweb_1024_bpe.model"}))
    code, out, err = run_main(["--ours", *ours, "--previous", folder / "submission.json"], capsys)
    assert code == 0 and err == "" and "verdict: significant" in out


def test_across_tokenizers_compares_bpb_with_a_warning(tmp_path, capsys):
    ours = write_seeds(tmp_path / "ours", [1.880, 1.881, 1.882])  # val_bpb = loss * 0.5923: 1.1135, 1.1141, 1.1147
    previous = april_seeds(tmp_path / "prev")
    code, out, err = run_main(["--ours", *ours, "--previous", *previous, "--across-tokenizers"], capsys)
    assert code == 0
    assert err.startswith("warning: --across-tokenizers: comparing val_bpb (bits per byte), not val_loss") and err.count("\n") == 1
    assert "val_bpb mean" in out and " nats" not in out
    assert "H0: improvement <= 0.005 bpb" in out and "verdict: not significant" in out
    improvement = float(out.split("improvement (previous - ours): ")[1].split()[0])
    assert improvement == pytest.approx((1.05989454 + 1.06125 + 1.06209) / 3 - 1.881 * 0.5923, abs=1e-7) and improvement < 0


def test_unknown_tokenizer_is_a_warning(tmp_path, capsys):
    ours = write_seeds(tmp_path / "ours", [1.880, 1.881, 1.882])
    path = tmp_path / "submission.json"
    path.write_text(json.dumps({"val_loss": 1.9, "val_loss_std": 0.001, "seeds": [1, 2, 3]}))
    code, out, err = run_main(["--ours", *ours, "--previous", path], capsys)
    assert code == 0 and err.startswith("warning: --previous: its tokenizer is not known") and "verdict:" in out


def test_logs_of_one_side_with_different_tokenizers_are_refused(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    logs = [write_log(tmp_path / "o" / "a.txt", seed=1), write_log(tmp_path / "o" / "b.txt", seed=2, settings={"VOCAB_SIZE": "8192"})]
    code, out, err = run_main(["--ours", *logs, "--previous", *logs], capsys)
    assert code == 2 and "error: --ours: the logs come from different tokenizers" in err


@pytest.mark.parametrize("sub", [{"val_loss": 1.893, "val_bpb": 1.12}, {"val_loss": 1.893, "seeds": [1337]},
                                 {"val_loss": 1.893, "val_loss_std": 0.003, "seeds": [1337]},
                                 {"seed_results": {"1337": {"val_loss": 1.893, "val_bpb": 1.12}}}])
def test_one_previous_seed_is_not_an_exact_mean(tmp_path, capsys, sub):
    ours = write_seeds(tmp_path / "ours", [1.880, 1.881, 1.882])
    path = tmp_path / "submission.json"
    path.write_text(json.dumps(sub))
    assert read_sample([path]).std is None and read_sample([path]).n == 1
    code, out, err = run_main(["--ours", *ours, "--previous", path], capsys)
    assert code == 0 and "std unknown (one seed)" in out and "t = " not in out
    assert "verdict: no test: the previous record is one run's score with no known spread" in out


def test_one_previous_log_is_not_an_exact_mean(tmp_path, capsys):
    ours = write_seeds(tmp_path / "ours", [1.880, 1.881, 1.882])
    previous = write_public_log(tmp_path / "prev.log", val_loss=1.95)
    code, out, err = run_main(["--ours", *ours, "--previous", previous], capsys)
    assert code == 0 and "verdict: no test: the previous record is one run's score" in out and "p = " not in out


def test_a_failed_log_is_not_a_score(tmp_path, capsys):
    ours = write_seeds(tmp_path / "ours", [1.880, 1.881, 1.882])
    write_log(ours[1], seed=42, val_loss=1.881, append=["error: NCCL timeout"])
    previous = write_seeds(tmp_path / "prev", [1.900, 1.901, 1.902], public=True)
    code, out, err = run_main(["--ours", *ours, "--previous", *previous], capsys)
    assert code == 2 and out == "" and err == f"error: {ours[1]}: the run failed (error: NCCL timeout); expected a complete run with a finite score\n"


def nan_log(path):
    path = write_log(path)
    path.write_text(path.read_text().replace("final_quant_sliding_window_exact val_loss:1.90310000", "final_quant_sliding_window_exact val_loss:nan"))
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda d: [nan_log(d / "n.txt")], "the score is not a finite number"),
    (lambda d: [json_file(d, '{"val_loss": NaN, "val_loss_std": 0.1, "seeds": [1, 2]}')], "val_loss: expected a finite number, got nan"),
    (lambda d: [json_file(d, '{"seed_results": {"1": {"val_loss": Infinity}, "2": {"val_loss": 1.9}}}')], "seed_results.1.val_loss: expected a finite number"),
    (lambda d: [json_file(d, '{"val_loss": 1.9, "val_loss_std": -Infinity, "seeds": [1, 2]}')], "val_loss_std: expected a finite number"),
    (lambda d: [json_file(d, '{"val_loss": 1.9, "val_loss_std": -0.1, "seeds": [1, 2]}')], "expected a standard deviation"),
    (lambda d: [json_file(d, '{"val_loss": "1.9"}')], 'val_loss: expected a number, got "1.9"'),
    (lambda d: [json_file(d, '{"val_loss": true}')], "val_loss: expected a number, got true"),
    (lambda d: [json_file(d, '{"seed_results": {"1": {"val_loss": [1]}}}')], "seed_results.1.val_loss: expected a number"),
    (lambda d: [json_file(d, '[1.9, 1.8]')], "expected a JSON object"),
    (lambda d: [json_file(d, '"text"')], "expected a JSON object"),
    (lambda d: [json_file(d, '')], "does not parse"),
    (lambda d: [json_file(d, '{"val_loss": 1.9')], "does not parse"),
    (lambda d: [json_file(d, '[' * 100_000)], "does not parse"),
    (lambda d: [json_file(d, '{"seed_results": [1, 2], "val_bpb": 1.1}')], "gives no val_loss"),
    (lambda d: [json_file(d, '{"val_loss": 1e308, "seeds": [1, 2], "val_loss_std": 1e308}')], None),
    (lambda d: [d / "missing.log"], "missing.log: cannot read"),
    (lambda d: [d], "cannot read"),
    (lambda d: [binary(d / "b.log")], "no log lines that this tool reads"),
    (lambda d: [json_file(d, '{}'), d / "x.log"], "--ours: expected either one submission.json or log files, not both"),
])
def test_bad_input_is_one_error_line_never_a_traceback(tmp_path, capsys, make, expected):
    good = write_seeds(tmp_path / "good", [1.900, 1.901, 1.902])
    code, out, err = run_main(["--ours", *make(tmp_path), "--previous", *good], capsys)
    if expected is None:  # absurd but finite figures: a report, no crash
        assert code == 0 and "verdict:" in out
        return
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def json_file(folder, text):
    path = folder / f"sub{len(list(folder.glob('*.json')))}.json"
    path.write_text(text)
    return path


def binary(path):
    path.write_bytes(bytes(range(256)) * 10)
    return path


@pytest.mark.parametrize("args, expected", [
    (["--threshold", "nan"], "error: --threshold: expected a finite number, got 'nan'"),
    (["--threshold", "-0.1"], "error: --threshold: expected 0 or more"),
    (["--alpha", "inf"], "error: --alpha: expected a finite number, got 'inf'"),
    (["--alpha", "1.5"], "error: --alpha: expected a level between 0 and 1"),
    (["--alpha", "x"], "error: --alpha: expected a number, got 'x'"),
])
def test_bad_settings_are_one_error_line(tmp_path, capsys, args, expected):
    good = write_seeds(tmp_path / "good", [1.900, 1.901, 1.902])
    code, out, err = run_main(["--ours", *good, "--previous", *good, *args], capsys)
    assert code == 2 and err.startswith(expected) and err.count("\n") == 1


def test_command_line_errors_have_no_usage_block(tmp_path):
    result = subprocess.run([sys.executable, str(RECORDS / "significance.py"), "--ours"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
