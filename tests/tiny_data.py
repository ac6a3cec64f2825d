"""A tiny corpus for CPU tests: generated sentences, a SentencePiece model trained on them (same
special ids and options as the official tokenizer), and train/val shards in the challenge format."""

import random
from pathlib import Path

import numpy as np

import train_gpt

VOCAB_SIZE = 384
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "to", "a", "big", "red", "house", "and", "then",
         "slept", "under", "tree", "bird", "sang", "loud", "small", "blue", "car", "drove", "fast", "home"]


def make_documents(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]) + (" " + str(rng.randint(0, 999)) if rng.random() < 0.2 else ""))
        docs.append(" ".join(sentences) + ("  café ünïcode ☃" if rng.random() < 0.1 else ""))
    return docs


def train_tokenizer(docs: list[str], prefix: Path) -> Path:
    import sentencepiece as spm
    text_file = prefix.with_suffix(".txt")
    text_file.write_text("\n".join(docs) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(prefix), model_type="bpe", vocab_size=VOCAB_SIZE,
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    return prefix.with_suffix(".model")


def encode_stream(model_path: Path, docs: list[str]) -> np.ndarray:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tokens = []
    for doc in docs:
        tokens.append(train_gpt.BOS_ID)
        tokens.extend(sp.encode(doc))
    return np.array(tokens, dtype=np.uint16)


def build(root: Path) -> tuple[Path, Path]:
    """Returns (data dir, tokenizer model)."""
    root.mkdir(parents=True, exist_ok=True)
    docs = make_documents(1200, seed=0)
    model_path = train_tokenizer(docs, root / "tok")
    data = root / "shards"
    data.mkdir()
    val = encode_stream(model_path, docs[:100])
    train = encode_stream(model_path, docs[100:])
    train_gpt.write_shard(data / "fineweb_val_000000.bin", val)
    half = len(train) // 2
    train_gpt.write_shard(data / "fineweb_train_000000.bin", train[:half])
    train_gpt.write_shard(data / "fineweb_train_000001.bin", train[half:])
    return data, model_path
