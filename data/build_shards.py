#!/usr/bin/env python3
"""Build token shards from documents: train (or reuse) a SentencePiece BPE tokenizer, tokenize every
document, and pack the tokens into shards that train_gpt.py reads.

    python data/build_shards.py --docs data/docs_selected.jsonl --vocab-size 1024
    python data/build_shards.py --docs my.jsonl --tokenizer data/tokenizers/fineweb_1024_bpe.model --out-dir /tmp/my_sp1024

Input: a JSONL file, one document per line, each an object with a string field "text" (other fields are
ignored). This is the format of the published docs_selected.jsonl (`cached_challenge_fineweb.py --with-docs`).

Output (written to `<out-dir>.partial/` and renamed to `<out-dir>` only when complete):
    fineweb_val_000000.bin ...    the first --val-docs documents
    fineweb_train_000000.bin ...  all the others
    manifest.json                 counts per split and per file, the settings, checksums of input and tokenizer

With --transform case (the lossless case transform, below) every document is transformed before the tokenizer
is trained on it and before it is encoded, and the validation byte sidecars are written; --byte-sidecar writes
them for any tokenizer:
    fineweb_val_bytes_000000.bin ...  one per validation shard, in the shard format, one uint16 a token: the
                                  bytes of original text that token stands for (rule: original_byte_counts)

Packing: each document becomes BOS followed by its tokens (no EOS). The documents of a split are packed back
to back into one stream, cut every --shard-tokens tokens; so every shard but the last of a split is full, and
a document may begin in one shard and end in the next. train_gpt.py reads the shards of a split in sorted
order as one stream, so nothing is lost at a cut. (The published shards are cut the same way.)

The tokenizer, when trained here, sees only training documents (never the first --val-docs), so no
validation text influences anything that is trained. Same input and settings give byte-identical output.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402  (the shard format is defined there, once)
from train_gpt import BOS_ID, DataError, write_atomic  # noqa: E402

DATA_DIR = REPO_ROOT / "data"
DEFAULT_VAL_DOCS = 50_000            # the challenge's validation set: the first 50,000 documents
DEFAULT_SHARD_TOKENS = 100_000_000   # size of the published shards
DEFAULT_TOKENIZER_DOCS = 100_000     # training documents the tokenizer is trained on
DOCS_PER_TASK = 512                  # documents per unit of work handed to a worker process


# =============================================================================================
# Tokenizer
# =============================================================================================

# The challenge's tokenizer family (the settings of the official fineweb_1024_bpe.model): special ids 0..3,
# then the 256 byte-fallback pieces <0x00>..<0xFF> (ids 4..259), then the learned pieces. BOS must be
# train_gpt.BOS_ID, which the data loader and the bits-per-byte metric treat as the document boundary.
SPECIAL_IDS = {"pad_id": 0, "bos_id": BOS_ID, "eos_id": 2, "unk_id": 3}
TOKENIZER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    character_coverage=0.999,
    **SPECIAL_IDS,
)
MIN_VOCAB_SIZE = 4 + 256 + 1        # specials + byte pieces + at least one learned piece
# The lossless case transform: each capital A-Z becomes CASE_MARKER and its lowercase letter, and a CASE_MARKER
# of the text is doubled; the marker is a user-defined piece of the tokenizer (always a piece of its own).
CASE_MARKER = "\u21e7"
TRANSFORMS = ("none", "case")
# The trainer reads sentences of at most this many bytes; longer lines are cut at a space (see below).
MAX_SENTENCE_BYTES = 16_384
# The thread count is recorded inside the .model file, so it is fixed (SentencePiece's own default) rather
# than taken from the machine: the file is then the same on every machine. The learned pieces do not depend
# on it.
TRAINER_THREADS = 16


def training_sentences(text: str, limit: int = MAX_SENTENCE_BYTES // 4) -> Iterator[str]:
    """Split a document into the trainer's "sentences": its lines, long lines cut at a space before `limit`
    characters (4 bytes per character at most, so within MAX_SENTENCE_BYTES). The trainer skips longer
    sentences silently, and BPE pieces never cross whitespace, so cutting there changes nothing learned."""
    for line in text.split("\n"):
        while len(line) > limit:
            cut = line.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            yield line[:cut]
            line = line[cut:]
        if line.strip():
            yield line


def case_transform(text: str) -> str:
    return "".join(CASE_MARKER + c.lower() if "A" <= c <= "Z" else c * 2 if c == CASE_MARKER else c for c in text)


def case_untransform(text: str) -> str:
    """The inverse of case_transform: a marker followed by a-z is that capital, a doubled marker one marker."""
    return re.sub(f"{CASE_MARKER}([a-z]|{CASE_MARKER})", lambda m: m.group(1).upper() if m.group(1) != CASE_MARKER else CASE_MARKER, text)


def transform_function(transform: str):
    if transform not in TRANSFORMS:
        raise DataError(f"--transform {transform}: expected one of {', '.join(TRANSFORMS)}")
    return case_transform if transform == "case" else (lambda text: text)


def piece_byte_strings(sp: spm.SentencePieceProcessor) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Per token id, the bytes train_gpt.py's tables count for it (a leading "\u2581" as a space; a byte piece
    its byte; control and unknown pieces nothing), whether it has that leading space, and whether it is a
    boundary (control, unknown, unused), after which that space stands for nothing."""
    strings, leading, boundary = [], np.zeros(sp.vocab_size(), dtype=bool), np.zeros(sp.vocab_size(), dtype=bool)
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
            strings.append(b"")
        elif sp.is_byte(i):
            strings.append(bytes([int(piece[3:5], 16)]))
        else:
            leading[i] = piece.startswith("\u2581")
            strings.append((" " if leading[i] else "").encode() + piece.removeprefix("\u2581").encode())
    return strings, leading, boundary


