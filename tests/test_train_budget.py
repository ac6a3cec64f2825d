"""The 16,000,000-byte cap and the time cap, checked early and on every rank; no artifact holds a value its
storage type cannot, and no run reports a score that is not finite."""
import re

import pytest
import torch
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import TINY_SETTINGS, gloo_ranks, log_body

# A model whose MLP matrices are exported as integers (more than SMALL_TENSOR_NUMEL elements each), so
# that fitting a byte target has +-1 values to zero.
WIDE = dict(MODEL_DIM="160", ITERATIONS="4", QUANT_METHOD="rtn")


def logged_int(log: str, prefix: str) -> int:
    return int(re.search(rf"^{prefix}(\d+)", log, re.M).group(1))


def test_a_binding_target_counts_the_code_bytes(run):
    free = run(RUN_ID="free", **WIDE)
    assert free.returncode == 0, free.stderr
    unpruned = logged_int(free.stdout, "Serialized model quant\\+zstd: ")
    code = logged_int(free.stdout, "Code size: ")
    assert code == tg.CODE_BYTES == len(tg.self_extracting(tg.SOURCE)) < len(tg.SOURCE)  # the counted form
    target = code + unpruned - 3000
    fitted = run(RUN_ID="fitted", TARGET_BYTES=str(target), **WIDE)
    assert fitted.returncode == 0, fitted.stderr
    artifact = logged_int(fitted.stdout, "Serialized model quant\\+zstd: ")
    assert logged_int(fitted.stdout, "Total submission size quant\\+zstd: ") == artifact + code <= target
    assert artifact > target - len(tg.SOURCE), "fitted to TARGET_BYTES less the counted code, not less the raw source"
    assert (run.cwd / "logs/fitted.model.zst").stat().st_size == artifact
    zeroed = int(re.search(r"(\d+) quantized \+-1 values zeroed to fit TARGET_BYTES=", fitted.stdout).group(1))
    assert zeroed > 0


def test_an_artifact_over_the_cap_is_never_written(tmp_path, monkeypatch):
    over = tg.SIZE_CAP_BYTES - tg.CODE_BYTES + 1  # the code counted is the self-extracting form
    monkeypatch.setattr(tg, "fit_to_budget", lambda *args: (b"\0" * over, 0))
    h = tg.Hyperparameters()
    with pytest.raises(tg.RunError, match=r"total submission size 16000001 bytes is over the 16,000,000-byte cap by 1 bytes"):
        tg.export_artifact(tg.Export({}, {}, {}, {}), h, tmp_path / "run.model.zst", budget=10**9)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(tg, "fit_to_budget", lambda *args: (b"\0" * (over - 1), 0))
    tg.export_artifact(tg.Export({}, {}, {}, {}), h, tmp_path / "run.model.zst", budget=10**9)
    assert (tmp_path / "run.model.zst").stat().st_size == over - 1


@pytest.mark.parametrize("target, message", [
    ("1000", rf"error: TARGET_BYTES=1000: expected at least \d+ \(the code counted as its self-extracting form, {tg.CODE_BYTES} bytes, and an empty artifact\) and at most 16000000"),
    ("100000000", r"error: TARGET_BYTES=100000000: expected 1\.\.16000000 \(the size cap\)"),
])
def test_a_target_that_cannot_be_met_is_refused_at_start(run, target, message):
    result = run(RUN_ID="target", TARGET_BYTES=target)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(message, result.stderr.strip().splitlines()[-1]), result.stderr
    assert not (run.cwd / "logs").exists()


def test_a_reserve_at_or_above_the_time_cap_is_refused_before_training(run):
    result = run(RUN_ID="reserve", MAX_WALLCLOCK_SECONDS="0.001")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(r"error: the export quantization needs \d+ms reserved, at or above MAX_WALLCLOCK_SECONDS=0\.001: "
                        r"no time would be left to train .*", result.stderr.strip().splitlines()[-1]), result.stderr
    log = log_body((run.cwd / "logs/reserve.txt").read_text())
    assert "step:1/" not in log and not (run.cwd / "logs/reserve.model.zst").exists()


