"""Export quantization: GPTQ-lite per row, full GPTQ, and the size target."""
import random
import re
import threading
import time

import pytest
import torch

import train_gpt as tg


def correlated_layer(seed: int, rows=96, cols=256, tokens=4096):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 2 * mixing)  # correlated inputs
    x[:, :8] *= 10  # a few large channels, as in real activations
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x


@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_lowers_output_error_against_rounding_to_nearest(bits):
    w, x = correlated_layer(bits)
    scale = tg.best_clip_scales(w, bits)
    rtn = tg.dequantize_rows(tg.round_to_grid(w, scale, bits), scale)
    q = tg.gptq_round(w[None], (x.T @ x)[None], scale[None], bits)[0]
    assert q.dtype == torch.int8 and q.abs().max() <= 2 ** (bits - 1) - 1
    gptq = tg.dequantize_rows(q, scale)
    error = lambda approx: (x @ (w - approx).T).square().sum().item()
    assert error(gptq) < 0.75 * error(rtn)
    # A batch of matrices is solved like each one alone.
    w2, x2 = correlated_layer(bits + 10)
    both = tg.gptq_round(torch.stack([w, w2]), torch.stack([x.T @ x, x2.T @ x2]), torch.stack([scale, tg.best_clip_scales(w2, bits)]), bits)
    assert torch.equal(both[0], q)


def test_gptq_keeps_the_weights_of_inputs_that_never_fired():
    w, x = correlated_layer(0)
    x[:, 100] = 0
    scale = tg.best_clip_scales(w, 6)
    q = tg.gptq_round(w[None], (x.T @ x)[None], scale[None], 6)[0]
    torch.testing.assert_close(q[:, 100], tg.round_to_grid(w, scale, 6)[:, 100])


def test_gptq_lite_chooses_the_clip_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4096, generator=g)
    w[0, 0] = 40.0  # one far outlier: clipping it pays in this row only
    scale = tg.best_clip_scales(w, 6)
    chosen_clip = [[c for c in tg.GPTQ_LITE_CLIPS if tg.row_scales(w[r:r + 1], 6, c)[0] == scale[r]][0] for r in range(4)]
    assert chosen_clip[0] < 1.0 and len(set(chosen_clip)) >= 2  # a choice per row, not per matrix
    chosen = (tg.dequantize_rows(tg.round_to_grid(w, scale, 6), scale) - w).square().sum(1)
    for clip in tg.GPTQ_LITE_CLIPS:  # no single clip for the whole matrix does better on any row
        s = tg.row_scales(w, 6, clip)
        assert (chosen <= (tg.dequantize_rows(tg.round_to_grid(w, s, 6), s) - w).square().sum(1) + 1e-6).all()


def random_export(bits=6):
    torch.manual_seed(0)
    state = {"a": torch.randn(512, 512) * 0.02, "b": torch.randn(256, 768) * 0.02, "g": torch.ones(16)}
    formats = {"a": tg.Format("int", bits, 1.0), "b": tg.Format("int", bits, 1.0), "g": tg.Format("fp32")}
    quantized = tg.quantize_state(state, formats, tg.Hyperparameters(quant_method="rtn"), {})
    return state, formats, quantized


def test_size_target_prunes_cheapest_ones_until_it_fits():
    state, formats, quantized = random_export()
    full = len(tg.compress(tg.pack_artifact(state, formats, quantized, {})))
    budget = full - 4000
    blob, zeroed = tg.fit_to_budget(state, formats, quantized, {}, {}, budget)
    assert len(blob) <= budget and zeroed > 0
    loaded, _ = tg.unpack_artifact(tg.zstandard.ZstdDecompressor().decompress(blob))
    changed = sum(int((tg.quantize_rows(state[n], 6)[0] != torch.round(loaded[n] / quantized[n][1].float()[:, None])).sum()) for n in "ab")
    assert changed == zeroed  # exactly the zeroed values differ, and they were +-1
    # The pruned ones are the cheapest: every zeroed value cost no more than every kept +-1 value.
    costs, kept = [], []
    for n in "ab":
        q, s = quantized[n]
        after = torch.round(loaded[n] / s.float()[:, None])
        cost = state[n].square() - (state[n] - tg.dequantize_rows(q, s)).square()
        costs.append(cost[(q.abs() == 1) & (after == 0)])
        kept.append(cost[(q.abs() == 1) & (after != 0)])
    assert torch.cat(costs).max() <= torch.cat(kept).min() + 1e-9
    blob2, zeroed2 = tg.fit_to_budget(state, formats, quantized, {}, {}, full)
    assert zeroed2 == 0 and len(blob2) == full


def test_size_target_zeroes_no_more_than_the_budget_needs():
    # 2% over: the fast level's sizes scaled by their first ratio to level 22's zero half as many values
    # again as needed (65,588 against about 43,600; 11,008 bytes left unused); with a ratio measured at
    # each count tried, the artifact ends within FIT_SLACK bytes of the budget.
    state, formats, quantized = random_export(5)
    full = len(tg.compress(tg.pack_artifact(state, formats, quantized, {})))
    budget = full - full // 50
    blob, _ = tg.fit_to_budget(state, formats, quantized, {}, {}, budget)
    assert budget - tg.FIT_SLACK <= len(blob) <= budget


