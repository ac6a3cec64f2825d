#!/usr/bin/env python3
"""A synthetic corpus whose entropy is known exactly, tokenized into shards, for runs without a GPU or a download.

    python data/synthetic.py            # -> data/datasets/synthetic_sp384/, data/tokenizers/synthetic_384_bpe.model

The text is drawn from a Markov chain over lowercase letters, the space and a document boundary. Its entropy per
byte B (formula below) is a lower bound on the val_bpb any model can reach on it, so a training run on it shows
both that the metric is right (val_bpb stays above B) and that the model learns (val_bpb falls toward B).

The chain (28 symbols: a..z = 0..25, SPACE = 26, END = 27):
  - END is the document boundary. A document is the chain run from END until it next reaches END; the symbols
    in between are its text. END itself is not text: in the shards it is the next document's BOS token.
  - From SPACE and from END the chain goes to a letter only, and it enters END only from a letter. So a document
    is never empty, never starts or ends with a space, and never holds two spaces in a row.
  - Word starts (the rows of SPACE and END) follow a Zipf law over the letters; each letter is followed by one of
    two letters, by SPACE or by END (word breaks end the document with probability END_GIVEN_BREAK).

Entropy. Documents start in the same state (END), so they are independent and their concatenation, boundaries
included, is one trajectory of the chain. With stationary distribution pi (pi P = pi), the entropy rate is
        H = -sum_i pi_i sum_j P_ij log2 P_ij        bits per symbol, boundaries included,
and a fraction 1 - pi_END of the symbols are text bytes, so the entropy of the text per byte is
        B = H / (1 - pi_END)                        bits per byte.
No model, however good, has a lower expected loss per byte on a long sample: the token stream is a function of
the symbol stream (with BOS for END), so it carries the same information. B charges the cost of predicting each
BOS (a token with no bytes) to the bytes; leaving BOS out would give a smaller number, also a bound but a
looser one. A real model sees less context at the start of each window, which only adds loss.

Why the metric's byte count is exactly the text's: the text is only a..z and single spaces, which SentencePiece's
nmt_nfkc normalisation leaves as they are; each space becomes the leading "▁" of the next piece, which the
metric counts as one byte because it never follows BOS (no document starts with a space).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from data.build_shards import DATA_DIR, build_dataset, exit_status  # noqa: E402
from train_gpt import DataError  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPACE, END = 26, 27
N_SYMBOLS = 28
# The knobs of the chain, chosen so that B is about 1.5-1.7 bits per byte (a tiny model gets well below the
# 4.7 bits of a uniform letter in a few dozen steps) and documents are a few hundred bytes long.
WORD_START_ZIPF = 1.5        # P(first letter of a word is the k-th most likely) ~ k^-1.5
SUCCESSORS = 2               # letters that can follow a letter inside a word
SUCCESSOR_CONCENTRATION = 0.5  # Dirichlet parameter of their probabilities (small = skewed)
WORD_BREAK = (0.15, 0.30)    # per letter, the probability that a word ends after it, drawn from this range
END_GIVEN_BREAK = 1 / 50     # a word break ends the document with this probability: about 50 words per document
PARALLEL_CHAINS = 256        # documents generated side by side (part of the algorithm: it fixes the output)
NO_SYMBOL = 255              # marks the steps of a chain that has drawn all its documents

DEFAULT_VOCAB = 384
DEFAULT_SEED = 1234
DEFAULT_TRAIN_DOCS = 20_000  # about 1.6 million tokens with the 384-piece tokenizer
DEFAULT_VAL_DOCS = 500


# =============================================================================================
# The chain and its entropy
# =============================================================================================

def make_chain(seed: int) -> np.ndarray:
    """Transition matrix P (28 x 28, rows sum to 1) of the text process; the same seed gives the same chain."""
    rng = np.random.default_rng(seed)
    P = np.zeros((N_SYMBOLS, N_SYMBOLS))
    word_start = np.zeros(len(LETTERS))
    word_start[rng.permutation(len(LETTERS))] = np.arange(1, len(LETTERS) + 1) ** -WORD_START_ZIPF
    P[SPACE, :SPACE] = P[END, :SPACE] = word_start / word_start.sum()
    for letter in range(len(LETTERS)):
        p_break = rng.uniform(*WORD_BREAK)
        successors = rng.choice(len(LETTERS), SUCCESSORS, replace=False)
        P[letter, successors] = rng.dirichlet(np.full(SUCCESSORS, SUCCESSOR_CONCENTRATION)) * (1 - p_break)
        P[letter, SPACE] = p_break * (1 - END_GIVEN_BREAK)
        P[letter, END] = p_break * END_GIVEN_BREAK
    return P


def stationary_distribution(P: np.ndarray) -> np.ndarray:
    """pi with pi P = pi and sum(pi) = 1. Every letter can start a word, so the chain is irreducible and pi is
    unique; it is aperiodic since a letter can be followed by SPACE (a 2-cycle) or by a letter then SPACE."""
    n = P.shape[0]
    A = np.vstack([P.T - np.eye(n), np.ones(n)])
    b = np.zeros(n + 1)
    b[-1] = 1.0
    pi, *_ = np.linalg.lstsq(A, b, rcond=None)
    if not np.allclose(pi @ P, pi, atol=1e-12) or pi.min() <= 0:
        raise AssertionError("the chain has no unique positive stationary distribution")
    return pi


def entropy_rate_bits(P: np.ndarray) -> float:
    """H = -sum_i pi_i sum_j P_ij log2 P_ij, bits per symbol (END included)."""
    pi = stationary_distribution(P)
    logs = np.log2(P, out=np.zeros_like(P), where=P > 0)
    return float(-(pi[:, None] * P * logs).sum())


def entropy_bits_per_byte(P: np.ndarray) -> float:
    """B = H / (1 - pi_END): the lowest expected val_bpb of any model on text from this chain."""
    return entropy_rate_bits(P) / (1.0 - stationary_distribution(P)[END])


# =============================================================================================
# Sampling
# =============================================================================================

def sample_documents(P: np.ndarray, n_docs: int, seed: int) -> list[np.ndarray]:
    """`n_docs` documents as arrays of symbols (no END), each the chain run from END back to END.

    PARALLEL_CHAINS documents are drawn side by side with numpy; chain k draws a fixed quota of documents, and
    the result is chain 0's documents, then chain 1's, ... A document is kept however long it runs, so the
    documents are independent draws with no bias on their length."""
    rng = np.random.default_rng([seed, 1])  # a stream of its own, apart from make_chain's
    cumulative = np.cumsum(P, axis=1)
    cumulative[:, -1] = 1.0  # guard against rounding: every draw lands in some column
    chains = min(PARALLEL_CHAINS, max(n_docs, 1))
    quota = np.full(chains, n_docs // chains) + (np.arange(chains) < n_docs % chains)
    state = np.full(chains, END)
    finished = np.zeros(chains, dtype=np.int64)
    steps = []  # per step, the symbol each chain drew (NO_SYMBOL once it has its quota)
    while (active := np.flatnonzero(finished < quota)).size:
        u = rng.random(active.size)
        drawn = (u[:, None] > cumulative[state[active]]).sum(axis=1)
        state[active] = drawn
        finished[active] += drawn == END
        step = np.full(chains, NO_SYMBOL, dtype=np.uint8)
        step[active] = drawn
        steps.append(step)
    history = np.stack(steps)
    docs = []
    for k in range(chains):
        trajectory = history[:, k][history[:, k] != NO_SYMBOL]
        ends = np.flatnonzero(trajectory == END)
        docs.extend(trajectory[start + 1:end] for start, end in zip(np.concatenate([[-1], ends[:-1]]), ends))
    return docs


SYMBOL_BYTES = np.frombuffer((LETTERS + " ").encode(), dtype=np.uint8)


def document_text(symbols: np.ndarray) -> str:
    return SYMBOL_BYTES[symbols].tobytes().decode()


def log2_probability(P: np.ndarray, symbols: np.ndarray) -> float:
    """log2 of the chain's probability of one document: END -> its symbols -> END."""
    path = np.concatenate([[END], symbols, [END]]).astype(np.int64)
    return float(np.log2(P[path[:-1], path[1:]]).sum())


