"""Each model and training feature against a hand computation of its effect, so that switching a
feature off (or breaking it) in train_gpt.py makes a test here fail: XSA, value embeddings, the query
gain, rotary (base and partial dims), LN scale, resid_mix, the MLP activations, the U-Net skips,
BigramHash and SmearGate, the logit soft cap; and, in tiny CPU trainings through train(), the weight
average that is exported (EMA, SWA, none) and the late-QAT switch inside the training loop."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

VOCAB = 64


def tiny_h(**kw):
    base = dict(vocab_size=VOCAB, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, bigram_vocab_size=32,
                bigram_dim=16, train_seq_len=16, eval_seq_len=16, xsa_last_n=0, rope_base=500.0, parallel_resid_start=0,
                ttt_mode="off")
    return tg.Hyperparameters(**(base | kw))


def give_weight(model, seed=0):
    """Random values for the zero-initialised projections and the control parameters that start at 0 or
    1, so that every path changes the output and a dropped factor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("attn_scale", "mlp_scale", "resid_mix", "skip_weights", "smear.gate", "bigram.embed.weight")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def ref_rotary(x, base, dims, positions):
    """Channels (i, i + dims/2), i < dims/2, as one complex number turned by -position / base^(2i/dims);
    channels from dims on pass through."""
    half = dims // 2
    inv_freq = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / dims)
    theta = positions.double()[:, None] * inv_freq[None, :]  # (T, half)
    z = torch.complex(x[..., :half].double(), x[..., half:dims].double()) * torch.exp(-1j * theta)[None, :, None, :]
    return torch.cat([z.real.float(), z.imag.float(), x[..., dims:]], dim=-1)


def ref_attention(attn, x, h, ve=None, tail=None, xsa=False):
    """Attention.forward written out from its weights: returns (output, q, k, v, y before XSA)."""
    B, T, C = x.shape
    tail = tail or T
    H, Hkv, D = h.num_heads, h.num_kv_heads, h.model_dim // h.num_heads
    dims = h.rope_dims or D
    q = (x[:, T - tail:] @ attn.c_q.weight.T).view(B, tail, H, D)
    k = (x @ attn.c_k.weight.T).view(B, T, Hkv, D)
    v = (x @ attn.c_v.weight.T).view(B, T, Hkv, D)
    if ve is not None:
        v = v + ve.view(B, T, Hkv, D)
    q = ref_rotary(rms(q), h.rope_base, dims, torch.arange(T - tail, T)) * attn.q_gain[:, None]
    k = ref_rotary(rms(k), h.rope_base, dims, torch.arange(T))
    head_kv = torch.arange(H) // (H // Hkv)  # query head -> its kv head
    kk, vv = k[:, :, head_kv], v[:, :, head_kv]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(D)
    allowed = torch.arange(T)[None, :] <= torch.arange(T - tail, T)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vv)
    out_y = y
    if xsa:
        v_hat = vv[:, T - tail:] / vv[:, T - tail:].norm(dim=-1, keepdim=True)
        out_y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
    return out_y.reshape(B, tail, H * D) @ attn.proj.weight.T, q, k, v, y


def close(a, b, **kw):
    torch.testing.assert_close(a, b, **({"rtol": 1e-4, "atol": 2e-5} | kw))


@pytest.fixture
def captured_attention(monkeypatch):
    """Every causal_attention call's (q, k, v), in call order."""
    calls = []
    original = tg.causal_attention

    def recording(q, k, v, backend):
        calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return original(q, k, v, backend)
    monkeypatch.setattr(tg, "causal_attention", recording)
    return calls


