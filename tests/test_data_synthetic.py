"""data/synthetic.py: the entropy formula against empirical estimates, the shape of the text, and the build."""

import json

import numpy as np
import pytest
import sentencepiece as spm
from data_fixtures import remote_files  # first: sets sys.path

import train_gpt
from data import inspect_shards as ins
from data import synthetic as sy

SEED = 1234


@pytest.fixture(scope="module")
def chain():
    return sy.make_chain(SEED)


@pytest.fixture(scope="module")
def sample(chain):
    return sy.sample_documents(chain, 8000, seed=5)  # about 2 million symbols


def symbol_paths(docs):
    """Each document as the chain's path END, symbols..., END."""
    return [np.concatenate([[sy.END], d, [sy.END]]).astype(np.int64) for d in docs]


def test_chain_is_a_proper_markov_chain(chain):
    np.testing.assert_allclose(chain.sum(axis=1), 1.0)
    pi = sy.stationary_distribution(chain)
    np.testing.assert_allclose(pi @ chain, pi, atol=1e-12)
    assert chain[sy.SPACE, sy.SPACE] == chain[sy.SPACE, sy.END] == chain[sy.END, sy.SPACE] == chain[sy.END, sy.END] == 0
    assert 1.0 < sy.entropy_bits_per_byte(chain) < 2.0
    assert not np.array_equal(chain, sy.make_chain(SEED + 1))


def test_entropy_formula_matches_the_sample(chain, sample):
    """The true chain's log-loss per byte on a long sample converges to B; the plug-in entropy from transition
    counts converges to H. Tolerance: 4 standard errors of the mean log-loss, small enough that the nearby
    wrong answers (H per symbol instead of per byte, or leaving the boundary's cost out) fail."""
    paths = symbol_paths(sample)
    losses = np.concatenate([-np.log2(chain[p[:-1], p[1:]]) for p in paths])
    n_bytes = sum(d.size for d in sample)
    tolerance = 4 * losses.std() / np.sqrt(losses.size) * losses.size / n_bytes

    bound = sy.entropy_bits_per_byte(chain)
    assert abs(losses.sum() / n_bytes - bound) < tolerance
    H = sy.entropy_rate_bits(chain)
    pi = sy.stationary_distribution(chain)
    p_end = sy.END_GIVEN_BREAK
    end_choice_bits = -(pi[sy.SPACE] + pi[sy.END]) * (p_end * np.log2(p_end) + (1 - p_end) * np.log2(1 - p_end))
    for wrong in (H, (H - end_choice_bits) / (1 - pi[sy.END])):
        assert abs(losses.sum() / n_bytes - wrong) > tolerance

    counts = np.zeros_like(chain)
    for p in paths:
        np.add.at(counts, (p[:-1], p[1:]), 1)
    estimate = counts / counts.sum(axis=1, keepdims=True)
    plug_in = -np.sum(counts * np.log2(estimate, out=np.zeros_like(estimate), where=counts > 0)) / counts.sum()
    assert abs(plug_in - H) < tolerance

    mean_length = (1 - pi[sy.END]) / pi[sy.END]  # bytes per document, from the renewal argument
    assert abs(n_bytes / len(sample) - mean_length) < 0.05 * mean_length


def test_text_shape(sample):
    texts = [sy.document_text(d) for d in sample[:2000]]
    assert all(t and t == t.strip() and "  " not in t and set(t) <= set(sy.LETTERS + " ") for t in texts)


def test_sampling_is_deterministic(chain):
    a = sy.sample_documents(chain, 700, seed=9)
    b = sy.sample_documents(chain, 700, seed=9)
    c = sy.sample_documents(chain, 700, seed=10)
    assert len(a) == 700 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def build(tmp_path, name, seed=SEED):
    return sy.build_synthetic(tmp_path / name / "shards", tmp_path / name / "tok.model", train_docs=600, val_docs=60,
                              seed=seed, vocab_size=320, shard_tokens=20_000, log=lambda *_: None)


def test_build_counts_bytes_exactly_and_is_reproducible(tmp_path):
    manifest = build(tmp_path, "a")
    out, tok = tmp_path / "a" / "shards", tmp_path / "a" / "tok.model"
    info = manifest["synthetic"]
    assert info["entropy_bits_per_byte"] == pytest.approx(sy.entropy_bits_per_byte(sy.make_chain(SEED)))
    assert abs(info["val_true_model_bits_per_byte"] - info["entropy_bits_per_byte"]) < 0.1
    assert json.loads((out / "manifest.json").read_text())["synthetic"] == info

    # The metric's byte count of the validation stream is exactly the number of characters of its text.
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    val = train_gpt.load_shard(out / "fineweb_val_000000.bin")
    assert ins.scored_bytes(val, ins.byte_tables(tok)) == info["val_bytes"]
    starts = list(np.flatnonzero(val == train_gpt.BOS_ID)) + [val.size]
    texts = [sp.decode(val[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
    assert len(texts) == 60 and sum(len(t) for t in texts) == info["val_bytes"]
    assert manifest["stats"]["files_train"] >= 2

    build(tmp_path, "b")
    build(tmp_path, "c", seed=SEED + 1)
    a, b, c = (remote_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a["shards/fineweb_val_000000.bin"] != c["shards/fineweb_val_000000.bin"]
