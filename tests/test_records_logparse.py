"""records/logparse.py: our log format, the public record format, and damaged source blocks."""

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records_testlogs import SOURCE, write_log, write_public_log  # noqa: E402

from logparse import SCORE_LINE, RecordsError, parse_log  # noqa: E402


def test_our_log(tmp_path):
    run = parse_log(write_log(tmp_path / "a.txt", seed=42, val_loss=1.90412345, val_bpb=1.12770123))
    assert run.ours and run.source == SOURCE and run.source_sha256 == hashlib.sha256(SOURCE).hexdigest()
    assert run.seed == 42 and run.settings["MAX_WALLCLOCK_SECONDS"] == "600.0"
    assert run.versions == {"python": "3.12.3", "torch": "2.11.0+cu130", "cuda": "13.0"}
    assert run.hardware() == "8xNVIDIA H100 80GB HBM3" and run.world_size == 8
    assert (run.last_step, run.last_train_time_ms, run.last_step_avg_ms) == (7103, 599912.0, 84.46)
    assert run.stopped_early and [v.step for v in run.val] == [0, 4000, 7103]
    assert run.train[0].step == 100 and run.train[-1].step == 7100
    assert (run.model_bytes, run.code_bytes, run.total_bytes) == (15_468_512, len(SOURCE), 15_468_512 + len(SOURCE))
    score = run.score()
    assert (score.name, score.val_loss, score.val_bpb) == (SCORE_LINE, 1.90412345, 1.12770123)
    assert run.evals["final_quant_sliding_window"].eval_time_ms == 70_000


def test_source_lines_are_not_log_lines(tmp_path):
    source = b'print("step:1/2 val_loss:0.1 val_bpb:0.1 train_time:1ms")\nprint("setting SEED=9")\n'
    run = parse_log(write_log(tmp_path / "a.txt", source=source, seed=3))
    assert run.seed == 3 and run.val[0].val_loss == 6.9315 and run.source == source


def test_source_without_final_newline(tmp_path):
    run = parse_log(write_log(tmp_path / "a.txt", source=b"print(1)"))
    assert run.source == b"print(1)" and run.score() is not None


def test_public_log_score_is_its_last_exact_line(tmp_path):
    run = parse_log(write_public_log(tmp_path / "p.log", seed=2025))
    assert not run.ours and run.seed == 2025 and run.settings == {}
    assert run.score().name == "legal_ttt_exact" and run.score().val_loss == 1.88976776
    assert run.evals["DIAGNOSTIC post_ema"].val_bpb == 1.1369
    assert (run.total_bytes, run.size_format, run.last_step) == (15_977_386, "int6+lzma", 7179)


def test_tolerates_extra_lines_and_decimals(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("W0323 torch/distributed/run.py:803] noise\r\n"
                   "step:5/10 train_loss:3.1 train_time:50ms step_avg:10ms\r\n"
                   "step:10/10 val_loss:2.5 val_bpb:1.48123456789 train_time:100.5ms step_avg:10.05ms\n"
                   "something: else val_loss=3\n"
                   "final_foo_exact val_loss:2.4 val_bpb:1.42\n")
    run = parse_log(log)
    assert run.train[0].train_loss == 3.1 and run.val[0].val_bpb == 1.48123456789 and run.last_train_time_ms == 100.5
    assert run.score().val_bpb == 1.42 and run.seed is None


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.replace(b"training", b"trainin6"), "does not match the sha256"),
    (lambda d: d[:150], "cut short"),
    (lambda d: d.replace(b"==== end of source ====", b"==== end ===="), "is not followed by"),
])
def test_damaged_source_block(tmp_path, damage, message):
    path = write_log(tmp_path / "a.txt")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(RecordsError, match=message):
        parse_log(path)


# ---------------------------------------------------------------------------------------------
# The later records' dialect, the test-time-training score, failed runs
# ---------------------------------------------------------------------------------------------

from records_testlogs import write_april_log  # noqa: E402

from logparse import InputError  # noqa: E402


def test_april_record_dialect(tmp_path):
    run = parse_log(write_april_log(tmp_path / "train_seed42.log", seed=42, val_loss=2.31944212, val_bpb=1.05989454))
    assert not run.ours and run.seed == 42 and run.world_size == 8
    assert (run.vocab_size, run.tokenizer) == (8192, "fineweb_8192_bpe.model")
    assert run.last_step == 4945 and run.last_train_time_ms == 599_592.0  # the stop line's ms, not the 9.0m of the step lines
    assert run.step_avg_ms == pytest.approx(599_592 / 4945)
    assert [p.step for p in run.train] == [1, 2, 500, 1000, 2000, 3000, 4000, 4500] and run.train[-1].train_time_ms == pytest.approx(9.1 * 60_000)
    assert run.val[-1].step == 4945 and run.val[-1].val_bpb == 1.0756
    assert (run.model_bytes, run.code_bytes, run.total_bytes) == (15_865_260, 31_999, 15_897_259)  # the compressed code counts
    pre = run.evals["diagnostic pre-quantization post-ema"]
    assert pre.val_bpb == pytest.approx(1.06395454) and pre.eval_time_ms == 6718
    score = run.final_score()
    assert (score.name, score.val_loss, score.val_bpb, score.eval_time_ms) == ("quantized_ttt_phased", 2.31944212, 1.05989454, 508_785)


