"""EMA and SWA equal hand computations, and the average is what gets exported."""
import torch

import train_gpt as tg
from test_train_model import tiny_h


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = torch.nn.Parameter(torch.tensor(4.0))


def walk(model, averager, values, scales):
    for step, (value, scale) in enumerate(zip(values, scales), start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        averager.update(step, scale)


def test_ema_matches_hand_computation():
    model = Two()
    averager = tg.WeightAverager(model, tg.Hyperparameters(weight_avg="ema", ema_decay=0.5))
    walk(model, averager, [10.0, 20.0], [1.0, 1.0])
    # start (1, 2) and 4; after 10: (5.5, 6) and 7; after 20: (12.75, 13) and 13.5
    assert averager.apply() == "weight_avg:ema decay:0.5 applied"
    torch.testing.assert_close(model.a.detach(), torch.tensor([12.75, 13.0]))
    torch.testing.assert_close(model.b.detach(), torch.tensor(13.5))


def test_swa_averages_snapshots_taken_late_and_on_schedule():
    model = Two()
    averager = tg.WeightAverager(model, tg.Hyperparameters(weight_avg="swa", swa_every=2, swa_threshold=0.5))
    # steps 1..6; LR scale drops below 0.5 from step 3; snapshots at steps 4 and 6 (values 4 and 6)
    walk(model, averager, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 0.9, 0.4, 0.3, 0.2, 0.1])
    assert averager.swa_count == 2
    assert averager.apply() == "weight_avg:swa snapshots:2 applied"
    torch.testing.assert_close(model.a.detach(), torch.tensor([5.0, 5.0]))


def test_swa_without_snapshots_says_so():
    model = Two()
    averager = tg.WeightAverager(model, tg.Hyperparameters(weight_avg="swa", swa_every=1, swa_threshold=0.5))
    walk(model, averager, [3.0], [1.0])
    assert "took no snapshot" in averager.apply()
    assert model.b.item() == 3.0


def test_the_average_is_what_gets_exported(tmp_path):
    h = tiny_h(weight_avg="ema", ema_decay=0.5, quant_method="gptq_lite")
    model = tg.build_model(h)
    averager = tg.WeightAverager(model, h)
    initial = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    averager.update(1, 1.0)
    averager.apply()
    tg.require_zstandard()
    path = tmp_path / "m.model.zst"
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
    tg.export_artifact(tg.quantize_for_export(model, [], h, rt), h, path, budget=10**9)
    state, _ = tg.load_artifact(path)
    for (name, _), start in zip(model.named_parameters(), initial):
        torch.testing.assert_close(state[name], start + 0.5, atol=2e-3, rtol=2e-3, msg=name)  # fp16 / int8 rounding