# ---------------------------------------------------------------------------------------------
# Attention: XSA, query gain, rotary
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_xsa_removes_each_heads_component_along_its_own_value():
    """The last block with XSA_LAST_N=1 against the same weights without XSA: the outputs differ by
    exactly proj((y . v_hat) v_hat), y and v_hat computed by hand (GQA: a query head's own kv head)."""
    torch.manual_seed(0)
    with_xsa, without = (give_weight(tg.build_model(tiny_h(xsa_last_n=n))) for n in (1, 0))
    assert all(torch.equal(p, q) for p, q in zip(with_xsa.parameters(), without.parameters()))
    h = tiny_h(xsa_last_n=1)
    x = torch.randn(2, 16, 64)
    a, b = with_xsa.blocks[-1].attn, without.blocks[-1].attn
    plain, _, _, v, y = ref_attention(b, x, h)
    close(b(x, None, 16), plain)
    head_kv = torch.arange(4) // 2
    v_hat = F.normalize(v[:, :, head_kv], dim=-1)
    along = (y * v_hat).sum(-1, keepdim=True) * v_hat
    expected_diff = along.reshape(2, 16, 64) @ b.proj.weight.T
    assert expected_diff.abs().max() > 0.05  # a difference far above the tolerance
    close(b(x, None, 16) - a(x, None, 16), expected_diff)
    close(a(x, None, 16), ref_attention(a, x, h, xsa=True)[0])
    # only the last positions' queries (the evaluation tail): the same values, and v of those positions
    close(a(x, None, 5), a(x, None, 16)[:, -5:])
    close(a(x, None, 5), ref_attention(a, x, h, tail=5, xsa=True)[0])
    # and the earlier blocks have none
    for blk_a, blk_b in zip(with_xsa.blocks[:-1], without.blocks[:-1]):
        close(blk_a.attn(x, None, 16), blk_b.attn(x, None, 16), rtol=0, atol=0)


@torch.no_grad()
def test_query_gain_multiplies_each_heads_queries(captured_attention):
    """q reaching attention = q_gain[head] * rotary(rms_norm(x W_q^T)): per head the rms of q is |gain|
    (a rotation keeps norms), and QK_GAIN_INIT is the gain a new model starts with."""
    torch.manual_seed(1)
    h = tiny_h(qk_gain_init=2.5)
    attn = give_weight(tg.build_model(h)).blocks[0].attn
    x = torch.randn(2, 16, 64)
    attn(x, None, 16)
    q = captured_attention[-1][0]
    close(q.pow(2).mean(-1).sqrt(), torch.full((2, 16, 4), 2.5))
    gain = torch.tensor([0.5, -1.0, 2.0, 3.0])
    attn.q_gain.copy_(gain)
    out = attn(x, None, 16)
    q = captured_attention[-1][0]
    close(q.pow(2).mean(-1).sqrt(), gain.abs().expand(2, 16, 4))
    ref_out, ref_q, ref_k, _, _ = ref_attention(attn, x, h)
    close(q, ref_q)
    close(captured_attention[-1][1], ref_k)  # keys: no gain
    close(out, ref_out)


