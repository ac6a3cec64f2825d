"""records/package.py: the folder and submission.json agree with the logs, and each broken rule is refused."""

import ast
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records_testlogs import RECORDS, SOURCE, write_log  # noqa: E402

import package  # noqa: E402

TRAIN_GPT = RECORDS.parent / "train_gpt.py"
# The stand-in source with train_gpt.py's own self_extracting(), which package.py runs to write the counted train_gpt.py.
_function = next(n for n in ast.parse(TRAIN_GPT.read_bytes()).body if isinstance(n, ast.FunctionDef) and n.name == "self_extracting")
SCRIPT = SOURCE + b"\n\n" + ast.get_source_segment(TRAIN_GPT.read_text(), _function).encode() + b"\n"
FORM = package.self_extracting_form(SCRIPT)

SCORES = {1337: (1.90310000, 1.12710000), 42: (1.90412345, 1.12770123), 2025: (1.90198765, 1.12644321)}
MODEL_BYTES = {1337: 15_468_512, 42: 15_501_000, 2025: 15_433_210}


def three_logs(tmp_path, **changes_by_seed):
    """The logs of seeds 1337, 42 and 2025; changes_by_seed={'s42': {...}} bends one of them."""
    (tmp_path / "logs").mkdir(exist_ok=True)
    return [write_log(tmp_path / "logs" / f"run_s{seed}.txt", **{"seed": seed, "val_loss": SCORES[seed][0], "val_bpb": SCORES[seed][1],
                                                                 "model_bytes": MODEL_BYTES[seed], "source": SCRIPT, "code_bytes": len(FORM),
                                                                 **changes_by_seed.get(f"s{seed}", {})})
            for seed in SCORES]


def package_args(tmp_path, logs, *extra):
    script = tmp_path / "train_gpt.py"
    if not script.exists():
        script.write_bytes(SCRIPT)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("torch\nnumpy\n")
    return [*map(str, logs), "--name", "Test run", "--author", "Ada", "--github-id", "ada", "--blurb", "A test.",
            "--date", "2026-03-25", "--script", str(script), "--requirements", str(requirements),
            "--out", str(tmp_path / "out" / "2026-03-25_Test_run"), *extra]


def refusal(tmp_path, logs, *extra) -> str:
    with pytest.raises(SystemExit) as exc:
        package.main(package_args(tmp_path, logs, *extra))
    message = str(exc.value.code)
    assert message.startswith("package.py: refused: ") and "\n" not in message
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == [], "a refused package must leave nothing behind"
    return message


def test_command_builds_a_folder_that_matches_the_logs(tmp_path):
    logs = three_logs(tmp_path)
    result = subprocess.run([sys.executable, str(RECORDS / "package.py"), *package_args(tmp_path, logs)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "out" / "2026-03-25_Test_run"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "submission.json", "train_gpt.py", "train_gpt_source.py", "requirements.txt",
         "train_seed1337.log", "train_seed42.log", "train_seed2025.log"])
    # train_gpt.py is the self-extracting form the logs count, beside the readable source; it runs that source
    assert (folder / "train_gpt_source.py").read_bytes() == SCRIPT
    assert (folder / "train_gpt.py").read_bytes() == FORM and len(FORM) < len(SCRIPT) + 400
    assert package.unpacked(FORM) == (SCRIPT, "train_gpt.py")
    ran = subprocess.run([sys.executable, "train_gpt.py"], cwd=folder, capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, "training\n"), ran.stderr
    for log in logs:
        seed = log.stem.removeprefix("run_s")
        assert (folder / f"train_seed{seed}.log").read_bytes() == log.read_bytes()

    sub = json.loads((folder / "submission.json").read_text())
    losses = [SCORES[s][0] for s in SCORES]
    bpbs = [SCORES[s][1] for s in SCORES]
    assert sub["val_loss"] == pytest.approx(statistics.mean(losses), abs=1e-8)
    assert sub["val_bpb"] == pytest.approx(statistics.mean(bpbs), abs=1e-8)
    assert sub["val_loss_std"] == pytest.approx(statistics.stdev(losses), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(bpbs), abs=1e-8)
    assert sub["seeds"] == [1337, 42, 2025]
    assert sub["bytes_code"] == len(FORM)
    assert sub["bytes_total"] == max(MODEL_BYTES.values()) + len(FORM)
    assert (sub["author"], sub["github_id"], sub["name"], sub["date"], sub["track"]) == ("Ada", "ada", "Test run", "2026-03-25", "10min_16mb")
    assert sub["hardware"] == "8xNVIDIA H100 80GB HBM3" and sub["pytorch_version"] == "2.11.0+cu130"
    for seed, (loss, bpb) in SCORES.items():
        r = sub["seed_results"][str(seed)]
        assert (r["val_loss"], r["val_bpb"]) == (loss, bpb)
        assert r["artifact_bytes"] == MODEL_BYTES[seed] and r["bytes_total"] == MODEL_BYTES[seed] + len(FORM)
        assert (r["steps"], r["step_avg_ms"], r["train_time_ms"]) == (7103, 84.46, 599912.0)
        assert (r["pre_quant_val_loss"], r["pre_quant_val_bpb"]) == (round(loss + 0.0259, 4), round(bpb + 0.0154, 4))
    assert sub["pre_quant_val_bpb"] == pytest.approx(statistics.mean(round(b + 0.0154, 4) for b in bpbs), abs=1e-8)

    readme = (folder / "README.md").read_text()
    for seed, (loss, bpb) in SCORES.items():
        assert f"| {seed} | 7103 |" in readme and f"{bpb:.8f}" in readme
    assert f"{sub['val_bpb']:.8f}" in readme


