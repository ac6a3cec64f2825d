"""data/build_shards.py on a few generated documents: the split, shard boundaries, manifest counts, determinism,
and bad input."""

import json

import numpy as np
import pytest
import sentencepiece as spm
from data_fixtures import make_texts, make_tokenizer, remote_files, write_docs  # first: sets sys.path

import train_gpt
from data import build_shards as bs

N_DOCS, VAL_DOCS, SHARD_TOKENS = 1200, 300, 4000  # more than one task of documents, several shards per split


def quiet(*_):
    pass


def build(tmp_path, name="out", texts=None, workers=1, **kw):
    docs = tmp_path / "docs.jsonl"
    if not docs.exists():
        write_docs(docs, texts or make_texts(N_DOCS))
    kw.setdefault("vocab_size", 320)
    kw.setdefault("val_docs", VAL_DOCS)
    kw.setdefault("shard_tokens", SHARD_TOKENS)
    tok = kw.pop("tokenizer", tmp_path / name / "tok.model")
    manifest = bs.build_dataset(docs, tmp_path / name / "shards", tok, workers=workers, log=quiet, **kw)
    return manifest, tmp_path / name / "shards", tok


def split_stream(out, split):
    return [train_gpt.load_shard(p) for p in sorted(out.glob(f"fineweb_{split}_*.bin"))]


def test_split_packing_and_manifest(tmp_path):
    texts = make_texts(N_DOCS)
    manifest, out, tok = build(tmp_path, texts=texts)
    sp = spm.SentencePieceProcessor(model_file=str(tok))

    for split, docs in (("val", texts[:VAL_DOCS]), ("train", texts[VAL_DOCS:])):
        shards = split_stream(out, split)
        expected = np.concatenate([np.array([train_gpt.BOS_ID, *ids]) for ids in sp.encode(docs)])
        np.testing.assert_array_equal(np.concatenate(shards), expected)  # order kept, BOS + tokens, nothing lost
        assert all(s.size == SHARD_TOKENS for s in shards[:-1]) and 0 < shards[-1].size <= SHARD_TOKENS
        assert shards[0][0] == train_gpt.BOS_ID  # each split starts at a document
        assert any(s[0] != train_gpt.BOS_ID for s in shards[1:])  # ... but documents straddle shard cuts

    stats = manifest["stats"]
    assert (stats["docs_val"], stats["docs_train"]) == (VAL_DOCS, N_DOCS - VAL_DOCS)
    assert stats["files_val"] == len(split_stream(out, "val")) >= 2 and stats["files_train"] >= 2
    assert stats["tokens_val"] == sum(s.size for s in split_stream(out, "val"))
    for entry in manifest["files"]:
        tokens = train_gpt.load_shard(out / entry["name"])
        assert entry["tokens"] == tokens.size and entry["docs"] == int((tokens == train_gpt.BOS_ID).sum())
        assert entry["bytes"] == (out / entry["name"]).stat().st_size
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["tokenizer"]["vocab_size"] == 320 and manifest["tokenizer"]["trained_on_docs"] == N_DOCS - VAL_DOCS
    assert not (tmp_path / "out" / "shards.partial").exists()


def test_tokenizer_has_the_challenge_settings(tmp_path):
    texts = [f"{t} {i * 7919} 2024 and 1999" for i, t in enumerate(make_texts(N_DOCS))]  # many numbers
    _, _, tok = build(tmp_path, texts=texts)
    sp = bs.load_tokenizer(tok)  # checks pad 0, bos 1, eos 2, unk 3
    assert sp.vocab_size() == 320
    assert [sp.id_to_piece(i) for i in (4, 259)] == ["<0x00>", "<0xFF>"]  # byte fallback, ids 4..259
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]      # split digits: never merged
    assert sp.encode("ab", out_type=str)[0][0] != "\u2581"               # no dummy prefix
    assert sp.decode(sp.encode("\uff21")) == "A"                         # nmt_nfkc: fullwidth A -> A


