"""The script end to end on the CPU, as a user runs it."""
import hashlib
import re
from pathlib import Path

import pytest
from conftest import log_body

import train_gpt as tg

FINAL = [
    r"final_quant_roundtrip val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms",
    r"final_quant_roundtrip_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}",
    r"final_quant_sliding_window val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} stride:16 eval_time:\d+ms",
    r"final_quant_sliding_window_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}",
]


def values(log: str, prefix: str, key: str) -> list[float]:
    return [float(m) for m in re.findall(rf"^{prefix}.*?{key}:([-\d.naif]+)", log_body(log), flags=re.M)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus):
    """One 20-step run shared by the tests below."""
    from conftest import run_script
    cwd = tmp_path_factory.mktemp("run")
    result = run_script(cwd, tiny_corpus, RUN_ID="tiny", VAL_LOSS_EVERY="10")
    return cwd, result


def test_twenty_steps_lower_the_loss_and_write_the_log_and_artifact(trained):
    cwd, result = trained
    assert result.returncode == 0, result.stderr
    log = (cwd / "logs/tiny.txt").read_text()
    assert not list((cwd / "logs").glob("*.part")) and not list((cwd / "logs").glob("*.tmp"))
    assert (cwd / "logs/tiny.model.zst").stat().st_size > 0
    losses = values(log, r"step:\d+/20 ", "train_loss")
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.0
    # Each step's record is read one step late: every step is still logged once, in order, and the
    # step before a validation (10, 20) carries the same train_time as that validation's line.
    logged = [int(n) for n in re.findall(r"^step:(\d+)/20 train_loss", log_body(log), re.M)]
    assert logged == [*range(1, 11), 15, 20]
    for n in (10, 20):
        times = re.findall(rf"^step:{n}/20 .*train_time:(\d+)ms", log_body(log), re.M)
        assert len(times) == 2 and times[0] == times[1]
    val = values(log, r"step:\d+/20 val_loss", "val_bpb")
    assert len(val) == 3 and val[2] < val[1] < val[0]  # steps 0, 10, 20
    for pattern in FINAL:
        assert re.search("^" + pattern + "$", log, flags=re.M), pattern
    assert result.stdout.rstrip().endswith(log.rstrip().splitlines()[-1])


def test_log_embeds_the_source_and_the_sizes_add_up(trained):
    cwd, _ = trained
    log = (cwd / "logs/tiny.txt").read_bytes()
    source = (Path(tg.__file__)).read_bytes()
    header = f"==== source: train_gpt.py bytes:{len(source)} sha256:{hashlib.sha256(source).hexdigest()} ====\n".encode()
    assert log.startswith(header + source + b"==== end of source ====\n")
    text = log.decode()
    artifact = int(re.search(r"^Serialized model quant\+zstd: (\d+) bytes$", text, re.M).group(1))
    code = int(re.search(r"^Code size: (\d+) bytes$", text, re.M).group(1))
    total = int(re.search(r"^Total submission size quant\+zstd: (\d+) bytes$", text, re.M).group(1))
    # the code counted is the self-extracting form of the source; the next line names the source itself
    assert code == len(tg.self_extracting(source)) < len(source)
    assert f"\nCode size: {code} bytes\nCode source: {len(source)} bytes sha256:{hashlib.sha256(source).hexdigest()} (counted as its self-extracting form)\n" in text
    assert artifact == (cwd / "logs/tiny.model.zst").stat().st_size and total == artifact + code
    assert "setting XSA_LAST_N=1" in text and "attention_backend:sdpa" in text and "gpu none (cpu)" in text


