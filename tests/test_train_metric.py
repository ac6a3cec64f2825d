"""Bytes per token: leading spaces after BOS versus after an ordinary token, byte-fallback pieces,
and the end-to-end identity: the bytes of an encoded document are the UTF-8 bytes of its text."""
import sentencepiece as spm
import torch
import pytest

import tiny_data
import train_gpt as tg


@pytest.fixture(scope="module")
def sp_and_tables(tiny_corpus):
    _, model = tiny_corpus
    return spm.SentencePieceProcessor(model_file=str(model)), tg.build_byte_tables(str(model), tiny_data.VOCAB_SIZE)


def piece_bytes(tables, prev, target):
    return int(tg.token_bytes(torch.tensor([prev]), torch.tensor([target]), tables)[0])


def test_leading_space_counts_after_ordinary_tokens_but_not_after_bos(sp_and_tables):
    sp, tables = sp_and_tables
    cat = sp.piece_to_id("\u2581cat")
    assert sp.id_to_piece(cat) == "\u2581cat"
    ordinary = sp.piece_to_id("the") if sp.piece_to_id("the") != sp.unk_id() else sp.piece_to_id("\u2581the")
    assert piece_bytes(tables, tg.BOS_ID, cat) == 3  # "cat": the space is a document boundary, not text
    assert piece_bytes(tables, ordinary, cat) == 4   # " cat"
    assert bool(tables.boundary[tg.BOS_ID]) and int(tables.base_bytes[tg.BOS_ID]) == 0


def test_byte_fallback_and_control_pieces(sp_and_tables):
    sp, tables = sp_and_tables
    byte_piece = sp.piece_to_id("<0xE2>")
    assert sp.is_byte(byte_piece)
    assert piece_bytes(tables, tg.BOS_ID, byte_piece) == 1
    assert piece_bytes(tables, byte_piece, byte_piece) == 1
    for special in (0, 1, 2, 3):  # pad, bos, eos, unk
        assert piece_bytes(tables, 5, special) == 0 and bool(tables.boundary[special])


@pytest.mark.parametrize("text", ["The cat sat on the mat.", "A big red house 42 and caf\u00e9 \u65e5\u672c then home!"])
def test_document_bytes_equal_its_utf8_length(sp_and_tables, text):
    sp, tables = sp_and_tables
    ids = [tg.BOS_ID] + sp.encode(text)
    assert any(sp.is_byte(i) for i in ids) == (not text.isascii())  # unseen CJK needs byte fallback
    total = tg.token_bytes(torch.tensor(ids[:-1]), torch.tensor(ids[1:]), tables).sum().item()
    assert total == len(text.encode("utf-8"))


def test_tokenizer_vocabulary_must_match(tiny_corpus):
    _, model = tiny_corpus
    with pytest.raises(tg.DataError, match=f"has {tiny_data.VOCAB_SIZE} pieces but VOCAB_SIZE=1024"):
        tg.build_byte_tables(str(model), 1024)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(tg.DataError, match="tokenizer model not found"):
        tg.build_byte_tables(str(tmp_path / "none.model"), 10)
