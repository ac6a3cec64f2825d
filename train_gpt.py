"""Parameter Golf training script: one file, launched by torchrun, configured by environment variables.

    torchrun --standalone --nproc_per_node=8 train_gpt.py        # the default run (see README.md)
    EVAL_ARTIFACT=logs/<run>.model.zst torchrun ... train_gpt.py  # re-score a saved artifact

Pipeline: settings -> data -> metric -> model -> optimisers -> averaging -> quantisation/export
-> evaluation -> main. Every setting is one line of `Hyperparameters`.
"""

from __future__ import annotations

import difflib
import glob
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


# =============================================================================================
# Settings
# =============================================================================================

@dataclass
class Hyperparameters:
    """Each attribute is read once from the environment variable of the same name, upper-cased.
    The defaults are the 1.1271 record run (PR #287): 11 layers, XSA on the last 4, EMA 0.997."""

    # ---- data and run
    data_path: str = "./data/datasets/fineweb10B_sp1024"  # holds fineweb_{train,val}_*.bin
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = ""                 # names logs/<RUN_ID>.txt and logs/<RUN_ID>.model.zst; "" = time stamp
    seed: int = 1337
    eval_artifact: str = ""          # path of a saved artifact: score it on the validation set, no training

    # ---- model shape
    vocab_size: int = 1024           # must equal the tokenizer's vocabulary
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4            # grouped-query attention: num_heads must be a multiple
    mlp_mult: float = 3.0            # MLP hidden width = mlp_mult * model_dim
    mlp_act: str = "relu2"           # relu2 | leaky_relu2 (LeakyReLU(0.5)^2, PR #1125)
    logit_softcap: float = 30.0      # logits = c * tanh(z / c)
    # The records build rotary for a hard-coded length of 1024 and NTK-rescale the base at 2048, which
    # gives 10000 * 2**(64/62) = 20452; here the base is the one actually used, at every length.
    rope_base: float = 20452.0
    rope_dims: int = 0               # rotary on the first ROPE_DIMS dims of each head; 0 = all
    ln_scale: bool = False           # scale each block's normalised input by 1/sqrt(layer+1)
    qk_gain_init: float = 1.5        # initial per-head gain on the queries
    xsa_last_n: int = 4              # exclusive self attention on the last N blocks (0..NUM_LAYERS)
    bigram_vocab_size: int = 2048    # BigramHash rows; 0 = off
    bigram_dim: int = 128
    ve_layers: str = ""              # value embeddings added to v in these blocks, e.g. "9,10"; "" = off
    ve_dim: int = 128
    tied_embed_init_std: float = 0.005

    # ---- training schedule
    iterations: int = 9000
    train_batch_tokens: int = 786_432   # global tokens per step, over all ranks and micro-steps
    train_seq_len: int = 2048
    grad_accum_steps: int = 0        # micro-steps per rank; 0 = 8 // world size
    max_wallclock_seconds: float = 600.0  # training-time cap; 0 = none
    warmup_steps: int = 20           # compile-priming steps, undone before the clock starts
    warmdown_iters: int = 3000       # linear LR decay to 0 over the last N steps (in time, under a cap)
    grad_clip_norm: float = 0.3      # global gradient norm; 0 = off

    # ---- optimisers
    matrix_lr: float = 0.025         # Muon, block matrices
    scalar_lr: float = 0.025         # AdamW, vectors and scalars
    tied_embed_lr: float = 0.035     # AdamW, embeddings
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5      # Newton-Schulz iterations
    muon_wd: float = 0.04            # decoupled: p <- p * (1 - lr * wd)
    adam_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8

    # ---- weight averaging and late QAT
    weight_avg: str = "ema"          # ema | swa | none: what is loaded before export
    ema_decay: float = 0.997
    swa_every: int = 50              # steps between SWA snapshots ...
    swa_threshold: float = 0.5       # ... once the LR scale is below this (PR #265)
    late_qat_threshold: float = 0.0  # fake-quantise matrices once the LR scale is below this; 0 = off

    # ---- export
    attn_bits: int = 6               # per-row integer width of attention matrices
    mlp_bits: int = 6                # ... of MLP matrices
    embed_bits: int = 8              # ... of embedding tables

    # ---- evaluation and logging
    eval_seq_len: int = 2048
    eval_stride: int = 64            # sliding-window stride, the submission score
    eval_batch_seqs: int = 32        # windows per forward pass per rank
    val_loss_every: int = 4000       # steps between validations; 0 = only after the last step
    train_log_every: int = 100

    # ---- machine
    compile: str = "auto"            # auto (CUDA only) | 1 | 0
    attn_backend: str = "auto"       # auto (fa3 if importable, else sdpa) | fa3 | sdpa

    @classmethod
    def from_env(cls, environ) -> Hyperparameters:
        check_setting_names(environ)
        values = {}
        for f in fields(cls):
            raw = environ.get(f.name.upper())
            if raw is not None:
                values[f.name] = parse_setting(f.name.upper(), raw, f.type)
        values.update(resolve_legacy_settings(environ, values))
        h = cls(**values)
        h.validate()
        h.from_environment = frozenset(n for n in values)
        return h

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)
        choices = {"mlp_act": ("relu2", "leaky_relu2"), "weight_avg": ("ema", "swa", "none"),
                   "compile": ("auto", "1", "0"), "attn_backend": ("auto", "fa3", "sdpa")}
        for name, allowed in choices.items():
            need(getattr(self, name) in allowed, f"{name.upper()}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        need(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} is not a multiple of NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0, f"NUM_HEADS={self.num_heads} is not a multiple of NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        need(head_dim % 2 == 0, f"head dim {head_dim} (MODEL_DIM / NUM_HEADS) must be even for rotary")
        need(self.rope_dims % 2 == 0 and 0 <= self.rope_dims <= head_dim, f"ROPE_DIMS={self.rope_dims}: expected an even number in 0..{head_dim}")
        need(0 <= self.xsa_last_n <= self.num_layers, f"XSA_LAST_N={self.xsa_last_n}: expected 0..NUM_LAYERS={self.num_layers}")
        need(self.num_layers >= 1 and self.vocab_size >= 2, "NUM_LAYERS and VOCAB_SIZE must be positive")
        need(self.bigram_vocab_size == 0 or self.bigram_vocab_size >= 2, f"BIGRAM_VOCAB_SIZE={self.bigram_vocab_size}: expected 0 (off) or at least 2")
        for layer in self.value_embedding_layers():
            need(0 <= layer < self.num_layers, f"VE_LAYERS={self.ve_layers!r}: layer {layer} is outside 0..{self.num_layers - 1}")
        need(0 < self.eval_stride <= self.eval_seq_len, f"EVAL_STRIDE={self.eval_stride}: expected 1..EVAL_SEQ_LEN={self.eval_seq_len}")
        need(self.swa_every > 0, f"SWA_EVERY={self.swa_every}: expected a positive number of steps")
        need(0.0 <= self.ema_decay < 1.0, f"EMA_DECAY={self.ema_decay}: expected 0 <= decay < 1")
        for name in ("attn_bits", "mlp_bits", "embed_bits"):
            need(2 <= getattr(self, name) <= 8, f"{name.upper()}={getattr(self, name)}: expected 2..8")
        for name in ("iterations", "train_batch_tokens", "train_seq_len", "eval_seq_len", "eval_batch_seqs", "train_log_every"):
            need(getattr(self, name) > 0, f"{name.upper()}={getattr(self, name)}: expected a positive number")

    def value_embedding_layers(self) -> list[int]:
        try:
            return [int(s) for s in self.ve_layers.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"VE_LAYERS={self.ve_layers!r}: expected comma-separated layer numbers, e.g. 9,10") from None


class UserError(Exception):
    """A problem with the settings or the input files: reported as one line, exit status 2."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


# Settings of the record scripts that are spelled differently here. EMA_ENABLED / SWA_ENABLED work as
# written (mapped onto WEIGHT_AVG); the others stop the run with the setting to use instead.
LEGACY_SETTINGS = ("EMA_ENABLED", "SWA_ENABLED")
RETIRED_SETTINGS = {
    "TIE_EMBEDDINGS": "embeddings are always tied here; remove the setting",
    "EMBED_LR": "embeddings are always tied here; use TIED_EMBED_LR",
    "HEAD_LR": "embeddings are always tied here; there is no separate head",
    "QAT_ENABLED": "use LATE_QAT_THRESHOLD (LR scale below which fake quantisation starts; 0 = off)",
    "LEAKY_RELU": "use MLP_ACT=leaky_relu2",
    "VE_ENABLED": "use VE_LAYERS (e.g. VE_LAYERS=9,10; empty = off)",
    "LN_SCALE_ENABLED": "use LN_SCALE",
}
# First words of settings that are also common in unrelated environment variables (MAX_JOBS, ...).
GENERIC_PREFIXES = {"MAX", "DATA", "RUN", "MODEL", "NUM", "SEED", "COMPILE", "ITERATIONS", "WEIGHT", "GRAD"}


def setting_names() -> set[str]:
    return {f.name.upper() for f in fields(Hyperparameters)}


def check_setting_names(environ) -> None:
    """Stop on a variable that looks like a setting but is not one (a typo such as XSA_LAST=4)."""
    known = setting_names()
    accepted = known | set(LEGACY_SETTINGS)
    prefixes = {name.split("_")[0] + "_" for name in accepted} - {p + "_" for p in GENERIC_PREFIXES}
    for name in sorted(environ):
        if name in accepted:
            continue
        if name in RETIRED_SETTINGS:
            raise ConfigError(f"{name} is not a setting of this script: {RETIRED_SETTINGS[name]}")
        close = difflib.get_close_matches(name, sorted(accepted), n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"unknown setting {name}: did you mean {close[0]}? (see the settings table in README.md)")
        if any(name.startswith(p) for p in prefixes):
            raise ConfigError(f"unknown setting {name}: no setting has that name (see the settings table in README.md)")


def parse_setting(name: str, raw: str, kind: str):
    text = raw.strip()
    try:
        if kind == "bool":
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if kind == "int":
            number = float(text)  # accepts 786_432 and 1e3; rejects 2.5
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind == "float":
            return float(text)
        return raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {'0 or 1' if kind == 'bool' else 'a number' if kind == 'float' else 'an integer'}") from None


def resolve_legacy_settings(environ, values: dict) -> dict:
    """EMA_ENABLED / SWA_ENABLED (record scripts) -> WEIGHT_AVG; contradictions stop the run."""
    flags = {name: parse_setting(name, environ[name], "bool") for name in LEGACY_SETTINGS if name in environ}
    if not flags:
        return {}
    if flags.get("EMA_ENABLED") and flags.get("SWA_ENABLED"):
        raise ConfigError("EMA_ENABLED=1 and SWA_ENABLED=1: only one average can be exported; set WEIGHT_AVG=ema or WEIGHT_AVG=swa")
    if flags.get("EMA_ENABLED"):
        chosen = "ema"
    elif flags.get("SWA_ENABLED"):
        chosen = "swa"
    elif flags.get("EMA_ENABLED") is False and flags.get("SWA_ENABLED") is not True:
        chosen = "none"
    else:
        return {}
    if "weight_avg" in values and values["weight_avg"] != chosen:
        raise ConfigError(f"WEIGHT_AVG={values['weight_avg']} contradicts {', '.join(f'{k}={int(v)}' for k, v in flags.items())}")
    return {"weight_avg": chosen}


# =============================================================================================
# Data: token shards
# =============================================================================================

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
SHARD_TOKEN_DTYPE = np.dtype("<u2")
BOS_ID = 1


def read_shard_header(path) -> int:
    """Check a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: header magic {header[0]}, expected {SHARD_MAGIC} (not a token shard)")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: shard version {header[1]}, expected {SHARD_VERSION}")
    n_tokens = int(header[2])
    if n_tokens < 0 or np.any(header[3:] != 0):
        raise DataError(f"{path}: malformed header (token count {n_tokens}, words 3..255 must be zero)")
    expected = SHARD_HEADER_BYTES + SHARD_TOKEN_DTYPE.itemsize * n_tokens
    if size != expected:
        raise DataError(f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes (truncated or padded)")
    return n_tokens


def load_shard(path) -> np.ndarray:
    n_tokens = read_shard_header(path)
    return np.fromfile(path, dtype=SHARD_TOKEN_DTYPE, count=n_tokens, offset=SHARD_HEADER_BYTES)


def write_shard(path, tokens) -> None:
    """Write a shard atomically (temporary name, then rename)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(SHARD_TOKEN_DTYPE).max):
        raise DataError(f"{path}: token ids must be in 0..65535")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(SHARD_TOKEN_DTYPE).tobytes())
    os.replace(tmp, path)


def shard_files(pattern: str, what: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no {what} shards match {pattern} (set DATA_PATH; see data/README.md)")
    return files
