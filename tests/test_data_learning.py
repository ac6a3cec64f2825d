"""The learning test: a short CPU run of train_gpt.py on the synthetic corpus. Its val_bpb must stay above the
text's entropy bound and fall toward it, and the reported val_bpb must be val_loss / ln 2 times the scored
tokens per byte of the text, counted here from the generator and SentencePiece's own decoder (not from the
metric's byte tables). This checks the metric and the training together."""

import math
import re

import numpy as np
import pytest
import sentencepiece as spm
from data_fixtures import REPO_ROOT  # first: sets sys.path

import train_gpt
from data import synthetic
from data.cpu_smoke_run import run_train_gpt, train_gpt_env

VOCAB, VAL_DOCS, EVAL_SEQ_LEN = 384, 400, 128  # 400 documents: about 100,000 bytes, 31,000 tokens
# Small enough for about ten seconds on 2 CPU cores, big enough to learn most of the chain in 60 steps.
TINY = dict(NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, MLP_MULT=2, XSA_LAST_N=1, PARALLEL_RESID_START=1, BIGRAM_VOCAB_SIZE=256,
            BIGRAM_DIM=16, ITERATIONS=60, TRAIN_BATCH_TOKENS=4096, TRAIN_SEQ_LEN=128, WARMDOWN_ITERS=20,
            EVAL_SEQ_LEN=EVAL_SEQ_LEN, EVAL_STRIDE=64, VAL_LOSS_EVERY=20, TRAIN_LOG_EVERY=20, TTT_MODE="off")
NUMBER = r"([0-9.]+)"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    manifest = synthetic.build_synthetic(root / "shards", root / "tok.model", train_docs=1500, val_docs=VAL_DOCS,
                                         vocab_size=VOCAB, log=lambda *_: None)
    env = train_gpt_env(root / "shards", root / "tok.model", VOCAB, "learning", **TINY)
    lines = run_train_gpt(env, cwd=root, echo=False)
    return root, manifest["synthetic"], lines


def scores(lines, prefix):
    pattern = re.compile(rf"{prefix} val_loss:{NUMBER} val_bpb:{NUMBER}")
    return [(float(m.group(1)), float(m.group(2))) for line in lines if (m := pattern.match(line))]


def test_run_writes_its_log_and_artifact(run):
    root, _, lines = run
    assert (root / "logs" / "learning.txt").is_file() and (root / "logs" / "learning.model.zst").is_file()
    assert len(scores(lines, r"final_quant_sliding_window_exact")) == 1


def test_val_bpb_stays_above_the_entropy_bound_and_falls_toward_it(run):
    _, info, lines = run
    bound = info["entropy_bits_per_byte"]
    curve = [bpb for _, bpb in scores(lines, r"step:\d+/\d+")]
    finals = [bpb for _, bpb in scores(lines, r"final_quant_\w+")]
    assert len(curve) == 4 and len(finals) == 4  # steps 0, 20, 40, 60; four final lines
    # B bounds the expected score; on this finite sample the true chain's own score is the floor too.
    assert all(bpb > max(bound, info["val_true_model_bits_per_byte"]) for bpb in curve + finals)
    assert all(later < earlier for earlier, later in zip(curve, curve[1:]))
    assert curve[-1] - bound < 0.2 * (curve[0] - bound)   # most of the gap closed in 60 steps
    assert finals[-1] < 1.1 * bound                       # and the exported model keeps it


def test_reported_bpb_is_loss_times_tokens_per_byte(run):
    root, info, lines = run
    val = train_gpt.load_shard(root / "shards" / "fineweb_val_000000.bin")
    n_targets = val.size - 1
    # Sliding window: every target is scored, and the generator knows how many bytes they cover.
    (loss, bpb), = scores(lines, "final_quant_sliding_window_exact")
    assert bpb == pytest.approx(loss / math.log(2) * n_targets / info["val_bytes"], rel=1e-6)
    # Non-overlapping windows drop the ragged tail: count the bytes of the targets they score by decoding them.
    sp = spm.SentencePieceProcessor(model_file=str(root / "tok.model"))
    scored = val[:1 + n_targets // EVAL_SEQ_LEN * EVAL_SEQ_LEN]
    starts = list(np.flatnonzero(scored == train_gpt.BOS_ID)) + [scored.size]
    n_bytes = sum(len(sp.decode(scored[a + 1:b].tolist()).encode()) for a, b in zip(starts, starts[1:]))
    (loss, bpb), = scores(lines, "final_quant_roundtrip_exact")
    assert bpb == pytest.approx(loss / math.log(2) * (scored.size - 1) / n_bytes, rel=1e-6)