def test_april_record_cut_during_ttt_is_not_scored(tmp_path):
    # The last evaluation printed is `diagnostic quantized`: no score; a log cut after TTT began is a failed run.
    run = parse_log(write_april_log(tmp_path / "cut.log", cut_after="tttg:"))
    assert run.score() is None
    with pytest.raises(InputError, match=r"cut.log: no final score line"):
        run.final_score()


def test_march_record_cut_during_ttt_is_not_scored_by_its_sliding_window(tmp_path):
    path = write_public_log(tmp_path / "p.log")
    text = path.read_text()
    path.write_text(text[:text.index("legal_ttt val_loss")])  # ends after ttt_chunk lines
    run = parse_log(path)
    with pytest.raises(InputError, match="ends during a test-time-training evaluation after `final_int6_sliding_window_exact`"):
        run.final_score()
    path.write_text(text[:text.index("legal_ttt_exact")])  # legal_ttt without its exact twin
    with pytest.raises(InputError, match="ends after `legal_ttt` without its `legal_ttt_exact` line"):
        parse_log(path).final_score()


def test_march_record_tokenizer(tmp_path):
    run = parse_log(write_public_log(tmp_path / "p.log"))
    assert (run.vocab_size, run.tokenizer) == (1024, "fineweb_1024_bpe.model")
    run = parse_log(write_log(tmp_path / "ours.txt"))
    assert (run.vocab_size, run.tokenizer) == (1024, "fineweb_1024_bpe.model")


def test_our_ttt_score_line(tmp_path):
    run = parse_log(write_log(tmp_path / "t.txt", ttt=(1.88012345, 1.11345678), ttt_eval_time_ms=412_000))
    score = run.final_score()
    assert (score.name, score.val_loss, score.val_bpb) == ("final_ttt_exact", 1.88012345, 1.11345678)
    assert run.evals["final_ttt"].eval_time_ms == 412_000 and run.eval(SCORE_LINE).val_loss == 1.9031
    cut = parse_log(write_log(tmp_path / "cut.txt", ttt=(1.88, 1.11), drop=("final_ttt_exact",)))
    with pytest.raises(InputError, match="ends after `final_ttt` without its `final_ttt_exact` line"):
        cut.final_score()


def test_the_older_int6_names_are_our_lines_too(tmp_path):
    """Logs of earlier versions name the lines final_int6_*: read as the same lines."""
    run = parse_log(write_log(tmp_path / "q.txt", val_loss=1.90123456, rename={"final_quant_": "final_int6_"}))
    assert "final_quant_sliding_window_exact" not in run.evals
    assert run.final_score().val_loss == 1.90123456 and run.final_score().name == "final_int6_sliding_window_exact"
    assert run.eval("final_quant_sliding_window").eval_time_ms == 70_000 and run.eval("final_quant_roundtrip_exact") is not None


def test_a_log_with_an_error_line_is_a_failed_run(tmp_path):
    run = parse_log(write_log(tmp_path / "e.txt", append=["error: CUDA out of memory"]))
    assert run.score() is not None  # the line is there, but the run failed: no tool may use it
    with pytest.raises(InputError, match=r"e.txt: the run failed \(error: CUDA out of memory\)"):
        run.final_score()


@pytest.mark.parametrize("loss, bpb", [("nan", "1.1"), ("1.9", "inf"), ("-inf", "nan")])
def test_non_finite_scores_are_refused(tmp_path, loss, bpb):
    path = write_log(tmp_path / "n.txt")
    text = path.read_text().replace("final_quant_sliding_window_exact val_loss:1.90310000 val_bpb:1.12710000",
                                    f"final_quant_sliding_window_exact val_loss:{loss} val_bpb:{bpb}")
    path.write_text(text)
    with pytest.raises(InputError, match="the score is not a finite number"):
        parse_log(path).final_score()


def test_our_ended_early_log_has_no_score(tmp_path):
    run = parse_log(write_log(tmp_path / "short.txt", drop=("final_",)))
    with pytest.raises(InputError, match="short.txt: no final score line"):
        run.final_score()


@pytest.mark.parametrize("content", [b"", b"\x00\xff\xfe binary \x89PNG\n", b"hello\nworld\n"])
def test_empty_or_foreign_files_parse_to_nothing(tmp_path, content):
    path = tmp_path / "x.log"
    path.write_bytes(content)
    run = parse_log(path)
    with pytest.raises(InputError, match="no log lines that this tool reads"):
        run.final_score()


def test_unreadable_file(tmp_path):
    with pytest.raises(InputError, match=r"missing.log: cannot read"):
        parse_log(tmp_path / "missing.log")
    with pytest.raises(InputError, match=r"cannot read"):
        parse_log(tmp_path)


def test_the_compressed_code_size_counts_in_either_order(tmp_path):
    path = write_april_log(tmp_path / "a.log", code_bytes=31_999)
    lines = path.read_text().splitlines()
    i, j = lines.index("Code size (uncompressed): 157868 bytes"), lines.index("Code size (compressed): 31999 bytes")
    lines[i], lines[j] = lines[j], lines[i]
    path.write_text("\n".join(lines) + "\n")
    assert parse_log(path).code_bytes == 31_999
