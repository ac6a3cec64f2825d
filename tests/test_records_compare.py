"""records/compare.py: the PNG is written and the table carries each log's final figures."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records_testlogs import write_log, write_public_log  # noqa: E402

import compare  # noqa: E402


def test_plot_and_table_for_our_logs_and_a_public_log(tmp_path, capsys):
    ours = write_log(tmp_path / "ours.txt", seed=42, val_loss=1.90412345, val_bpb=1.12770123)
    public = write_public_log(tmp_path / "record.log", seed=2025)
    out, table_file = tmp_path / "cmp.png", tmp_path / "cmp.txt"
    compare.main([str(ours), str(public), "--out", str(out), "--table", str(table_file)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    table = table_file.read_text()
    assert table in printed + "\n"
    header, rule, row_ours, row_public = table.splitlines()
    assert header.split()[:3] == ["run", "seed", "steps"] and set(rule) == {"-"}
    assert row_ours.split() == ["ours", "42", "7103", "599.9", "84.46", "1.1431", "1.90412345", "1.12770123",
                                "final_quant_sliding_window_exact", "15,468,585"]
    assert row_public.split() == ["record", "2025", "7179", "600.1", "83.59", "-", "1.88976776", "1.11922988",
                                  "legal_ttt_exact", "15,977,386"]


def test_labels_and_same_file_names(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    logs = [write_log(tmp_path / d / "train_seed1337.log") for d in ("a", "b")]
    compare.main([*map(str, logs), "--out", str(tmp_path / "x.png")])
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].startswith("a/train_seed1337 ") and rows[3].startswith("b/train_seed1337 ")
    compare.main([*map(str, logs), "--out", str(tmp_path / "y.png"), "--labels", "base", "new"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].startswith("base ") and rows[3].startswith("new ")
    with pytest.raises(SystemExit):
        compare.main([*map(str, logs), "--labels", "only-one"])


def test_refuses_logs_without_step_lines(tmp_path, capsys):
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    with pytest.raises(SystemExit) as exc:
        compare.main([str(empty), "--out", str(tmp_path / "z.png")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.splitlines()[-1].startswith("error: ") and "nothing to plot" in err
    assert not (tmp_path / "z.png").exists()


# ---------------------------------------------------------------------------------------------
# Warnings for logs that cannot be shown, the later records' dialect, bad input
# ---------------------------------------------------------------------------------------------

from records_testlogs import run_tool, write_april_log  # noqa: E402


def run_compare(argv, capsys):
    return run_tool(compare.main, argv, capsys)


def test_empty_and_unreadable_logs_get_a_warning_naming_them(tmp_path, capsys):
    good = write_log(tmp_path / "good.txt")
    empty = tmp_path / "empty.log"
    empty.write_text("")
    binary = tmp_path / "binary.log"
    binary.write_bytes(bytes(range(256)))
    missing = tmp_path / "missing.log"
    code, out, err = run_compare([good, empty, missing, binary, "--out", tmp_path / "c.png"], capsys)
    assert code == 0 and (tmp_path / "c.png").exists()
    warnings = err.splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: ") for w in warnings)
    assert f"{empty}: no `step:` lines and no scores" in warnings[0]
    assert f"{missing}: cannot read" in warnings[1] and f"{binary}: no `step:` lines" in warnings[2]
    rows = out.splitlines()[2:-1]
    assert [r.split()[0] for r in rows] == ["good"]  # no row of dashes for the files that hold nothing


def test_labels_follow_the_logs_that_are_kept(tmp_path, capsys):
    a, b = write_log(tmp_path / "a.txt"), write_log(tmp_path / "b.txt")
    code, out, err = run_compare([a, tmp_path / "gone.log", b, "--labels", "A", "GONE", "B", "--out", tmp_path / "c.png"], capsys)
    assert code == 0 and "gone.log" in err
    assert [r.split()[0] for r in out.splitlines()[2:-1]] == ["A", "B"]


def test_a_failed_run_is_plotted_without_its_score(tmp_path, capsys):
    failed = write_log(tmp_path / "failed.txt", append=["error: the artifact is 16,000,321 bytes"])
    cut = write_log(tmp_path / "cut.txt", drop=("final_",))
    code, out, err = run_compare([failed, cut, "--out", tmp_path / "c.png"], capsys)
    assert code == 0
    assert err.splitlines() == [f"warning: {failed}: the run failed (error: the artifact is 16,000,321 bytes); its score is not shown",
                                f"warning: {cut}: no final score line (the log ends before its final scores: did the run finish?); its score is not shown"]
    for row in out.splitlines()[2:4]:
        cells = row.split()
        assert cells[6:9] == ["-", "-", "-"], row  # val_loss, val_bpb, score line


def test_april_record_row(tmp_path, capsys):
    log = write_april_log(tmp_path / "train_seed42.log", seed=42, val_loss=2.31944212, val_bpb=1.05989454)
    code, out, err = run_compare([log, "--out", tmp_path / "c.png"], capsys)
    assert code == 0 and err == ""
    assert out.splitlines()[2].split() == ["train_seed42", "42", "4945", "599.6", "121.25", "1.0640", "2.31944212", "1.05989454",
                                           "quantized_ttt_phased", "15,897,259"]


def test_a_diverged_run_with_nan_losses_still_plots(tmp_path, capsys):
    log = tmp_path / "nan.log"
    log.write_text("step:1/10 train_loss:6.9 train_time:10ms step_avg:10ms\nstep:2/10 train_loss:nan train_time:20ms step_avg:10ms\n"
                   "step:3/10 train_loss:inf train_time:30ms step_avg:10ms\n")
    code, out, err = run_compare([log, "--out", tmp_path / "c.png"], capsys)
    assert code == 0 and (tmp_path / "c.png").exists() and "no final score line" in err


@pytest.mark.parametrize("extra, expected", [
    (["--labels", "one", "two"], "error: --labels: expected one label per log, got 2 labels for 1 logs"),
    (["--out", "c.notaformat"], "error: --out c.notaformat: expected a file name ending in one of"),
])
def test_bad_settings_are_one_error_line(tmp_path, capsys, monkeypatch, extra, expected):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_compare([write_log(tmp_path / "a.txt"), *extra], capsys)
    assert code == 2 and err.startswith(expected) and err.count("\n") == 1 and list(tmp_path.glob("c.*")) == []


def test_nothing_half_written_under_the_final_name(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    code, out, err = run_compare([write_log(tmp_path / "a.txt"), "--out", tmp_path / "c.png"], capsys)
    assert code == 2 and err.startswith("error: ") and "No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
