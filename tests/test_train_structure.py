"""The model structure of the later records, each against a hand computation of its effect: depth
recurrence (RECUR_LAYERS, RECUR_REPEATS, RECUR_START), parallel residuals (PARALLEL_RESID_START, in one
lane or two: PARALLEL_RESID_LANES), the
attention output gate (ATTN_GATE) and the input-dependent SmearGate (SMEAR_GATE); their parameters'
routing, their settings' checks, and tiny end-to-end runs whose artifacts re-score to the same lines."""
import re

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import train_gpt as tg
from conftest import final_lines
from test_train_features import VOCAB, StubEvaluator, close, give_weight, ref_attention, rms, tiny_h


def randomise(model, *suffixes, seed=1):
    """Random values for the parameters whose names end so (the new gates start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffixes):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------------
# Depth recurrence
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_recurrence_runs_the_looped_blocks_again_by_hand():
    """5 blocks (encoder 0, 1; decoder 2, 3, 4), RECUR_LAYERS=1,2 twice more: 0 1 2 (1 2) (1 2) 3 4, the
    U-Net skips joining the first passes only. Off, the model is the one without RECUR_LAYERS."""
    torch.manual_seed(3)
    h = tiny_h(num_layers=5, recur_layers="1,2", recur_repeats=2)
    model = give_weight(tg.build_model(h))
    plain = give_weight(tg.build_model(tiny_h(num_layers=5)))
    assert model.state_dict().keys() == plain.state_dict().keys()  # no new parameters
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    x0s = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: x0s.append(args[1]))
    idx = torch.randint(0, VOCAB, (2, 16))
    final = model.trunk(idx)
    assert len(x0s) == 1  # block 0 ran once
    x0 = x0s[0]
    b, w = model.blocks, model.skip_weights
    out0 = b[0](x0, x0, None)
    out1 = b[1](out0, x0, None)
    x = b[2](out1 + w[0] * out1, x0, None)
    for _ in range(2):
        x = b[2](b[1](x, x0, None), x0, None)
    x = b[3](x + w[1] * out0, x0, None)
    expected = rms(b[4](x, x0, None))
    close(final, expected)
    tg.set_recurrence(model, False)
    off = model.trunk(idx)
    close(off, plain.trunk(idx), rtol=0, atol=0)
    assert (off - final).abs().max() > 1e-2  # the repeats change the output
    # the evaluation tail: the last block computes only the last positions
    tg.set_recurrence(model, True)
    close(model.token_nll(idx, idx, 5), model.token_nll(idx, idx, 16)[:, -5:])


class StructureEvaluator(StubEvaluator):
    """Notes whether the repeats are on whenever train() scores."""

    def __init__(self):
        self.model, self.recur_on = None, []

    def score(self, sliding):
        self.recur_on.append(self.model.recur_on)
        return super().score(sliding)


def recording_run(shards, compile_backend=None, log=None, evaluator=None, **kw):
    """tg.train on the CPU (a StubEvaluator scores nothing); returns the log and the model."""
    settings = dict(data_path=str(shards), vocab_size=VOCAB, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2,
                    bigram_vocab_size=32, bigram_dim=16, train_seq_len=32, eval_seq_len=32, eval_stride=16, train_batch_tokens=128,
                    grad_accum_steps=1, iterations=12, warmup_steps=2, warmdown_iters=10, max_wallclock_seconds=0.0,
                    val_loss_every=0, train_log_every=100, quant_method="rtn", compile="0", attn_backend="sdpa",
                    mlp_kernel="torch", qk_kernel="torch", xsa_kernel="torch", xsa_last_n=1, parallel_resid_start=0, ttt_mode="off")
    h = tg.Hyperparameters(**(settings | kw))
    h.validate()
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), compile=compile_backend is not None,
                    micro_batch_seqs=h.train_batch_tokens // h.train_seq_len)
    model = tg.build_model(h)
    log = [] if log is None else log
    with pytest.MonkeyPatch.context() as mp:
        if compile_backend is not None:
            real_compile = torch.compile
            mp.setattr(tg.torch, "compile", lambda fn, **kw: real_compile(fn, backend=compile_backend(fn), **kw))
        evaluator = evaluator or StubEvaluator()
        evaluator.model = model
        tg.train(model, tg.route_parameters(model), evaluator, h, rt, log.append)
    return log, model


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("structure_shards")
    tg.write_shard(root / "fineweb_train_000000.bin", np.random.default_rng(0).integers(0, VOCAB, 8192))
    return root


def test_recurrence_turns_on_at_recur_start(shards):
    """RECUR_START=0.5 of 12 steps: steps 0-5 run block 1 once, steps 6-11 twice; the two priming steps
    one of each; every validation (steps 0, 5, 10, 12) scores the final structure, and so does the export."""
    passes = []

    def count(module, args):
        passes[-1] += 1
    original_build = tg.build_model

    def build_with_hooks(h):
        model = original_build(h)
        model.register_forward_pre_hook(lambda m, args: passes.append(0))
        model.blocks[1].register_forward_pre_hook(count)
        return model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "build_model", build_with_hooks)
        evaluator = StructureEvaluator()
        log, model = recording_run(shards, evaluator=evaluator, val_loss_every=5, recur_layers="1", recur_start=0.5)
    assert passes == [1, 2] + [1] * 6 + [2] * 6
    assert evaluator.recur_on == [True] * 4
    assert any(line.startswith("recurrence: on from step:6 ") for line in log)
    assert model.recur_on


def test_training_fraction_is_the_further_of_steps_and_time():
    h = tiny_h(iterations=100)
    assert tg.training_fraction(h, 30, 0.0, 0.0) == 0.3  # no cap: the step count
    assert tg.training_fraction(h, 30, 600.0, 1000.0) == 0.6  # the cap comes first
    assert tg.training_fraction(h, 70, 600.0, 1000.0) == 0.7  # ITERATIONS comes first


def test_recurrence_compiles_two_graphs_during_the_warm_up(shards):
    """Under torch.compile the training graph is compiled without and with the repeats in the priming
    steps, and turning the repeats on at RECUR_START compiles nothing more."""
    counters = {}

    def backend(fn):
        return counters.setdefault(type(fn).__name__, CompileCounter())
    graphs_at_warmup = []

    class Log(list):
        def append(self, line):
            if line.startswith("warmup:"):
                graphs_at_warmup.append(counters["GPT"].frame_count)
            super().append(line)
    log, _ = recording_run(shards, compile_backend=backend, log=Log(), recur_layers="1", recur_start=0.5)
    assert graphs_at_warmup == [2] and counters["GPT"].frame_count == 2
    assert any(line.startswith("recurrence: on from step:6 ") for line in log)


# ---------------------------------------------------------------------------------------------
# Parallel residuals
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_parallel_blocks_add_attention_and_mlp_of_one_input():
    """PARALLEL_RESID_START=2 of 4 blocks: blocks 2, 3 give x + a*attn(n(x)) + m*mlp(n(x)), blocks 0, 1
    stay sequential (the MLP reads n(x + a*attn)); x is the resid_mix of the block's inputs."""
    torch.manual_seed(5)
    model = give_weight(tg.build_model(tiny_h(num_layers=4, parallel_resid_start=2, ln_scale=True)))
    x, x0 = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    for layer, block in enumerate(model.blocks):
        a, b = block.resid_mix
        mixed = a * x + b * x0
        n = rms(mixed) * (layer + 1) ** -0.5
        after_attn = mixed + block.attn_scale * block.attn(n, None, 16)
        mlp_in = n if layer >= 2 else rms(after_attn) * (layer + 1) ** -0.5
        expected = after_attn + block.mlp_scale * block.mlp(mlp_in)
        close(block(x, x0, None), expected)
        close(block(x, x0, None, 5), expected[:, -5:])
        other = rms(after_attn) * (layer + 1) ** -0.5 if layer >= 2 else n
        assert (block.mlp(other) - block.mlp(mlp_in)).abs().max() > 1e-2  # the two forms differ here


