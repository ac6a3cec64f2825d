"""DOC_MASK's attention and LOSS_KERNEL=triton on a GPU, on synthetic tokens (no data needed): for every
attention backend that runs here, document_attention compiled (fullgraph, as in training) against the
masked attention in float32 (output and q/k/v gradients, a whole window and the scorer's last 64), then
its forward + backward time against plain causal attention at the record's shapes; the scoring forward
without autograd (checked and timed, and flex itself there); the fused soft-capped
cross-entropy against the compiled plain loss (value, gradient, time).

    python3 bench/docmask_check.py          # DOCS_MEAN=<tokens> sets the mean document length (default 600)
"""
import os, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

B, T, H, HKV, D, V = 48, 2048, 8, 4, 64, 1024
device = torch.device("cuda")
torch.manual_seed(0)


def tokens(rows: int, mean: float) -> torch.Tensor:
    """Rows of T tokens with BOS at the starts of documents of geometric lengths (mean `mean`)."""
    idx = torch.randint(2, V, (rows, T), device=device)
    idx[torch.rand(rows, T, device=device) < 1.0 / mean] = tg.BOS_ID
    return idx


def timed(fn, *args, reps: int = 20) -> float:
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / reps


def compiled_masked(backend: str, tail: int):
    """document_attention of `backend` over the last `tail` queries, with its mask built in the graph, compiled
    (fullgraph, as in the model): fn(q, k, v, idx)."""
    return torch.compile(lambda q, k, v, idx: tg.document_attention(q, k, v, backend, tg.document_mask(idx, tail, backend)),
                         fullgraph=True, dynamic=False)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


backends = ["sdpa", "flex"] + (["fa3"] if tg.fa3_varlen_attention is not None else []) + (["fa4"] if tg.fa4_interface is not None else [])
print(f"torch {torch.__version__} gpu {torch.cuda.get_device_name()} backends {backends} "
      f"(fa3 {'yes' if tg.fa3_attention is not None else 'no'}, fa3 varlen {'yes' if tg.fa3_varlen_attention is not None else 'no'}, "
      f"fa4 {tg.FA4_VERSION})")
mean = float(os.environ.get("DOCS_MEAN", 600))

# correctness, compiled as the training graph is
idx = tokens(4, mean)
for tail in (T, 64):
    q0, k0, v0 = (torch.randn(4, n, heads, D, device=device, dtype=torch.bfloat16)
                  for n, heads in ((tail, H), (T, HKV), (T, HKV)))
    grad = torch.randn(4, tail, H, D, device=device, dtype=torch.bfloat16)
    leaves = [t.float().requires_grad_() for t in (q0, k0, v0)]
    want = tg.document_attention(*leaves, "sdpa", tg.document_mask(idx, tail, "sdpa"))
    want_grads = torch.autograd.grad(want, leaves, grad.float())
    for backend in backends:
        fn = compiled_masked(backend, tail)
        leaves = [t.clone().requires_grad_() for t in (q0, k0, v0)]
        try:
            got = fn(*leaves, idx)
            grads = torch.autograd.grad(got, leaves, grad)
            print(f"check {backend} tail {tail}: out rel err {rel(got, want):.2e} grads "
                  + " ".join(f"{rel(g, w):.2e}" for g, w in zip(grads, want_grads)))
        except Exception as e:  # report and go on: the other backends still tell something
            print(f"check {backend} tail {tail}: FAILED {type(e).__name__}: {str(e)[:300]}")

# scoring: compiled without autograd, as the evaluator runs it (forward_backend: a flex model scores through
# sdpa's mask), checked and timed at the scorer's shapes (64 windows)
def scoring(backend: str, tail: int):
    """The compiled scoring attention of `backend` on 64 windows, and its relative error against float32 sdpa."""
    idx = tokens(64, mean)
    q, k, v = (torch.randn(64, n, heads, D, device=device, dtype=torch.bfloat16) for n, heads in ((tail, H), (T, HKV), (T, HKV)))
    fn = compiled_masked(backend, tail)
    want = tg.document_attention(q[:4].float(), k[:4].float(), v[:4].float(), "sdpa", tg.document_mask(idx[:4], tail, "sdpa"))
    return rel(fn(q, k, v, idx)[:4], want), timed(fn, q, k, v, idx)


with torch.no_grad():
    for backend in backends:
        for tail in (T, 64):
            try:
                err, ms = scoring(tg.forward_backend(backend), tail)
                print(f"scoring {backend} (as {tg.forward_backend(backend)}) tail {tail}: out rel err {err:.2e}, {ms:.2f} ms forward")
            except Exception as e:
                print(f"scoring {backend} tail {tail}: FAILED {type(e).__name__}: {str(e)[:300]}")

# time: forward + backward of attention at the record's shapes
idx = tokens(B, mean)
print(f"documents per row: {((idx == tg.BOS_ID).sum(1) + 1).float().mean().item():.1f} (mean length {mean:g})")
q, k, v = (torch.randn(B, T, heads, D, device=device, dtype=torch.bfloat16, requires_grad=True) for heads in (H, HKV, HKV))
grad = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
for backend in backends:
    plain = torch.compile(lambda q, k, v, idx, b=backend: tg.causal_attention(q, k, v, "sdpa" if b == "flex" else b), fullgraph=True)
    masked = compiled_masked(backend, T)
    for name, fn in (("causal", plain), ("doc_mask", masked)):
        try:
            ms = timed(lambda: torch.autograd.grad(fn(q, k, v, idx), (q, k, v), grad))
            print(f"time {backend} {name}: {ms:.2f} ms forward+backward (B={B} T={T})")
        except Exception as e:
            print(f"time {backend} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")

# the fused soft-capped cross-entropy against the compiled plain path
if tg.triton is not None:
    cap = 20.0
    z = (torch.randn(B * T, V, device=device) * 30).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (B * T,), device=device)
    plain = torch.compile(lambda z, t: F.cross_entropy(cap * torch.tanh(z.float() / cap), t), fullgraph=True)
    fused = torch.compile(lambda z, t: tg.softcap_ce(z, t, cap).mean(), fullgraph=True)
    results = [(f(z, targets), torch.autograd.grad(f(z, targets), z)[0]) for f in (plain, fused)]
    print(f"loss plain {results[0][0].item():.6f} fused {results[1][0].item():.6f}; gradient rel err {rel(results[1][1], results[0][1]):.2e}")
    for name, f in (("plain", plain), ("fused", fused)):
        ms = timed(lambda: torch.autograd.grad(f(z, targets), z))
        print(f"time loss {name}: {ms:.2f} ms forward+backward ({B * T} x {V})")

# last, as it may leave the CUDA context unusable: flex itself compiled without autograd, which failed on
# torch 2.11 (bench/RESULTS.md, "DOC_MASK on the GPU"); forward_backend routes around it while it fails
with torch.no_grad():
    try:
        err, ms = scoring("flex", T)
        print(f"scoring flex itself tail {T}: out rel err {err:.2e}, {ms:.2f} ms forward (forward_backend could keep flex)")
    except Exception as e:
        print(f"scoring flex itself tail {T}: FAILED {type(e).__name__}: {str(e)[:200]}")