def test_rotary_angles_follow_rope_base():
    """cos/sin tables = cos/sin(t / base^(2i/d)) for two bases, d the rotated dims (ROPE_DIMS or head dim)."""
    for base, dims in ((10000.0, 0), (37.0, 8)):
        h = tiny_h(rope_base=base, rope_dims=dims, train_seq_len=16, eval_seq_len=24)
        rotary = tg.Rotary(h)
        d = dims or 16
        t = torch.arange(24, dtype=torch.float64)[:, None]
        i = torch.arange(d // 2, dtype=torch.float64)[None, :]
        angles = t / base ** (2 * i / d)
        close(rotary.cos, angles.cos().float(), rtol=0, atol=1e-6)
        close(rotary.sin, angles.sin().float(), rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("rope_dims", [0, 8])
def test_queries_and_keys_are_rotated_by_position(captured_attention, rope_dims):
    """The q and k reaching attention equal the hand rotary of the normalised projections, at the
    queries' own positions when only the last ones are computed; with ROPE_DIMS=8 of 16, channels 8..15
    are not rotated. Another ROPE_BASE changes the attention output."""
    torch.manual_seed(2)
    h = tiny_h(rope_dims=rope_dims, rope_base=50.0)
    attn = give_weight(tg.build_model(h)).blocks[0].attn
    x = torch.randn(2, 16, 64)
    for tail in (16, 5):
        out = attn(x, None, tail)
        q, k, _ = captured_attention[-1]
        ref_out, ref_q, ref_k, _, _ = ref_attention(attn, x, h, tail=tail)
        close(q, ref_q)
        close(k, ref_k)
        close(out, ref_out)
    k_plain = rms((x @ attn.c_k.weight.T).view(2, 16, 2, 16))
    if rope_dims:
        close(k[..., 8:], k_plain[..., 8:], rtol=0, atol=1e-6)
    assert (k[:, 1:, :, :8] - k_plain[:, 1:, :, :8]).abs().max() > 0.1
    other = tg.build_model(tiny_h(rope_dims=rope_dims, rope_base=5000.0)).blocks[0].attn
    other.load_state_dict(attn.state_dict())
    assert (other(x, None, 16) - attn(x, None, 16)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Value embeddings, blocks (LN scale, resid_mix), MLP activations
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_value_embeddings_are_added_to_v_of_the_chosen_layers(captured_attention):
    """With VE_LAYERS=0,2 the v of blocks 0 and 2 is c_v(input) + ve_scale * proj(embed[idx]) of the
    shared ValueEmbedding (computed by hand from its tables); block 1's v is c_v(input) alone."""
    torch.manual_seed(3)
    h = tiny_h(ve_layers="0,2", ve_dim=8)
    model = give_weight(tg.build_model(h))
    model.blocks[0].ve_scale.fill_(0.7)
    model.blocks[2].ve_scale.fill_(-1.3)
    inputs = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    idx = torch.randint(0, VOCAB, (2, 16))
    model.trunk(idx)
    ve = model.value_embed.embed.weight[idx] @ model.value_embed.proj.weight.T  # (2, 16, kv_dim)
    assert ve.abs().max() > 1e-3
    for layer, block in enumerate(model.blocks):
        v = captured_attention[layer][2]
        base = (inputs[layer] @ block.attn.c_v.weight.T).view(2, 16, 2, 16)
        if layer == 1:
            close(v, base)
            assert block.ve_scale is None
        else:
            close(v, base + block.ve_scale * ve.view(2, 16, 2, 16))
            assert (v - base).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("ln_scale", [True, False])
def test_block_mixes_x0_and_scales_its_normalised_inputs(ln_scale):
    """Block L: x <- a*x + b*x0 (resid_mix), attention and MLP read rms_norm(.) * 1/sqrt(L+1) with
    LN_SCALE=1 (* 1 without), and out = x + attn_scale*attn + mlp_scale*mlp."""
    torch.manual_seed(4)
    model = give_weight(tg.build_model(tiny_h(ln_scale=ln_scale)))
    seen = {}
    for layer, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, L=layer: seen.__setitem__(("block", L), args[:2]))
        block.register_forward_hook(lambda m, args, out, L=layer: seen.__setitem__(("out", L), out))
        block.attn.register_forward_pre_hook(lambda m, args, L=layer: seen.__setitem__(("attn_in", L), args[0]))
        block.attn.register_forward_hook(lambda m, args, out, L=layer: seen.__setitem__(("attn_out", L), out))
        block.mlp.register_forward_pre_hook(lambda m, args, L=layer: seen.__setitem__(("mlp_in", L), args[0]))
        block.mlp.register_forward_hook(lambda m, args, out, L=layer: seen.__setitem__(("mlp_out", L), out))
    model.trunk(torch.randint(0, VOCAB, (2, 16)))
    for layer, block in enumerate(model.blocks):
        factor = (layer + 1) ** -0.5 if ln_scale else 1.0
        x, x0 = seen[("block", layer)]
        a, b = block.resid_mix
        mixed = a * x + b * x0
        close(seen[("attn_in", layer)], rms(mixed) * factor)
        after_attn = mixed + block.attn_scale * seen[("attn_out", layer)]
        close(seen[("mlp_in", layer)], rms(after_attn) * factor)
        close(seen[("out", layer)], after_attn + block.mlp_scale * seen[("mlp_out", layer)])
        # the stream that reaches the block is not already x0, so the mix matters
        assert layer == 0 or (x - x0).abs().max() > 0.1


@torch.no_grad()
@pytest.mark.parametrize("act", ["relu2", "leaky_relu2"])
def test_mlp_activation(act):
    """relu2: proj(max(h, 0)^2); leaky_relu2: proj(where(h > 0, h, 0.5 h)^2), h = fc(x)."""
    torch.manual_seed(5)
    mlp = give_weight(tg.build_model(tiny_h(mlp_act=act))).blocks[0].mlp
    x = torch.randn(2, 16, 64)
    hidden = x @ mlp.fc.weight.T
    assert (hidden < 0).any() and (hidden > 0).any()
    act_ref = hidden.clamp_min(0) if act == "relu2" else torch.where(hidden > 0, hidden, 0.5 * hidden)
    close(mlp(x), act_ref.square() @ mlp.proj.weight.T)


# ---------------------------------------------------------------------------------------------
# The trunk: embeddings, BigramHash, SmearGate, U-Net skips; the logits
# ---------------------------------------------------------------------------------------------

def ref_bigram_rows(idx, rows):
    out = torch.full_like(idx, rows - 1)
    for b in range(idx.size(0)):
        for t in range(1, idx.size(1)):
            out[b, t] = ((36313 * int(idx[b, t])) ^ (27191 * int(idx[b, t - 1]))) % (rows - 1)
    return out


@torch.no_grad()
def test_bigram_hash_and_smear_gate_make_the_first_blocks_input():
    """x0 = smear(rms_norm(tok_emb[idx] + scale * proj(embed[bigram row]))), smear(x)_t = (1-g) x_t + g x_{t-1}
    (x_{-1} = 0) with g = sigmoid(gate) per channel; x0 is both inputs of block 0."""
    torch.manual_seed(6)
    model = give_weight(tg.build_model(tiny_h()))
    model.bigram.scale.fill_(0.8)
    model.tok_emb.weight.normal_(0, 1)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[:2]))
    idx = torch.randint(0, VOCAB, (2, 16))
    model.trunk(idx)
    bigram = 0.8 * model.bigram.embed.weight[ref_bigram_rows(idx, 32)] @ model.bigram.proj.weight.T
    close(model.bigram(idx), bigram)
    emb = rms(model.tok_emb.weight[idx] + bigram)
    g = torch.sigmoid(model.smear.gate)
    previous = torch.cat([torch.zeros_like(emb[:, :1]), emb[:, :-1]], dim=1)
    x0 = (1 - g) * emb + g * previous
    x, x0_arg = seen[0]
    close(x, x0)
    close(x0_arg, x0)
    # each part matters: without the bigram term, or without the smear, the input would differ
    assert (rms(model.tok_emb.weight[idx]) - emb).abs().max() > 1e-2
    assert (emb - x0).abs().max() > 1e-2


