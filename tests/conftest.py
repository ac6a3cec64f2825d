import contextlib
import gc
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import tiny_data  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(shard dir, tokenizer model) of the generated corpus in tests/tiny_data.py."""
    return tiny_data.build(tmp_path_factory.mktemp("tiny"))


# A model small enough for a CPU step in milliseconds; every test run starts from these settings.
TINY_SETTINGS = dict(
    VOCAB_SIZE=str(tiny_data.VOCAB_SIZE), NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
    XSA_LAST_N="1", PARALLEL_RESID_START="1", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64",
    EVAL_STRIDE="16", EVAL_BATCH_SEQS="8", TRAIN_BATCH_TOKENS="1024", ITERATIONS="20", WARMUP_STEPS="2",
    WARMDOWN_ITERS="10", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="5",
    MUON_MOMENTUM_WARMUP_STEPS="10", EMA_DECAY="0.9", COMPILE="0", TTT_MODE="off",
)


def run_script(cwd: Path, corpus, nproc: int = 1, timeout: int = 300, script: Path | None = None, args=(), **settings) -> subprocess.CompletedProcess:
    """Run train_gpt.py, or another form of it or a tool that runs it (`script`, with `args`), plainly or under
    torchrun with nproc processes, in `cwd`, with TINY_SETTINGS and `settings` (a setting given as None is left
    at the script's default)."""
    data, tokenizer = corpus
    import train_gpt
    env = train_gpt.without_settings(os.environ) | dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), OMP_NUM_THREADS="1") | TINY_SETTINGS
    env = {k: str(v) for k, v in (env | settings).items() if v is not None}
    script = str(script or REPO / "train_gpt.py")
    command = [sys.executable, script, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def gloo_ranks(rank: int, world_size: int, init_file: str, timeout_s: float = 1800):
    """A CPU process group for one rank of an mp.spawn test (a shorter timeout turns a hang into an error)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()
        gc.collect()  # as main() does: tensors freed at interpreter exit instead can abort gloo's teardown


@pytest.fixture
def run(tmp_path, tiny_corpus):
    def runner(nproc: int = 1, **settings):
        return run_script(tmp_path, tiny_corpus, nproc=nproc, **settings)
    runner.cwd = tmp_path
    return runner


FINAL_EXACT = ("final_quant_roundtrip_exact", "final_quant_sliding_window_exact")


def log_body(log: str) -> str:
    """A run log after its embedded source (which itself contains log-like text)."""
    return log.split("\n==== end of source ====\n", 1)[1]


def final_lines(text: str) -> list[str]:
    """The run's exact final lines (round trip, then sliding window)."""
    return [line for line in text.splitlines() if line.startswith(FINAL_EXACT)]


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory, tiny_corpus):
    """The final lines of the tiny run with the defaults, against which a setting's run is compared."""
    result = run_script(tmp_path_factory.mktemp("plain"), tiny_corpus, RUN_ID="plain")
    assert result.returncode == 0, result.stderr
    return final_lines(result.stdout)
