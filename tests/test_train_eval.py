"""Evaluation: the vectorised sliding window equals a naive per-window loop; every token scored once."""
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from test_train_model import tiny_h


class CpuRuntime(tg.Runtime):
    def __init__(self):
        super().__init__(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)


@pytest.mark.parametrize("n_targets, window, stride", [(100, 32, 8), (96, 32, 8), (33, 32, 32), (32, 32, 5), (1000, 64, 64)])
def test_sliding_windows_score_every_target_once_with_enough_context(n_targets, window, stride):
    starts, first = tg.sliding_windows(n_targets, window, stride)
    scored = np.concatenate([np.arange(s + f, s + window) for s, f in zip(starts, first)])  # target index - 1
    np.testing.assert_array_equal(scored, np.arange(n_targets))
    for s, f in zip(starts, first):
        assert s + window <= n_targets and (f == 0 or f >= window - stride)
        context = np.arange(s + f, s + window) - s  # tokens before each scored target inside the window
        assert (context >= np.minimum(np.arange(s + f, s + window), window - stride)).all()


def naive_scores(model, tokens, tables, window, stride):
    """One window at a time, one token at a time."""
    n_targets = len(tokens) - 1
    loss, count, n_bytes, scored_until = 0.0, 0, 0, 0
    start = 0
    while scored_until < n_targets:
        start = min(start, n_targets - window)
        x, y = tokens[start:start + window], tokens[start + 1:start + window + 1]
        with torch.no_grad():
            nll = model.token_nll(x[None], y[None], window)[0]
        for pos in range(window):
            if start + pos >= scored_until:  # target index start + pos + 1 not yet scored
                loss += nll[pos].item()
                n_bytes += tg.token_bytes(x[pos:pos + 1], y[pos:pos + 1], tables).item()
                count += 1
        scored_until = start + window
        start += stride
    return loss / count, loss / (math.log(2) * n_bytes), count


@pytest.mark.parametrize("n_tokens, stride", [(301, 8), (290, 16)])
def test_sliding_window_equals_naive_reference(n_tokens, stride):
    torch.manual_seed(0)
    h = tiny_h(eval_seq_len=32, eval_stride=stride, eval_batch_seqs=4)
    model = tg.build_model(h)
    for p in model.parameters():  # a model with non-trivial outputs
        p.data.add_(0.05 * torch.randn_like(p))
    tokens = torch.randint(0, 96, (n_tokens,))
    tables = tg.ByteTables(torch.randint(0, 5, (96,)), torch.rand(96) < 0.5, torch.rand(96) < 0.1)
    evaluator = tg.Evaluator(model, h, CpuRuntime(), tokens, tables)
    loss, bpb, _ = evaluator.score(sliding=True)
    ref_loss, ref_bpb, count = naive_scores(model, tokens, tables, 32, stride)
    assert count == n_tokens - 1
    assert loss == pytest.approx(ref_loss, rel=1e-6) and bpb == pytest.approx(ref_bpb, rel=1e-6)


def test_disjoint_windows_equal_a_plain_loop():
    torch.manual_seed(1)
    h = tiny_h(eval_seq_len=32, eval_batch_seqs=3)
    model = tg.build_model(h)
    tokens = torch.randint(0, 96, (200,))
    tables = tg.ByteTables(torch.ones(96, dtype=torch.long), torch.zeros(96, dtype=torch.bool), torch.zeros(96, dtype=torch.bool))
    loss, bpb, _ = tg.Evaluator(model, h, CpuRuntime(), tokens, tables).score(sliding=False)
    windows = [tokens[s:s + 33] for s in range(0, 199 - 32 + 1, 32)]  # 6 windows, ragged tail dropped
    with torch.no_grad():
        nll = torch.cat([model.token_nll(w[None, :-1], w[None, 1:], 32)[0] for w in windows])
    assert len(nll) == 6 * 32
    assert loss == pytest.approx(nll.double().mean().item(), rel=1e-6)
    assert bpb == pytest.approx(nll.double().sum().item() / (math.log(2) * len(nll)), rel=1e-6)


def test_prime_compiles_exactly_what_scoring_then_calls():
    h = tiny_h(eval_seq_len=32, eval_stride=8, eval_batch_seqs=3)
    tables = tg.ByteTables(torch.ones(96, dtype=torch.long), torch.zeros(96, dtype=torch.bool), torch.zeros(96, dtype=torch.bool))
    model = tg.build_model(h)
    evaluator = tg.Evaluator(model, h, CpuRuntime(), torch.randint(0, 96, (200,)), tables)
    calls = []

    def recording(x, y, tail):  # what selects a compiled graph: shapes, strides, dtypes and the tail
        calls.append((tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.stride(), tail))
        return model.token_nll(x, y, tail)

    evaluator.token_nll = recording
    evaluator.prime()
    assert calls == []  # not compiling: nothing to prime
    evaluator.rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=True)
    evaluator.prime()
    primed, calls[:] = set(calls), []
    assert len(primed) == 2  # whole windows and stride tails
    evaluator.score(sliding=False)
    evaluator.score(sliding=True)
    assert set(calls) == primed
