"""Run by test_train_model.py under TRITON_INTERPRET=1 (Triton's CPU interpreter, float32): the fused
relu^2 MLP kernel, the q/k norm-rotary kernel, the XSA kernel and the soft-capped cross-entropy kernel
against the plain paths, each custom op through torch.library.opcheck, and each fused path also compiled
through AOT autograd (the fakes and the autograd registration as torch.compile uses them). Exits non-zero
on the first mismatch."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def close(name, got, want):
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-5, f"{name}: relative error {err:.2e}"


def compiled(fn):
    """fn under torch.compile with AOT autograd and no code generation, and the golf ops that its forward and
    its backward graphs call (a custom op stays one call in them: inductor would see the same)."""
    ops = {"forward": set(), "backward": set()}

    def graph_ops(part):
        def compiler(gm, example_inputs):
            ops[part] |= {str(n.target) for n in gm.graph.nodes if str(n.target).startswith("golf.")}
            return make_boxed_func(gm.forward)
        return compiler
    backend = aot_autograd(fw_compiler=graph_ops("forward"), bw_compiler=graph_ops("backward"))
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False), ops


def graphs_of(op):
    """What compiled() records for a fused path that is the custom op pair golf::op, golf::op_backward."""
    return {"forward": {f"golf.{op}.default"}, "backward": {f"golf.{op}_backward.default"}}


torch.manual_seed(0)
# M not a multiple of the 128-row tile, N under one 256-column tile or over several, K over one 64-deep block
for M, K, N in [(210, 64, 192), (7, 16, 24), (300, 96, 520)]:
    x = torch.randn(M, K, requires_grad=True)
    w_fc, w_proj = (torch.randn(N, K) * K ** -0.5).requires_grad_(), (torch.randn(K, N) * N ** -0.5).requires_grad_()
    grad = torch.randn(M, K)
    fused = lambda x, a, b: tg.relu2_mlp(x, a, b)[0]  # noqa: E731
    fused_compiled, ops = compiled(fused)
    results = []
    for mlp in (lambda x, a, b: torch.relu(x @ a.T).square() @ b.T, fused, fused_compiled):
        y = mlp(x, w_fc, w_proj)
        results.append([y, *torch.autograd.grad(y, (x, w_fc, w_proj), grad)])
    for name, want, got, got_compiled in zip(("y", "dx", "dw_fc", "dw_proj"), *results):
        close(f"{name} at {(M, K, N)}", got, want)
        close(f"compiled {name} at {(M, K, N)}", got_compiled, want)
    assert ops == graphs_of("relu2_mlp"), ops

# The q/k kernel against Rotary(rms_norm(x)) * gain: full and partial rotary (channels passed through,
# widths that are not powers of 2), with and without the gain, from position 0 or a later one (the
# scorer's last block), rows not a multiple of the kernel's 16.
for B, T, H, D, dims, start, with_gain in [(2, 5, 3, 8, 0, 0, True), (1, 7, 2, 24, 12, 3, False), (3, 9, 4, 16, 4, 2, True)]:
    rotary = tg.Rotary(tg.Hyperparameters(model_dim=H * D, num_heads=H, num_kv_heads=H, rope_dims=dims, train_seq_len=16, eval_seq_len=16))
    x = torch.randn(B, T, H, D, requires_grad=True)
    gain = torch.randn(H, requires_grad=True) if with_gain else None
    grad = torch.randn(B, T, H, D)
    fused = lambda x, g: tg.norm_rotary(x, g, rotary.cos, rotary.sin, start)  # noqa: E731
    fused_compiled, ops = compiled(fused)
    results = []
    for path in (lambda x, g: rotary(tg.rms_norm(x), start) * (g[:, None] if g is not None else 1), fused, fused_compiled):
        y = path(x, gain)
        results.append([y, *torch.autograd.grad(y, [x] + ([gain] if with_gain else []), grad)])
    for name, want, got, got_compiled in zip(("y", "dx", "dgain"), *results):
        close(f"norm-rotary {name} at {(B, T, H, D, dims, start)}", got, want)
        close(f"compiled norm-rotary {name} at {(B, T, H, D, dims, start)}", got_compiled, want)
    assert ops == graphs_of("norm_rotary"), ops

# The XSA kernel against exclusive_self_attention: query heads per kv head 1, 2 and 3, head widths not
# powers of 2, rows not a multiple of the kernel's 16.
for B, T, H, Hkv, D in [(2, 5, 4, 2, 8), (1, 7, 6, 2, 12), (3, 4, 3, 3, 16)]:
    y, v = torch.randn(B, T, H, D, requires_grad=True), torch.randn(B, T, Hkv, D, requires_grad=True)
    grad = torch.randn(B, T, H, D)
    fused_compiled, ops = compiled(lambda y, v: tg.xsa(y, v))
    results = []
    for xsa in (tg.exclusive_self_attention, tg.xsa, fused_compiled):
        out = xsa(y, v)
        results.append([out, *torch.autograd.grad(out, (y, v), grad)])
    for name, want, got, got_compiled in zip(("out", "dy", "dv"), *results):
        close(f"xsa {name} at {(B, T, H, Hkv, D)}", got, want)
        close(f"compiled xsa {name} at {(B, T, H, Hkv, D)}", got_compiled, want)
    assert ops == graphs_of("xsa"), ops

# The soft-capped cross-entropy kernel against F.cross_entropy(cap * tanh(z / cap)): vocabularies under,
# at and over a power of 2, logits far into the cap's saturation (|z| up to 8 caps), an upstream
# gradient that differs by row (as a reduction other than the mean would give).
for rows, V, cap, spread in [(7, 96, 20.0, 4.0), (5, 128, 30.0, 1.0), (3, 1000, 5.0, 40.0)]:
    z = (torch.randn(rows, V) * spread).requires_grad_()
    targets = torch.randint(0, V, (rows,))
    grad = torch.rand(rows) + 0.5
    fused = lambda z: tg.softcap_ce(z, targets, cap)  # noqa: E731
    fused_compiled, ops = compiled(fused)
    results = []
    for ce in (lambda z: F.cross_entropy(cap * torch.tanh(z / cap), targets, reduction="none"), fused, fused_compiled):
        loss = ce(z)
        results.append([loss, *torch.autograd.grad(loss, z, grad)])
    for name, want, got, got_compiled in zip(("loss", "dz"), *results):
        close(f"softcap cross-entropy {name} at {(rows, V, cap, spread)}", got, want)
        close(f"compiled softcap cross-entropy {name} at {(rows, V, cap, spread)}", got_compiled, want)
    assert ops == graphs_of("softcap_ce"), ops

# Each custom op through torch.library.opcheck: its schema, its fake against the op's outputs, its autograd
# registration, and AOT autograd with dynamic shapes (small inputs: each op runs several times), with and
# without the gain.
rotary = tg.Rotary(tg.Hyperparameters(model_dim=36, num_heads=3, num_kv_heads=3, rope_dims=8, train_seq_len=16, eval_seq_len=16))
x, gain = torch.randn(2, 5, 3, 12, requires_grad=True), torch.randn(3, requires_grad=True)
y, v = torch.randn(2, 5, 4, 8, requires_grad=True), torch.randn(2, 5, 2, 8, requires_grad=True)
mlp = [torch.randn(7, 16, requires_grad=True), torch.randn(24, 16, requires_grad=True), torch.randn(16, 24, requires_grad=True)]
z, targets = torch.randn(5, 96, requires_grad=True), torch.randint(0, 96, (5,))
golf = torch.ops.golf
for op, args in [(golf.norm_rotary, (x, gain, rotary.cos, rotary.sin, 2)), (golf.norm_rotary, (x, None, rotary.cos, rotary.sin, 0)),
                 (golf.norm_rotary_backward, (torch.randn_like(x), x.detach(), gain.detach(), rotary.cos, rotary.sin, 2)),
                 (golf.norm_rotary_backward, (torch.randn_like(x), x.detach(), None, rotary.cos, rotary.sin, 0)),
                 (golf.xsa, (y, v)), (golf.xsa_backward, (torch.randn_like(y), y.detach(), v.detach())),
                 (golf.relu2_mlp, mlp), (golf.relu2_mlp_backward, (torch.randn(7, 16), *(t.detach() for t in mlp),
                                                                 tg.relu2_mlp(*mlp)[1].detach())),
                 (golf.softcap_ce, (z, targets, 20.0)), (golf.softcap_ce_backward, (torch.rand(5), z.detach(), targets, 20.0))]:
    torch.library.opcheck(op.default, args)  # raises at the first test that fails

# The whole model, late QAT on: the loss, every gradient, and GPTQ's Hessians (the fused MLP runs its
# plain path beside it for the hooks of fc and proj). MODEL_DIM 256 makes the MLP matrices large enough to be
# exported as integers, so that they have Hessians.
h = dict(vocab_size=96, num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2, bigram_vocab_size=32, bigram_dim=16,
         train_seq_len=32, eval_seq_len=32, xsa_last_n=1, late_qat_threshold=0.5)
plain, fused = (tg.build_model(tg.Hyperparameters(**h), tg.Kernels(mlp=kernel, qk=kernel, xsa=kernel, loss=kernel))
                for kernel in ("torch", "triton"))
with torch.no_grad():
    for p in plain.parameters():  # away from the zero-initialised projections, which would hide gradients
        p.add_(torch.randn_like(p) * 0.02)
fused.load_state_dict(plain.state_dict())
for model in (plain, fused):
    assert tg.set_late_qat(model, True) > 0
idx = torch.randint(0, 96, (3, 33))
losses = [model(idx[:, :-1], idx[:, 1:]) for model in (plain, fused)]
close("loss", losses[1].detach().reshape(1), losses[0].detach().reshape(1))
for loss in losses:
    loss.backward()
for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
    close(f"gradient of {name}", q.grad, p.grad)
with torch.no_grad():  # the scorer's path: the last block computes only the last positions
    close("token_nll of the last 5", fused.token_nll(idx[:, :-1], idx[:, 1:], 5), plain.token_nll(idx[:, :-1], idx[:, 1:], 5))
rt = tg.Runtime(0, 1, torch.device("cpu"), 3, False)
batches = [(idx[None, :, :-1], idx[None, :, 1:])]
hessians = [tg.collect_hessians(model, batches, tg.Hyperparameters(**h), rt) for model in (plain, fused)]
assert any(".mlp." in name for name in hessians[0]), sorted(hessians[0])
for name, H in hessians[0].items():
    close(f"Hessian of {name}", hessians[1][name], H)
assert not any(m._forward_pre_hooks or m._forward_hooks for m in fused.modules()), "collect_hessians left a hook behind"
print("triton kernels: all checks passed")
