"""Muon: orthogonal updates; the sharded multi-rank step equals the single-process step."""
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import train_gpt as tg
from conftest import final_lines, gloo_ranks
from test_train_model import tiny_h


@pytest.mark.parametrize("shape", [(48, 128), (128, 48), (64, 256)])
def test_newton_schulz_output_is_nearly_orthogonal(shape):
    torch.manual_seed(0)
    g = torch.randn(3, *shape)
    spread = torch.linalg.svdvals(g)
    assert (spread[:, 0] / spread[:, -1]).min() > 2.5  # far from orthogonal to begin with
    singular = torch.linalg.svdvals(tg.newton_schulz(g, 5).float())
    # Muon's quintic iteration trades exactness for speed: singular values land near 1, not on it.
    assert singular.min() > 0.6 and singular.max() < 1.25


def make_model_and_grads(world_size):
    h = tiny_h(num_layers=3)  # 3 of each attention/MLP shape: uneven over 2 ranks, so slots are padded
    model = tg.build_model(h)
    gen = torch.Generator().manual_seed(7)
    grads = [{name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()} for _ in range(world_size)]
    return h, model, grads


def two_steps(model, h, rt, grads_per_step):
    opt = tg.Optimizers(model, tg.route_parameters(model), h, rt, tg.newton_schulz)
    for step, grads in enumerate(grads_per_step):
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        opt.step(lr_scale=1.0 - 0.3 * step, momentum=0.9)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def sharded_worker(rank, world_size, init_file, out_file):
    with gloo_ranks(rank, world_size, init_file):
        torch.manual_seed(0)
        h, model, grads = make_model_and_grads(world_size)
        rt = tg.Runtime(rank=rank, world_size=world_size, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
        result = two_steps(model, h, rt, [grads[rank], grads[rank]])
        if rank == 0:
            torch.save(result, out_file)


def test_sharded_step_equals_single_process(tmp_path):
    torch.manual_seed(0)
    h, model, grads = make_model_and_grads(2)
    mean = {name: (grads[0][name] + grads[1][name]) / 2 for name in grads[0]}
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    single = two_steps(model, h, rt, [mean, mean])

    mp.spawn(sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "out.pt")
    assert sharded.keys() == single.keys()
    for name in single:
        assert not torch.equal(single[name], initial[name]), name  # every parameter moved
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6, msg=name)


def muon_step(wd_scale=None, **settings):
    """One Muon step (lr scale 0.5, no momentum) of a 2-block model on random gradients: (fc weight before, its
    gradient, after). The fc matrix is (192, 64), so its update is scaled by sqrt(192 / 64)."""
    h = tiny_h(num_layers=2, grad_clip_norm=0.0, muon_wd=0.5, matrix_lr=0.1, **settings)
    model = tg.build_model(h)
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
    opt = tg.Optimizers(model, tg.route_parameters(model), h, rt, tg.newton_schulz)
    w = model.blocks[0].mlp.fc.weight
    before = w.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grad = w.grad.clone()
    opt.step(lr_scale=0.5, momentum=0.0, **({} if wd_scale is None else {"wd_scale": wd_scale}))
    return before, grad, w.detach()


def test_muon_update_has_the_scheduled_size_and_decay():
    before, grad, after = muon_step()
    lr = 0.1 * 0.5
    expected = before * (1 - lr * 0.5) - lr * (tg.newton_schulz(grad[None], 5) * 3 ** 0.5)[0].float()
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_scales_by_the_global_norm():
    h = tiny_h(num_layers=2, grad_clip_norm=0.3)
    model = tg.build_model(h)
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
    opt = tg.Optimizers(model, tg.route_parameters(model), h, rt, tg.newton_schulz)
    captured = {}
    opt.adam.step = lambda: captured.update(g=model.tok_emb.weight.grad.clone())  # what AdamW receives
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    total = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    opt.step(1.0, 0.9)
    torch.testing.assert_close(captured["g"], torch.full_like(captured["g"], 10.0 * 0.3 / total.item()), rtol=1e-4, atol=0)
    assert all(p.grad is None for p in model.parameters())  # cleared for the next step