def test_diverged_weights_stop_the_run_naming_the_tensor(run):
    result = run(RUN_ID="diverged", MATRIX_LR="1e5", MUON_WD="0", WEIGHT_AVG="none", ITERATIONS="10")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(r"error: (tensor \S+ (holds|has) .*: no artifact is written .*|train_loss is (nan|inf) at step \d+: .*)",
                        result.stderr.strip().splitlines()[-1]), result.stderr
    assert not (run.cwd / "logs/diverged.model.zst").exists() and "final_quant" not in result.stdout


@pytest.mark.parametrize("fmt, value, problem", [
    (tg.Format("fp32"), float("nan"), "holds 1 non-finite values"),
    (tg.Format("fp16"), float("inf"), "holds 1 non-finite values"),
    (tg.Format("fp16"), 70000.0, "has |w| up to 7e+04, beyond fp16's 65504"),
    (tg.Format("int", 5, 1.0), 1e7, "has rows whose int5 step is beyond fp16's range"),
])
def test_values_their_storage_cannot_hold_are_refused(fmt, value, problem):
    w = torch.ones(4, 8)
    w[2, 3] = value
    state, formats = {"ok": torch.ones(3), "bad": w}, {"ok": tg.Format("fp32"), "bad": fmt}
    quantized = {"bad": tg.quantize_rows(w, fmt.bits)} if fmt.encoding == "int" else {}
    with pytest.raises(tg.RunError, match=re.escape(f"tensor bad {problem}")):
        tg.check_storable(state, formats, quantized)
    w[2, 3] = 60000.0 if fmt.encoding == "fp16" else 3.0  # storable: no error
    tg.check_storable(state, formats, {"bad": tg.quantize_rows(w, fmt.bits)} if fmt.encoding == "int" else {})


def test_a_score_that_is_not_finite_fails_the_run():
    class Diverged:
        def score(self, sliding):
            return float("nan"), float("nan"), 1.0

    class Fine:
        def score(self, sliding):
            return 2.0, 1.5, 1.0
    lines = []
    with pytest.raises(tg.RunError, match=r"the round-trip score is val_loss:nan val_bpb:nan"):
        tg.log_final_scores(lines.append, Diverged(), tg.Hyperparameters(ttt_mode="off"))
    assert lines == []  # no final_ line with nan for tools to read
    tg.log_final_scores(lines.append, Fine(), tg.Hyperparameters(ttt_mode="off"))
    assert len(lines) == 4 and all(line.startswith("final_quant_") for line in lines)