MARKER_BYTES = CASE_MARKER.encode()
CASE_PATTERN = re.compile(re.escape(MARKER_BYTES) + b"(?:[a-z]|" + re.escape(MARKER_BYTES) + b")")


def original_byte_counts(tokens: np.ndarray, tables: tuple, transform: str) -> np.ndarray:
    """The sidecar rule: per token of a stream of documents (each BOS + its tokens), how many bytes of the
    original text it stands for. A token's bytes are those train_gpt.py's tables count (its piece's UTF-8
    text, a leading space except right after BOS or another boundary piece); under the case transform a
    marker before a letter stands for no byte (its letter stands for the capital's one), and of a doubled
    marker the second stands for none. Without a transform the counts are exactly the tables' bytes."""
    strings, leading, boundary = tables
    counts = np.zeros(len(tokens), dtype=np.int64)
    pieces = []
    for j, t in enumerate(tokens.tolist()):
        b = strings[t]
        if leading[t] and (j == 0 or boundary[tokens[j - 1]]):
            b = b[1:]
        pieces.append(b)
        counts[j] = len(b)
    if transform == "case":
        text = b"".join(pieces)
        weight = np.ones(len(text), dtype=np.int64)
        for m in CASE_PATTERN.finditer(text):
            dropped = m.start() + (len(MARKER_BYTES) if m.group().count(MARKER_BYTES) == 2 else 0)
            weight[dropped:dropped + len(MARKER_BYTES)] = 0
        owner = np.repeat(np.arange(len(tokens)), counts)
        counts = np.bincount(owner, weights=weight, minlength=len(tokens)).astype(np.int64)
    if counts.size and counts.max() > 65535:
        raise DataError(f"a token stands for {counts.max()} bytes; the sidecar stores at most 65535")
    return counts


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: Path, transform: str = "none") -> None:
    """Train a BPE tokenizer of `vocab_size` pieces on `texts` (in the given order) and write it atomically."""
    if not MIN_VOCAB_SIZE <= vocab_size <= 65536:
        raise DataError(f"vocabulary size {vocab_size}: expected {MIN_VOCAB_SIZE}..65536 "
                        "(4 special ids + 256 byte pieces + learned pieces; shards store ids as uint16)")
    bad_input = []

    def sentences():
        try:
            for text in texts:
                yield from training_sentences(text)
        except DataError as e:  # raised inside the trainer it would come out as a RuntimeError: keep it
            bad_input.append(e)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            input_sentence_size=0, shuffle_input_sentence=False,  # use every sentence, in input order
            max_sentence_length=MAX_SENTENCE_BYTES, num_threads=TRAINER_THREADS,
            minloglevel=2, **TOKENIZER_SETTINGS, **({"user_defined_symbols": [CASE_MARKER]} if transform == "case" else {}))
    except RuntimeError as e:  # e.g. too little text for the requested vocabulary
        if not bad_input:
            raise DataError(f"training a {vocab_size}-piece tokenizer for {model_path} failed: {e}".strip()) from None
    if bad_input:
        raise bad_input[0]
    write_atomic(model_path, model.getvalue())


