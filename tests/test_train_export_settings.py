"""The export's later-record techniques, each a setting: std-based clipping, widths per block, low-rank error
correction (LQER), GPTQ for the side tables, self-generated calibration; each against a direct computation."""
import re

import pytest
import torch

import train_gpt as tg
from test_train_eval import CpuRuntime
from test_train_model import tiny_h
from test_train_quant import correlated_layer
from conftest import TINY_SETTINGS
from test_train_settings import assert_one_line_error


def error_on(x: torch.Tensor, w: torch.Tensor, approx: torch.Tensor) -> float:
    return (x @ (w - approx).T).square().sum().item()


def artifact_header(container: bytes) -> dict:
    start = len(tg.ARTIFACT_MAGIC) + 4
    return tg.parse_artifact_header(container[start:start + int.from_bytes(container[start - 4:start], "little")], "artifact")


# ---- CLIP=std

def test_std_clip_is_k_row_standard_deviations():
    torch.manual_seed(0)
    w = torch.randn(32, 512) * torch.logspace(-3, 0, 32)[:, None]
    w[3, 7] = 50.0  # an outlier beyond k stds is clipped, not allowed to set the step
    for bits, k in ((6, 12.85), (8, 20.0), (5, 3.0)):
        qmax = 2 ** (bits - 1) - 1
        scale = tg.std_scales(w, bits, k).float()
        clip = k * w.std(dim=1, correction=0)
        # the clip is k stds, the fp16 step rounded up by less than one fp16 unit
        assert (scale * qmax >= clip * (1 - 1e-6)).all() and (scale * qmax <= clip * (1 + 2 ** -9)).all()
    h = tiny_h(clip="std", quant_method="rtn", clip_std_k_attn=3.0, clip_std_k_mlp=4.0, clip_std_k_embed=5.0)
    big = tg.SMALL_TENSOR_NUMEL + 1
    assert [tg.export_format(h, role, big) for role in ("attn", "mlp", "embed", "proj")] == [
        tg.Format("int", 5, 3.0), tg.Format("int", 5, 4.0), tg.Format("int", h.embed_bits, 5.0), tg.Format("int", 8, 3.0)]
    q, scale = tg.quantize_state({"w": w}, {"w": tg.Format("int", 6, 3.0)}, h, {})["w"]
    expected_scale = tg.std_scales(w, 6, 3.0)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q, torch.clamp(torch.round(w / expected_scale.float()[:, None]), -31, 31).to(torch.int8))
    assert q[3, 7] == 31  # the outlier sits at the clip


def test_std_clip_with_gptq_rounds_once_at_the_std_step():
    w, x = correlated_layer(3)
    H = x.T @ x
    h = tiny_h(clip="std", quant_method="gptq", clip_std_k_mlp=4.0)
    q, scale = tg.quantize_state({"w": w}, {"w": tg.Format("int", 5, 4.0)}, h, {"w": H})["w"]
    expected_scale = tg.std_scales(w, 5, 4.0)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q, tg.gptq_round(w[None], H[None], expected_scale[None], 5, damp=h.gptq_damp)[0])
    rtn = tg.dequantize_rows(tg.round_to_grid(w, expected_scale, 5), expected_scale)
    assert error_on(x, w, tg.dequantize_rows(q, scale)) < 0.75 * error_on(x, w, rtn)


# ---- widths per block

def test_layer_bits_set_each_blocks_width():
    torch.manual_seed(0)
    h = tiny_h(num_layers=3, model_dim=128, mlp_mult=5, quant_method="rtn", mlp_layer_bits="6,4,3", attn_layer_bits="8,7,2")
    model = tg.build_model(h)
    export = tg.quantize_for_export(model, [], h, CpuRuntime())
    for block, bits in enumerate((6, 4, 3)):
        for name in (f"blocks.{block}.mlp.fc.weight", f"blocks.{block}.mlp.proj.weight"):
            assert export.formats[name] == tg.Format("int", bits, 1.0)
            q, scale = export.quantized[name]
            assert torch.equal(q, tg.quantize_rows(export.state[name], bits)[0])
    assert tg.export_format(h, "attn", tg.SMALL_TENSOR_NUMEL + 1, 2) == tg.Format("int", 2, 1.0)
    assert tg.export_format(h, "attn", tg.SMALL_TENSOR_NUMEL + 1) == tg.Format("int", 5, 1.0)  # outside a block: ATTN_BITS
    assert tg.export_format(h, "embed", tg.SMALL_TENSOR_NUMEL + 1, 1) == tg.Format("int", h.embed_bits, tg.EMBED_CLIP_QUANTILE)