def lane_model(**kw):
    """4 blocks (encoder 0, 1; decoder 2, 3), two lanes from block 2, random lane_cross."""
    model = give_weight(tg.build_model(tiny_h(num_layers=4, parallel_resid_start=2, parallel_resid_lanes=2, **kw)))
    return randomise(model, "lane_cross", seed=4)


@torch.no_grad()
def test_two_lane_blocks_add_each_output_to_both_lanes():
    """PARALLEL_RESID_LANES=2: a block of lanes (a, m) gives (a + s_a*attn(n(a)) + c_0*mlp(n(m)),
    m + c_1*attn(n(a)) + s_m*mlp(n(m))), a and m first mixed with x0; the tail: the last positions of both."""
    torch.manual_seed(8)
    model = lane_model(ln_scale=True)
    assert [block.lane_cross is not None for block in model.blocks] == [False, False, True, True]
    lanes, x0 = torch.randn(2, 2, 16, 64), torch.randn(2, 16, 64)
    for layer in (2, 3):
        block = model.blocks[layer]
        mix, cross = block.resid_mix, block.lane_cross
        a, m = mix[0] * lanes[0] + mix[1] * x0, mix[0] * lanes[1] + mix[1] * x0
        attn = block.attn(rms(a) * (layer + 1) ** -0.5, None, 16)
        mlp = block.mlp(rms(m) * (layer + 1) ** -0.5)
        expected = torch.stack([a + block.attn_scale * attn + cross[0] * mlp, m + cross[1] * attn + block.mlp_scale * mlp])
        close(block(lanes, x0, None), expected)
        close(block(lanes, x0, None, 5), expected[:, :, -5:])
        assert (block.mlp(rms(a) * (layer + 1) ** -0.5) - mlp).abs().max() > 1e-2  # the MLP reads its own lane