def test_schedules():
    h = tg.Hyperparameters(iterations=100, warmdown_iters=20, max_wallclock_seconds=0)
    assert [tg.lr_scale_at(h, s, 0, 0) for s in (0, 80, 90, 100)] == [1.0, 1.0, 0.5, 0.0]
    h = tg.Hyperparameters(warmdown_iters=100)  # cap at 10 s and 50 ms steps: the warm-down is the last 5 s
    assert tg.lr_scale_at(h, 100, 5000.0, 10000.0) == 1.0
    assert tg.lr_scale_at(h, 150, 7500.0, 10000.0) == pytest.approx(2500 / 5000)
    assert tg.lr_scale_at(h, 200, 10000.0, 10000.0) == 0.0
    assert tg.lr_scale_at(h, 3, 0.0, 10000.0) == 1.0  # no step time known yet
    h = tg.Hyperparameters(iterations=100, warmdown_iters=20)  # a cap far away: the step limit ends training first
    assert [tg.lr_scale_at(h, s, 50.0 * s, 600_000.0) for s in (1, 80, 90, 100)] == [1.0, 1.0, 0.5, 0.0]
    h = tg.Hyperparameters(iterations=100, warmdown_iters=50)  # both limits near: the lower scale wins
    assert tg.lr_scale_at(h, 60, 6000.0, 10000.0) == pytest.approx(min(4000 / 5000, 40 / 50))
    assert tg.lr_scale_at(h, 60, 9000.0, 10000.0) == pytest.approx(1000 / 7500)
    h = tg.Hyperparameters(muon_momentum_warmup_start=0.9, muon_momentum=0.99, muon_momentum_warmup_steps=10)
    assert [round(tg.muon_momentum_at(h, s), 6) for s in (0, 5, 10, 50)] == [0.9, 0.945, 0.99, 0.99]


def test_step_records_come_back_in_order_as_rank_means():
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
    records = tg.StepRecords(rt)
    assert records.take() is None
    records.post([torch.tensor(2.5), 10.0])
    records.post([torch.tensor(float("nan")), 20.0])
    assert records.take() == [2.5, 10.0]
    first, second = records.take()
    assert math.isnan(first) and second == 20.0 and records.take() is None


# ---------------------------------------------------------------------------------------------
# The optimiser and schedule variants (docs/OPTIM.md): MUON_ROW_NORM, MUON_NS=polar, MIN_LR, WD_TAPER,
# TRAIN_SEQ_SCHEDULE, each against a direct computation of its effect
# ---------------------------------------------------------------------------------------------

def optimal_quintic(lo, hi):
    """The odd quintic p(x) = a x + b x^3 + c x^5 with the least max |1 - p(x)| on [lo, hi], and that error E,
    by Remez exchange: the optimum equioscillates at lo, its two interior extremes q < r and hi, where
    p = 1 - E, 1 + E, 1 - E, 1 + E. Each round solves for (a, b, c, E) on the four points, then moves q and r
    to the roots of p'(x) = a + 3b x^2 + 5c x^4 (a quadratic in x^2)."""
    q, r = lo + 0.3 * (hi - lo), lo + 0.8 * (hi - lo)
    for _ in range(60):
        x = np.array([lo, q, r, hi])
        a, b, c, error = np.linalg.solve(np.stack([x, x**3, x**5, np.array([1.0, -1.0, 1.0, -1.0])], 1), np.ones(4))
        root = math.sqrt(9 * b * b - 20 * a * c)
        q, r = sorted(math.sqrt((-3 * b + sign * root) / (10 * c)) for sign in (-1.0, 1.0))
    return (a, b, c), error


def quintic(coefficients, x):
    a, b, c = coefficients
    return a * x + b * x**3 + c * x**5