# ---- LQER

def lqer_export(rank=4, tensors=2, bits=6):
    torch.manual_seed(1)
    state = {f"m{i}": torch.randn(96 + 32 * i, 160) * (0.02 + 0.01 * i) for i in range(3)} | {"g": torch.ones(5)}
    formats = {n: tg.Format("int", 4, 1.0) for n in state if n != "g"} | {"g": tg.Format("fp32")}
    h = tiny_h(quant_method="rtn", lqer_rank=rank, lqer_tensors=tensors, lqer_bits=bits)
    quantized = tg.quantize_state(state, formats, h, {})
    return state, formats, quantized, h


def test_lqer_corrects_the_most_damaged_matrices_by_the_stored_low_rank_product():
    state, formats, quantized, h = lqer_export()
    damage = {n: (state[n] - tg.dequantize_rows(*quantized[n])).square().sum().item() for n in ("m0", "m1", "m2")}
    chosen = sorted(damage, key=damage.get)[-2:]
    s2, f2, q2 = tg.with_low_rank_corrections(state, formats, quantized, {}, ["m0", "m1", "m2"], h)
    assert sorted(n for n in s2 if n.endswith(".lqer_a")) == sorted(f"{n}.lqer_a" for n in chosen)
    container = tg.pack_artifact(s2, f2, q2, {})
    loaded, _ = tg.unpack_artifact(container)
    assert loaded.keys() == state.keys()  # the factors are folded into their matrices
    for name in ("m0", "m1", "m2"):
        plain = tg.dequantize_rows(*quantized[name])
        if name not in chosen:
            assert torch.equal(loaded[name], plain)
            continue
        a, b = tg.dequantize_rows(*q2[name + ".lqer_a"]), tg.dequantize_rows(*q2[name + ".lqer_b"])
        assert a.shape == (4, state[name].size(0)) and b.shape == (4, 160) and f2[name + ".lqer_b"] == tg.Format("int", 6, 1.0)
        assert q2[name + ".lqer_a"][0].abs().max() == 31  # LQER_BITS=6: the factors use the int6 range
        torch.testing.assert_close(loaded[name], plain + a.T @ b, rtol=0, atol=1e-6)
        # the stored factors approximate the best rank-4 correction of the error
        U, S, Vh = torch.linalg.svd(state[name] - plain, full_matrices=False)
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        assert (a.T @ b - best).norm() < 0.1 * best.norm()
        assert (loaded[name] - state[name]).norm() < (plain - state[name]).norm()
    # counted in the bytes: the compressed artifact grows by the factors
    assert len(tg.compress(container)) > len(tg.compress(tg.pack_artifact(state, formats, quantized, {}))) + 1000


def test_lqer_ranks_damage_by_the_hessian_where_there_is_one():
    state, formats, quantized, h = lqer_export(tensors=1)
    x = torch.randn(512, 160)
    x[:, :4] *= 30
    hessians = {n: x.T @ x for n in ("m0", "m1", "m2")}
    hessians["m0"] = hessians["m0"] * 1000  # m0's inputs are far larger: its rounding does the most damage
    s2, _, _ = tg.with_low_rank_corrections(state, formats, quantized, hessians, ["m0", "m1", "m2"], h)
    assert [n for n in s2 if n.endswith(".lqer_a")] == ["m0.lqer_a"]
    e = state["m1"] - tg.dequantize_rows(*quantized["m1"])
    assert tg.rounding_damage(state["m1"], *quantized["m1"], hessians["m1"]) == pytest.approx(((x @ e.T) ** 2).sum().item(), rel=1e-4)


def test_a_correction_without_its_matrix_is_refused():
    state, formats, quantized, h = lqer_export(tensors=1)
    s2, f2, q2 = tg.with_low_rank_corrections(state, formats, quantized, {}, ["m0", "m1", "m2"], h)
    name = next(n for n in s2 if n.endswith(".lqer_b"))
    del s2[name]
    with pytest.raises(tg.DataError, match="a low-rank correction without its matrix"):
        tg.unpack_artifact(tg.pack_artifact(s2, f2, q2, {}))


