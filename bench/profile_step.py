"""Where the time of one step goes (bench/RESULTS.md, "Where a step's time goes"): phases with a sync after each, the heaviest CUDA kernels,
sliding-window evaluation throughput. Settings from the environment (defaults: the record configuration).

    DATA_PATH=... TOKENIZER_PATH=... python3 bench/profile_step.py
"""
import os, sys, time, torch
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_gpt as tg
h = tg.Hyperparameters.from_env(os.environ)
rt = tg.setup_runtime(h, os.environ)
model = tg.build_model(h, rt.kernels).to(rt.device)
routes = tg.route_parameters(model)
train_model = torch.compile(model, dynamic=False, fullgraph=True)
ortho = torch.compile(tg.newton_schulz, dynamic=False, fullgraph=True)
opt = tg.Optimizers(model, routes, h, rt, ortho)
avg = tg.WeightAverager(model, h)
loader = tg.TrainLoader(h, rt)
records = tg.StepRecords(rt)
def sync(): torch.cuda.synchronize()
phases = {k: 0.0 for k in ("data", "forward", "backward", "optimizer", "averaging", "records")}
def step(timed):
    t = time.perf_counter(); x, y = loader.next_batch()
    if timed: sync(); phases["data"] += time.perf_counter() - t
    for m in range(rt.grad_accum_steps):
        t = time.perf_counter()
        with tg.autocast(rt): loss = train_model(x[m], y[m])
        if timed: sync(); phases["forward"] += time.perf_counter() - t
        t = time.perf_counter(); (loss / rt.grad_accum_steps).backward()
        if timed: sync(); phases["backward"] += time.perf_counter() - t
    t = time.perf_counter(); opt.step(1.0, 0.95)
    if timed: sync(); phases["optimizer"] += time.perf_counter() - t
    t = time.perf_counter(); avg.update(1, 1.0)
    if timed: sync(); phases["averaging"] += time.perf_counter() - t
    t = time.perf_counter(); records.take(); records.post([loss, 1.0])  # as train(): the previous step's record
    if timed: phases["records"] += time.perf_counter() - t
t0 = time.perf_counter()
for _ in range(8): step(False)
sync(); print(f"compile+warmup {time.perf_counter() - t0:.0f}s", flush=True)
t0 = time.perf_counter()
for _ in range(10): step(False)
sync(); plain = (time.perf_counter() - t0) / 10 * 1000
for _ in range(5): step(True)
print(f"step (no extra syncs): {plain:.1f} ms")
print("phases with a sync after each (ms/step): " + "  ".join(f"{k}:{v / 5 * 1000:.1f}" for k, v in phases.items()), flush=True)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(2): step(False)
    sync()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70), flush=True)
# Sliding-window evaluation throughput on the first 2,048 windows' worth of validation tokens (256 gave wobbly figures)
val = tg.load_validation_tokens(h)[: 2048 * 64 + 2048 + 1]
tables = tg.build_byte_tables(h.tokenizer_path, h.vocab_size)
for b in (32, 64, 128):
    hb = tg.Hyperparameters(**{**tg.asdict(h), "eval_batch_seqs": b})
    ev = tg.Evaluator(model, hb, rt, val, tables)
    ev.score(sliding=True)
    _, bpb, ms = ev.score(sliding=True)
    print(f"sliding eval batch {b}: {(len(val) - 1) / ms * 1000:,.0f} scored tokens/s", flush=True)