# =============================================================================================
# Build
# =============================================================================================

def build_synthetic(out_dir: Path, tokenizer_path: Path, *, train_docs: int, val_docs: int, seed: int = DEFAULT_SEED,
                    vocab_size: int = DEFAULT_VOCAB, shard_tokens: int = 1_000_000, workers: int = 1,
                    overwrite: bool = False, log=print) -> dict:
    """Sample the corpus, train a tokenizer on its training documents, write the shards; return the manifest."""
    if train_docs < 1 or val_docs < 1:
        raise DataError(f"--train-docs {train_docs} / --val-docs {val_docs}: both must be at least 1")
    P = make_chain(seed)
    docs = sample_documents(P, val_docs + train_docs, seed)
    val_bytes = sum(len(d) for d in docs[:val_docs])
    val_bits = -sum(log2_probability(P, d) for d in docs[:val_docs])
    bound = entropy_bits_per_byte(P)
    info = {
        "seed": seed,
        "entropy_bits_per_symbol": entropy_rate_bits(P),
        "entropy_bits_per_byte": bound,
        "formula": "B = H / (1 - pi_END), H = -sum_i pi_i sum_j P_ij log2 P_ij (see data/synthetic.py)",
        "val_bytes": val_bytes,
        # The true chain's own score on this validation sample: B up to sampling noise.
        "val_true_model_bits_per_byte": val_bits / val_bytes,
    }
    log(f"synthetic corpus: {len(docs)} documents from a Markov chain with entropy B = {bound:.4f} bits per byte")
    log(f"first document begins: {document_text(docs[0])[:72]!r}")
    with tempfile.TemporaryDirectory(prefix="synthetic_docs_") as tmp:
        docs_path = Path(tmp) / "synthetic_docs.jsonl"
        with open(docs_path, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": document_text(d)}) + "\n")
        return build_dataset(docs_path, out_dir, tokenizer_path, vocab_size=vocab_size, val_docs=val_docs,
                             shard_tokens=shard_tokens, tokenizer_docs=train_docs, workers=workers,
                             overwrite=overwrite, extra_manifest={"synthetic": info}, log=log)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See data/README.md.")
    p.add_argument("--out-dir", type=Path, help="shard directory (default data/datasets/synthetic_sp<V>)")
    p.add_argument("--tokenizer-out", type=Path, help="tokenizer file (default data/tokenizers/synthetic_<V>_bpe.model)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help="tokenizer pieces (default %(default)s)")
    p.add_argument("--train-docs", type=int, default=DEFAULT_TRAIN_DOCS, help="training documents (default %(default)s)")
    p.add_argument("--val-docs", type=int, default=DEFAULT_VAL_DOCS, help="validation documents (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="picks the chain and the sample (default %(default)s)")
    p.add_argument("--shard-tokens", type=int, default=1_000_000, help="tokens per shard (default %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory / tokenizer")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out_dir or DATA_DIR / "datasets" / f"synthetic_sp{args.vocab_size}"
    tokenizer = args.tokenizer_out or DATA_DIR / "tokenizers" / f"synthetic_{args.vocab_size}_bpe.model"

    def command():
        build_synthetic(out_dir, tokenizer, train_docs=args.train_docs, val_docs=args.val_docs, seed=args.seed,
                        vocab_size=args.vocab_size, shard_tokens=args.shard_tokens, workers=args.workers,
                        overwrite=args.overwrite)
        print(f"entropy bound: val_bpb >= {entropy_bits_per_byte(make_chain(args.seed)):.4f}  "
              f"(DATA_PATH={out_dir} TOKENIZER_PATH={tokenizer} VOCAB_SIZE={args.vocab_size})")
    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())