def test_rescoring_the_artifact_reproduces_the_final_scores(trained, tiny_corpus):
    from conftest import run_script
    cwd, _ = trained
    result = run_script(cwd, tiny_corpus, RUN_ID="rescore", EVAL_ARTIFACT="logs/tiny.model.zst", NUM_LAYERS="11")
    assert result.returncode == 2 and "NUM_LAYERS=11 but logs/tiny.model.zst was trained with NUM_LAYERS=2" in result.stderr
    result = run_script(cwd, tiny_corpus, RUN_ID="rescore_fp32", EVAL_ARTIFACT="logs/tiny.model.zst", RESIDUAL_DTYPE="fp32")
    assert result.returncode == 2 and "RESIDUAL_DTYPE=fp32 but logs/tiny.model.zst was trained with RESIDUAL_DTYPE=bf16" in result.stderr
    result = run_script(cwd, tiny_corpus, RUN_ID="rescore2", EVAL_ARTIFACT="logs/tiny.model.zst")
    assert result.returncode == 0, result.stderr
    trained_log, rescored = (cwd / "logs/tiny.txt").read_text(), (cwd / "logs/rescore2.txt").read_text()
    for prefix in ("final_quant_roundtrip_exact", "final_quant_sliding_window_exact"):
        line = re.search(rf"^{prefix} .*$", trained_log, re.M).group(0)
        assert line in rescored.splitlines()
    assert "step:" not in log_body(rescored)  # no training happened


def test_a_run_id_is_never_reused(trained, tiny_corpus):
    from conftest import run_script
    cwd, _ = trained
    before = (cwd / "logs/tiny.txt").read_bytes()
    result = run_script(cwd, tiny_corpus, RUN_ID="tiny")
    assert result.returncode == 2 and "RUN_ID=tiny was used before" in result.stderr
    assert (cwd / "logs/tiny.txt").read_bytes() == before


def test_misspelled_setting_stops_before_any_work(run):
    result = run(XSA_LAST="4", RUN_ID="typo")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: unknown setting XSA_LAST: did you mean XSA_LAST_N? (python train_gpt.py --help lists the settings)"
    assert not (run.cwd / "logs").exists()


def test_non_finite_loss_stops_naming_the_step(run):
    result = run(TIED_EMBED_LR="1e30", SCALAR_LR="1e30", MATRIX_LR="1e30", GRAD_CLIP_NORM="0", RUN_ID="nan")
    assert result.returncode == 2
    assert re.search(r"^error: train_loss is (nan|inf) at step \d+: stopping", result.stderr, re.M), result.stderr
    assert "error: train_loss" in (run.cwd / "logs/nan.txt").read_text()


def test_two_ranks_stop_together_under_a_time_cap(run):
    """The stop decision comes from times averaged over ranks, so both ranks leave the loop after the
    same step (otherwise one would wait forever in the other's gradient reduction)."""
    # GPTQ (the default): its reserve leaves the slack a real run has; RTN's is about 0 ms,
    # and a CPU step slower than the loop's estimate could then push the total past the cap.
    result = run(nproc=2, RUN_ID="cap2", GRAD_ACCUM_STEPS="1", ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="2",
                 timeout=240)
    assert result.returncode == 0, result.stderr
    log = log_body((run.cwd / "logs/cap2.txt").read_text())
    stop = re.search(r"^stopping_early: wallclock_cap train_time:(\d+)ms \(estimated\) step:(\d+)/100000", log, re.M)
    budget = re.search(r"^training_budget: train_time:(\d+)ms quantization:(\d+)ms total:(\d+)ms cap:2000ms", log, re.M)
    assert stop and budget and int(stop.group(2)) > 2 and int(budget.group(3)) <= 2000
    assert re.search(rf"^step:{stop.group(2)}/100000 val_loss", log, re.M)


def test_two_ranks_train_exactly_like_one(run):
    """The global batch is split over ranks x micro-steps: 1 x 2 and 2 x 1 do the same arithmetic."""
    one = run(RUN_ID="one", GRAD_ACCUM_STEPS="2", ITERATIONS="6", TRAIN_LOG_EVERY="1")
    two = run(nproc=2, RUN_ID="two", GRAD_ACCUM_STEPS="1", ITERATIONS="6", TRAIN_LOG_EVERY="1")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    logs = [(run.cwd / f"logs/{name}.txt").read_text() for name in ("one", "two")]
    assert "world_size:2 grad_accum_steps:1" in logs[1]
    losses = [values(log, r"step:\d+/6 ", "train_loss") for log in logs]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=2e-4)
    finals = [values(log, "final_quant_sliding_window_exact", "val_bpb") for log in logs]
    assert finals[0] == pytest.approx(finals[1], abs=1e-4)