def test_fit_to_budget_leaves_the_corrections_whole():
    state, formats, quantized, h = lqer_export()
    s2, f2, q2 = tg.with_low_rank_corrections(state, formats, quantized, {}, ["m0", "m1", "m2"], h)
    full = len(tg.compress(tg.pack_artifact(s2, f2, q2, {})))
    blob, zeroed = tg.fit_to_budget(s2, f2, q2, {}, {}, full - 300)
    assert zeroed > 0 and len(blob) <= full - 300
    container = tg.zstandard.ZstdDecompressor().decompress(blob)
    header = artifact_header(container)
    assert sum(e["name"].endswith(tg.LQER_SUFFIXES) for e in header["tensors"]) == 4


# ---- GPTQ for the side tables

def test_gptq_embed_rounds_the_bigram_table_against_its_projection():
    torch.manual_seed(0)
    h = tiny_h(quant_method="gptq", gptq_embed=True, bigram_vocab_size=600, bigram_dim=128, embed_bits=6)
    model = tg.build_model(h)
    with torch.no_grad():
        model.bigram.embed.weight.normal_(0, 0.1)
        model.bigram.proj.weight.mul_(torch.logspace(-1, 1, 128))  # projection weighs the table's columns unevenly
    x = torch.randint(0, h.vocab_size, (2, 1, 24))
    hessians = tg.collect_hessians(model, [(x, x)], h, CpuRuntime())
    P = model.bigram.proj.weight.detach()
    torch.testing.assert_close(hessians["bigram.embed.weight"], P.T @ P * (48 / 600))
    assert "bigram.embed.weight" not in tg.collect_hessians(model, [(x, x)], tiny_h(quant_method="gptq", bigram_vocab_size=600,
                                                                                       bigram_dim=128, gptq_embed=False), CpuRuntime())
    state = {k: v.detach() for k, v in model.state_dict().items()}
    routes = tg.route_parameters(model)
    formats = {k: tg.export_format(h, routes[k], v.numel()) for k, v in state.items()}
    w = state["bigram.embed.weight"]
    gptq = tg.dequantize_rows(*tg.quantize_state(state, formats, h, hessians)["bigram.embed.weight"])
    rtn = tg.dequantize_rows(*tg.quantize_rows(w, 6, tg.EMBED_CLIP_QUANTILE))
    stream_error = lambda q: ((q - w) @ P.T).square().sum().item()  # what reaches the residual stream
    assert stream_error(gptq) < 0.9 * stream_error(rtn)


# ---- CALIB=self

def test_self_generated_calibration_samples_the_model_from_bos():
    torch.manual_seed(0)
    h = tiny_h(quant_method="gptq", calib="self", train_seq_len=6, gptq_calib_batches=2)
    model = tg.build_model(h)
    with torch.no_grad():
        model.tok_emb.weight.normal_(0, 0.1)  # next-token distributions neither flat nor certain: the temperature matters
    rt = CpuRuntime()
    rt.micro_batch_seqs, rt.grad_accum_steps = 3, 2
    batches = tg.self_generated_batches(model, h, rt)
    assert len(batches) == 2 and all(x.shape == y.shape == (2, 3, 6) for x, y in batches)
    g = torch.Generator().manual_seed(h.seed)
    for x, y in batches:  # the same draws, each from the full forward's next-token distribution
        tokens = torch.full((6, 1), tg.BOS_ID)
        with torch.no_grad():
            for _ in range(6):
                p = torch.softmax(model.logits(model.trunk(tokens))[:, -1] / tg.SELF_CALIB_TEMPERATURE, dim=-1)
                tokens = torch.cat([tokens, torch.multinomial(p, 1, generator=g)], dim=1)
        tokens = tokens.view(2, 3, 7)
        assert torch.equal(x, tokens[..., :-1]) and torch.equal(y, tokens[..., 1:])
        assert (x[..., 0] == tg.BOS_ID).all()


# ---- through the script

EXPORT_RUN = dict(MODEL_DIM="128", MLP_MULT="5", QUANT_METHOD="gptq", ITERATIONS="6")  # MLP matrices over SMALL_TENSOR_NUMEL: integers


def final_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith(("final_quant_roundtrip_exact", "final_quant_sliding_window_exact"))]


