"""bench/ttt_sweep.py: every arm's TTT pass on one loaded artifact gives the score a re-score with that arm's
settings gives, and bad arms stop before the artifact is read (tiny model on the CPU)."""
import importlib.util
import re
from pathlib import Path

import pytest
from conftest import log_body, run_script

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ttt_sweep", REPO / "bench" / "ttt_sweep.py")
ttt_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ttt_sweep)

ARTIFACT = dict(EVAL_ARTIFACT="logs/base.model.zst")


@pytest.mark.parametrize("arms, environ, message", [
    ([], ARTIFACT, "expected at least one arm"),
    (["defaults"], {}, "EVAL_ARTIFACT: expected the artifact"),
    (["defaults"], ARTIFACT | dict(TTT_LR="0.01"), "TTT_LR in the environment: TTT settings go in the arms"),
    (["QK_GAIN_INIT=5.0"], ARTIFACT, "arm 'QK_GAIN_INIT=5.0': expected `defaults` or TTT_*=VALUE settings"),
    (["TTT_CHUNK"], ARTIFACT, "arm 'TTT_CHUNK': expected `defaults` or TTT_*=VALUE"),
    (["defaults", "TTT_CHUNK=0"], ARTIFACT, "arm 'TTT_CHUNK=0': TTT_CHUNK=0: expected a positive number"),
    (["TTT_CHUNKS=64"], ARTIFACT, "arm 'TTT_CHUNKS=64': unknown setting TTT_CHUNKS"),
    (["TTT_MODE=off"], ARTIFACT, "arm 'TTT_MODE=off': TTT_MODE=off has no TTT pass"),
])
def test_bad_arms_are_refused(arms, environ, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        ttt_sweep.parse_arms(arms, environ)


def test_each_arm_scores_as_a_rescore_with_its_settings(run, tiny_corpus):
    assert run(RUN_ID="base").returncode == 0
    arms = {"TTT_CHUNK=32": dict(TTT_CHUNK="32"),
            "TTT_CHUNK=16 TTT_LR=0.01 TTT_CONTEXT=document": dict(TTT_CHUNK="16", TTT_LR="0.01", TTT_CONTEXT="document")}
    swept = run_script(run.cwd, tiny_corpus, script=REPO / "bench" / "ttt_sweep.py", args=list(arms), RUN_ID="sweep",
                       TTT_MODE=None, **ARTIFACT)  # TTT settings go in the arms
    assert swept.returncode == 0, swept.stderr
    log = log_body((run.cwd / "logs/sweep.txt").read_text())
    assert "final_ttt" not in re.sub(r"^sweep .*$", "", log, flags=re.M)  # the re-score itself runs no TTT pass
    sliding = float(re.search(r"^final_quant_sliding_window_exact .*val_bpb:([\d.]+)$", log, re.M).group(1))
    for label, settings in arms.items():
        line = re.search(rf"^sweep {re.escape(label)}: (final_ttt_exact val_loss:\S+ val_bpb:(\S+)) delta:(\S+) ", log, re.M)
        rescored = run(RUN_ID=f"rescore{len(settings)}", TTT_MODE=None, **ARTIFACT, **settings)
        assert rescored.returncode == 0, rescored.stderr
        assert line.group(1) == re.search(r"^final_ttt_exact .*$", rescored.stdout, re.M).group(0)
        assert float(line.group(3)) == pytest.approx(float(line.group(2)) - sliding, abs=1e-5)