def test_command_refuses_with_one_line_and_status_1(tmp_path):
    logs = three_logs(tmp_path, s42={"total_bytes": 16_000_001})
    result = subprocess.run([sys.executable, str(RECORDS / "package.py"), *package_args(tmp_path, logs)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "seed 42" in result.stderr and "over 16,000,000" in result.stderr


@pytest.mark.parametrize("changes, expected", [
    ({"s42": {"model_bytes": 16_000_063 - len(FORM)}}, "seed 42 (run_s42.txt): total submission size 16,000,063 bytes is over 16,000,000"),
    ({"s2025": {"drop": ("final_quant_sliding_window_exact",)}}, "run_s2025.txt lacks the final lines: final_quant_sliding_window_exact"),
    ({"s2025": {"drop": ("Total submission size",)}}, "lacks the final lines: Total submission size"),
    ({"s1337": {"train_time_ms": 600_001.0}}, "seed 1337 (run_s1337.txt): training took 600001ms, over 600000ms"),
    ({"s1337": {"train_time_ms": 597_000.0, "quantization_ms": 3_500.0}},
     "seed 1337 (run_s1337.txt): training took 600500ms, over 600000ms"),  # the GPTQ time counts
    ({"s42": {"eval_time_ms": 600_500}}, "the scoring evaluation took 600500ms"),
    ({"s42": {"source": SCRIPT + b"# changed\n"}}, "the logs come from different code"),
    ({"s42": {"settings": {"NUM_LAYERS": "10"}}}, "differ in settings other than the seed: NUM_LAYERS"),
    ({"s42": {"seed": 1337}}, "a seed appears twice"),
    ({"s42": {"code_bytes": 999}}, "seed 42 (run_s42.txt): Code size 999 bytes but the self-extracting train_gpt.py built from its source has"),
    ({"s42": {"code_bytes": len(SCRIPT)}}, f"Code size {len(SCRIPT)} bytes but"),  # the readable source's size is not the one counted
    ({"s42": {"total_bytes": 15_000_000}}, "is not model 15501000 + code"),
])
def test_refusals(tmp_path, changes, expected):
    assert expected in refusal(tmp_path, three_logs(tmp_path, **changes))


def test_refuses_a_script_that_differs_from_the_logs(tmp_path):
    (tmp_path / "train_gpt.py").write_bytes(SCRIPT.replace(b"training", b"trainning"))
    assert "differs from the source embedded in the logs (first at line 3)" in refusal(tmp_path, three_logs(tmp_path))


def test_refuses_a_source_without_a_self_extracting_form(tmp_path):
    (tmp_path / "train_gpt.py").write_bytes(SOURCE)
    logs = [write_log(tmp_path / "one.txt", seed=7, source=SOURCE)]
    assert "the source in the logs has no self_extracting() to build its self-extracting train_gpt.py with" in refusal(tmp_path, logs)


def test_refuses_a_form_that_does_not_unpack_to_the_source(tmp_path):
    """A self_extracting() that runs some other program is caught by running its form with compile and exec recorded."""
    bad = SCRIPT.replace(b"READABLE_SOURCE=lzma.decompress(", b'READABLE_SOURCE=b"print(1)"or lzma.decompress(', 1)
    assert bad != SCRIPT
    (tmp_path / "train_gpt.py").write_bytes(bad)
    logs = [write_log(tmp_path / "one.txt", seed=7, source=bad, code_bytes=len(package.self_extracting_form(bad)))]
    assert "the self-extracting train_gpt.py does not unpack to the source embedded in the logs" in refusal(tmp_path, logs)


def test_refuses_public_logs_without_source(tmp_path):
    log = tmp_path / "public.log"
    log.write_text("step:10/100 train_loss:3.0 train_time:100ms step_avg:10.00ms\n")
    assert "not logs of our train_gpt.py" in refusal(tmp_path, [log])


def test_record_track_needs_8xh100_but_non_record_track_does_not(tmp_path):
    logs = three_logs(tmp_path, s1337={"gpus": ("NVIDIA A100-SXM4-80GB",) * 8}, s42={"gpus": ("NVIDIA A100-SXM4-80GB",) * 8},
                      s2025={"gpus": ("NVIDIA A100-SXM4-80GB",) * 8, "train_time_ms": 1_200_000.0})
    assert "the record track needs 8xH100" in refusal(tmp_path, logs)
    package.main(package_args(tmp_path, logs, "--track", "non_record_16mb"))
    sub = json.loads((tmp_path / "out" / "2026-03-25_Test_run" / "submission.json").read_text())
    assert sub["track"] == "non_record_16mb" and sub["hardware"] == "8xNVIDIA A100-SXM4-80GB"


def test_refuses_to_overwrite_and_leaves_the_existing_folder_alone(tmp_path):
    logs = three_logs(tmp_path)
    package.main(package_args(tmp_path, logs))
    folder = tmp_path / "out" / "2026-03-25_Test_run"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SystemExit) as exc:
        package.main(package_args(tmp_path, logs))
    assert "already exists" in str(exc.value.code)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in (tmp_path / "out").iterdir()] == [folder.name], "no temporary folder may be left"


