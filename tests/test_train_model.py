"""Model pieces against plain reference formulations."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg


def tiny_h(**kw):
    base = dict(vocab_size=96, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, bigram_vocab_size=32,
                bigram_dim=16, train_seq_len=32, eval_seq_len=32, xsa_last_n=2, rope_dims=8, parallel_resid_start=0, ttt_mode="off")
    return tg.Hyperparameters(**(base | kw))


def test_gqa_xsa_equals_repeat_interleave_formulation():
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 5, 8, 2, 16
    y, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D)
    v_full = v.repeat_interleave(H // Hkv, dim=2)  # query head h uses kv head h // group
    v_hat = v_full / v_full.norm(dim=-1, keepdim=True)
    expected = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
    torch.testing.assert_close(tg.exclusive_self_attention(y, v), expected)
    out = tg.exclusive_self_attention(y, v)
    assert (out * v_hat).sum(-1).abs().max() < 1e-5  # nothing left along each head's own value


def test_gqa_attention_equals_repeated_kv():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 7, 8, 16), torch.randn(2, 7, 2, 16), torch.randn(2, 7, 2, 16)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(4, 2).transpose(1, 2),
                                              v.repeat_interleave(4, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(tg.causal_attention(q, k, v, "sdpa"), expected)


def test_xsa_only_on_the_last_blocks():
    model = tg.build_model(tiny_h(xsa_last_n=2))
    assert [b.attn.xsa for b in model.blocks] == [False, False, True, True]
    assert not any(b.attn.xsa for b in tg.build_model(tiny_h(xsa_last_n=0)).blocks)


def test_bigram_rows():
    idx = torch.tensor([[3, 7, 1]])
    rows = tg.bigram_rows(idx, 2048)
    assert rows.tolist() == [[2047, (36313 * 7 ^ 27191 * 3) % 2047, (36313 * 1 ^ 27191 * 7) % 2047]]


def test_smear_gate_mixes_the_previous_position():
    gate = tg.SmearGate(tiny_h())
    with torch.no_grad():
        gate.gate.fill_(0.0)  # g = 0.5
    x = torch.randn(1, 3, 64)
    out = gate(x)
    torch.testing.assert_close(out[:, 0], 0.5 * x[:, 0])
    torch.testing.assert_close(out[:, 2], 0.5 * x[:, 2] + 0.5 * x[:, 1])


def test_every_parameter_is_routed_once():
    model = tg.build_model(tiny_h(ve_layers="2,3", ve_dim=8))
    routes = tg.route_parameters(model)
    assert routes.keys() == dict(model.named_parameters()).keys()
    assert routes["blocks.0.attn.c_q.weight"] == "attn" and routes["blocks.1.mlp.fc.weight"] == "mlp"
    assert routes["tok_emb.weight"] == "embed" and routes["bigram.embed.weight"] == "embed"
    assert routes["bigram.proj.weight"] == "proj" and routes["blocks.3.ve_scale"] == "control"
    assert "blocks.0.ve_scale" not in routes


def test_rope_dims_leave_the_other_channels_untouched():
    rotary = tg.Rotary(tiny_h(rope_dims=8))
    x = torch.randn(1, 6, 2, 16)
    out = rotary(x)
    torch.testing.assert_close(out[..., 8:], x[..., 8:])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # a rotation
    assert not torch.allclose(out[:, 1:, :, :8], x[:, 1:, :, :8])


def test_loss_and_token_nll_share_the_trunk():
    """token_nll of the last positions computes only those in the last block (its attention still
    reads every position): the same values as slicing the full pass, with XSA, partial rotary and
    a value embedding in that block, and its output projections given weight."""
    torch.manual_seed(2)
    model = tg.build_model(tiny_h(ve_layers="0,3"))
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.proj.weight, std=0.1)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.1)
    idx = torch.randint(0, 96, (2, 32))
    targets = torch.randint(0, 96, (2, 32))
    nll = model.token_nll(idx, targets, 32)
    torch.testing.assert_close(model(idx, targets), nll.mean())
    for tail in (1, 5, 31):
        torch.testing.assert_close(model.token_nll(idx, targets, tail), nll[:, -tail:])


def test_attention_of_the_last_queries_is_aligned_to_the_end():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    full = tg.causal_attention(q, k, v, "sdpa")
    torch.testing.assert_close(tg.causal_attention(q[:, -3:], k, v, "sdpa"), full[:, -3:])


def test_init_is_seeded_and_output_projections_start_at_zero():
    a, b = tg.build_model(tiny_h()), tg.build_model(tiny_h())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.blocks[0].attn.proj.weight.abs().sum() == 0 and a.blocks[0].mlp.proj.weight.abs().sum() == 0
    w = a.blocks[0].attn.c_q.weight  # 64x64: orthogonal
    torch.testing.assert_close(w @ w.T, torch.eye(64), atol=1e-5, rtol=0)


def test_residual_dtype_under_autocast():
    """RESIDUAL_DTYPE=bf16 carries the stream between blocks in autocast's dtype; fp32 keeps the records'
    float32 stream. Outside autocast (the CPU path) both are float32, and the two agree closely."""
    idx, targets = torch.randint(0, 96, (2, 32)), torch.randint(0, 96, (2, 32))
    seen, losses = {}, {}
    for dtype in ("bf16", "fp32"):
        model = tg.build_model(tiny_h(residual_dtype=dtype))
        # give the zero-initialised projections weight, so every block changes the stream
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.proj.weight, std=0.05)
            torch.nn.init.normal_(block.mlp.proj.weight, std=0.05)
        def record(module, args, dtype=dtype):
            seen.setdefault(dtype, (args[0].dtype, args[1].dtype))
        model.blocks[1].register_forward_pre_hook(record)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[dtype] = model(idx, targets).item()
        assert model(idx, targets).dtype == torch.float32
    assert seen == {"bf16": (torch.bfloat16, torch.bfloat16), "fp32": (torch.float32, torch.float32)}
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02 * losses["fp32"]


def reference_fa3(q, k, v, causal):
    """FlashAttention-3's flash_attn_func contract, written out: (B, T, H, D) tensors, query head h reads kv
    head h // (H / Hkv), a causal mask aligned to the last positions when there are fewer queries than
    keys, and (out, softmax_lse) returned."""
    assert causal and q.dim() == k.dim() == 4 and q.dtype == k.dtype == v.dtype
    B, Tq, H, D = q.shape
    T, Hkv = k.size(1), k.size(2)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D ** 0.5
    query_pos = torch.arange(T - Tq, T)[:, None]
    scores = scores.masked_fill(torch.arange(T)[None, :] > query_pos, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), scores.logsumexp(-1)


def test_fa3_backend_matches_sdpa_given_the_fa3_contract(monkeypatch):
    """The FA3 branch (untestable on CPU with the real kernel) against the SDPA branch, with FA3's calling
    convention written out: layout, GQA head grouping, causal alignment of a tail of queries, tuple output."""
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    for fa3 in (reference_fa3, lambda *a, **kw: reference_fa3(*a, **kw)[0]):  # older and newer return types
        monkeypatch.setattr(tg, "fa3_attention", fa3)
        torch.testing.assert_close(tg.causal_attention(q, k, v, "fa3"), tg.causal_attention(q, k, v, "sdpa"))
        torch.testing.assert_close(tg.causal_attention(q[:, -3:], k, v, "fa3"), tg.causal_attention(q[:, -3:], k, v, "sdpa"))


def test_fa3_backend_is_refused_without_fa3_on_a_hopper_gpu(monkeypatch):
    monkeypatch.setattr(tg, "fa3_attention", reference_fa3 if not torch.cuda.is_available() else None)
    h = tg.Hyperparameters.from_env({"ATTN_BACKEND": "fa3"})
    with pytest.raises(tg.ConfigError, match="ATTN_BACKEND=fa3 needs a Hopper GPU and the flash_attn_interface package"):
        tg.setup_runtime(h, {})


class ReferenceFA4:
    """flash_attn.cute.interface's two entry points as the fa4 backend calls them, written out with the
    contract of reference_fa3: _flash_attn_fwd returns (out, lse (B, H, Tq), ...) and _flash_attn_bwd
    (dq, dk, dv) for the same causal attention; GQA by head count, k's and v's gradients of their shape."""

    calls = []

    @classmethod
    def _flash_attn_fwd(cls, q, k, v, causal, return_lse):
        assert return_lse and all(t.is_contiguous() for t in (q, k, v))
        cls.calls.append("fwd")
        out, lse = reference_fa3(q, k, v, causal)
        return out, lse, None, None, None

    @classmethod
    def _flash_attn_bwd(cls, q, k, v, out, dout, lse, causal):
        """The attention backward by hand: P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)),
        dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D); a kv head's gradients sum over its query heads."""
        assert causal
        cls.calls.append("bwd")
        B, Tq, H, D = q.shape
        T, Hkv = k.size(1), k.size(2)
        kr, vr = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) / D ** 0.5
        P = torch.exp(scores - lse[..., None]).masked_fill(torch.arange(T)[None, :] > torch.arange(T - Tq, T)[:, None], 0.0)
        dv = torch.einsum("bhqk,bqhd->bkhd", P, dout)
        dS = P * (torch.einsum("bqhd,bkhd->bhqk", dout, vr) - (dout * out).sum(-1).transpose(1, 2)[..., None])
        dq = torch.einsum("bhqk,bkhd->bqhd", dS, kr) / D ** 0.5
        dk = torch.einsum("bhqk,bqhd->bkhd", dS, q) / D ** 0.5
        group = lambda g: g.view(B, T, Hkv, H // Hkv, D).sum(3)
        return dq, group(dk), group(dv)


def test_fa4_backend_matches_sdpa_forward_and_backward_given_the_fa4_contract(monkeypatch):
    """The fa4 branch (a custom op with its own backward, so that torch.compile keeps it whole) against
    the SDPA branch: outputs and the gradients of q, k and v, all positions and a tail of queries."""
    monkeypatch.setattr(tg, "fa4_interface", ReferenceFA4)
    torch.manual_seed(5)
    for tail in (9, 3):
        grads = {}
        for backend in ("fa4", "sdpa"):
            q, k, v = (torch.randn(2, 9, heads, 8, generator=torch.Generator().manual_seed(i)).requires_grad_()
                       for i, heads in enumerate((4, 2, 2)))
            y = tg.causal_attention(q[:, -tail:].contiguous(), k, v, backend)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            grads[backend] = (y.detach(), q.grad, k.grad, v.grad)
        for a, b in zip(grads["fa4"], grads["sdpa"]):
            torch.testing.assert_close(a, b)
    assert ReferenceFA4.calls == ["fwd", "bwd"] * 2


def test_fa4_backend_is_refused_without_the_package_or_a_gpu(monkeypatch):
    monkeypatch.setattr(tg, "fa4_interface", None)
    h = tg.Hyperparameters.from_env({"ATTN_BACKEND": "fa4"})
    with pytest.raises(tg.ConfigError, match=r"ATTN_BACKEND=fa4 needs a Hopper or Blackwell GPU and the flash-attn-4 package .*: it does not import here"):
        tg.setup_runtime(h, {})
    monkeypatch.setattr(tg, "fa4_interface", ReferenceFA4)
    if not torch.cuda.is_available():
        with pytest.raises(tg.ConfigError, match=r"ATTN_BACKEND=fa4 needs a Hopper or Blackwell GPU and the flash-attn-4 package \(pip install flash-attn-4; FlashAttention-4\)$"):
            tg.setup_runtime(tg.Hyperparameters.from_env({"ATTN_BACKEND": "fa4"}), {})


@pytest.mark.parametrize("fa3, fa4, major, chosen", [
    (True, True, 9, "fa3"), (False, True, 9, "fa4"), (False, True, 10, "fa4"), (True, True, 10, "fa4"),
    (False, False, 9, "sdpa"), (True, True, 8, "sdpa"), (True, True, 0, "sdpa")])
def test_auto_attention_takes_fa3_then_fa4_then_sdpa(monkeypatch, fa3, fa4, major, chosen):
    monkeypatch.setattr(tg, "fa3_attention", reference_fa3 if fa3 else None)
    monkeypatch.setattr(tg, "fa4_interface", ReferenceFA4 if fa4 else None)
    assert tg.choose_attention("auto", major) == chosen
    assert tg.choose_attention("sdpa", major) == "sdpa"
    for explicit in ("fa3", "fa4"):
        if explicit == chosen or (explicit == "fa4" and fa4 and major >= 9):
            assert tg.choose_attention(explicit, major) == explicit
        else:
            with pytest.raises(tg.ConfigError, match=f"ATTN_BACKEND={explicit} needs"):
                tg.choose_attention(explicit, major)


def test_triton_kernels_match_the_plain_paths_in_tritons_interpreter():
    """tests/triton_kernel_check.py under Triton's CPU interpreter: the kernels, the custom ops relu2_mlp, norm_rotary,
    xsa and softcap_ce with their backward ops (also compiled, and through opcheck), and the model with all four kernel
    settings at triton against the plain paths (output, gradients, scoring, GPTQ Hessians)."""
    pytest.importorskip("triton")
    check = Path(__file__).with_name("triton_kernel_check.py")
    result = subprocess.run([sys.executable, str(check)], env=os.environ | {"TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "all checks passed" in result.stdout, result.stdout + result.stderr


def test_kernel_resolution_on_this_machine():
    usable = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and tg.triton is not None
    h = tg.Hyperparameters.from_env({"ROPE_DIMS": "16"})  # partial rotary is fused too
    kernels = tg.setup_runtime(h, {}).kernels
    assert (kernels.mlp, kernels.qk, kernels.xsa) == (("triton",) * 3 if usable else ("torch",) * 3)
    assert (h.mlp_kernel, h.qk_kernel, h.xsa_kernel, h.attn_backend, h.compile) == ("auto",) * 5  # the settings stay as given
    h = tg.Hyperparameters.from_env({"MLP_KERNEL": "auto", "MLP_ACT": "leaky_relu2"})
    assert tg.setup_runtime(h, {}).kernels.mlp == "torch"  # its sign is lost in act = leaky_relu(h)^2, which the fused backward reads
    refused = [{"MLP_ACT": "leaky_relu2"}, {"MLP_MULT": "2.99"}] + ([] if usable else [{}])
    for env in refused:
        env["MLP_KERNEL"] = "triton"
        with pytest.raises(tg.ConfigError, match="MLP_KERNEL=triton needs a Hopper GPU and Triton 3.4 or later, MLP_ACT=relu2"):
            tg.setup_runtime(tg.Hyperparameters.from_env(env), {})
    for name in ([] if usable else ["QK_KERNEL", "XSA_KERNEL"]):
        with pytest.raises(tg.ConfigError, match=f"^{name}=triton needs a Hopper GPU and Triton 3.4 or later$"):
            tg.setup_runtime(tg.Hyperparameters.from_env({name: "triton"}), {})


def test_the_runtime_holds_the_resolved_choices_and_the_settings_stay_as_given():
    h = tg.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "4096", "TRAIN_SEQ_LEN": "64"})
    rt = tg.setup_runtime(h, {"WORLD_SIZE": "1"})
    assert (rt.grad_accum_steps, rt.micro_batch_seqs, rt.compile) == (8, 8, torch.cuda.is_available())
    assert (h.grad_accum_steps, h.compile) == (0, "auto")


def test_rescoring_resolves_the_kernels_for_the_artifacts_model(monkeypatch, tmp_path):
    """Kernels are chosen for the model that is scored: on a (stand-in) Hopper GPU with Triton, auto fuses
    the MLP of a relu2 artifact but not that of a leaky_relu2 one, and an explicit MLP_KERNEL=triton is
    refused for the latter."""
    (tmp_path / "a.model.zst").write_bytes(b"stand-in: load_artifact is replaced below")
    monkeypatch.setattr(tg, "triton", object())
    monkeypatch.setattr(tg.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(tg, "build_byte_tables", lambda *a: None)
    monkeypatch.setattr(tg, "load_validation_tokens", lambda h: None)
    monkeypatch.setattr(tg, "check_artifact_tensors", lambda *a: None)
    built = []

    def build_model(h, kernels):
        built.append(kernels.mlp)
        raise RuntimeError("stop here")
    monkeypatch.setattr(tg, "build_model", build_model)
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cuda", 0), micro_batch_seqs=1, compile=False)
    for act, fused in (("relu2", "triton"), ("leaky_relu2", "torch")):
        monkeypatch.setattr(tg, "load_artifact", lambda path: ({}, {"mlp_act": act}))
        h = tiny_h(model_dim=64, eval_artifact=str(tmp_path / "a.model.zst"))
        lines = []
        with pytest.raises(RuntimeError, match="stop here"):
            tg.rescore(h, rt, lines.append)
        assert built[-1] == fused and f"MLP_ACT={act}" in lines[0] and lines[0].endswith(f"(mlp_kernel:{fused})")
        assert h.mlp_act == "relu2"  # this run's settings stay as given
    with pytest.raises(tg.ConfigError, match="MLP_KERNEL=triton needs a Hopper GPU and Triton 3.4 or later, MLP_ACT=relu2"):
        tg.rescore(tiny_h(mlp_kernel="triton", eval_artifact=str(tmp_path / "a.model.zst")), rt, lines.append)
