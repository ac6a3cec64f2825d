"""data/inspect_shards.py on good and broken shards, and its byte count (the metric's rule)."""

import lzma

import numpy as np
import pytest
import sentencepiece as spm
from data_fixtures import SHARED_DATA, make_texts, make_tokenizer  # first: sets sys.path

import train_gpt
from data import inspect_shards as ins


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model", vocab_size=300)


def docs_stream(sp, texts):
    return np.concatenate([np.array([train_gpt.BOS_ID, *ids]) for ids in sp.encode(texts)])


def report(paths, tokenizer=None):
    lines = []
    ok = ins.inspect(paths, tokenizer, out=lines.append)
    return ok, "\n".join(lines)


def test_byte_rule_for_leading_space_pieces(tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    tables = ins.byte_tables(tokenizer)
    word = next(i for i in range(260, sp.vocab_size()) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 1)
    other = next(i for i in range(260, sp.vocab_size()) if not sp.id_to_piece(i).startswith("\u2581"))
    n = len(sp.id_to_piece(word).encode()) - len("\u2581".encode())
    # "▁xy": 2 bytes right after BOS (a boundary), 3 bytes after an ordinary piece; a byte piece is 1 byte.
    assert ins.scored_bytes(np.array([train_gpt.BOS_ID, word]), tables) == n
    assert ins.scored_bytes(np.array([other, word]), tables) == n + 1
    assert ins.scored_bytes(np.array([other, 4 + ord("A")]), tables) == 1
    assert ins.scored_bytes(np.array([word]), tables, previous=other) == n + 1


def test_scored_bytes_equal_the_text_for_plain_documents(tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = [t.replace("\n", " ") for t in make_texts(50, seed=3)]  # no newline: nmt_nfkc would change it
    tokens = docs_stream(sp, texts)
    assert ins.scored_bytes(tokens, ins.byte_tables(tokenizer)) == sum(len(t.encode()) for t in texts)


def test_report_on_good_shards(tmp_path, tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = [t.replace("\n", " ") for t in make_texts(30, seed=4)]
    stream = docs_stream(sp, texts)
    cut = stream.size // 2 + 1  # a document straddles the two validation shards
    train_gpt.write_shard(tmp_path / "fineweb_val_000000.bin", stream[:cut])
    train_gpt.write_shard(tmp_path / "fineweb_val_000001.bin", stream[cut:])
    train_gpt.write_shard(tmp_path / "fineweb_train_000000.bin", stream[:100])
    ok, text = report([tmp_path], tokenizer)
    assert ok and "all shards valid" in text
    first = text.splitlines()[1].split()
    assert first[:4] == ["fineweb_val_000000.bin", "ok", f"{cut:,}", str(int((stream[:cut] == 1).sum()))]
    assert first[4] == f"{stream[:cut].min()}..{stream[:cut].max()}"
    n_bytes = sum(len(t.encode()) for t in texts)
    assert f"{stream.size - 1:,} scored tokens, {n_bytes:,} bytes, {(stream.size - 1) / n_bytes:.4f} tokens per byte" in text


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[:-2], "truncated or padded"),
    (lambda b: b[:100], "shorter than the 1024-byte shard header"),
    (lambda b: b"\x00" + b[1:], "header magic"),
    (lambda b: b[:4] + (2).to_bytes(4, "little") + b[8:], "shard version 2"),
    (lambda b: b[:-2] + (299).to_bytes(2, "little"), None),  # still valid: id 299 < 300
    (lambda b: b[:-2] + (1000).to_bytes(2, "little"), "token ids >= the tokenizer's vocabulary size 300"),
])
def test_report_on_broken_shards(tmp_path, tokenizer, damage, reason):
    good = tmp_path / "fineweb_val_000000.bin"
    train_gpt.write_shard(good, np.array([1, 300 - 1, 280, 5, 1, 7], dtype=np.uint16))
    bad = tmp_path / "fineweb_train_000000.bin"
    bad.write_bytes(damage(good.read_bytes()))
    ok, text = report([tmp_path], tokenizer)
    assert text.splitlines()[1].startswith("fineweb_val_000000.bin       ok")
    if reason is None:
        assert ok and "BAD" not in text
    else:
        assert not ok and "SOME SHARDS ARE INVALID" in text
        bad_line = next(line for line in text.splitlines() if "BAD" in line)
        assert bad_line.startswith("fineweb_train_000000.bin") and reason in bad_line and str(bad) in bad_line


def test_command_line_exit_status(tmp_path, capsys):
    shard = tmp_path / "fineweb_val_000000.bin"
    train_gpt.write_shard(shard, np.array([1, 2, 3], dtype=np.uint16))
    assert ins.main([str(shard)]) == 0
    shard.write_bytes(shard.read_bytes()[:-1])
    assert ins.main([str(tmp_path)]) == 1
    assert ins.main([str(tmp_path / "missing")]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err


@pytest.mark.skipif(SHARED_DATA is None, reason="needs the shared data folder (real sp1024 shard and tokenizer)")
def test_real_validation_shard(tmp_path):
    shard = tmp_path / "fineweb_val_000000.bin"
    shard.write_bytes(lzma.open(SHARED_DATA / "wiki_sp1024" / "fineweb_val_000000.bin.xz").read())
    tokenizer = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
    ok, text = report([shard], tokenizer)
    assert ok
    assert text.splitlines()[1].split()[:5] == ["fineweb_val_000000.bin", "ok", "1,988,764", "433", "1..1023"]
    # Cross-check the byte rule against the decoded text of whole documents. Decoding maps a byte piece that is
    # not valid UTF-8 on its own to U+FFFD (3 bytes), so documents holding such pieces are left out.
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    tables = ins.byte_tables(tokenizer)
    tokens = train_gpt.load_shard(shard)
    starts = np.flatnonzero(tokens == train_gpt.BOS_ID)
    checked = 0
    for a, b in zip(starts[:60], starts[1:61]):
        doc = tokens[a:b]
        text_out = sp.decode(doc[1:].tolist())
        if "\ufffd" in text_out:
            continue
        assert ins.scored_bytes(doc, tables) == len(text_out.encode()), a
        checked += 1
    assert checked >= 40