@torch.no_grad()
def test_two_lanes_start_as_the_stream_and_end_as_their_mean():
    """The first block of two lanes takes x in both; the U-Net skips add to both; the trunk's output is the
    norm of the lanes' mean. With lane_cross = (mlp_scale, attn_scale) the lanes stay equal: one lane's model."""
    torch.manual_seed(9)
    model = lane_model()
    x0s = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: x0s.append(args[1]))
    idx = torch.randint(0, VOCAB, (2, 16))
    final = model.trunk(idx)
    b, w, x0 = model.blocks, model.skip_weights, x0s[0]
    out0 = b[0](x0, x0, None)
    out1 = b[1](out0, x0, None)
    lanes = b[2](torch.stack([out1, out1]) + w[0] * out1, x0, None)
    lanes = b[3](lanes + w[1] * out0, x0, None)
    close(final, rms(lanes.mean(0)))
    close(model.trunk(idx, 5), final[:, -5:])
    one_lane = give_weight(tg.build_model(tiny_h(num_layers=4, parallel_resid_start=2)))
    one_lane.load_state_dict({k: v for k, v in model.state_dict().items() if "lane_cross" not in k})
    assert (one_lane.trunk(idx) - final).abs().max() > 1e-2
    for block in b[2:]:
        block.lane_cross.copy_(torch.stack([block.mlp_scale, block.attn_scale]))
    close(model.trunk(idx), one_lane.trunk(idx))


# ---------------------------------------------------------------------------------------------
# Gates
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("kind, channels", [("head", 64), ("sparse", tg.SPARSE_GATE_CHANNELS)])
def test_attention_gate_scales_each_heads_output(kind, channels):
    """ATTN_GATE: head h's output y_h times 2 sigmoid(w_h . x[:channels]) before the output projection
    (head: all channels of the attention input; sparse: the first 12); zero weights = no gate."""
    torch.manual_seed(6)
    h = tiny_h(attn_gate=kind)
    model = give_weight(tg.build_model(h))
    ungated = give_weight(tg.build_model(tiny_h()))
    attn = model.blocks[0].attn
    assert attn.gate.shape == (4, channels)
    x = torch.randn(2, 16, 64)
    close(attn(x, None, 16), ungated.blocks[0].attn(x, None, 16), rtol=0, atol=0)
    randomise(model, "attn.gate")
    _, _, _, _, y = ref_attention(attn, x, h)
    gate = 2 * torch.sigmoid(x[..., :channels] @ attn.gate.T)  # (B, T, heads)
    expected = (y * gate[..., None]).reshape(2, 16, 64) @ attn.proj.weight.T
    close(attn(x, None, 16), expected)
    close(attn(x, None, 5), expected[:, -5:])
    assert (gate - 1).abs().max() > 0.3