def polar_express_polynomials(n, lower=1e-3):
    """The paper's construction (Amsel et al. 2025, arXiv:2505.16932), done here from scratch: the singular
    values start in [lower, 1]; each polynomial is the minimax quintic on [max(l, cushion * u), u], rescaled so
    that p(l) + p(u) = 2, after which they lie in [p(l), 2 - p(l)]. The cushion is the lowest bottom of an
    interval [c, 1] whose minimax quintic leaves the spread (1 + E) / (1 - E) at most 10 (it keeps the first
    polynomials from being too steep to survive bf16)."""
    low, high = lower, 0.5
    for _ in range(80):  # bisection: the spread falls as the interval's bottom rises
        mid = (low + high) / 2
        error = optimal_quintic(mid, 1.0)[1]
        low, high = (mid, high) if (1 + error) / (1 - error) > 10 else (low, mid)
    cushion = (low + high) / 2
    l, u, polynomials = lower, 1.0, []
    for _ in range(n):
        p, _ = optimal_quintic(max(l, cushion * u), u)
        scale = 2 / (quintic(p, l) + quintic(p, u))
        p = tuple(scale * k for k in p)
        polynomials.append(p)
        l = quintic(p, l)
        u = 2 - l
    return cushion, polynomials, l


def test_polar_express_coefficients_are_the_papers_construction():
    cushion, derived, last_l = polar_express_polynomials(len(tg.POLAR_EXPRESS))
    assert cushion == pytest.approx(0.0240733, abs=1e-7)  # the paper's constant, found here by its defining condition
    for stored, expected in zip(tg.POLAR_EXPRESS, derived, strict=True):
        assert stored == pytest.approx(expected, rel=1e-8)
    assert 1 - last_l < 1e-8  # after the table the interval is [1 - 1e-8, 1 + 1e-8]: the limit polynomial takes over
    limit = tg.POLAR_EXPRESS_LIMIT  # p(1) = 1, p'(1) = 0, p''(1) = 0: the quintic that fixes 1 to third order
    a, b, c = limit
    assert (a + b + c, a + 3 * b + 5 * c, 6 * b + 20 * c) == (1.0, 0.0, 0.0)
    # MUON_NS=polar applies the derived polynomials at x / 1.01 (the paper's safety margin), then the limit one.
    used = tg.ns_coefficients("polar", len(derived) + 2)
    x = np.linspace(0.0, 1.2, 13)
    for p_used, p_derived in zip(used, derived):
        np.testing.assert_allclose(quintic(p_used, x), quintic(p_derived, x / 1.01), rtol=1e-8, atol=1e-12)
    assert used[len(derived):] == [limit, limit]
    assert tg.ns_coefficients("ns5", 3) == [tg.NS_COEFFS] * 3