@torch.no_grad()
def test_unet_skips_feed_encoder_outputs_to_the_decoder_in_reverse():
    """5 blocks: encoder 0, 1; decoder 2, 3, 4. Block 2 reads out1 + w0*out1, block 3 out2 + w1*out0,
    block 4 out3 (no skip left); the trunk returns rms_norm(out4). Other skip weights, another output."""
    torch.manual_seed(7)
    model = give_weight(tg.build_model(tiny_h(num_layers=5)))
    ins, outs = [], []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: ins.append(args[0]))
        block.register_forward_hook(lambda m, args, out: outs.append(out))
    idx = torch.randint(0, VOCAB, (2, 16))
    final = model.trunk(idx)
    w = model.skip_weights
    assert w.shape == (2, 64)
    close(ins[1], outs[0])
    close(ins[2], outs[1] + w[0] * outs[1])
    close(ins[3], outs[2] + w[1] * outs[0])
    close(ins[4], outs[3])
    close(final, rms(outs[4]))
    assert (outs[0] - outs[1]).abs().max() > 0.1  # reversing the order would show
    model.skip_weights.mul_(0.25)
    assert (model.trunk(idx) - final).abs().max() > 1e-3


@torch.no_grad()
def test_logits_are_soft_capped():
    """logits = c tanh(z / c) with z = x tok_emb^T, |logits| < c, and the loss is their cross-entropy."""
    torch.manual_seed(8)
    model = give_weight(tg.build_model(tiny_h(logit_softcap=5.0)))
    model.tok_emb.weight.normal_(0, 1)
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    x = model.trunk(idx)
    z = x @ model.tok_emb.weight.T
    assert z.abs().max() > 15  # far into the cap's saturation
    capped = 5.0 * torch.tanh(z / 5.0)
    logits = model.logits(x)
    close(logits, capped)
    assert logits.abs().max() <= 5.0
    close(model(idx, targets), F.cross_entropy(capped.flatten(0, 1), targets.flatten()))
    close(model.token_nll(idx, targets, 16), F.cross_entropy(capped.flatten(0, 1), targets.flatten(), reduction="none").view(2, 16))


