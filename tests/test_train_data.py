"""Shard format, training stream, validation tokens, and the errors for bad input."""
import numpy as np
import pytest

import train_gpt as tg


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=5000)
    path = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(path, tokens)
    assert path.stat().st_size == tg.SHARD_HEADER_BYTES + 2 * 5000
    assert tg.read_shard_header(path) == 5000
    np.testing.assert_array_equal(tg.load_shard(path), tokens)
    assert not list(tmp_path.glob("*.tmp")), "the temporary file must be renamed away"


def test_write_shard_rejects_ids_outside_uint16(tmp_path):
    with pytest.raises(tg.DataError, match="0..65535"):
        tg.write_shard(tmp_path / "x.bin", [1, 70000])


def corrupt(path, offset=None, value=None, truncate=None, append=b""):
    data = bytearray(path.read_bytes())
    if offset is not None:
        data[offset:offset + 4] = np.array([value], dtype="<i4").tobytes()
    if truncate is not None:
        data = data[:truncate]
    path.write_bytes(bytes(data) + append)


@pytest.mark.parametrize("damage, message", [
    (dict(offset=0, value=1234), "magic 1234, expected 20240520"),
    (dict(offset=4, value=2), "version 2, expected 1"),
    (dict(offset=12, value=7), "words 3..255 must be zero"),
    (dict(offset=8, value=-5), "malformed header"),
    (dict(truncate=1024 + 2 * 99), "header says 100 tokens .* has 1222 bytes"),
    (dict(append=b"\x00\x00"), "truncated or padded"),
    (dict(truncate=100), "shorter than the 1024-byte shard header"),
])
def test_malformed_shards_name_the_file_and_the_problem(tmp_path, damage, message):
    path = tmp_path / "fineweb_val_000000.bin"
    tg.write_shard(path, np.arange(100))
    corrupt(path, **damage)
    with pytest.raises(tg.DataError, match=message) as err:
        tg.load_shard(path)
    assert str(path) in str(err.value)


def test_missing_shard(tmp_path):
    with pytest.raises(tg.DataError, match="shard file not found"):
        tg.read_shard_header(tmp_path / "nope.bin")


def make_h(tmp_path, **kw):
    return tg.Hyperparameters(data_path=str(tmp_path), **kw)


class FakeRuntime:
    def __init__(self, rank=0, world_size=1, micro_batch_seqs=1, grad_accum_steps=1):
        import torch
        self.rank, self.world_size, self.micro_batch_seqs = rank, world_size, micro_batch_seqs
        self.grad_accum_steps, self.device = grad_accum_steps, torch.device("cpu")


def test_stream_reads_shards_in_sorted_order_and_wraps(tmp_path):
    tg.write_shard(tmp_path / "fineweb_train_000001.bin", [5, 6, 7])
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3, 4])
    stream = tg.TokenStream(str(tmp_path / "fineweb_train_*.bin"), vocab_size=10)
    assert stream.take(5).tolist() == [1, 2, 3, 4, 5]
    assert stream.take(5).tolist() == [6, 7, 1, 2, 3]


def test_loader_gives_each_rank_a_disjoint_slice_of_one_span(tmp_path):
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1000) % 500)
    h = make_h(tmp_path, vocab_size=500, train_batch_tokens=32, train_seq_len=4, grad_accum_steps=2)
    seen = []
    for rank in range(2):
        loader = tg.TrainLoader(h, FakeRuntime(rank, 2, micro_batch_seqs=2, grad_accum_steps=2))
        x, y = loader.next_batch()
        assert x.shape == (2, 2, 4)
        np.testing.assert_array_equal(y.flatten().numpy(), x.flatten().numpy() + 1)  # targets are the next tokens
        seen.append(x.flatten().numpy())
        x2, _ = loader.next_batch()
        assert x2.flatten()[0].item() == 32 + 16 * rank  # the next step continues the stream
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(32))


def test_no_training_files(tmp_path):
    with pytest.raises(tg.DataError, match="no training shards match"):
        tg.TokenStream(str(tmp_path / "fineweb_train_*.bin"), 10)


def test_training_token_outside_vocabulary(tmp_path):
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 300])
    with pytest.raises(tg.DataError, match="token id 300 >= VOCAB_SIZE=256"):
        tg.TokenStream(str(tmp_path / "fineweb_train_*.bin"), 256).take(2)


def test_validation_shorter_than_one_window(tmp_path):
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(64))
    with pytest.raises(tg.DataError, match="64 tokens, fewer than one window of EVAL_SEQ_LEN=64"):
        tg.load_validation_tokens(make_h(tmp_path, eval_seq_len=64))
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(65))
    assert len(tg.load_validation_tokens(make_h(tmp_path, eval_seq_len=64))) == 65


def test_script_reports_bad_input_in_one_line(run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fineweb_val_000000.bin").write_bytes(b"\x00" * 10)
    result = run(DATA_PATH=str(bad))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "fineweb_val_000000.bin: 10 bytes, shorter than" in lines[0]


def test_byte_sidecars_are_not_token_shards(tmp_path):
    """fineweb_val_bytes_*.bin (per-token byte counts) matches fineweb_val_*.bin but is not a shard of tokens."""
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100) % 7)
    tg.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.full(100, 300))
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(50) % 7)
    tg.write_shard(tmp_path / "fineweb_train_bytes_000000.bin", np.full(50, 300))
    assert tg.load_validation_tokens(make_h(tmp_path, vocab_size=7, eval_seq_len=64)).tolist() == (np.arange(100) % 7).tolist()
    assert tg.TokenStream(str(tmp_path / "fineweb_train_*.bin"), 7).files == [str(tmp_path / "fineweb_train_000000.bin")]
