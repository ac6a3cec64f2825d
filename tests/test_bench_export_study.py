"""bench/export_study.py: a variant studied from a checkpoint saved by STUDY_SAVE, in a re-scoring run
(STUDY_LOAD), gives the figures the training run gave it; bad study settings stop in one line (tiny model on the CPU)."""
import re
from pathlib import Path

import pytest
from conftest import log_body, run_script

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "bench" / "export_study.py"
WIDE = dict(MODEL_DIM="128", MLP_MULT="5", ITERATIONS="6")  # MLP matrices over SMALL_TENSOR_NUMEL: integers, which the variants change


def study_lines(log: str) -> list[str]:
    """The variants' lines, without their timings."""
    return [re.sub(r" quantize_s:\S+ fit_s:\S+", "", line) for line in log.splitlines() if re.match(r"^study \S+=", line)]


def test_a_loaded_checkpoint_studies_as_the_training_run(run, tiny_corpus):
    picked = "CLIP=std;LQER_RANK=4"
    trained = run_script(run.cwd, tiny_corpus, script=STUDY, RUN_ID="trained", STUDY=picked, STUDY_SAVE="study.pt", **WIDE)
    assert trained.returncode == 0, trained.stderr
    assert (run.cwd / "study.pt").is_file() and not (run.cwd / "study.pt.part").exists()
    first = log_body((run.cwd / "logs/trained.txt").read_text())
    loaded = run_script(run.cwd, tiny_corpus, script=STUDY, RUN_ID="loaded", STUDY=picked, STUDY_LOAD="study.pt",
                        EVAL_ARTIFACT="logs/trained.model.zst", **WIDE)
    assert loaded.returncode == 0, loaded.stderr
    second = log_body((run.cwd / "logs/loaded.txt").read_text())
    assert [line.split(":")[0] for line in study_lines(first)] == ["study CLIP=std int5/5", "study LQER_RANK=4 int5/5"]
    assert len(set(line.split(": ")[1] for line in study_lines(first))) == 2  # the two variants' figures differ
    assert study_lines(second) == study_lines(first)
    pre = re.search(r"^study prequant_sliding_bpb:(\S+) ", first, re.M).group(1)
    assert f"study checkpoint: study.pt prequant_sliding_bpb:{pre}" in second
    exact = [line for line in first.splitlines() if line.startswith("final_quant_sliding_window_exact")]
    assert exact and exact[0] in second  # the re-score of the artifact itself runs first
    assert run(RUN_ID="other").returncode == 0  # the tiny model without WIDE's shape
    other = run_script(run.cwd, tiny_corpus, script=STUDY, RUN_ID="mismatch", STUDY=picked, STUDY_LOAD="study.pt",
                       EVAL_ARTIFACT="logs/other.model.zst")
    assert other.returncode == 2 and other.stderr.strip() == "error: STUDY_LOAD=study.pt: saved from another model than logs/other.model.zst"


@pytest.mark.parametrize("settings, message", [
    (dict(STUDY="CLIP=sd"), "STUDY: unknown variant(s) ['CLIP=sd']; expected some of ['CLIP=std', "),
    (dict(STUDY_LOAD="study.pt"), "STUDY_LOAD=study.pt: expected EVAL_ARTIFACT too"),
    (dict(STUDY_LOAD="missing.pt", EVAL_ARTIFACT="logs/x.model.zst"), "STUDY_LOAD=missing.pt: no such file"),
    (dict(STUDY_SAVE="a.pt", STUDY_LOAD="b.pt"), "STUDY_LOAD and STUDY_SAVE: a run either"),
    (dict(STUDY_SAVE="a.pt", EVAL_ARTIFACT="logs/x.model.zst"), "STUDY_SAVE=a.pt: a re-scoring run (EVAL_ARTIFACT) has no"),
    (dict(STUDY_LOAD="junk.pt", EVAL_ARTIFACT="logs/trained.model.zst"), "STUDY_LOAD=junk.pt: expected a checkpoint written by STUDY_SAVE"),
])
def test_bad_study_settings_stop_in_one_line(run, tiny_corpus, settings, message):
    loads_junk = settings.get("STUDY_LOAD") == "junk.pt"  # found only once the artifact is read: the others stop before the run
    if loads_junk:
        (run.cwd / "junk.pt").write_bytes(b"not a checkpoint")
        assert run(RUN_ID="trained").returncode == 0
    result = run_script(run.cwd, tiny_corpus, script=STUDY, RUN_ID="bad", **settings)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr, result.stderr
    if not loads_junk:
        assert not list((run.cwd / "logs").glob("bad*"))
