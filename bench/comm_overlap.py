"""How much of the optimiser's communication overlaps compute on several GPUs. Run under
torchrun; the record configuration's 786,432 tokens per step split over the ranks:

    DATA_PATH=... TOKENIZER_PATH=... torchrun --standalone --nproc_per_node=2 bench/comm_overlap.py

Rank 0 prints the mean step time, then profiles two steps and prints, from the CUDA kernel trace:
the NCCL kernels' total time, the part of it during which a non-NCCL kernel ran on another stream
(overlapped), and the optimiser's share of the step. An NCCL kernel's time includes its wait for
the other ranks. bench/RESULTS.md ("Several GPUs") gives its figures from two H200s.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of (union of a) intersected with (union of b)."""
    a, b, total, j = union(a), union(b), 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            total += min(end, b[k][1]) - max(start, b[k][0])
            k += 1
    return total


def nccl_overlap(trace: dict) -> tuple[float, float]:
    """(NCCL kernel time, the part of it overlapped by other kernels), in microseconds, from a Chrome trace."""
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    nccl = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if e["name"].lower().startswith("nccl")]
    other = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if not e["name"].lower().startswith("nccl")]
    return sum(end - start for start, end in union(nccl)), overlap(nccl, other)


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile
    import train_gpt as tg

    h = tg.Hyperparameters.from_env(os.environ)
    rt = tg.setup_runtime(h, os.environ)
    if not rt.distributed:
        raise SystemExit("run under torchrun with at least 2 processes")
    model = tg.build_model(h, rt.kernels).to(rt.device)
    train_model = torch.compile(model, dynamic=False, fullgraph=True)
    opt = tg.Optimizers(model, tg.route_parameters(model), h, rt, torch.compile(tg.newton_schulz, dynamic=False, fullgraph=True))
    loader = tg.TrainLoader(h, rt)
    opt_ms = []

    def step() -> None:
        tg.forward_backward(train_model, loader.next_batch(), rt)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step(1.0, 0.95)
        torch.cuda.synchronize()
        opt_ms.append((time.perf_counter() - t0) * 1000)

    for _ in range(5):
        step()
    dist.barrier()
    t0, opt_ms[:] = time.perf_counter(), []
    for _ in range(10):
        step()
    step_ms = (time.perf_counter() - t0) / 10 * 1000
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
    if rt.master:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            nccl_us, overlapped_us = nccl_overlap(json.loads(path.read_text()))
        print(f"world size {rt.world_size}, {rt.grad_accum_steps} micro-steps per rank: {step_ms:.1f} ms/step, "
              f"optimiser {sum(opt_ms) / len(opt_ms):.1f} ms of it (synchronised before and after)")
        print(f"NCCL kernels over 2 steps: {nccl_us / 1000:.2f} ms, of which {overlapped_us / 1000:.2f} ms "
              f"({overlapped_us / max(nccl_us, 1e-9):.0%}) ran beside compute kernels")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