def on_master_worker(rank, world_size, init_file, out_file):
    with gloo_ranks(rank, world_size, init_file, timeout_s=60):
        rt = tg.Runtime(rank=rank, world_size=world_size, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
        outcomes = []
        for fail in (False, True):
            def work():
                if fail:
                    raise tg.RunError("the artifact cannot fit")
                return ("written", 7)
            try:
                outcomes.append(tg.on_master(rt, work))
            except tg.RunError as e:
                outcomes.append(f"RunError: {e}")
        torch.save(outcomes, f"{out_file}.{rank}")


def test_an_export_failure_on_rank_0_stops_every_rank(tmp_path):
    mp.spawn(on_master_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    results = [torch.load(f"{tmp_path / 'out'}.{rank}") for rank in range(2)]
    assert results[0] == [("written", 7), "RunError: the artifact cannot fit"]
    assert results[1] == [("written", 7), "RunError: rank 0: the artifact cannot fit"]


def impossible_target_worker(rank, world_size, init_file, corpus, out_dir):
    """train_and_export on two gloo ranks with a TARGET_BYTES that rank 0's export cannot meet."""
    with gloo_ranks(rank, world_size, init_file, timeout_s=60):  # a rank left waiting fails in a minute
        torch.set_num_threads(1)
        data, tokenizer = corpus
        env = TINY_SETTINGS | WIDE | dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), GRAD_ACCUM_STEPS="1",
                                          TARGET_BYTES=str(tg.CODE_BYTES + 2000), ATTN_BACKEND="sdpa")
        h = tg.Hyperparameters.from_env(env)
        rt = tg.Runtime(rank=rank, world_size=world_size, device=torch.device("cpu"),
                        micro_batch_seqs=h.train_batch_tokens // (world_size * h.train_seq_len), compile=False)
        log = tg.RunLog(out_dir / "run.txt", rt.master)
        try:
            tg.train_and_export(h, rt, log, out_dir / "run.model.zst")
            error = None
        except tg.RunError as e:
            error = str(e)
        log.close()
        torch.save(error, out_dir / f"error.{rank}")


def test_an_impossible_target_fails_every_rank_with_rank_0s_reason(tmp_path, tiny_corpus):
    """Rank 0 cannot fit the artifact: rank 1 must raise too, with rank 0's reason, not wait at a barrier."""
    mp.spawn(impossible_target_worker, args=(2, str(tmp_path / "init"), tiny_corpus, tmp_path), nprocs=2, join=True)
    errors = [torch.load(tmp_path / f"error.{rank}") for rank in range(2)]
    assert errors[0].startswith("the artifact cannot fit 2000 bytes even with all") and errors[1] == f"rank 0: {errors[0]}"
    assert not (tmp_path / "run.model.zst").exists()


def test_an_impossible_target_under_torchrun_is_one_error_line(run):
    result = run(nproc=2, RUN_ID="nofit", GRAD_ACCUM_STEPS="1", TARGET_BYTES=str(tg.CODE_BYTES + 2000), timeout=240, **WIDE)
    assert result.returncode != 0
    assert re.search(r"^error: the artifact cannot fit \d+ bytes even with all \d+ quantized \+-1 values zeroed", result.stderr, re.M), result.stderr
    assert (run.cwd / "logs/nofit.txt").read_text().rstrip().splitlines()[-1].startswith("error: the artifact cannot fit")


def test_rescoring_an_artifact_over_the_cap_is_refused_before_scoring(run):
    """A well-formed artifact whose bytes and the code's exceed 16,000,000: bad input, not a score."""
    noise = torch.randn(4_500_000, generator=torch.Generator().manual_seed(0))  # 18 MB of fp32 that zstd barely shrinks
    container = tg.pack_artifact({"noise": noise}, {"noise": tg.Format("fp32")}, {}, {})
    path = run.cwd / "big.model.zst"
    path.write_bytes(tg.compress(container, level=1))
    assert path.stat().st_size + tg.CODE_BYTES > tg.SIZE_CAP_BYTES
    result = run(RUN_ID="big", EVAL_ARTIFACT=str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(r"error: total submission size \d+ bytes is over the 16,000,000-byte cap by \d+ bytes",
                        result.stderr.strip().splitlines()[-1]), result.stderr
    assert "final_quant" not in result.stdout


def test_the_training_clock_extrapolates_agreed_step_ends_and_stops_a_step_early(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(tg.time, "perf_counter", lambda: now[0])
    clock = tg.TrainingClock(cap_ms=2000.0, reserve_ms=100.0)
    assert clock.loop_cap_ms == 1900.0 and tg.TrainingClock(0.0, 100.0).loop_cap_ms == 0.0  # 0: no cap
    now[0] += 0.25
    assert clock.pause() == pytest.approx(250.0)
    now[0] += 5.0  # paused: validation is not training time
    clock.resume()
    now[0] += 0.05
    assert clock.now_ms() == pytest.approx(300.0)
    assert clock.estimate(3) == (0.0, 0.0) and not clock.out_of_time(0.0, 0.0)  # nothing agreed yet
    clock.ended_ms += [50.0, 100.0, 300.0]  # steps 0, 1, 2 ended then
    # a step takes the slower of the mean (150) and the last step (200); step 4 ends two steps after step 2
    assert clock.estimate(4) == (700.0, 200.0) and not clock.out_of_time(700.0, 200.0)
    assert not clock.out_of_time(*clock.estimate(8))  # 1500 + 2 x 200 = 1900: the next step still fits
    assert clock.out_of_time(*clock.estimate(9))  # 1700 + 2 x 200 > 1900
    uncapped = tg.TrainingClock(0.0, 0.0)
    uncapped.ended_ms += [1.0, 2.0]
    assert not uncapped.out_of_time(10 ** 9, 1.0)  # no cap: never out of time