@torch.no_grad()
def test_input_smear_gate_shifts_the_gate_by_the_tokens_state():
    """SMEAR_GATE=input: smear(x)_t = (1-g_t) x_t + g_t x_{t-1}, g_t = sigmoid(gate + x_t . shift) per
    channel; shift = 0 (a new model) is the fixed gate."""
    torch.manual_seed(7)
    smear = tg.build_model(tiny_h(smear_gate="input")).smear
    fixed = tg.build_model(tiny_h()).smear
    randomise(smear, "gate")
    fixed.gate.copy_(smear.gate)
    x = torch.randn(2, 16, 64)
    close(smear(x), fixed(x), rtol=0, atol=0)
    randomise(smear, "shift", seed=2)
    smear.shift.mul_(0.3)
    g = torch.sigmoid(smear.gate + (x * smear.shift).sum(-1, keepdim=True))
    previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    close(smear(x), (1 - g) * x + g * previous)
    assert (smear(x) - fixed(x)).abs().max() > 1e-2


def test_new_parameters_are_control_tensors_routed_once():
    """Every gate is routed once, as a control tensor: AdamW's scalar group and fp32 in the artifact."""
    h = tiny_h(attn_gate="head", smear_gate="input", recur_layers="0,1", parallel_resid_start=2, parallel_resid_lanes=2)
    model = tg.build_model(h)
    routes = tg.route_parameters(model)
    plain = tg.route_parameters(tg.build_model(tiny_h()))
    new = set(routes) - set(plain)
    assert new == {"smear.shift", "blocks.2.lane_cross", *(f"blocks.{i}.attn.gate" for i in range(3))}
    for name in new:
        assert routes[name] == "control" and tg.export_format(h, routes[name], 1) == tg.Format("fp32")
    export = tg.quantize_for_export(model, [], h, tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"),
                                                                 compile=False, micro_batch_seqs=1))
    for name in new:
        assert export.formats[name] == tg.Format("fp32") and name not in export.quantized


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(recur_layers="4,x"), "RECUR_LAYERS='4,x': expected comma-separated block numbers"),
    (dict(recur_layers="2"), "RECUR_LAYERS='2': expected blocks in 0..1 (the last block is not looped)"),
    (dict(recur_layers="1,0"), "RECUR_LAYERS='1,0': expected consecutive blocks in increasing order"),
    (dict(num_layers=5, recur_layers="1,3"), "RECUR_LAYERS='1,3': expected consecutive blocks in increasing order"),
    (dict(recur_repeats=2), "RECUR_REPEATS=2: expected 1 without RECUR_LAYERS"),
    (dict(recur_layers="1", recur_repeats=0), "RECUR_REPEATS=0: expected a positive number"),
    (dict(recur_start=0.3), "RECUR_START=0.3: expected 0 without RECUR_LAYERS"),
    (dict(recur_layers="1", recur_start=1.0), "RECUR_START=1.0: expected 0 <= value < 1"),
    (dict(recur_layers="1", recur_start=0.3, warmup_steps=1), "WARMUP_STEPS=1: expected at least 2 with RECUR_START > 0"),
    (dict(parallel_resid_start=3), "PARALLEL_RESID_START=3: expected 0 (off) or a block in 1..2"),
    (dict(parallel_resid_start=-1), "PARALLEL_RESID_START=-1: expected 0 (off) or a block in 1..2"),
    (dict(parallel_resid_start=1, parallel_resid_lanes=3), "PARALLEL_RESID_LANES=3: expected 1 or 2"),
    (dict(parallel_resid_lanes=2), "PARALLEL_RESID_LANES=2: expected PARALLEL_RESID_START > 0"),
    (dict(num_layers=4, recur_layers="1,2", parallel_resid_start=2, parallel_resid_lanes=2),
     "RECUR_LAYERS='1,2': with PARALLEL_RESID_LANES=2, expected looped blocks all below PARALLEL_RESID_START=2 or all from it"),
    (dict(attn_gate="dense"), "ATTN_GATE='dense': expected one of off, head, sparse"),
    (dict(smear_gate="learned"), "SMEAR_GATE='learned': expected one of fixed, input"),
    (dict(attn_gate="sparse", model_dim=8, num_heads=2, num_kv_heads=1), "ATTN_GATE=sparse: expected MODEL_DIM >= 12"),
])
def test_structure_settings_are_checked(settings, message):
    with pytest.raises(tg.ConfigError) as e:
        tiny_h(**settings).validate()
    assert str(e.value).startswith(message)


