"""bench/ablate.py: the proxy ablation runner checks its arms before any run, runs every arm and seed,
and tabulates each arm's score against the first (tiny model on the CPU in place of the proxy)."""
import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import TINY_SETTINGS

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablate", REPO / "bench" / "ablate.py")
ablate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate)
sys.path.insert(0, str(REPO / "records"))
from logparse import parse_log  # noqa: E402

TINY = " ".join(f"{k}={v}" for k, v in (TINY_SETTINGS | dict(ITERATIONS="6", WARMDOWN_ITERS="3")).items())


@pytest.mark.parametrize("arm, message", [
    ("QK_GAIN_INT=4.0", "QK_GAIN_INIT"),      # a misspelled setting, with the likely one named
    ("MLP_ACT=gelu", "MLP_ACT"),              # a value the script refuses
    ("SEED=1", "--seeds"),                    # the runner's own
    ("ROPE_DIMS", "SETTING=VALUE"),
])
def test_bad_arms_stop_before_any_run(tmp_path, arm, message, capsys):
    with pytest.raises(SystemExit) as stop:
        ablate.main(["--workdir", str(tmp_path), "defaults", arm])
    assert message in str(stop.value)
    assert not (tmp_path / "logs").exists()


def test_runs_every_arm_and_seed_and_tabulates(tmp_path, tiny_corpus, monkeypatch, capsys):
    data, tokenizer = tiny_corpus
    monkeypatch.setenv("DATA_PATH", str(data))
    monkeypatch.setenv("TOKENIZER_PATH", str(tokenizer))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("QK_GAIN_INIT", "9.0")  # settings in the environment are ignored: --base is the way
    arms = ["defaults", "QK_GAIN_INIT=1.5 LOGIT_SOFTCAP=30 TTT_MODE=lora TTT_CHUNK=32"]
    code = ablate.main(["--workdir", str(tmp_path), "--seeds", "1,2", "--slots", "2", "--tag", "t", "--base", TINY, *arms])
    out = capsys.readouterr().out
    assert code == 0, out
    scores = {}
    for arm, slug in zip(arms, ["defaults", "QK_GAIN_INIT-1.5-LOGIT_SOFTCAP-30-TTT_MODE-lora-TTT_CHUNK-32"]):
        runs = [parse_log(tmp_path / "logs" / f"t_{slug}_s{seed}.txt") for seed in (1, 2)]
        assert [r.seed for r in runs] == [1, 2]
        assert all(r.settings["ITERATIONS"] == "6" for r in runs)
        scores[arm] = [r.score().val_bpb for r in runs]
    assert runs[0].settings["QK_GAIN_INIT"] == "1.5" and runs[0].settings["LOGIT_SOFTCAP"] == "30.0"
    first = parse_log(tmp_path / "logs" / "t_defaults_s1.txt")
    assert first.settings["QK_GAIN_INIT"] == "4.0"  # the script's default, not the environment's 9.0
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2
    mean = {arm: sum(v) / 2 for arm, v in scores.items()}
    assert f"| {mean['defaults']:.4f} |" in rows[0]
    assert f"{mean[arms[1]] - mean['defaults']:+.4f}" in rows[1]
    assert f"{scores[arms[1]][0]:.4f} / {scores[arms[1]][1]:.4f}" in rows[1]
    # the second arm is scored by TTT: its sliding window and TTT time have their own columns
    second = [parse_log(tmp_path / "logs" / f"t_QK_GAIN_INIT-1.5-LOGIT_SOFTCAP-30-TTT_MODE-lora-TTT_CHUNK-32_s{seed}.txt") for seed in (1, 2)]
    cells = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert cells[4] == " / ".join(f"{r.evals['final_quant_sliding_window_exact'].val_bpb:.4f}" for r in second)
    assert cells[8] == " / ".join(f"{r.evals['final_ttt'].eval_time_ms / 1000:.1f}" for r in second)
    assert [c.strip() for c in rows[0].split("|")[1:-1]][8] == "- / -"  # TTT off in the first arm


def test_a_failed_run_shows_in_the_table_and_the_exit_code(tmp_path, tiny_corpus, monkeypatch, capsys):
    data, tokenizer = tiny_corpus
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "no_such_dir"))
    monkeypatch.setenv("TOKENIZER_PATH", str(tokenizer))
    code = ablate.main(["--workdir", str(tmp_path), "--tag", "f", "--base", TINY, "defaults"])
    out = capsys.readouterr().out
    assert code == 1
    assert "no score: see" in out and "f_defaults_s1337.out" in out
    assert "no_such_dir" in (tmp_path / "logs" / "f_defaults_s1337.out").read_text()


def test_runs_side_by_side_share_the_cores_unless_the_environment_says():
    assert ablate.thread_limits({}, slots=8, cores=128) == dict(OMP_NUM_THREADS="16", TORCHINDUCTOR_COMPILE_THREADS="16")
    assert ablate.thread_limits({}, slots=4, cores=2)["OMP_NUM_THREADS"] == "1"
    mine = ablate.thread_limits(dict(OMP_NUM_THREADS="3", X="y"), slots=2, cores=64)
    assert mine == dict(OMP_NUM_THREADS="3", TORCHINDUCTOR_COMPILE_THREADS="32", X="y")
