"""Larger vocabularies and the byte sidecar: byte tables up to 65,536 pieces, the standalone "▁" rule, the
lossless case transform, the sidecar rule of data/build_shards.py, and the metric reading the sidecar."""

import random

import numpy as np
import pytest
import torch
from data_fixtures import write_docs  # first: sets sys.path

import train_gpt as tg
from data import build_shards as bs

WORDS = ["alpha", "Beta", "gamma", "Delta", "eps", "Zeta", "eta", "theta", "Iota", "kappa", "Lambda", "mu", "caf\u00e9", "NATO", "x"]


def case_texts(n: int, seed: int = 0) -> list[str]:
    """Documents with capitals, a literal case marker now and then, single spaces (so the tokenizer's
    normalisation leaves them as they are: their UTF-8 bytes are the bytes to score)."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 30))]
        if i % 7 == 0:
            words.append(bs.CASE_MARKER + "Q")
        texts.append(" ".join(words) + rng.choice([".", "!", " 42."]))
    return texts


def quiet(*_):
    pass


def build(tmp_path, texts, **kw):
    docs = write_docs(tmp_path / "docs.jsonl", texts)
    kw.setdefault("vocab_size", 300)
    out, tok = tmp_path / "shards", tmp_path / "tok.model"
    manifest = bs.build_dataset(docs, out, tok, val_docs=40, shard_tokens=500, log=quiet, **kw)
    return manifest, out, tok


def val_stream(out, prefix="fineweb_val_"):
    files = sorted(p for p in out.glob(prefix + "*.bin") if prefix != "fineweb_val_" or "_bytes_" not in p.name)
    return np.concatenate([tg.load_shard(p) for p in files]).astype(np.int64)


def test_case_transform_is_lossless():
    for text in case_texts(50) + ["", bs.CASE_MARKER * 3 + "A", "\u00c9 ABC " + bs.CASE_MARKER + "a"]:
        assert bs.case_untransform(bs.case_transform(text)) == text
    assert bs.case_transform("Hi " + bs.CASE_MARKER) == bs.CASE_MARKER + "hi " + bs.CASE_MARKER * 2


def test_sidecar_equals_the_table_bytes_without_a_transform(tmp_path):
    manifest, out, tok = build(tmp_path, case_texts(200), byte_sidecar=True)
    tokens, counts = val_stream(out), val_stream(out, "fineweb_val_bytes_")
    assert manifest["stats"]["files_val_bytes"] == manifest["stats"]["files_val"] >= 2
    tables = tg.build_byte_tables(str(tok), 300)
    assert not tables.transformed
    expected = np.concatenate([[0], tg.token_bytes(torch.from_numpy(tokens[:-1]), torch.from_numpy(tokens[1:]), tables).numpy()])
    np.testing.assert_array_equal(counts, expected)


def test_a_transformed_tokenizer_scores_the_original_bytes(tmp_path):
    texts = case_texts(200)
    manifest, out, tok = build(tmp_path, texts, transform="case")
    assert manifest["transform"] == "case" and manifest["byte_sidecar"]
    tables = tg.build_byte_tables(str(tok), 300)
    assert tables.transformed  # the marker is a user-defined piece
    tokens, counts = val_stream(out), val_stream(out, "fineweb_val_bytes_")
    original = sum(len(t.encode()) for t in texts[:40])
    assert counts.sum() == original
    with_sidecar = tg.with_byte_sidecar(tables, str(out), len(tokens))
    positions = torch.arange(1, len(tokens))
    t = torch.from_numpy(tokens)
    assert int(tg.token_bytes(t[:-1], t[1:], with_sidecar, positions).sum()) == original
    assert int(tg.token_bytes(t[:-1], t[1:], tables).sum()) > original  # the pieces spell the markers too
    assert "sidecar" in with_sidecar.source


def test_a_transformed_tokenizer_without_its_sidecar_is_refused(tmp_path):
    _, out, tok = build(tmp_path, case_texts(200), transform="case")
    tables = tg.build_byte_tables(str(tok), 300)
    for sidecar in out.glob("fineweb_val_bytes_*.bin"):
        sidecar.unlink()
    with pytest.raises(tg.DataError, match="user-defined pieces .* needs the byte sidecars"):
        tg.with_byte_sidecar(tables, str(out), 100)


@pytest.mark.parametrize("damage, message", [
    ("drop_last", r"1 byte sidecar\(s\) .* but 2 validation shard\(s\)"),
    ("short", r"99 byte counts, but fineweb_val_000001.bin holds 100 tokens"),
    ("magic", "header magic"),
])
def test_sidecar_mismatches_are_one_line_errors(tmp_path, damage, message):
    for i in range(2):
        tg.write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", np.arange(100) % 5)
        tg.write_shard(tmp_path / f"fineweb_val_bytes_{i:06d}.bin", np.ones(99 if damage == "short" and i == 1 else 100))
    if damage == "drop_last":
        (tmp_path / "fineweb_val_bytes_000001.bin").unlink()
    if damage == "magic":
        (tmp_path / "fineweb_val_bytes_000000.bin").write_bytes(b"\x00" * 1224)
    tables = tg.ByteTables(torch.ones(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(tg.DataError, match=message):
        tg.with_byte_sidecar(tables, str(tmp_path), 200)


def extended_model(model: bytes, pieces: list[tuple[str, int]]) -> bytes:
    """A serialized SentencePiece model with these (piece, type) appended: repeated field 1 of ModelProto,
    each a message of field 1 (the piece), 2 (score) and 3 (type)."""
    def varint(n):
        out = bytearray()
        while True:
            out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    extra = bytearray()
    for i, (piece, kind) in enumerate(pieces):
        text = piece.encode()
        body = b"\x0a" + varint(len(text)) + text + b"\x15" + np.float32(-1000 - i).tobytes() + b"\x18" + varint(kind)
        extra += b"\x0a" + varint(len(body)) + body
    return model + bytes(extra)


def test_byte_tables_up_to_65536_pieces(tmp_path, tiny_corpus):
    _, model = tiny_corpus
    base = model.read_bytes()
    n = 65536 - tg.build_byte_tables(str(model), 384).base_bytes.numel()
    big = tmp_path / "big.model"
    big.write_bytes(extended_model(base, [(f"\u2581w{i}", 1) for i in range(n)]))
    tables = tg.build_byte_tables(str(big), 65536)
    assert tables.base_bytes.numel() == 65536 and int(tables.base_bytes[-1]) == len(f"w{n - 1}") and bool(tables.leading_space[-1])
    assert not tables.transformed
    too_big = tmp_path / "too_big.model"
    too_big.write_bytes(extended_model(base, [(f"\u2581w{i}", 1) for i in range(n + 1)]))
    with pytest.raises(tg.DataError, match="65537 pieces; expected at most 65536"):
        tg.build_byte_tables(str(too_big), 65537)


def test_user_defined_pieces_mark_a_transform(tmp_path, tiny_corpus):
    _, model = tiny_corpus
    marked = tmp_path / "marked.model"
    marked.write_bytes(extended_model(model.read_bytes(), [(bs.CASE_MARKER, 4)]))
    assert tg.user_defined_pieces(model.read_bytes()) == []
    assert tg.user_defined_pieces(marked.read_bytes()) == [384]
    assert tg.build_byte_tables(str(marked), 385).transformed
    assert bs.load_tokenizer(marked, "case").vocab_size() == 385
    with pytest.raises(tg.DataError, match=r"user-defined pieces \['\u21e7'\], expected \[\] for --transform none \(a transformed"):
        bs.load_tokenizer(marked, "none")


def test_a_tokenizer_without_a_standalone_space_piece_is_refused(tmp_path, tiny_corpus, capsys):
    _, model = tiny_corpus
    raw = model.read_bytes()
    space = b"\x0a\x03\xe2\x96\x81\x15"  # the piece "▁" (field 1, 3 bytes), then its score
    assert raw.count(space) == 1
    bad = tmp_path / "nospace.model"
    bad.write_bytes(raw.replace(space, b"\x0a\x03\xe2\x96\x82\x15"))  # renamed to "▂"
    with pytest.raises(tg.DataError, match='no standalone "\u2581" piece'):
        bs.load_tokenizer(bad)
    docs = write_docs(tmp_path / "d.jsonl", ["a b"] * 3)
    assert bs.main(["--docs", str(docs), "--tokenizer", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: no standalone")


def test_the_evaluator_scores_each_target_with_the_sidecar_bytes_at_its_position(tmp_path):
    from test_train_eval import CpuRuntime
    from test_train_model import tiny_h
    torch.manual_seed(0)
    tokens = torch.randint(4, 96, (300,))
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", tokens.numpy())
    counts = np.arange(300) % 4 + 1  # differs from position to position, not from token id to token id
    tg.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", counts)
    tables = tg.ByteTables(torch.ones(96, dtype=torch.long), torch.zeros(96, dtype=torch.bool), torch.zeros(96, dtype=torch.bool))
    for sliding in (False, True):
        h = tiny_h(eval_seq_len=32, eval_stride=8, eval_batch_seqs=3, data_path=str(tmp_path))
        model = tg.build_model(h)
        loss, bpb, _ = tg.Evaluator(model, h, CpuRuntime(), tokens, tables).score(sliding=sliding)
        h_plain = tiny_h(eval_seq_len=32, eval_stride=8, eval_batch_seqs=3, data_path=str(tmp_path / "none"))
        loss_plain, bpb_plain, _ = tg.Evaluator(model, h_plain, CpuRuntime(), tokens, tables).score(sliding=sliding)
        scored = counts[1:] if sliding else counts[1:1 + 32 * ((299 - 32) // 32 + 1)]  # targets scored
        assert loss == pytest.approx(loss_plain)
        assert bpb == pytest.approx(bpb_plain * len(scored) / scored.sum(), rel=1e-9)