def test_the_structure_settings_are_stored_in_the_artifact():
    names = {"recur_layers", "recur_repeats", "parallel_resid_start", "parallel_resid_lanes", "attn_gate", "smear_gate"}
    assert names <= set(tg.model_settings(tiny_h()))
    assert "recur_start" not in tg.MODEL_SETTINGS  # training only: the artifact holds the final structure


def test_a_bad_structure_setting_stops_the_script_with_one_line(run):
    result = run(RECUR_LAYERS="0", RECUR_START="1.5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: RECUR_START=1.5: expected 0 <= value < 1 (a fraction of the training time)"


# ---------------------------------------------------------------------------------------------
# End to end: each setting changes the score, and the artifact re-scores to the same lines
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    dict(RECUR_LAYERS="0", RECUR_REPEATS="2", RECUR_START="0.5"),
    dict(PARALLEL_RESID_START="0"),  # the tiny runs' PARALLEL_RESID_START=1 (the default's parallel tail) off
    dict(PARALLEL_RESID_START="1", PARALLEL_RESID_LANES="2"),
    dict(ATTN_GATE="head"),
    dict(ATTN_GATE="sparse"),
    dict(SMEAR_GATE="input"),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_each_setting_changes_the_score(run, plain_run, settings):
    trained = run(RUN_ID="on", **settings)
    assert trained.returncode == 0, trained.stderr
    lines = final_lines(trained.stdout)
    assert lines[0] != plain_run[0] and lines[1] != plain_run[1]


def test_an_artifact_of_every_setting_rescores_to_the_same_lines(run):
    """The structure comes from the artifact: re-scoring without the settings rebuilds the same model."""
    settings = dict(NUM_LAYERS="3", RECUR_LAYERS="0,1", RECUR_START="0.4", PARALLEL_RESID_START="2", PARALLEL_RESID_LANES="2",
                    ATTN_GATE="sparse", SMEAR_GATE="input")
    trained = run(RUN_ID="on", **settings)
    assert trained.returncode == 0, trained.stderr
    assert re.search(r"^recurrence: on from step:8 ", trained.stdout, re.M)
    rescored = run(RUN_ID="rescore", EVAL_ARTIFACT="logs/on.model.zst", NUM_LAYERS="3", PARALLEL_RESID_START="2")
    assert rescored.returncode == 0, rescored.stderr
    assert final_lines(rescored.stdout) == final_lines(trained.stdout)
    for name, value in settings.items():
        assert name == "RECUR_START" or f" {name}={value}" in rescored.stdout
    refused = run(RUN_ID="refused", EVAL_ARTIFACT="logs/on.model.zst", NUM_LAYERS="3", PARALLEL_RESID_START="2", ATTN_GATE="head")
    assert refused.returncode == 2 and "ATTN_GATE=head but logs/on.model.zst was trained with ATTN_GATE=sparse" in refused.stderr
