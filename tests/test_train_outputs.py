"""What a run leaves behind when it fails: the log's last line says so, nothing half-written keeps a final
name, and RUN_ID cannot point outside logs/ (the rule is in README.md, "Logs and outputs")."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from conftest import REPO, TINY_SETTINGS, log_body


def leftovers(cwd: Path) -> list[str]:
    return sorted(p.name for p in (cwd / "logs").glob("*") if p.name.endswith((".tmp", ".part")))


def last_line(path: Path) -> str:
    return path.read_text().rstrip("\n").splitlines()[-1]


BAD_RUN_IDS = ["../x", "/tmp/abs", "a/b", ".hidden", "..", "tab\there", "x" * 201, "naïve"]


@pytest.mark.parametrize("run_id", BAD_RUN_IDS)
def test_run_id_must_be_a_plain_file_name(tmp_path, monkeypatch, run_id):
    monkeypatch.chdir(tmp_path)
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
    with pytest.raises(tg.ConfigError) as refused:
        tg.claim_run_paths(tg.Hyperparameters(run_id=run_id), rt)
    assert str(refused.value) == (f"RUN_ID={run_id!r}: expected a plain file name of letters, digits, '.', '_' and '-' "
                                  "(at most 200, not starting with '.'); the run writes logs/<RUN_ID>.txt")
    assert list(tmp_path.iterdir()) == []


def test_the_script_refuses_a_run_id_outside_logs_in_one_line(run):
    result = run(RUN_ID="../x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: RUN_ID='../x': expected a plain file name of letters, digits, "
                                                  "'.', '_' and '-' (at most 200, not starting with '.'); the run writes logs/<RUN_ID>.txt"]
    assert not (run.cwd / "logs").exists() and not (run.cwd.parent / "x.txt").exists()


def test_plain_run_ids_are_accepted():
    for run_id in ("seed1337", "2026-12-01_run.v2", "_a", "-b"):
        assert tg.RUN_ID_PATTERN.fullmatch(run_id)


def test_a_logs_path_that_is_not_a_folder_is_one_line(run):
    (run.cwd / "logs").write_text("a file where the folder should be")
    result = run(RUN_ID="nofolder")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: logs/: cannot create the folder for the run's log and artifact")


def test_a_log_that_cannot_be_created_is_one_line(tmp_path):
    with pytest.raises(tg.ConfigError, match=r"run\.txt\.part: cannot create the run log"):
        tg.RunLog(tmp_path / "missing_folder" / "run.txt", master=True)


def test_a_failed_write_leaves_no_temporary_file_and_no_final_name(tmp_path, monkeypatch):
    class FullDisk:
        def __init__(self, path, mode):
            self.path = path
            Path(path).write_bytes(b"partial")  # what a real full disk leaves: some bytes

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, chunk):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("builtins.open", FullDisk)
    with pytest.raises(tg.RunError, match=r"out\.bin: cannot write \(No space left on device\)"):
        tg.write_atomic(tmp_path / "out.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_a_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_replace = os.replace

    def interrupted(src, dst):
        raise tg.Stopped(signal.SIGINT)
    monkeypatch.setattr(tg.os, "replace", interrupted)
    with pytest.raises(tg.Stopped):
        tg.write_atomic(tmp_path / "out.bin", b"data")
    monkeypatch.setattr(tg.os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []


def test_a_log_that_lost_lines_keeps_its_part_name(tmp_path, capsys):
    log = tg.RunLog(tmp_path / "run.txt", master=True)
    log("first line")
    real_file = log.file

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def close(self):
            real_file.close()
    log.file = Full()
    log("lost line")
    log("another lost line")
    log.close()
    assert not (tmp_path / "run.txt").exists() and (tmp_path / "run.txt.part").read_text() == "first line\n"
    assert capsys.readouterr().err.count("cannot write the run log") == 1


def test_full_disk_at_export_one_line_no_temporary_file(run):
    """The artifact's temporary file is /dev/full: the write fails as on a full disk."""
    (run.cwd / "logs").mkdir()
    (run.cwd / "logs" / "full.model.zst.tmp").symlink_to("/dev/full")
    result = run(RUN_ID="full", ITERATIONS="4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: logs/full.model.zst: cannot write (No space left on device)"
    assert leftovers(run.cwd) == [] and not (run.cwd / "logs/full.model.zst").exists()
    assert last_line(run.cwd / "logs/full.txt") == "error: logs/full.model.zst: cannot write (No space left on device)"


def test_a_crash_ends_the_log_with_the_traceback_and_an_error_line(tmp_path, tiny_corpus):
    """An exception that is not a RunError (a bug) still leaves a log that says the run did not finish."""
    data, tokenizer = tiny_corpus
    driver = ("import sys; sys.path.insert(0, sys.argv[1]); import train_gpt as tg\n"
              "def broken(*args): raise ZeroDivisionError('division by zero in a test')\n"
              "tg.log_sizes = broken\n"
              "tg.main()\n")
    env = tg.without_settings(os.environ) | TINY_SETTINGS | dict(
        DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), OMP_NUM_THREADS="1", RUN_ID="crash", ITERATIONS="3")
    result = subprocess.run([sys.executable, "-c", driver, str(REPO)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "ZeroDivisionError" in result.stderr
    log = (tmp_path / "logs/crash.txt").read_text()
    assert last_line(tmp_path / "logs/crash.txt") == "error: the run did not finish: ZeroDivisionError: division by zero in a test"
    assert "Traceback (most recent call last):" in log_body(log)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_log_with_an_error_line(tmp_path, tiny_corpus, signum):
    data, tokenizer = tiny_corpus
    env = tg.without_settings(os.environ) | TINY_SETTINGS | dict(
        DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), OMP_NUM_THREADS="1", RUN_ID="stopped",
        ITERATIONS="100000", TRAIN_LOG_EVERY="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = tmp_path / "logs/stopped.txt.part"
    deadline = time.time() + 120
    while time.time() < deadline and not (part.exists() and "\nstep:3/" in part.read_text()):
        time.sleep(0.1)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum and stderr.strip().splitlines()[-1] == f"error: stopped by {name}"
    assert last_line(tmp_path / "logs/stopped.txt") == f"error: the run did not finish: stopped by {name}"
    assert leftovers(tmp_path) == [] and not (tmp_path / "logs/stopped.model.zst").exists()


def test_a_run_that_fails_after_training_ends_its_log_with_the_error_and_prints_no_score(run):
    result = run(RUN_ID="nan", TIED_EMBED_LR="1e30", SCALAR_LR="1e30", MATRIX_LR="1e30", GRAD_CLIP_NORM="0")
    assert result.returncode == 2 and "final_quant" not in result.stdout
    assert last_line(run.cwd / "logs/nan.txt").startswith("error: ") and leftovers(run.cwd) == []