def test_same_input_gives_identical_output(tmp_path):
    build(tmp_path, "a", workers=1)
    build(tmp_path, "b", workers=2)
    a, b = remote_files(tmp_path / "a"), remote_files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) >= 6
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_tokenizer_never_sees_validation_documents(tmp_path):
    val = make_texts(VAL_DOCS, seed=1, alphabet="xyz")   # letters that no training document has
    train = make_texts(N_DOCS - VAL_DOCS, seed=2, alphabet="abcdefgh")
    _, _, tok = build(tmp_path, texts=val + train)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if not (sp.is_byte(i) or sp.is_control(i))]
    assert not any(c in p for p in pieces for c in "xyz") and any("ab" in p for p in pieces)


def test_reusing_a_tokenizer(tmp_path):
    tok = make_tokenizer(tmp_path / "given.model", vocab_size=300)
    before = tok.read_bytes()
    manifest, out, _ = build(tmp_path, tokenizer=tok, vocab_size=None)
    assert tok.read_bytes() == before and manifest["tokenizer"]["trained_on_docs"] is None
    assert manifest["tokenizer"]["vocab_size"] == 300 and int(split_stream(out, "train")[0].max()) < 300


def test_bad_input_is_reported_with_file_and_line(tmp_path):
    docs = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t}) for t in make_texts(N_DOCS)]
    lines[900] = '{"text": 5}'
    docs.write_text("\n".join(lines) + "\n")
    with pytest.raises(train_gpt.DataError, match=r"docs\.jsonl:901: expected an object with a string field \"text\""):
        build(tmp_path)  # found while training the tokenizer
    assert not (tmp_path / "out" / "tok.model").exists()
    lines[900] = "{not json"
    docs.write_text("\n".join(lines) + "\n")
    tok = make_tokenizer(tmp_path / "given.model")
    with pytest.raises(train_gpt.DataError, match=r"docs\.jsonl:901: not a JSON object"):
        build(tmp_path, tokenizer=tok, vocab_size=None, workers=2)  # found by a worker process
    assert not (tmp_path / "out" / "shards").exists() and not (tmp_path / "out" / "shards.partial").exists()


def test_refusals(tmp_path):
    write_docs(tmp_path / "docs.jsonl", make_texts(100))
    with pytest.raises(train_gpt.DataError, match="100 documents, but --val-docs 100 leaves none for training"):
        build(tmp_path, val_docs=100)
    build(tmp_path, val_docs=10)
    with pytest.raises(train_gpt.DataError, match="already exists; pass --overwrite"):
        build(tmp_path, val_docs=10)
    build(tmp_path, val_docs=20, overwrite=True)
    assert json.loads((tmp_path / "out" / "shards" / "manifest.json").read_text())["stats"]["docs_val"] == 20
    with pytest.raises(train_gpt.DataError, match="vocabulary size 100"):
        build(tmp_path, "small", vocab_size=100, val_docs=10)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(train_gpt.DataError, match="bad.model: not a SentencePiece model"):
        bs.load_tokenizer(bad)


def test_command_line(tmp_path, capsys):
    docs = write_docs(tmp_path / "docs.jsonl", make_texts(200))
    status = bs.main(["--docs", str(docs), "--vocab-size", "300", "--tokenizer-out", str(tmp_path / "t.model"),
                      "--out-dir", str(tmp_path / "o"), "--val-docs", "20", "--shard-tokens", "1000", "--workers", "2"])
    assert status == 0 and (tmp_path / "o" / "fineweb_val_000000.bin").exists()
    assert bs.main(["--docs", str(tmp_path / "none.jsonl"), "--vocab-size", "300",
                    "--tokenizer-out", str(tmp_path / "t2.model"), "--out-dir", str(tmp_path / "o2")]) == 2
    assert "none.jsonl: documents file not found" in capsys.readouterr().err