def test_polar_express_maps_each_singular_value_through_its_polynomials():
    """newton_schulz(g, k, "polar") = U P(S) V^T: each singular value, scaled as the iteration scales it (by the
    Frobenius norm times 1.01), through the composition of the first k polynomials (up to bf16 arithmetic)."""
    torch.manual_seed(0)
    m, n, steps = 48, 96, 3
    U = torch.linalg.qr(torch.randn(2, m, m, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(2, n, m, dtype=torch.float64))[0]
    sigma = torch.logspace(0, -2.5, m, dtype=torch.float64)  # a spread of 300: far from orthogonal
    g = U @ torch.diag_embed(sigma.expand(2, m)) @ V.mT

    def composed(method, safety):
        s = sigma / (sigma.norm() * safety)
        for p in tg.ns_coefficients(method, steps):
            s = quintic(p, s)
        return s
    out = tg.newton_schulz(g.float(), steps, "polar").double()
    on_each = torch.diagonal(U.mT @ out @ V, dim1=-2, dim2=-1)  # what became of each singular direction
    assert (on_each - composed("polar", 1.01)).abs().max() < 0.15
    assert (on_each - composed("ns5", 1.0)).abs().max() > 0.5  # the check can tell the two methods apart
    # At the top of the interval the first polynomial is steep (p'(1) = 24): a rank-one matrix, whose singular
    # value the iteration scales to 1/1.01, shows both safety margins (without them p1(1) = 1.76).
    u, v = F.normalize(torch.randn(3, m, 1, dtype=torch.float64), dim=1), F.normalize(torch.randn(3, n, 1, dtype=torch.float64), dim=1)
    out = tg.newton_schulz((7.0 * u @ v.mT).float(), 1, "polar").double()
    expected = quintic(tg.POLAR_EXPRESS[0], 1 / 1.01 / 1.01)
    torch.testing.assert_close(out, expected * u @ v.mT, rtol=0, atol=0.05 * expected / math.sqrt(m))


@pytest.mark.parametrize("shape", [(48, 128), (128, 48)])  # the iteration transposes tall matrices: rows stay rows
def test_row_norm_gives_every_row_unit_norm_before_the_iteration(shape):
    torch.manual_seed(1)
    g = torch.randn(3, *shape) * torch.logspace(-3, 1, shape[0])[:, None]  # rows of very different norms
    g[1, 5] = 0.0  # a zero row (as in a bucket's padding) stays zero
    norms = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    unit = torch.where(norms > 0, g / norms, 0.0)
    out = tg.newton_schulz(g, 5, row_norm=True)
    torch.testing.assert_close(out, tg.newton_schulz(unit, 5), rtol=0, atol=2e-2)
    assert torch.isfinite(out).all() and (out[1, 5] == 0).all()
    # Hence the update ignores each row's scale, which plain Muon does not.
    rescaled = g * torch.logspace(2, -2, shape[0])[:, None]
    torch.testing.assert_close(tg.newton_schulz(rescaled, 5, row_norm=True), out, rtol=0, atol=2e-2)
    assert (tg.newton_schulz(rescaled, 5) - tg.newton_schulz(g, 5)).abs().max() > 0.1


def test_muon_step_uses_the_chosen_orthogonalisation_and_the_tapered_decay():
    before, grad, after = muon_step(wd_scale=0.3, muon_row_norm=True, muon_ns="polar")
    lr = 0.1 * 0.5
    expected = before * (1 - lr * 0.5 * 0.3) - lr * (tg.newton_schulz(grad[None], 5, "polar", True) * 3 ** 0.5)[0].float()
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


def test_schedule_helpers():
    h = tg.Hyperparameters(iterations=100, warmdown_iters=20, min_lr=0.25)  # the floor holds the warm-down's end
    assert [tg.lr_scale_at(h, s, 0, 0) for s in (0, 80, 90, 95, 100)] == [1.0, 1.0, 0.5, 0.25, 0.25]
    assert tg.lr_scale_at(h, 60, 9000.0, 10000.0) == pytest.approx(1000 / 3000)  # under a time cap: 1 s left of a 3 s warm-down
    assert tg.lr_scale_at(h, 60, 9600.0, 10000.0) == 0.25  # 0.4 s left of 3.2 s, floored
    h = tg.Hyperparameters(iterations=100)
    assert [tg.training_fraction(h, s, 0.0, 0.0) for s in (0, 30, 100, 120)] == [0.0, 0.3, 1.0, 1.0]
    assert tg.training_fraction(h, 30, 5000.0, 10000.0) == 0.5  # the time, when it is further than the steps
    assert tg.training_fraction(h, 70, 5000.0, 10000.0) == 0.7
    h = tg.Hyperparameters(wd_taper="0.5@0.7")
    assert [tg.wd_scale_at(h, f) for f in (0.0, 0.7, 0.85, 1.0)] == pytest.approx([1.0, 1.0, 0.75, 0.5])
    assert tg.wd_scale_at(tg.Hyperparameters(), 0.9) == 1.0
    h = tg.Hyperparameters(train_seq_len=3072, train_seq_schedule="1024@0,2048@0.3,3072@0.7")
    assert [tg.train_seq_len_at(h, f) for f in (0.0, 0.29, 0.3, 0.69, 0.7, 1.0)] == [1024, 1024, 2048, 2048, 3072, 3072]
    assert tg.train_seq_len_at(tg.Hyperparameters(), 0.9) == 2048


class StubEvaluator:
    """train() only asks it to prime and to score (the validation lines of the log)."""

    def prime(self):
        return 0.0

    def score(self, sliding):
        return 0.0, 0.0, 0.0


def train_recording(tmp_path, **kw):
    """tg.train on the CPU (12 steps of 128 tokens, 3 priming steps), recording the token rows of every
    forward and the (lr_scale, momentum, wd_scale) of every optimiser step; returns them and the log."""
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.random.default_rng(0).integers(0, 96, 8192))
    h = tiny_h(num_layers=2, data_path=str(tmp_path), train_seq_len=32, eval_seq_len=32, eval_stride=16,
               train_batch_tokens=128, grad_accum_steps=1, iterations=12, warmup_steps=3, warmdown_iters=10,
               max_wallclock_seconds=0.0, val_loss_every=0, train_log_every=100, quant_method="rtn", compile="0",
               attn_backend="sdpa", mlp_kernel="torch", qk_kernel="torch", xsa_kernel="torch", **kw)
    h.validate()
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=4, compile=False)
    model = tg.build_model(h)
    rows, steps, log = [], [], []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].clone()))
    step = tg.Optimizers.step

    def recording_step(self, lr_scale, momentum, wd_scale=1.0):
        steps.append((lr_scale, momentum, wd_scale))
        step(self, lr_scale, momentum, wd_scale)
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(tg.Optimizers, "step", recording_step)
        tg.train(model, tg.route_parameters(model), StubEvaluator(), h, rt, log.append)
    return h, rows, steps, log


