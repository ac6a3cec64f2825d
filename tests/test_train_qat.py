"""Late QAT: once switched on, the forward uses the fake-quantized weights, also in a compiled graph."""
import pytest
import torch

import train_gpt as tg

# 160 x 480 = 76,800 elements: above the fp16 threshold, so exported (and fake-quantized) as intN (N = MLP_BITS).
H = tg.Hyperparameters(vocab_size=64, num_layers=2, model_dim=160, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
                       bigram_vocab_size=0, train_seq_len=16, eval_seq_len=16, late_qat_threshold=0.15,
                       attn_bits=3, mlp_bits=3)  # coarse, so the switch moves the loss far beyond rounding noise


def quantized_copy(model):
    copy = tg.build_model(H)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for module in copy.modules():
            if isinstance(module, tg.Linear) and module.qat_bits:
                module.weight.copy_(tg.fake_quantize(module.weight, module.qat_bits))
    return copy


def check_switch(forward, model):
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        before = forward(idx, idx)
        assert tg.set_late_qat(model, True) == 4  # the two MLP matrices of each block; attention ones are fp16
        after = forward(idx, idx)
        tg.set_late_qat(model, False)
        reference = quantized_copy(model)(idx, idx)
    # Compiled kernels round differently from eager ones (about 1e-4 here); the switch moves far more.
    torch.testing.assert_close(after, reference, rtol=0, atol=5e-4)
    assert (after - before).abs().max() > 20 * 5e-4


def test_late_qat_switch_in_eager_mode():
    model = tg.build_model(H)
    check_switch(model, model)


def test_late_qat_switch_inside_a_compiled_graph():
    """Proves the compiled path: torch.compile (inductor, CPU) with fullgraph, traced before the switch."""
    model = tg.build_model(H)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    try:
        compiled(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long))
    except Exception as error:  # no C++ compiler on this machine
        pytest.skip(f"torch.compile is unavailable here: {error}")
    check_switch(compiled, model)


def test_qat_matrices_are_exactly_the_int_exported_ones():
    model = tg.build_model(H)
    routes = tg.route_parameters(model)
    gated = {name.removesuffix(".weight") for name, p in model.named_parameters()
             if tg.export_format(H, routes[name], p.numel())[0] == "int" and routes[name] != "embed"}
    assert gated == {name for name, m in model.named_modules() if isinstance(m, tg.Linear) and m.qat_bits}