# ---------------------------------------------------------------------------------------------
# train(): the exported weight average and late QAT
# ---------------------------------------------------------------------------------------------

ITERATIONS, WARMDOWN, WARMUP = 12, 10, 2


def lr_at(step):
    """The LR scale of training step `step` (0-based) without a time cap: 1, then linear to 0 over the
    last WARMDOWN steps."""
    return min(max((ITERATIONS - step) / WARMDOWN, 0.0), 1.0)


class StubEvaluator:
    """train() only asks it to prime and to score (the validation lines of the log)."""

    def prime(self):
        return 0.0

    def score(self, sliding):
        return 0.0, 0.0, 0.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("features_shards")
    tokens = np.random.default_rng(0).integers(0, VOCAB, 8192)
    tg.write_shard(root / "fineweb_train_000000.bin", tokens)
    return root


def train_tiny(shards, **kw):
    """tg.train on the CPU with a recording WeightAverager: returns the exported state, the model's
    initial parameters, the (step, lr_scale, parameters) of every averager update, and the log."""
    settings = dict(data_path=str(shards), vocab_size=VOCAB, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2,
                    bigram_vocab_size=32, bigram_dim=16, train_seq_len=32, eval_seq_len=32, eval_stride=16, train_batch_tokens=128,
                    grad_accum_steps=1, iterations=ITERATIONS, warmup_steps=WARMUP, warmdown_iters=WARMDOWN,
                    max_wallclock_seconds=0.0, val_loss_every=0, train_log_every=100, muon_momentum_warmup_steps=10,
                    quant_method="rtn", compile="0", attn_backend="sdpa", mlp_kernel="torch", qk_kernel="torch",
                    xsa_kernel="torch", xsa_last_n=1, parallel_resid_start=0, ttt_mode="off")
    h = tg.Hyperparameters(**(settings | kw))
    h.validate()
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), compile=False,
                    micro_batch_seqs=h.train_batch_tokens // (h.grad_accum_steps * h.train_seq_len))
    model = tg.build_model(h)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    updates = []

    class RecordingAverager(tg.WeightAverager):
        def update(self, step, lr_scale):
            super().update(step, lr_scale)
            updates.append((step, lr_scale, {n: p.detach().clone() for n, p in model.named_parameters()}))

    log = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "WeightAverager", RecordingAverager)
        state = tg.train(model, tg.route_parameters(model), StubEvaluator(), h, rt, log.append).state
    assert [u[0] for u in updates] == list(range(1, ITERATIONS + 1))
    for step, lr_scale, _ in updates:
        assert lr_scale == pytest.approx(lr_at(step - 1))
    return dict(h=h, model=model, state=state, initial=initial, updates=updates, log=log)


