#!/usr/bin/env python3
"""The newcomer's run: on a CPU, with no GPU and no download, build the synthetic corpus and train a tiny model
with train_gpt.py end to end (training, averaging, quantized export, round trip, sliding-window score, test-time
training).

    python data/cpu_smoke_run.py

It builds data/datasets/synthetic_sp384/ and data/tokenizers/synthetic_384_bpe.model (if not there yet), runs
`python train_gpt.py` with the settings in TINY_RUN below, shows its output as it goes (the full log is
logs/<RUN_ID>.txt), and ends with the final record-format lines beside the entropy bound of the text: the lowest
val_bpb any model can reach on it (see data/synthetic.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from data import synthetic  # noqa: E402
from data.build_shards import DATA_DIR, exit_status  # noqa: E402
import train_gpt  # noqa: E402
from train_gpt import DataError  # noqa: E402

# A scaled-down record configuration (same features: GQA, XSA, BigramHash, EMA, quantized export), small enough to
# finish well inside 5 minutes on 2 CPU cores even when other programs slow them down several times over.
# Steps are counted, not timed (MAX_WALLCLOCK_SECONDS=0), so every machine runs the same computation and prints
# the same numbers. WARMUP_STEPS=0: the priming steps only matter for torch.compile, which is off.
TINY_MODEL = dict(NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, XSA_LAST_N=2, PARALLEL_RESID_START=3,
                  BIGRAM_VOCAB_SIZE=512, BIGRAM_DIM=32)
TINY_RUN = dict(ITERATIONS=150, TRAIN_BATCH_TOKENS=4096, TRAIN_SEQ_LEN=256, GRAD_ACCUM_STEPS=1, WARMUP_STEPS=0,
                WARMDOWN_ITERS=50, MAX_WALLCLOCK_SECONDS=0, EMA_DECAY=0.9,  # 0.997 averages over too many of 150 steps
                EVAL_SEQ_LEN=256, EVAL_STRIDE=64, EVAL_BATCH_SEQS=32, VAL_LOSS_EVERY=50, TRAIN_LOG_EVERY=25,
                COMPILE=0, SEED=1337)
FINAL_PREFIXES = ("final_quant_roundtrip", "final_quant_sliding_window", "final_ttt")


def train_gpt_env(data_dir: Path, tokenizer: Path, vocab_size: int, run_id: str, **settings) -> dict[str, str]:
    """The environment for one train_gpt.py run on a synthetic set: TINY_MODEL and TINY_RUN, then `settings`.
    Settings of train_gpt.py already in the environment are left out, so every machine runs the same thing."""
    values = {**TINY_MODEL, **TINY_RUN, **settings,
              "DATA_PATH": data_dir, "TOKENIZER_PATH": tokenizer, "VOCAB_SIZE": vocab_size, "RUN_ID": run_id}
    return {**train_gpt.without_settings(os.environ), **{k: str(v) for k, v in values.items()}}


def run_train_gpt(env: dict[str, str], cwd: Path, echo=True) -> list[str]:
    """Run train_gpt.py (logs/ goes under `cwd`), echo its output line by line, return the lines."""
    lines = []
    with subprocess.Popen([sys.executable, str(REPO_ROOT / "train_gpt.py")], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1) as child:
        for line in child.stdout:
            lines.append(line.rstrip("\n"))
            if echo:
                print(line, end="", flush=True)
    if child.returncode != 0:
        raise DataError(f"train_gpt.py stopped with exit status {child.returncode}; see the output above")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See data/README.md.")
    p.add_argument("--iterations", type=int, default=TINY_RUN["ITERATIONS"], help="training steps (default %(default)s)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the synthetic set even if it is there")
    args = p.parse_args(argv)

    started = time.time()
    vocab = synthetic.DEFAULT_VOCAB
    data_dir = DATA_DIR / "datasets" / f"synthetic_sp{vocab}"
    tokenizer = DATA_DIR / "tokenizers" / f"synthetic_{vocab}_bpe.model"

    def command():
        if args.rebuild or not (data_dir / "manifest.json").is_file() or not tokenizer.is_file():
            synthetic.build_synthetic(data_dir, tokenizer, train_docs=synthetic.DEFAULT_TRAIN_DOCS,
                                      val_docs=synthetic.DEFAULT_VAL_DOCS, overwrite=True)
        info = json.loads((data_dir / "manifest.json").read_text())["synthetic"]
        run_id = f"cpu_smoke_{time.strftime('%Y%m%d_%H%M%S')}"
        print(f"training: python train_gpt.py with {' '.join(f'{k}={v}' for k, v in TINY_MODEL.items())} "
              f"ITERATIONS={args.iterations} (RUN_ID={run_id})", flush=True)
        lines = run_train_gpt(train_gpt_env(data_dir, tokenizer, vocab, run_id, ITERATIONS=args.iterations), REPO_ROOT)
        print("\n" + "=" * 100)
        for line in lines:
            if line.startswith(FINAL_PREFIXES):
                print(line)
        print(f"entropy bound of the synthetic text: val_bpb >= {info['entropy_bits_per_byte']:.4f} "
              f"(the true process scores {info['val_true_model_bits_per_byte']:.4f} on this validation set)")
        print(f"log: logs/{run_id}.txt   total time (build + training + evaluation): {time.time() - started:.0f} s")
    return exit_status(command)

if __name__ == "__main__":
    sys.exit(main())