def load_tokenizer(model_path: Path, transform: str | None = None) -> spm.SentencePieceProcessor:
    """Load a tokenizer and check it has the special ids that train_gpt.py relies on, a standalone "\u2581"
    piece, and (with `transform`) the user-defined pieces that transform needs and no others."""
    if not Path(model_path).is_file():
        raise DataError(f"{model_path}: tokenizer file not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{model_path}: not a SentencePiece model ({e})") from None
    found = {"pad_id": sp.pad_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id()}
    if found != SPECIAL_IDS:
        raise DataError(f"{model_path}: special ids {found}, expected {SPECIAL_IDS}")
    if sp.vocab_size() > 65536:
        raise DataError(f"{model_path}: {sp.vocab_size()} pieces; shards store ids as uint16 (at most 65536)")
    if sp.piece_to_id("\u2581") == sp.unk_id():
        raise DataError(f'{model_path}: no standalone "\u2581" piece (a space before a piece that does not begin with one); '
                        "the bits-per-byte metric would then come out too low (parameter-golf issue #897)")
    if transform is not None:
        user = [sp.id_to_piece(i) for i in train_gpt.user_defined_pieces(sp.serialized_model_proto())]
        wanted = [CASE_MARKER] if transform == "case" else []
        if user != wanted:
            raise DataError(f"{model_path}: user-defined pieces {user}, expected {wanted} for --transform {transform}"
                            + (" (a transformed tokenizer: pass its --transform)" if user else ""))
    return sp


# =============================================================================================
# Documents
# =============================================================================================

def parse_document(path, line_no: int, line: bytes) -> str:
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise DataError(f"{path}:{line_no}: not a JSON object ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise DataError(f'{path}:{line_no}: expected an object with a string field "text"')
    return doc["text"]


def read_lines(path: Path, digest=None) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw line) for each non-empty line; feed every byte read to `digest`."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if digest is not None:
                digest.update(line)
            if line.strip():
                yield line_no, line


def read_texts(path: Path, skip: int = 0, limit: int | None = None) -> Iterator[str]:
    """Document texts in file order, after the first `skip` documents, at most `limit` of them."""
    count = 0
    for index, (line_no, line) in enumerate(read_lines(path)):
        if index < skip:
            continue
        if limit is not None and count >= limit:
            return
        count += 1
        yield parse_document(path, line_no, line)


# Worker processes: each loads the tokenizer once and turns a batch of raw lines into one token array.
_worker_sp: spm.SentencePieceProcessor | None = None
_worker_transform, _worker_tables = "none", None


def _start_worker(model_path: str, transform: str = "none", sidecar: bool = False) -> None:
    global _worker_sp, _worker_transform, _worker_tables
    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)
    _worker_transform = transform
    _worker_tables = piece_byte_strings(_worker_sp) if sidecar else None


def _encode_batch(task: tuple[str, list[tuple[int, bytes]]]) -> tuple[np.ndarray, int, np.ndarray | None]:
    """BOS + tokens of each document of the batch, concatenated; the number of documents; and with a sidecar,
    the original bytes of each token (original_byte_counts)."""
    path, lines = task
    transform = transform_function(_worker_transform)
    texts = [transform(parse_document(path, line_no, line)) for line_no, line in lines]
    # One thread per worker: the workers are the parallelism (SentencePiece would otherwise start a thread per core).
    encoded = _worker_sp.encode(texts, out_type=int, num_threads=1)
    pieces = [np.array([BOS_ID, *ids], dtype=np.uint16) for ids in encoded]
    tokens = np.concatenate(pieces)
    counts = None if _worker_tables is None else original_byte_counts(tokens, _worker_tables, _worker_transform)
    return tokens, len(lines), counts