def test_single_seed_has_no_std(tmp_path):
    log = write_log(tmp_path / "one.txt", seed=7, source=SCRIPT, code_bytes=len(FORM))
    package.main(package_args(tmp_path, [log]))
    sub = json.loads((tmp_path / "out" / "2026-03-25_Test_run" / "submission.json").read_text())
    assert sub["seeds"] == [7] and sub["val_loss"] == 1.9031 and sub["val_loss_std"] is None


# ---------------------------------------------------------------------------------------------
# Unusable input (status 2), strict JSON, the test-time-training score
# ---------------------------------------------------------------------------------------------

def error_line(tmp_path, capsys, args) -> str:
    with pytest.raises(SystemExit) as exc:
        package.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == [], "nothing may be written"
    return err


def replace_in(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("old, new, expected", [
    ("final_quant_sliding_window_exact val_loss:1.90412345", "final_quant_sliding_window_exact val_loss:nan",
     "run_s42.txt: final_quant_sliding_window_exact val_loss:nan val_bpb:1.12770123; expected finite numbers"),
    ("post_average_prequant val_loss:1.9300 val_bpb:1.1431", "post_average_prequant val_loss:1.9300 val_bpb:inf",
     "run_s42.txt: post_average_prequant val_loss:1.93 val_bpb:inf; expected finite numbers"),
])
def test_refuses_non_finite_scores_in_one_line(tmp_path, capsys, old, new, expected):
    logs = three_logs(tmp_path)
    replace_in(logs[1], old, new)
    assert expected in error_line(tmp_path, capsys, package_args(tmp_path, logs))


def test_refuses_a_failed_run(tmp_path, capsys):
    logs = three_logs(tmp_path, s2025={"append": ["error: the artifact does not round-trip"]})
    err = error_line(tmp_path, capsys, package_args(tmp_path, logs))
    assert err == f"error: {logs[2]}: the run failed (error: the artifact does not round-trip); expected the log of a complete run\n"


def test_unreadable_files_and_bad_options_are_one_error_line(tmp_path, capsys):
    logs = three_logs(tmp_path)
    assert f"{tmp_path / 'nope.txt'}: cannot read" in error_line(tmp_path, capsys, package_args(tmp_path, [*logs[:2], tmp_path / "nope.txt"]))
    args = package_args(tmp_path, logs)
    args[args.index("--script") + 1] = str(tmp_path / "missing.py")
    assert f"{tmp_path / 'missing.py'}: cannot read the script" in error_line(tmp_path, capsys, args)
    args = package_args(tmp_path, logs)
    args[args.index("--date") + 1] = "25.03.2026"
    assert error_line(tmp_path, capsys, args) == "error: --date: expected YYYY-MM-DD, got '25.03.2026'\n"
    assert error_line(tmp_path, capsys, package_args(tmp_path, logs, "--track", "other")).startswith("error: --track: invalid choice")


def test_submission_json_is_strict_json(tmp_path, capsys, monkeypatch):
    real = package.submission_json
    monkeypatch.setattr(package, "submission_json", lambda *a, **k: {**real(*a, **k), "val_loss_std": float("nan")})
    assert "val_loss_std is not a finite number" in error_line(tmp_path, capsys, package_args(tmp_path, three_logs(tmp_path)))


def test_no_cuda_version_is_null_not_the_string_none(tmp_path):
    logs = three_logs(tmp_path, **{f"s{seed}": {"versions": "versions python:3.12.3 torch:2.11.0+cpu cuda:None"} for seed in SCORES})
    package.main(package_args(tmp_path, logs))
    text = (tmp_path / "out" / "2026-03-25_Test_run" / "submission.json").read_text()
    sub = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert sub["cuda_version"] is None and sub["pytorch_version"] == "2.11.0+cpu" and '"None"' not in text
    assert (sub["vocab_size"], sub["tokenizer"]) == (1024, "fineweb_1024_bpe.model")


def test_a_failed_write_leaves_no_folder_and_no_temporary(tmp_path, monkeypatch, capsys):
    args = package_args(tmp_path, three_logs(tmp_path))
    real = Path.write_bytes
    folders = []

    def failing(self, data):
        folders.append(self.parent.name)
        if self.name == "README.md":
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing)
    err = error_line(tmp_path, capsys, args)
    assert "No space left on device" in err and not (tmp_path / "out" / "2026-03-25_Test_run").exists()
    assert folders and all(f.startswith(".2026-03-25_Test_run.") and f.endswith(".tmp") for f in folders), folders


