"""The optimiser step alone, record model, random gradients, on one GPU: Newton-Schulz compiled
plainly against compiled with CUDA graphs (mode "reduce-overhead"; training uses the first).
For each, twice in turn: the step's wall time (synchronised before and after), the CPU time until
step() returns (close to the wall time: the step is bound by launching kernels), Newton-Schulz's CPU
time per call for each bucket shape, and how far its output is from the uncompiled function.

    python3 bench/optimizer_step.py
"""
import os, sys, time, torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_gpt as tg

h = tg.Hyperparameters.from_env(os.environ)
rt = tg.setup_runtime(h, os.environ)
if rt.device.type != "cuda":
    raise SystemExit("needs a GPU: on the CPU there are no kernel launches to save")
model = tg.build_model(h, rt.kernels).to(rt.device)
params = list(model.parameters())
grads = [torch.randn_like(p) * 1e-3 for p in params]
median = lambda v: sorted(v)[len(v) // 2]


def fill() -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


for mode in ("default", "reduce-overhead") * 2:
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = 64
    ns = torch.compile(tg.newton_schulz, dynamic=False, fullgraph=True, mode=None if mode == "default" else mode)
    opt = tg.Optimizers(model, tg.route_parameters(model), h, rt, ns)
    for _ in range(10):
        fill()
        opt.step(1.0, 0.95)
    wall, cpu = [], []
    for _ in range(30):
        fill()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step(1.0, 0.95)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        cpu.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    per_call, error = [], []
    with torch.no_grad():  # as in Optimizers.step: grad mode is part of the compiled function's guard
        for bucket in opt.buckets:
            x = torch.randn(bucket.per_rank, *bucket.params[0].shape, device=rt.device)
            for _ in range(3):
                ns(x, h.muon_backend_steps)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                y = ns(x, h.muon_backend_steps)
            per_call.append((time.perf_counter() - t0) / 20 * 1e3)
            error.append((y.float() - tg.newton_schulz(x, h.muon_backend_steps).float()).abs().max().item())
    print(f"{mode}: step {median(wall):.2f} ms (median of 30), CPU until return {median(cpu):.2f} ms; "
          f"Newton-Schulz CPU per call by bucket {' '.join(f'{c:.3f}' for c in per_call)} ms, "
          f"max |output - uncompiled| {max(error):.1e}", flush=True)