def test_size_target_compresses_a_rounds_counts_at_once_and_alike_in_any_order(monkeypatch):
    # A round's level-22 compressions run side by side, so the fit takes a few compressions' time and
    # not a dozen; which of them finishes first changes nothing in the artifact.
    state, formats, quantized = random_export(5)
    budget = len(tg.compress(tg.pack_artifact(state, formats, quantized, {}))) * 49 // 50
    alone = tg.fit_to_budget(state, formats, quantized, {}, {}, budget)
    real, lock, delays = tg.compress, threading.Lock(), random.Random(0)
    running = most = 0

    def slow(container, level=tg.ZSTD_LEVEL):
        nonlocal running, most
        if level != tg.ZSTD_LEVEL:
            return real(container, level)
        with lock:
            running += 1
            most, delay = max(most, running), delays.uniform(0.05, 0.3)
        time.sleep(delay)
        try:
            return real(container, level)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(tg, "compress", slow)
    assert tg.fit_to_budget(state, formats, quantized, {}, {}, budget) == alone
    assert most == len(tg.FIT_SPREAD)


def test_size_target_refuses_an_impossible_budget():
    state, formats, quantized = random_export()
    with pytest.raises(tg.RunError, match=r"cannot fit 1000 bytes even with all \d+ quantized \+-1 values zeroed .* lower MLP_BITS or ATTN_BITS"):
        tg.fit_to_budget(state, formats, quantized, {}, {}, 1000)


def test_calibration_and_quantization_are_charged_to_the_training_clock(run):
    # A real time cap on the tiny model: the loop must leave room for the (measured) GPTQ work.
    result = run(RUN_ID="gptq", QUANT_METHOD="gptq", MAX_WALLCLOCK_SECONDS="2", ITERATIONS="100000", WARMDOWN_ITERS="20",
                 MODEL_DIM="128", MLP_MULT="4", NUM_HEADS="4", NUM_KV_HEADS="2")
    assert result.returncode == 0, result.stderr
    log = (run.cwd / "logs/gptq.txt").read_text()
    cold, warm, reserved = map(float, re.search(r"two export quantizations \(cold:(\d+)ms warm:(\d+)ms reserved:(\d+)ms\)", log).groups())
    assert abs(reserved - min(cold, tg.RESERVE_FACTOR * warm)) <= 1
    stop = re.search(r"^stopping_early: wallclock_cap train_time:(\d+)ms .*reserved (\d+)ms", log, re.M)
    budget = re.search(r"^training_budget: train_time:(\d+)ms quantization:(\d+)ms total:(\d+)ms cap:2000ms method:gptq "
                       r"calibration_tokens:1024$", log, re.M)
    assert stop and budget and reserved > 0
    train_ms, quant_ms, total_ms = map(int, budget.groups())
    assert int(stop.group(1)) + reserved <= 2000 and total_ms <= 2000
    assert abs(total_ms - (train_ms + quant_ms)) <= 1  # each figure is rounded to a whole millisecond
    assert "int" in log and re.search(r"^artifact: .*\(gptq; 0 quantized \+-1 values zeroed", log, re.M)


def test_gptq_rounds_the_tied_embedding_against_its_output_inputs():
    """With QUANT_METHOD=gptq and GPTQ_EMBED=1 the tied embedding is quantized by GPTQ with the Hessian of the output layer's
    inputs (collect_hessians adds it): the logits' error on those inputs is below round-to-nearest's."""
    from test_train_eval import CpuRuntime
    from test_train_model import tiny_h
    torch.manual_seed(0)
    h = tiny_h(quant_method="gptq", embed_bits=7, vocab_size=1100, gptq_embed=False)  # 1100 x 64 > SMALL_TENSOR_NUMEL: integers
    model = tg.build_model(h)
    x = torch.randint(0, 1100, (2, 1, 32))
    assert "tok_emb.weight" not in tg.collect_hessians(model, [(x, x)], h, CpuRuntime())  # GPTQ_EMBED=0: round to nearest
    h = tiny_h(quant_method="gptq", embed_bits=7, vocab_size=1100, gptq_embed=True)
    hessians = tg.collect_hessians(model, [(x, x)], h, CpuRuntime())
    assert hessians["tok_emb.weight"].shape == (64, 64)
    with torch.no_grad():  # exactly the output layer's inputs, summed over both micro-steps
        expected = torch.cat([model.trunk(x[0]), model.trunk(x[1])]).flatten(0, -2)
    torch.testing.assert_close(hessians["tok_emb.weight"], expected.T @ expected, rtol=1e-4, atol=1e-4)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    formats = {k: tg.export_format(h, tg.route_parameters(model)[k], v.numel()) for k, v in state.items()}
    assert formats["tok_emb.weight"] == tg.Format("int", 7, tg.EMBED_CLIP_QUANTILE)
    with torch.no_grad():
        inputs = model.trunk(x[0])[0]
    w = state["tok_emb.weight"].float()
    gptq = tg.dequantize_rows(*tg.quantize_state(state, formats, h, hessians)["tok_emb.weight"])
    rtn = tg.dequantize_rows(*tg.quantize_rows(w, 7, tg.EMBED_CLIP_QUANTILE))
    error = lambda q: (inputs @ (q - w).T).square().sum().item()
    assert error(gptq) < 0.9 * error(rtn)
    assert tg.Hyperparameters.from_env({"EMBED_BITS": "7"}).embed_bits == 7  # allowed (2..8)
    # By default (the sp4096 stack) the tied embedding is int6, rounded by GPTQ.
    h = tiny_h(vocab_size=1100)
    assert "tok_emb.weight" in tg.collect_hessians(model, [(x, x)], h, CpuRuntime())
    assert tg.export_format(h, tg.route_parameters(model)["tok_emb.weight"], w.numel()) == tg.Format("int", 6, tg.EMBED_CLIP_QUANTILE)
