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


def uneven_quantisation_worker(rank, world_size, init_file, corpus, out_dir):
    """train() under a 2 s cap on two gloo ranks, where rank 1's first export quantisation (the one timed
    before the clock and reserved from the cap) takes 0.4 s longer than rank 0's."""
    with gloo_ranks(rank, world_size, init_file, timeout_s=60):  # a disagreement fails in a minute, not in 30
        torch.set_num_threads(1)
        data, tokenizer = corpus
        env = TINY_SETTINGS | dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), GRAD_ACCUM_STEPS="1",
                                   MAX_WALLCLOCK_SECONDS="2", ITERATIONS="100000", QUANT_METHOD="rtn", ATTN_BACKEND="sdpa")
        h = tg.Hyperparameters.from_env(env)
        rt = tg.Runtime(rank=rank, world_size=world_size, device=torch.device("cpu"),
                        micro_batch_seqs=h.train_batch_tokens // (world_size * h.train_seq_len), compile=False)
        quantize = tg.quantize_for_export
        if rank == 1:
            def slow_first_quantize(*args, **kwargs):
                tg.quantize_for_export = quantize
                time.sleep(0.4)
                return quantize(*args, **kwargs)
            tg.quantize_for_export = slow_first_quantize
        model = tg.build_model(h)
        evaluator = tg.Evaluator(model, h, rt, tg.load_validation_tokens(h), tg.build_byte_tables(h.tokenizer_path, h.vocab_size))
        log = tg.RunLog(out_dir / "run.txt", rt.master)
        tg.train(model, tg.route_parameters(model), evaluator, h, rt, log)
        log.close()


def test_ranks_stop_after_the_same_step_when_their_quantisation_times_differ(tmp_path, tiny_corpus):
    mp.spawn(uneven_quantisation_worker, args=(2, str(tmp_path / "init"), tiny_corpus, tmp_path), nprocs=2, join=True)
    log = (tmp_path / "run.txt").read_text()
    reserved = float(log.split("one export quantisation (")[1].split("ms")[0])
    assert reserved >= 400  # the slower rank's time
    assert "stopping_early: wallclock_cap" in log and "training_budget:" in log
