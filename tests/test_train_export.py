"""Quantize -> pack -> compress -> decompress -> unpack -> dequantize, and loading without pickle."""
import pickle

import pytest
import torch

import train_gpt as tg
from test_train_model import tiny_h


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_per_row_quantization_error_is_at_most_half_a_step(bits):
    torch.manual_seed(bits)
    w = torch.randn(64, 300) * torch.logspace(-4, 1, 64)[:, None]  # rows of very different scales
    q, scale = tg.quantize_rows(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() <= qmax and scale.dtype == torch.float16
    error = (tg.dequantize_rows(q, scale) - w).abs()
    assert (error <= scale.float()[:, None] / 2 + 1e-12).all()
    unfloored = w.abs().amax(dim=1) / qmax > tg.FP16_MIN_NORMAL  # the scale is floored at the smallest normal fp16
    assert unfloored.sum() > 32 and (q.abs().amax(dim=1)[unfloored] >= qmax - 1).all()  # the range is used


def test_clipped_rows_clip_only_the_outliers():
    w = torch.randn(8, 4096)
    w[:, 0] = 100.0
    q, scale = tg.quantize_rows(w, 8, clip=0.999)
    assert (scale.float() * 127 < 10).all()  # the outlier did not set the scale
    assert (tg.dequantize_rows(q, scale)[:, 0] < 10).all()


def test_export_formats():
    h = tiny_h(attn_bits=5, mlp_bits=4)
    big = tg.SMALL_TENSOR_NUMEL + 1
    assert tg.export_format(h, "attn", big) == tg.Format("int", 5, 1.0)
    assert tg.export_format(h, "mlp", big) == tg.Format("int", 4, 1.0)
    assert tg.export_format(h, "embed", big) == tg.Format("int", 6, tg.EMBED_CLIP_QUANTILE)  # EMBED_BITS, 6 by default
    assert tg.export_format(h, "attn", tg.SMALL_TENSOR_NUMEL) == tg.Format("fp16")
    assert tg.export_format(h, "control", big) == tg.Format("fp32")


def test_round_trip_through_the_compressed_artifact(tmp_path, monkeypatch):
    torch.manual_seed(0)
    state = {"big": torch.randn(300, 256), "small": torch.randn(16, 16), "gain": torch.randn(7), "emb": torch.randn(512, 160)}
    formats = {"big": tg.Format("int", 6, 1.0), "small": tg.Format("fp16"), "gain": tg.Format("fp32"), "emb": tg.Format("int", 8, tg.EMBED_CLIP_QUANTILE)}
    quantized = tg.quantize_state(state, formats, tg.Hyperparameters(quant_method="rtn"), {})
    container = tg.pack_artifact(state, formats, quantized, {"note": "hello"})
    blob = tg.zstandard.ZstdCompressor(level=3).compress(container)
    path = tmp_path / "a.model.zst"
    path.write_bytes(blob)

    def forbidden(*args, **kwargs):
        raise AssertionError("the artifact must load without pickle")
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded, config = tg.load_artifact(path)
    assert config == {"note": "hello"} and loaded.keys() == state.keys()
    q, scale = tg.quantize_rows(state["big"], 6)
    assert (loaded["big"] - state["big"]).abs().max() <= scale.float().max() / 2
    torch.testing.assert_close(loaded["small"], state["small"].half().float())
    assert torch.equal(loaded["gain"], state["gain"])
    assert all(t.dtype == torch.float32 for t in loaded.values())


def test_corrupt_artifacts_are_refused(tmp_path):
    path = tmp_path / "x.model.zst"
    path.write_bytes(b"not zstd at all")
    with pytest.raises(tg.DataError, match="not a zstd artifact"):
        tg.load_artifact(path)
    path.write_bytes(tg.zstandard.ZstdCompressor().compress(b"PK\x03\x04 something else"))
    with pytest.raises(tg.DataError, match="bad magic"):
        tg.load_artifact(path)
    container = tg.pack_artifact({"w": torch.randn(4, 4)}, {"w": tg.Format("fp32")}, {}, {})
    path.write_bytes(tg.zstandard.ZstdCompressor().compress(container[:-8]))
    with pytest.raises(tg.DataError, match="truncated or corrupt"):
        tg.load_artifact(path)


def test_size_cap():
    tg.check_size_cap(16_000_000)
    with pytest.raises(tg.RunError, match="over the 16,000,000-byte cap by 1 bytes"):
        tg.check_size_cap(16_000_001)
