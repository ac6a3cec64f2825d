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
    assert run.evals["final_int6_sliding_window"].eval_time_ms == 70_000


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
