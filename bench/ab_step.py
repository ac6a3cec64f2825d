"""A/B of several copies of train_gpt.py (of this version or later: each runs its own train_step): step time and train_loss, 50 steps each, in one
process, same seed and batches (AB_STEPS to change); the record configuration unless the environment says otherwise.
Prints the mean step time after the first 10 steps, the peak memory, the largest relative train_loss
difference from the first copy, and the sliding-window evaluation throughput (64 windows per batch).

    DATA_PATH=... TOKENIZER_PATH=... python3 bench/ab_step.py /tmp/before.py train_gpt.py
"""
import importlib.util, os, sys, time, torch


def load(path: str, index: int):
    spec = importlib.util.spec_from_file_location(f"variant{index}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(tg, steps: int = int(os.environ.get("AB_STEPS", 50))):
    if steps <= 10:
        sys.exit(f"AB_STEPS={steps}: expected more than 10 (the first 10 steps are not timed)")
    torch._dynamo.reset()
    h = tg.Hyperparameters.from_env(os.environ)
    rt = tg.setup_runtime(h, os.environ)
    model = tg.build_model(h, rt.kernels).to(rt.device)
    compile_ = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if rt.compile else (lambda f: f)
    train_model = compile_(model)
    opt = tg.Optimizers(model, tg.route_parameters(model), h, rt, compile_(tg.newton_schulz))
    loader = tg.TrainLoader(h, rt)
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []  # tensors, read after the last step: as in train(), no step waits for the host
    for step in range(steps):
        if step == 10:
            tg.synchronize(rt)
            t0 = time.perf_counter()
        losses.append(tg.train_step(train_model, opt, loader.next_batch(), rt, 1.0, tg.muon_momentum_at(h, step)))
    tg.synchronize(rt)
    ms = (time.perf_counter() - t0) / (steps - 10) * 1000
    peak = torch.cuda.max_memory_allocated() // 2**20 if cuda else 0
    val = tg.load_validation_tokens(h)[: 2048 * 64 + h.eval_seq_len + 1]
    hb = tg.Hyperparameters(**{**tg.asdict(h), "eval_batch_seqs": 64})
    evaluator = tg.Evaluator(model, hb, rt, val, tg.build_byte_tables(h.tokenizer_path, h.vocab_size))
    evaluator.score(sliding=True)  # compile
    _, _, eval_ms = evaluator.score(sliding=True)
    return [v.item() for v in losses], ms, peak, (len(val) - 1) / eval_ms * 1000


results = []
for i, path in enumerate(sys.argv[1:]):
    losses, ms, peak, eval_rate = run(load(path, i))
    results.append(losses)
    print(f"{path}: {ms:.1f} ms/step (steps 11-{len(losses)}), peak {peak:,} MiB, sliding eval {eval_rate:,.0f} scored tokens/s", flush=True)
for path, losses in zip(sys.argv[2:], results[1:]):
    rel = [abs(a - b) / abs(a) for a, b in zip(results[0], losses)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    print(f"{path} vs {sys.argv[1]}: train_loss within {rel[worst]:.2%} over {len(rel)} steps (largest at step {worst + 1}); "
          f"step {len(rel)}: {losses[-1]:.4f} vs {results[0][-1]:.4f}")
for path, losses in zip(sys.argv[1:], results):
    print(path, " ".join(f"{v:.4f}" for v in losses))