def test_train_follows_the_length_schedule_the_lr_floor_and_the_wd_taper(tmp_path):
    h, rows, steps, log = train_recording(tmp_path / "scheduled", train_seq_schedule="16@0,32@0.5",
                                          min_lr=0.35, wd_taper="0.4@0.25")
    n = h.iterations
    # The priming steps run each length in turn (so that each is compiled before the clock), at LR scale 1.
    assert [r.shape for r in rows[:3]] == [(8, 16), (8, 16), (4, 32)]
    assert steps[:3] == [(1.0, h.muon_momentum_warmup_start, 1.0)] * 3
    # Training step s (0-based) starts at fraction s / n (no time cap): rows of 16 before 0.5, then of 32.
    assert [r.shape[1] for r in rows[3:]] == [16 if s / n < 0.5 else 32 for s in range(n)]
    assert "train_seq_len: 32 from step:6 fraction:0.5000" in log
    for s, (lr_scale, momentum, wd_scale) in enumerate(steps[3:]):
        assert lr_scale == pytest.approx(max(min((n - s) / h.warmdown_iters, 1.0), 0.35))
        assert momentum == pytest.approx(tg.muon_momentum_at(h, s))
        assert wd_scale == pytest.approx(1.0 - 0.6 * max(s / n - 0.25, 0.0) / 0.75)
    assert min(lr for lr, _, _ in steps) == 0.35 and min(wd for _, _, wd in steps) < 0.5  # both took effect
    # Tokens per step are fixed: the same tokens as without a schedule, cut into other rows.
    _, plain_rows, plain_steps, _ = train_recording(tmp_path / "plain")
    assert len(plain_rows) == len(rows) and all(r.shape == (4, 32) for r in plain_rows)
    for scheduled, plain in zip(rows, plain_rows):
        assert torch.equal(scheduled.flatten(), plain.flatten())
    assert [lr for lr, _, _ in plain_steps[3:]] == [min((n - s) / h.warmdown_iters, 1.0) for s in range(n)]
    assert all(wd == 1.0 for _, _, wd in plain_steps)


