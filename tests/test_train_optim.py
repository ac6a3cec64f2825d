"""Muon: orthogonal updates; the sharded multi-rank step equals the single-process step."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import gloo_ranks
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


def test_muon_update_has_the_scheduled_size_and_decay():
    h = tiny_h(num_layers=2, grad_clip_norm=0.0, muon_wd=0.5, matrix_lr=0.1)
    model = tg.build_model(h)
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
    opt = tg.Optimizers(model, tg.route_parameters(model), h, rt, tg.newton_schulz)
    w = model.blocks[0].mlp.fc.weight  # (192, 64): update scaled by sqrt(192 / 64)
    before = w.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grad = w.grad.clone()
    opt.step(lr_scale=0.5, momentum=0.0)
    lr = 0.1 * 0.5
    expected = before * (1 - lr * 0.5) - lr * (tg.newton_schulz(grad[None], 5) * 3 ** 0.5)[0].float()
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)


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