def encoded_batches(docs_path: Path, model_path: Path, workers: int, digest, transform: str = "none",
                    sidecar: bool = False) -> Iterator[tuple[np.ndarray, int, np.ndarray | None]]:
    """(tokens, number of documents) per batch of DOCS_PER_TASK documents, in file order, computed by `workers`
    processes. Results are taken in submission order, so the output does not depend on the number of workers;
    at most a few batches per worker are in flight, so memory stays flat however large the file."""
    def tasks():
        batch = []
        for item in read_lines(docs_path, digest):
            batch.append(item)
            if len(batch) == DOCS_PER_TASK:
                yield str(docs_path), batch
                batch = []
        if batch:
            yield str(docs_path), batch

    if workers <= 1:
        _start_worker(str(model_path), transform, sidecar)
        yield from map(_encode_batch, tasks())
        return
    with multiprocessing.Pool(workers, _start_worker, (str(model_path), transform, sidecar)) as pool:
        pending = collections.deque()
        for task in tasks():
            pending.append(pool.apply_async(_encode_batch, (task,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# =============================================================================================
# Shards
# =============================================================================================

def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


class ShardPacker:
    """Packs the token stream of one split into shards of exactly `shard_tokens` tokens (the last shorter)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.files: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.buffer.size - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.buffer.size:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = shard_name(self.split, len(self.files))
        tokens = self.buffer[:self.fill]
        train_gpt.write_shard(self.out_dir / name, tokens)
        self.files.append({"name": name, "tokens": int(self.fill),
                           "docs": int(np.count_nonzero(tokens == BOS_ID)),  # documents that start here
                           "bytes": train_gpt.SHARD_HEADER_BYTES + 2 * int(self.fill)})
        self.fill = 0


# =============================================================================================
# Build
# =============================================================================================

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def exit_status(command) -> int:
    """Run a command's body: a DataError becomes one line on stderr and exit status 2 (as in train_gpt.py);
    otherwise the status is what the body returns (None: 0)."""
    try:
        return command() or 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def check_can_write(path: Path, overwrite: bool, what: str) -> None:
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise DataError(f"{path}: {what} already exists; pass --overwrite to replace it")


def count_documents(docs_path: Path) -> int:
    return sum(1 for _ in read_lines(docs_path))


def build_dataset(docs_path: Path, out_dir: Path, tokenizer_path: Path, *, vocab_size: int | None = None,
                  val_docs: int = DEFAULT_VAL_DOCS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                  tokenizer_docs: int = DEFAULT_TOKENIZER_DOCS, workers: int = 1, overwrite: bool = False,
                  extra_manifest: dict | None = None, transform: str = "none", byte_sidecar: bool = False, log=print) -> dict:
    """Tokenize `docs_path` into shards in `out_dir` and return the manifest written there.

    With `vocab_size`, first train a tokenizer of that size on the first `tokenizer_docs` training documents
    and write it to `tokenizer_path`; without, use the tokenizer already at `tokenizer_path`. `transform` is
    applied to every document (training the tokenizer and encoding); `byte_sidecar` (always, with a transform)
    also writes the validation byte sidecars."""
    docs_path, out_dir, tokenizer_path = Path(docs_path), Path(out_dir), Path(tokenizer_path)
    apply = transform_function(transform)
    byte_sidecar = byte_sidecar or transform != "none"
    if not docs_path.is_file():
        raise DataError(f"{docs_path}: documents file not found")
    if val_docs < 1 or shard_tokens < 1:
        raise DataError(f"--val-docs {val_docs} / --shard-tokens {shard_tokens}: both must be at least 1")
    check_can_write(out_dir, overwrite, "the output directory")
    n_docs = count_documents(docs_path)
    if n_docs <= val_docs:
        raise DataError(f"{docs_path}: {n_docs} documents, but --val-docs {val_docs} leaves none for training")

    if vocab_size is not None:
        check_can_write(tokenizer_path, overwrite, "the tokenizer")
        n_train = min(tokenizer_docs, n_docs - val_docs)
        log(f"training a {vocab_size}-piece tokenizer on {n_train} training documents -> {tokenizer_path}")
        train_tokenizer(map(apply, read_texts(docs_path, skip=val_docs, limit=tokenizer_docs)), vocab_size, tokenizer_path, transform)
    sp = load_tokenizer(tokenizer_path, transform)

    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # left over from an interrupted build
    staging.mkdir(parents=True)
    try:
        manifest = write_shards(docs_path, staging, sp, tokenizer_path, n_docs=n_docs, val_docs=val_docs,
                                shard_tokens=shard_tokens, workers=workers, transform=transform, byte_sidecar=byte_sidecar, log=log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # leave nothing half-written behind
        raise
    manifest["tokenizer"]["trained_on_docs"] = min(tokenizer_docs, n_docs - val_docs) if vocab_size is not None else None
    manifest.update(extra_manifest or {})
    write_atomic(staging / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    stats = manifest["stats"]
    log(f"wrote {stats['files_val']} validation shard(s), {stats['tokens_val']:,} tokens, {stats['docs_val']:,} documents; "
        f"{stats['files_train']} training shard(s), {stats['tokens_train']:,} tokens, {stats['docs_train']:,} documents")
    return manifest


def write_shards(docs_path: Path, out_dir: Path, sp, tokenizer_path: Path, *, n_docs: int, val_docs: int,
                 shard_tokens: int, workers: int, log, transform: str = "none", byte_sidecar: bool = False) -> dict:
    """Tokenize every document into the shards of `out_dir`; return the manifest (not yet written)."""
    packers = {"val": ShardPacker(out_dir, "val", shard_tokens), "train": ShardPacker(out_dir, "train", shard_tokens)}
    sidecars = ShardPacker(out_dir, "val_bytes", shard_tokens)  # cut where the validation shards are
    docs_digest = hashlib.sha256()
    seen = 0
    log(f"tokenizing {n_docs} documents ({val_docs} validation) with {workers} worker(s)")
    for tokens, n, counts in encoded_batches(docs_path, tokenizer_path, workers, docs_digest, transform, byte_sidecar):
        if seen < val_docs:  # a batch may hold the last validation and the first training documents
            starts = np.flatnonzero(tokens == BOS_ID)
            cut = starts[val_docs - seen] if seen + n > val_docs else tokens.size
            packers["val"].add(tokens[:cut])
            if byte_sidecar:
                sidecars.add(counts[:cut].astype(np.uint16))
            tokens = tokens[cut:]
            if seen + n > val_docs:
                packers["val"].flush()
                sidecars.flush()
        packers["train"].add(tokens)
        seen += n
    for packer in (*packers.values(), sidecars):
        packer.flush()

    stats = {}
    for split, packer in packers.items():
        stats[f"docs_{split}"] = sum(f["docs"] for f in packer.files)
        stats[f"tokens_{split}"] = sum(f["tokens"] for f in packer.files)
        stats[f"files_{split}"] = len(packer.files)
    manifest = {
        "source": {"docs_file": docs_path.name, "docs_sha256": docs_digest.hexdigest(), "docs": n_docs},
        "tokenizer": {"file": tokenizer_path.name, "sha256": sha256_file(tokenizer_path), "vocab_size": sp.vocab_size()},
        "val_docs": val_docs, "shard_tokens": shard_tokens, "bos_id": BOS_ID,
        "transform": transform, "byte_sidecar": byte_sidecar,
        "stats": stats | ({"files_val_bytes": len(sidecars.files)} if byte_sidecar else {}),
        "files": packers["val"].files + packers["train"].files + [{k: f[k] for k in ("name", "tokens", "bytes")} for f in sidecars.files],
    }
    if stats["docs_val"] != val_docs or stats["docs_train"] != n_docs - val_docs:
        raise AssertionError(f"document counts {stats} do not add up to {n_docs} documents")
    return manifest


# =============================================================================================
# Command line
# =============================================================================================

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See data/README.md.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=Path, required=True, help='JSONL of documents, one {"text": ...} per line')
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vocab-size", type=int, help="train a new BPE tokenizer of this many pieces")
    tok.add_argument("--tokenizer", type=Path, help="use this existing SentencePiece .model instead of training one")
    p.add_argument("--tokenizer-out", type=Path,
                   help="where to write the trained tokenizer (default data/tokenizers/fineweb_<V>_bpe.model)")
    p.add_argument("--out-dir", type=Path, help="directory for the shards (default data/datasets/fineweb10B_sp<V>)")
    p.add_argument("--val-docs", type=int, default=DEFAULT_VAL_DOCS,
                   help="the first N documents form the validation set (default %(default)s)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (default %(default)s)")
    p.add_argument("--tokenizer-docs", type=int, default=DEFAULT_TOKENIZER_DOCS,
                   help="train the tokenizer on the first N training documents (default %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (default: all cores, %(default)s here)")
    p.add_argument("--transform", choices=TRANSFORMS, default="none",
                   help="transform every document first: case = the lossless case transform (writes the byte sidecars)")
    p.add_argument("--byte-sidecar", action="store_true",
                   help="also write fineweb_val_bytes_*.bin: the original bytes of each validation token")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory / tokenizer")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def command():
        if args.tokenizer is not None:
            if args.tokenizer_out is not None:
                raise DataError("--tokenizer-out only applies when training a tokenizer (--vocab-size)")
            tokenizer_path, vocab = args.tokenizer, load_tokenizer(args.tokenizer, args.transform).vocab_size()
        else:
            vocab = args.vocab_size
            tokenizer_path = args.tokenizer_out or DATA_DIR / "tokenizers" / f"fineweb_{vocab}_bpe.model"
        out_dir = args.out_dir or DATA_DIR / "datasets" / f"fineweb10B_sp{vocab}"
        build_dataset(args.docs, out_dir, tokenizer_path, vocab_size=args.vocab_size, val_docs=args.val_docs,
                      shard_tokens=args.shard_tokens, tokenizer_docs=args.tokenizer_docs,
                      workers=args.workers, overwrite=args.overwrite, transform=args.transform, byte_sidecar=args.byte_sidecar)
    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())
