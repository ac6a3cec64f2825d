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
                                "final_int6_sliding_window_exact", "15,468,585"]
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


def test_refuses_logs_without_step_lines(tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    with pytest.raises(SystemExit) as exc:
        compare.main([str(empty), "--out", str(tmp_path / "z.png")])
    assert "nothing to plot" in str(exc.value.code)
    assert not (tmp_path / "z.png").exists()