# Through the script: each variant changes the final score of the tiny run, and its artifact re-scores to the
# same final lines (none of them is stored: they change how the weights are trained, not the model).
@pytest.mark.parametrize("settings", [
    dict(MUON_ROW_NORM="1"), dict(MUON_NS="polar"), dict(MIN_LR="0.3"), dict(WD_TAPER="0.5@0.5"),
    dict(TRAIN_SEQ_SCHEDULE="32@0,64@0.5"),
], ids=lambda s: "_".join(s))
def test_each_variant_changes_the_tiny_run_and_its_artifact_rescores(run, plain_run, settings):
    result = run(RUN_ID="variant", **settings)
    assert result.returncode == 0, result.stderr
    lines = final_lines(result.stdout)
    assert len(lines) == 2 and len(plain_run) == 2
    assert all(a != b for a, b in zip(lines, plain_run)), (lines, plain_run)
    rescored = run(RUN_ID="rescored", EVAL_ARTIFACT="logs/variant.model.zst")
    assert rescored.returncode == 0, rescored.stderr
    assert final_lines(rescored.stdout) == lines


@pytest.mark.parametrize("settings, text", [
    (dict(MUON_NS="newton"), "MUON_NS='newton': expected one of ns5, polar"),
    (dict(MIN_LR="1"), "MIN_LR=1.0: expected 0 <= value < 1"),
    (dict(MIN_LR="0.2", WARMDOWN_ITERS="0"), "MIN_LR=0.2: expected 0 without a warm-down"),
    (dict(MIN_LR="0.5", WEIGHT_AVG="swa", SWA_THRESHOLD="0.5"), "SWA_THRESHOLD=0.5: expected above MIN_LR=0.5"),
    (dict(MIN_LR="0.2", LATE_QAT_THRESHOLD="0.15"), "LATE_QAT_THRESHOLD=0.15: expected 0 (off) or above MIN_LR=0.2"),
    (dict(WD_TAPER="0.5"), "WD_TAPER='0.5': expected MULT@START, e.g. 0.5@0.7"),
    (dict(WD_TAPER="1@0.7"), "expected a multiplier MULT in 0..1"),
    (dict(WD_TAPER="0.5@1"), "expected a start START in 0..1"),
    (dict(WD_TAPER="-0.5@0.7"), "expected MULT@START"),
    (dict(WD_TAPER="0.5@0.7", MUON_WD="0"), "MUON_WD=0, there is no weight decay to taper"),
    (dict(TRAIN_SEQ_SCHEDULE="32@0;64@0.5"), "expected LEN@FRACTION entries separated by commas"),
    (dict(TRAIN_SEQ_SCHEDULE="32@0,64@1e-1"), "expected LEN@FRACTION entries"),
    (dict(TRAIN_SEQ_SCHEDULE="32@0.1,64@0.5"), "expected a first entry at fraction 0"),
    (dict(TRAIN_SEQ_SCHEDULE="32@0,48@0.5,64@0.4"), "fractions that increase from 0 and stay below 1"),
    (dict(TRAIN_SEQ_SCHEDULE="32@0,64@1"), "fractions that increase from 0 and stay below 1"),
    (dict(TRAIN_SEQ_SCHEDULE="32@0,32@0.5,64@0.7"), "each entry changing it"),
    (dict(TRAIN_SEQ_SCHEDULE="0@0,64@0.5"), "lengths of at least 1"),
    (dict(TRAIN_SEQ_SCHEDULE="32@0,48@0.5"), "its last length to be TRAIN_SEQ_LEN=64"),
    (dict(TRAIN_SEQ_SCHEDULE="32@0,128@0.3,64@0.5"), "and none longer"),
    (dict(TRAIN_SEQ_SCHEDULE=",".join(f"{n}@{i / 10}" for i, n in enumerate(range(1, 10))) + ",64@0.95"), "at most 8 entries"),
    (dict(TRAIN_SEQ_SCHEDULE="16@0,32@0.3,64@0.6", WARMUP_STEPS="2"), "WARMUP_STEPS=2: expected at least 3"),
    (dict(TRAIN_SEQ_SCHEDULE="48@0,64@0.5"), "length 48 does not divide TRAIN_BATCH_TOKENS=1024"),
])
def test_bad_variant_settings_stop_in_one_line(run, settings, text):
    from test_train_settings import assert_one_line_error
    result = run(RUN_ID="bad", **settings)
    assert_one_line_error(result, text)
    assert not (run.cwd / "logs").exists()
