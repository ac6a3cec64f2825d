"""Throughput of score-first TTT on one GPU: the default model (random weights; the time does not depend on
them), a synthetic validation stream of documents whose lengths follow a geometric law of the given mean,
timed by TestTimeTraining.run after its prime(). Prints scored tokens per second for each TTT setting given.

    python bench/ttt_throughput.py TOKENS MEAN_DOC 'TTT_MODE=lora' 'TTT_MODE=lora TTT_PHASES=1' ...
"""
import os
import sys
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def main() -> None:
    n_tokens, mean_doc = int(sys.argv[1]), float(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    lengths = torch.distributions.Geometric(probs=torch.tensor(1 / mean_doc)).sample((int(3 * n_tokens / mean_doc),)).long() + 1
    lengths = lengths[:int((lengths.cumsum(0) < n_tokens).sum())]
    tokens = torch.randint(2, 1024, (int(lengths.sum()) + len(lengths),), generator=g)
    tokens[(lengths + 1).cumsum(0) - lengths - 1] = tg.BOS_ID
    tables = tg.ByteTables(torch.randint(1, 5, (1024,)), torch.rand(1024) < 0.5, torch.zeros(1024, dtype=torch.bool))
    for spec in sys.argv[3:]:
        env = dict(kv.split("=", 1) for kv in spec.split())
        h = tg.Hyperparameters.from_env(env)
        rt = tg.setup_runtime(h, {})
        model = tg.build_model(h, rt.kernels).to(rt.device)
        evaluator = tg.Evaluator(model, h, rt, tokens, tables)
        ttt = tg.TestTimeTraining(evaluator)
        primed = ttt.prime()
        loss, bpb, ms, documents = ttt.run()
        scored = int(documents[:, 1].sum())
        evaluator.prime()
        _, _, sliding_ms = evaluator.score(sliding=True)
        print(f"{spec}: {len(documents)} documents, {scored} targets in {ms:.0f} ms = {1000 * scored / ms:,.0f} scored tokens/s "
              f"(prime {primed:.1f}s); sliding evaluation {1000 * scored / sliding_ms:,.0f} tokens/s; loss {loss:.4f}; "
              f"peak {torch.cuda.max_memory_allocated() // 2**20 if torch.cuda.is_available() else 0} MiB", flush=True)


if __name__ == "__main__":
    main()
