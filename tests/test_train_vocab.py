"""End to end at a real-size vocabulary: a 4096-piece case-transformed tokenizer trained from generated text,
its shards and byte sidecars (data/build_shards.py), a tiny training run, its re-score, and the refusals."""

import random
import re

import pytest
from conftest import run_script
from data_fixtures import write_docs  # first: sets sys.path

from data import build_shards as bs

VOCAB = 4096


def texts(n: int) -> list[str]:
    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "ne", "su", "mo", "la", "pi", "de", "go", "vu", "xe", "zo", "ba", "fi", "hu"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(8000)})
    words = [w.capitalize() if i % 5 == 0 else w for i, w in enumerate(words)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) + "." for _ in range(1500)]


@pytest.fixture(scope="module")
def case_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp4096_case")
    docs = write_docs(root / "docs.jsonl", texts(1500))
    bs.build_dataset(docs, root / "shards", root / "tok.model", vocab_size=VOCAB, val_docs=100, shard_tokens=5000,
                     transform="case", log=lambda *_: None)
    return root / "shards", root / "tok.model"


def test_train_and_rescore_with_the_sidecar(tmp_path, case_corpus):
    settings = dict(VOCAB_SIZE=str(VOCAB), ITERATIONS="6", BIGRAM_VOCAB_SIZE="0")
    trained = run_script(tmp_path, case_corpus, RUN_ID="v4096", **settings)
    assert trained.returncode == 0, trained.stderr
    rescored = run_script(tmp_path, case_corpus, RUN_ID="v4096_rescore", EVAL_ARTIFACT="logs/v4096.model.zst", **settings)
    assert rescored.returncode == 0, rescored.stderr
    logs = [(tmp_path / f"logs/{name}.txt").read_text() for name in ("v4096", "v4096_rescore")]
    for log in logs:
        assert re.search(r"^val_bytes: from the sidecar .*fineweb_val_bytes_\*\.bin \(\d+ bytes\)$", log, re.M)
    line = re.search(r"^final_quant_sliding_window_exact .*$", logs[0], re.M).group(0)
    assert line in logs[1].splitlines()


def test_without_its_sidecar_the_run_stops_in_one_line(tmp_path, case_corpus):
    data, tokenizer = case_corpus
    copy = tmp_path / "nosidecar"
    copy.mkdir()
    for shard in data.glob("fineweb_*.bin"):
        if "_bytes_" not in shard.name:
            (copy / shard.name).write_bytes(shard.read_bytes())
    result = run_script(tmp_path, (copy, tokenizer), RUN_ID="refused", VOCAB_SIZE=str(VOCAB))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "user-defined pieces" in errors[0] and "fineweb_val_bytes_*.bin" in errors[0]
    assert "step:" not in result.stdout  # refused before any training


def test_an_untransformed_run_says_its_bytes_come_from_the_pieces(tmp_path, tiny_corpus):
    result = run_script(tmp_path, tiny_corpus, RUN_ID="plain", ITERATIONS="2")
    assert result.returncode == 0, result.stderr
    assert "val_bytes: from the tokenizer pieces" in (tmp_path / "logs/plain.txt").read_text().splitlines()
