"""The code counted against the cap is the script's self-extracting form, and that form runs the same program."""
import hashlib
import linecache
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import REPO, run_script

SCORE_LINES = ("final_quant_roundtrip_exact ", "final_quant_sliding_window_exact ")


def unpacked(form: bytes) -> tuple[bytes, str, list[str]]:
    """Run the form with compile and exec replaced by recorders: (what it would compile, under which
    file name, the lines it leaves in linecache for that name)."""
    compiled = []
    try:
        exec(form, {"compile": lambda text, name, mode: compiled.append((text, name, mode)) or "code",
                    "exec": lambda code: None})
        (text, name, mode), = compiled
        assert mode == "exec"
        return text, name, linecache.cache[name][2]
    finally:
        linecache.cache.pop("train_gpt.py", None)


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory) -> Path:
    """The self-extracting train_gpt.py alone in a folder, as in a submission."""
    path = tmp_path_factory.mktemp("submission") / "train_gpt.py"
    path.write_bytes(tg.self_extracting(tg.SOURCE))
    return path


def test_the_form_is_deterministic_small_and_unpacks_to_the_exact_source():
    form = tg.self_extracting(tg.SOURCE)
    assert tg.SOURCE == (REPO / "train_gpt.py").read_bytes()
    assert tg.CODE_BYTES == len(form) < len(tg.SOURCE) // 2
    assert form == tg.self_extracting(tg.SOURCE)
    other = subprocess.run([sys.executable, "-c", "import sys, train_gpt as t; sys.stdout.buffer.write(t.self_extracting(t.SOURCE))"],
                           cwd=REPO, capture_output=True, timeout=120, check=True).stdout
    assert other == form, "another process must build the same bytes"
    assert form.isascii() and form.count(b"\n") == 2 and form.endswith(b"\n")
    text, name, lines = unpacked(form)
    assert (text, name) == (tg.SOURCE, "train_gpt.py")
    assert lines == tg.SOURCE.decode().splitlines(True)


def test_a_changed_source_changes_the_form():
    changed = tg.SOURCE.replace(b"training", b"trainning", 1)
    assert unpacked(tg.self_extracting(changed))[0] == changed != tg.SOURCE


def test_the_form_trains_the_same_run_and_logs_the_readable_source(wrapped, tmp_path, tiny_corpus):
    settings = dict(RUN_ID="same", ITERATIONS="8", WARMDOWN_ITERS="4")
    readable = run_script(tmp_path, tiny_corpus, **settings)
    assert readable.returncode == 0, readable.stderr
    folder = wrapped.parent  # run where a submission runs: in its folder, beside no readable train_gpt.py
    packed = run_script(folder, tiny_corpus, script=wrapped, **settings)
    assert packed.returncode == 0, packed.stderr

    logs = [(tmp_path / "logs/same.txt").read_bytes(), (folder / "logs/same.txt").read_bytes()]
    header = f"==== source: train_gpt.py bytes:{len(tg.SOURCE)} sha256:{hashlib.sha256(tg.SOURCE).hexdigest()} ====\n".encode()
    for log in logs:
        assert log.startswith(header + tg.SOURCE + b"==== end of source ====\n")
    finals = [[line for line in log.decode().splitlines() if line.startswith(SCORE_LINES)] for log in logs]
    assert len(finals[0]) == 2 and finals[1] == finals[0]
    sizes = [re.search(r"^Code size: (\d+) bytes\nCode source: (\d+) bytes sha256:(\w+) \(counted as its self-extracting form\)\n",
                       log.decode(), re.M).groups() for log in logs]
    assert sizes[0] == sizes[1] == (str(tg.CODE_BYTES), str(len(tg.SOURCE)), hashlib.sha256(tg.SOURCE).hexdigest())
    assert int(sizes[1][0]) == wrapped.stat().st_size


TRACEBACK_PROBE = r"""
import inspect, runpy, sys, traceback
g = runpy.run_path(sys.argv[1], run_name="probe")
print("file", g["__file__"])
print("annotations", g["check_size_cap"].__annotations__)
print("custom_op", g["torch"].ops.golf.norm_rotary.default.name())
print("dataclass", g["Hyperparameters"]().target_bytes)
print("getsource", inspect.getsource(g["check_size_cap"]).splitlines()[0])
try:
    g["check_size_cap"](10**9)
except g["RunError"]:
    frame = traceback.extract_tb(sys.exc_info()[2])[-1]
    print("frame", frame.filename, frame.lineno, frame.line)
"""


def test_the_form_keeps_names_annotations_and_readable_tracebacks(wrapped):
    result = subprocess.run([sys.executable, "-c", TRACEBACK_PROBE, str(wrapped)], cwd=wrapped.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    lines = tg.SOURCE.decode().splitlines()
    raised = next(n for n, line in enumerate(lines, 1) if line.strip().startswith("raise RunError(f\"total submission size"))
    assert out["frame"] == f"train_gpt.py {raised} {lines[raised - 1].strip()}"
    assert out["getsource"] == "def check_size_cap(total_bytes: int) -> None:"
    assert out["annotations"] == "{'total_bytes': 'int', 'return': 'None'}"  # from __future__ import annotations holds
    assert out["custom_op"] == "golf::norm_rotary" and out["dataclass"] == str(tg.SIZE_CAP_BYTES)
    assert out["file"] == str(wrapped)


def test_the_start_up_check_counts_the_form_not_the_raw_source():
    h = tg.Hyperparameters()
    h.target_bytes = len(tg.SOURCE) - 1  # too small for the readable source, enough for its counted form
    tg.check_budget(h)
    h.target_bytes = tg.CODE_BYTES + 100  # the code fits, an empty artifact does not
    with pytest.raises(tg.ConfigError, match=rf"expected at least (\d+) \(the code counted as its self-extracting form, {tg.CODE_BYTES} bytes, ") as e:
        tg.check_budget(h)
    floor = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    assert floor == tg.CODE_BYTES + len(tg.compress(tg.pack_artifact({}, {}, {}, {n: getattr(h, n) for n in tg.MODEL_SETTINGS}))) < len(tg.SOURCE)


def test_the_form_prints_the_settings_help(wrapped):
    """--help reads the settings' comments from the readable source, not from the two lines it runs from."""
    result = subprocess.run([sys.executable, str(wrapped), "--help"], cwd=wrapped.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == tg.settings_help() + "\n" and "  XSA_LAST_N=4" in result.stdout