def test_the_export_settings_end_to_end_rescore_exactly(run):
    result = run(RUN_ID="frontier", CLIP="std", MLP_LAYER_BITS="6,4", LQER_RANK="4", LQER_TENSORS="2", GPTQ_EMBED="1",
                 CALIB="self", MAX_WALLCLOCK_SECONDS="60", **EXPORT_RUN)
    assert result.returncode == 0, result.stderr
    log = (run.cwd / "logs/frontier.txt").read_text()
    assert "no export quantization (CALIB=self: it runs after the clock, reserved:0ms)" in log
    assert re.search(r"^training_budget: train_time:\d+ms quantization:0ms .*calibration_tokens:0$", log, re.M)
    assert re.search(r"^self_calibration: 1024 generated tokens a rank, generation:\d+ms quantization:\d+ms after the clock", log, re.M)
    path = run.cwd / "logs/frontier.model.zst"
    container = tg.zstandard.ZstdDecompressor().decompress(path.read_bytes())
    header = artifact_header(container)
    entries = {e["name"]: e for e in header["tensors"]}
    assert sum(n.endswith(".lqer_a") for n in entries) == 2 and entries["blocks.0.mlp.fc.weight"]["bits"] == 6
    assert entries["blocks.1.mlp.proj.weight"]["bits"] == 4
    artifact = int(re.search(r"^Serialized model quant\+zstd: (\d+) bytes$", log, re.M).group(1))
    assert artifact == path.stat().st_size  # the factors are inside the counted bytes
    rescored = run(RUN_ID="frontier_rescore", EVAL_ARTIFACT=str(path), **EXPORT_RUN)
    assert rescored.returncode == 0, rescored.stderr
    assert final_lines((run.cwd / "logs/frontier_rescore.txt").read_text()) == final_lines(log) != []


@pytest.mark.parametrize("settings, text", [
    ({"CLIP": "sd"}, "error: CLIP='sd': expected one of search, std"),
    ({"CLIP": "std", "QUANT_METHOD": "gptq_lite"}, "error: CLIP=std replaces GPTQ-lite's clip search: expected QUANT_METHOD=gptq or rtn"),
    ({"CLIP_STD_K_MLP": "0"}, "error: CLIP_STD_K_MLP=0.0: expected a number > 0"),
    ({"MLP_LAYER_BITS": "5,5,5"}, "error: MLP_LAYER_BITS='5,5,5': expected 2 widths (NUM_LAYERS), each in 2..8"),
    ({"ATTN_LAYER_BITS": "5,9"}, "error: ATTN_LAYER_BITS='5,9': expected 2 widths (NUM_LAYERS), each in 2..8"),
    ({"ATTN_LAYER_BITS": "5,x"}, "error: ATTN_LAYER_BITS='5,x': expected comma-separated widths, one per block"),
    ({"MLP_LAYER_BITS": "5,6", "LATE_QAT_THRESHOLD": "0.2"}, "error: MLP_LAYER_BITS with LATE_QAT_THRESHOLD"),
    ({"LQER_RANK": "-1"}, "error: LQER_RANK=-1: expected a number >= 0 (0 = off)"),
    ({"LQER_RANK": "33"}, "error: LQER_RANK=33: expected 0..32 (the narrowest block matrix's side)"),
    ({"LQER_TENSORS": "0"}, "error: LQER_TENSORS=0: expected a positive number"),
    ({"LQER_BITS": "1"}, "error: LQER_BITS=1: expected 2..8"),
    ({"CALIB": "val"}, "error: CALIB='val': expected one of train, self"),
    ({"CALIB": "self", "QUANT_METHOD": "rtn"}, "error: CALIB=self: calibrates GPTQ, expected QUANT_METHOD=gptq"),
    ({"FIT_METHOD": "all"}, "error: FIT_METHOD='all': expected one of ones, cheapest"),
])
def test_bad_export_settings_are_refused_naming_the_setting(settings, text):
    with pytest.raises(tg.ConfigError, match="^" + re.escape(text.removeprefix("error: "))):
        tg.Hyperparameters.from_env(TINY_SETTINGS | settings)


@pytest.mark.parametrize("settings, text", [
    ({"CLIP": "std", "QUANT_METHOD": "gptq_lite"}, "error: CLIP=std replaces GPTQ-lite's clip search: expected QUANT_METHOD=gptq or rtn"),
    ({"MLP_LAYER_BITS": "5,5,5"}, "error: MLP_LAYER_BITS='5,5,5': expected 2 widths (NUM_LAYERS), each in 2..8"),
])
def test_the_script_refuses_bad_export_settings_in_one_line(run, settings, text):
    assert_one_line_error(run(RUN_ID="bad", **settings), text)
    assert not (run.cwd / "logs").exists()


# ---- FIT_METHOD=cheapest

