#!/usr/bin/env python3
"""Check and describe token shards: per shard, header validity, token and document counts, the token-id range;
for the validation set, tokens per byte under a tokenizer (the factor that turns loss per token into val_bpb).

    python data/inspect_shards.py data/datasets/fineweb10B_sp1024 --tokenizer data/tokenizers/fineweb_1024_bpe.model
    python data/inspect_shards.py data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin

Exit status: 0 if every shard is valid (and, with --tokenizer, every id is inside its vocabulary), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402
from data.build_shards import exit_status, load_tokenizer  # noqa: E402
from train_gpt import BOS_ID, DataError  # noqa: E402

CHUNK_TOKENS = 1 << 24  # byte counting works through the validation stream in pieces of this many tokens


# =============================================================================================
# Bytes per token: the metric's own tables and rule (train_gpt.py, DESIGN.md section 2)
# =============================================================================================

def byte_tables(tokenizer: Path) -> train_gpt.ByteTables:
    return train_gpt.build_byte_tables(str(tokenizer), load_tokenizer(tokenizer).vocab_size())


def scored_bytes(tokens: np.ndarray, tables: train_gpt.ByteTables, previous: int | None = None) -> int:
    """Bytes the metric counts for tokens[1:] (each scored with its predecessor as context), or for all of
    `tokens` when `previous`, the token before them, is given."""
    stream = torch.from_numpy(tokens.astype(np.int64))
    if previous is not None:
        stream = torch.cat([torch.tensor([previous]), stream])
    return int(train_gpt.token_bytes(stream[:-1], stream[1:], tables).sum())


# =============================================================================================
# Inspection
# =============================================================================================

def shard_paths(targets: list[Path]) -> list[Path]:
    paths = []
    for target in targets:
        if target.is_dir():
            found = sorted(target.glob("fineweb_val_*.bin")) + sorted(target.glob("fineweb_train_*.bin"))
            if not found:
                raise DataError(f"{target}: no fineweb_val_*.bin or fineweb_train_*.bin shards in this directory")
            paths.extend(found)
        elif target.exists():
            paths.append(target)
        else:
            raise DataError(f"{target}: no such file or directory")
    return paths


def describe(path: Path, vocab_size: int | None) -> tuple[dict, np.ndarray | None]:
    """One row of the report, and the tokens when the shard is valid."""
    try:
        tokens = train_gpt.load_shard(path)
    except DataError as e:
        return {"file": path.name, "ok": False, "problem": str(e)}, None
    row = {"file": path.name, "ok": True, "tokens": tokens.size, "docs": int(np.count_nonzero(tokens == BOS_ID)),
           "min": int(tokens.min()) if tokens.size else None, "max": int(tokens.max()) if tokens.size else None}
    if tokens.size == 0:
        row["ok"], row["problem"] = False, f"{path}: no tokens"
    elif vocab_size is not None and row["max"] >= vocab_size:
        bad = int(np.count_nonzero(tokens >= vocab_size))
        row["ok"], row["problem"] = False, f"{path}: {bad} token ids >= the tokenizer's vocabulary size {vocab_size}"
    return row, tokens


def inspect(targets: list[Path], tokenizer: Path | None = None, out=print) -> bool:
    """Print the report; return True when every shard is valid."""
    sp = load_tokenizer(tokenizer) if tokenizer else None
    tables = byte_tables(tokenizer) if sp else None
    all_ok = True
    val = {"tokens": 0, "bytes": 0, "previous": None}
    out(f"{'shard':<28} {'header':<7} {'tokens':>13} {'docs':>10} {'token ids':>12}")
    for path in shard_paths(targets):
        row, tokens = describe(path, sp.vocab_size() if sp else None)
        all_ok &= row["ok"]
        if "tokens" in row:
            ids = f"{row['min']}..{row['max']}" if row["tokens"] else "-"
            out(f"{row['file']:<28} {'ok':<7} {row['tokens']:>13,} {row['docs']:>10,} {ids:>12}")
        if not row["ok"]:
            out(f"{row['file']:<28} {'BAD':<7} {row['problem']}")
        if tables is not None and tokens is not None and row["ok"] and path.name.startswith("fineweb_val_"):
            # The validation shards form one stream: the first token of a shard is scored after the last of
            # the previous one, and the very first token of the stream is not scored.
            for start in range(0, tokens.size, CHUNK_TOKENS):
                chunk = tokens[start:start + CHUNK_TOKENS]
                if val["previous"] is None:
                    val["bytes"] += scored_bytes(chunk, tables)
                    val["tokens"] += chunk.size - 1
                else:
                    val["bytes"] += scored_bytes(chunk, tables, val["previous"])
                    val["tokens"] += chunk.size
                val["previous"] = int(chunk[-1])
    if tables is not None and val["tokens"]:
        out(f"validation under {tokenizer.name}: {val['tokens']:,} scored tokens, {val['bytes']:,} bytes, "
            f"{val['tokens'] / val['bytes']:.4f} tokens per byte "
            f"(val_bpb = val_loss / ln 2 * {val['tokens'] / val['bytes']:.4f})")
    out("all shards valid" if all_ok else "SOME SHARDS ARE INVALID")
    return all_ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See data/README.md.")
    p.add_argument("paths", nargs="+", type=Path, help="shard files, or directories holding fineweb_*.bin shards")
    p.add_argument("--tokenizer", type=Path, help="SentencePiece .model: check ids against it, count validation bytes")
    args = p.parse_args(argv)
    return exit_status(lambda: 0 if inspect(args.paths, args.tokenizer) else 1)


if __name__ == "__main__":
    sys.exit(main())