def test_the_ttt_score_when_the_log_has_one(tmp_path):
    ttt = {1337: (1.88010000, 1.11350000), 42: (1.88110000, 1.11410000), 2025: (1.87990000, 1.11330000)}
    logs = three_logs(tmp_path, **{f"s{seed}": {"ttt": ttt[seed], "ttt_eval_time_ms": 455_000, "evaluation_ms": 599_000} for seed in SCORES})
    package.main(package_args(tmp_path, logs))
    folder = tmp_path / "out" / "2026-03-25_Test_run"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["score_line"] == "final_ttt_exact"
    assert sub["val_loss"] == pytest.approx(statistics.mean(v[0] for v in ttt.values()), abs=1e-8)
    assert all(sub["seed_results"][str(s)]["val_loss"] == ttt[s][0] and sub["seed_results"][str(s)]["eval_time_ms"] == 455_000 for s in SCORES)
    assert "test-time training" in (folder / "README.md").read_text()


@pytest.mark.parametrize("changes, expected", [
    ({"ttt": (1.88, 1.11), "ttt_eval_time_ms": 600_001}, "the scoring evaluation took 600001ms"),
    ({"ttt": (1.88, 1.11), "ttt_eval_time_ms": 540_000, "evaluation_ms": 600_200},  # the sliding window counts too
     "seed 42 (run_s42.txt): the evaluation took 600200ms (its evaluation_time line"),
    ({"ttt": (1.88, 1.11), "drop": ("final_ttt_exact",)}, "lacks the final lines: final_ttt_exact"),
])
def test_ttt_refusals(tmp_path, changes, expected):
    assert expected in refusal(tmp_path, three_logs(tmp_path, s42=changes))


def test_final_quant_names_are_packaged(tmp_path):
    logs = three_logs(tmp_path, **{f"s{seed}": {"rename": {"final_quant_": "final_quant_"}} for seed in SCORES})
    package.main(package_args(tmp_path, logs))
    sub = json.loads((tmp_path / "out" / "2026-03-25_Test_run" / "submission.json").read_text())
    assert sub["score_line"] == "final_quant_sliding_window_exact" and sub["seed_results"]["42"]["val_loss"] == SCORES[42][0]
    assert sub["seed_results"]["42"]["eval_time_ms"] == 70_000