def assert_state_equals(state, expected, live):
    """state == expected for every parameter, and (when expected is not the live weights) far from live."""
    for name, value in expected.items():
        close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    if live is not expected:
        moved = max((expected[n] - live[n]).abs().max().item() for n in expected)
        assert moved > 1e-3, "the average equals the live weights: the check would not see a missing average"


# Late QAT: MLP matrices of 160 x 480 (76,800 elements) are exported as int4, so they are fake-quantized.
QAT_THRESHOLD = 0.35


@pytest.fixture(scope="module")
def ema_qat_run(shards):
    """An EMA run with late QAT, recording for each forward of blocks[0].mlp.fc whether its output is that
    of the fake-quantized weight or of the plain one."""
    qat = []

    def classify(module, args, out):
        x = args[0].detach()
        quantized = F.linear(x, tg.fake_quantize(module.weight.detach(), 4))
        plain = F.linear(x, module.weight.detach())
        qat.append((torch.allclose(out, quantized, rtol=1e-4, atol=1e-5), torch.allclose(out, plain, rtol=1e-4, atol=1e-5)))

    original_build = tg.build_model

    def build_with_hook(h):
        model = original_build(h)
        model.blocks[0].mlp.fc.register_forward_hook(classify)
        return model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "build_model", build_with_hook)
        run = train_tiny(shards, model_dim=160, mlp_mult=3.0, mlp_bits=4, weight_avg="ema", ema_decay=0.7,
                         late_qat_threshold=QAT_THRESHOLD)
    run["qat"] = qat
    return run


def test_train_exports_the_ema_of_the_weights(ema_qat_run):
    run = ema_qat_run
    d = run["h"].ema_decay
    ema = {n: p.clone() for n, p in run["initial"].items()}  # the weights the training starts from
    for _, _, params in run["updates"]:
        ema = {n: d * ema[n] + (1 - d) * params[n] for n in ema}
    assert_state_equals(run["state"], ema, live=run["updates"][-1][2])


def test_train_exports_the_swa_mean_of_the_late_snapshots(shards):
    run = train_tiny(shards, weight_avg="swa", swa_every=2, swa_threshold=0.5)
    chosen = [params for step, _, params in run["updates"] if lr_at(step - 1) < 0.5 and step % 2 == 0]
    assert len(chosen) == 2  # steps 10 and 12
    mean = {n: sum(p[n] for p in chosen) / len(chosen) for n in chosen[0]}
    assert_state_equals(run["state"], mean, live=run["updates"][-1][2])


def test_train_exports_the_live_weights_without_an_average(shards):
    run = train_tiny(shards, weight_avg="none")
    live = run["updates"][-1][2]
    assert_state_equals(run["state"], live, live=live)
    assert max((live[n] - run["initial"][n]).abs().max().item() for n in live) > 1e-3  # it trained


def test_late_qat_switches_on_in_the_last_steps_of_training(ema_qat_run):
    """The priming steps and every step whose LR scale is at or above LATE_QAT_THRESHOLD run on the plain
    weights; from the first step below it, the forward uses the fake-quantized (int4 per row) weights."""
    qat = ema_qat_run["qat"]
    assert len(qat) == WARMUP + ITERATIONS  # one forward per step: nothing else ran the model
    expected = [False] * WARMUP + [lr_at(s) < QAT_THRESHOLD for s in range(ITERATIONS)]
    assert expected.count(True) == 3  # steps 9, 10, 11
    assert [quantized for quantized, _ in qat] == expected
    assert [plain for _, plain in qat] == [not e for e in expected]  # the two outputs are distinguishable
    assert any(line.startswith("late_qat: on from step:9 ") for line in ema_qat_run["log"])