def two_corrected_matrices():
    torch.manual_seed(2)
    state = {"m0": torch.randn(128, 256) * 0.02, "m1": torch.randn(128, 256) * 0.02}
    formats = {"m0": tg.Format("int", 8, 1.0), "m1": tg.Format("int", 3, 1.0)}
    h = tiny_h(quant_method="rtn", lqer_rank=8, lqer_tensors=2)
    quantized = tg.quantize_state(state, formats, h, {})
    return tg.with_low_rank_corrections(state, formats, quantized, {}, ["m0", "m1"], h)


def test_whole_tensor_moves_are_measured_directly():
    state, formats, quantized = two_corrected_matrices()
    moves = {name: (damage, saved) for damage, saved, name in tg.whole_tensor_moves(state, formats, quantized, {})}
    assert moves.keys() == {"m0", "m1"}  # both corrected: their move is dropping the correction
    size = lambda q, s: len(tg.compress(q.numpy().tobytes() + s.numpy().tobytes()))  # at the artifact's level
    for name in ("m0", "m1"):
        plain = state[name] - tg.dequantize_rows(*quantized[name])
        a, b = (tg.dequantize_rows(*quantized[name + s]) for s in tg.LQER_SUFFIXES)
        damage = plain.square().sum().item() - (plain - a.T @ b).square().sum().item()
        assert moves[name][0] == pytest.approx(damage, rel=1e-4) and moves[name][0] > 0
        assert moves[name][1] == size(*quantized[name + ".lqer_a"]) + size(*quantized[name + ".lqer_b"])
    del state["m0.lqer_a"], state["m0.lqer_b"], quantized["m0.lqer_a"], quantized["m0.lqer_b"]
    (damage, saved, name), = [m for m in tg.whole_tensor_moves(state, formats, quantized, {}) if m[2] == "m0"]
    narrow = tg.quantize_rows(state["m0"], 7)  # without a correction: one bit narrower
    direct = (state["m0"] - tg.dequantize_rows(*narrow)).square().sum() - (state["m0"] - tg.dequantize_rows(*quantized["m0"])).square().sum()
    assert damage == pytest.approx(direct.item(), rel=1e-4) and saved == size(*quantized["m0"]) - size(*narrow)


def test_the_price_of_zeroing_plus_minus_one_values_is_measured_at_the_artifacts_level():
    state, formats, quantized = two_corrected_matrices()
    full = len(tg.compress(tg.pack_artifact(state, formats, quantized, {})))
    ones = {n: q.abs() == 1 for n, (q, _) in quantized.items() if not n.endswith(tg.LQER_SUFFIXES)}
    zeroed = quantized | {n: (quantized[n][0].masked_fill(m, 0), quantized[n][1]) for n, m in ones.items()}
    saved = full - len(tg.compress(tg.pack_artifact(state, formats, zeroed, {})))
    assert tg.plus_minus_one_bytes(state, formats, quantized, {}, full) == saved / sum(int(m.sum()) for m in ones.values())


def test_cheapest_fit_gives_up_the_correction_that_buys_least_before_any_ones(tmp_path):
    state, formats, quantized = two_corrected_matrices()
    full = len(tg.compress(tg.pack_artifact(state, formats, quantized, {})))
    s2, f2, q2, moves = tg.cheapest_whole_moves(state, formats, quantized, {}, {}, full - 200)
    assert moves == ["dropped m0's correction"]  # m0 is rounded at 8 bits: its correction removes almost nothing
    assert "m0.lqer_a" not in q2 and "m1.lqer_a" in q2 and torch.equal(q2["m1"][0], quantized["m1"][0])
    export = tg.Export(state, formats, quantized, {})
    h = tiny_h(fit_method="cheapest")
    size, zeroed, moves = tg.export_artifact(export, h, tmp_path / "a.model.zst", full - 200)
    assert moves == ["dropped m0's correction"] and zeroed == 0 and size <= full - 200
    assert tg.export_artifact(export, tiny_h(), tmp_path / "b.model.zst", full - 200)[1:] != (0, [])  # ones: values zeroed instead
    assert tg.cheapest_whole_moves(state, formats, quantized, {}, {}, full)[3] == []  # it fits: nothing given up
    # m1 alone, 3 bits: its correction buys much; a small gap is closed by its cheapest +-1 values instead
    only = lambda d: {k: v for k, v in d.items() if k.startswith("m1")}
    s1, f1, q1 = only(state), only(formats), only(quantized)
    full1 = len(tg.compress(tg.pack_artifact(s1, f1, q1, {})))
    assert tg.cheapest_whole_moves(s1, f1, q1, {}, {}, full1 - 100)[3] == []
