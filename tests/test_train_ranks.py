"""Ranks must take the same decisions (when to stop, which learning rate): a rank that stops while
another goes on waits for it in a collective forever."""
import time

import torch
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import TINY_SETTINGS, gloo_ranks


def agreement_worker(rank, world_size, init_file, out_file):
    with gloo_ranks(rank, world_size, init_file):
        rt = tg.Runtime(rank=rank, world_size=world_size, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
        records = tg.StepRecords(rt)
        records.post([torch.tensor(float(rank)), 100.0 + 10 * rank])
        torch.save([tg.rank_max(1000.0 + rank, rt), records.take()], f"{out_file}.{rank}")


def test_rank_max_and_step_records_give_every_rank_the_same_figures(tmp_path):
    mp.spawn(agreement_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    results = [torch.load(f"{tmp_path / 'out'}.{rank}") for rank in range(2)]
    assert results[0] == results[1] == [1001.0, [0.5, 105.0]]


def slow_quantization_worker(rank, world_size, init_file, corpus, out_dir, delays_s):
    """train() under a 2 s cap on two gloo ranks, where rank 1's export quantizations (two timed before
    the clock and reserved from the cap, then the export itself) each take delays_s[i] longer than
    rank 0's. Saves the RunError message each rank raised, or None."""
    with gloo_ranks(rank, world_size, init_file, timeout_s=60):  # a disagreement fails in a minute, not in 30
        torch.set_num_threads(1)
        data, tokenizer = corpus
        env = TINY_SETTINGS | dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), GRAD_ACCUM_STEPS="1",
                                   MAX_WALLCLOCK_SECONDS="2", ITERATIONS="100000", QUANT_METHOD="rtn", ATTN_BACKEND="sdpa")
        h = tg.Hyperparameters.from_env(env)
        rt = tg.Runtime(rank=rank, world_size=world_size, device=torch.device("cpu"),
                        micro_batch_seqs=h.train_batch_tokens // (world_size * h.train_seq_len), compile=False)
        quantize, calls = tg.quantize_for_export, []
        if rank == 1:
            def slow_quantize(*args, **kwargs):
                time.sleep(delays_s[len(calls)])
                calls.append(1)
                return quantize(*args, **kwargs)
            tg.quantize_for_export = slow_quantize
        model = tg.build_model(h)
        evaluator = tg.Evaluator(model, h, rt, tg.load_validation_tokens(h), tg.build_byte_tables(h.tokenizer_path, h.vocab_size))
        log = tg.RunLog(out_dir / "run.txt", rt.master)
        try:
            tg.train(model, tg.route_parameters(model), evaluator, h, rt, log)
            error = None
        except tg.RunError as e:
            error = str(e)
        log.close()
        torch.save(error, out_dir / f"error.{rank}")


def run_two_ranks(tmp_path, corpus, delays_s) -> tuple[str, list]:
    mp.spawn(slow_quantization_worker, args=(2, str(tmp_path / "init"), corpus, tmp_path, delays_s), nprocs=2, join=True)
    return (tmp_path / "run.txt").read_text(), [torch.load(tmp_path / f"error.{rank}") for rank in range(2)]


def test_ranks_stop_after_the_same_step_when_their_quantization_times_differ(tmp_path, tiny_corpus):
    log, errors = run_two_ranks(tmp_path, tiny_corpus, [0.4, 0.4, 0.4])
    reserved = float(log.split("reserved:")[1].split("ms")[0])
    assert reserved >= 400  # the slower rank's time
    assert "stopping_early: wallclock_cap" in log and "training_budget:" in log
    assert errors == [None, None]


def test_every_rank_fails_when_one_goes_over_the_cap(tmp_path, tiny_corpus):
    """Rank 1's export quantization takes 2.5 s more than it did before the clock: only its own total is over
    the 2 s cap, but both ranks must stop with the error (a rank that carried on would wait for the other)."""
    log, errors = run_two_ranks(tmp_path, tiny_corpus, [0.0, 0.0, 2.5])
    assert all(e and e.startswith("training and export quantization took") for e in errors), errors
    total = int(log.split("training_budget: ")[1].split("total:")[1].split("ms")[0])
    assert total > 2000
