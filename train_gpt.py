"""Parameter Golf training script: one file, launched by torchrun, configured by environment variables.

    torchrun --standalone --nproc_per_node=8 train_gpt.py        # the default run (see README.md)
    EVAL_ARTIFACT=logs/<run>.model.zst torchrun ... train_gpt.py  # re-score a saved artifact

Pipeline: settings -> data -> metric -> model -> optimisers -> averaging -> quantization/export
-> evaluation -> main. Every setting is one line of `Hyperparameters`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import difflib
import functools
import gc
import glob
import json
import math
import os
import platform
import re
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, NamedTuple

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
    The defaults are the 1.1271 record run (PR #287: 11 layers, XSA on the last 4, EMA 0.997) except
    where measured better (bench/RESULTS.md): the sp4096 vocabulary (sp1024), LOGIT_SOFTCAP 20 (30),
    QK_GAIN_INIT 4.0 (1.5), RESIDUAL_DTYPE bf16 (fp32), PARALLEL_RESID_START 7 (off: blocks 7-10 run
    attention and MLP in parallel), the export: GPTQ with int5 block matrices (int6 with a clip search)
    and GPTQ int6 embeddings (int8 round to nearest), and the evaluation: score-first TTT with LoRA
    adapters (TTT_MODE lora, TTT_LR 0.003, TTT_CONTEXT stream, TTT_LORA_TARGETS all six projections);
    ROPE_BASE is the record's effective base at 2048, written out."""

    # ---- data and run
    data_path: str = "./data/datasets/fineweb10B_sp4096"  # holds fineweb_{train,val}_*.bin
    tokenizer_path: str = "./data/tokenizers/fineweb_4096_bpe.model"  # SentencePiece model of the shards
    run_id: str = ""                 # names logs/<RUN_ID>.txt and logs/<RUN_ID>.model.zst; "" = time stamp
    seed: int = 1337                 # model initialisation
    eval_artifact: str = ""          # path of a saved artifact: score it on the validation set, no training

    # ---- model shape
    vocab_size: int = 4096           # must equal the tokenizer's vocabulary
    num_layers: int = 11             # transformer blocks (at least 2: U-Net encoder and decoder)
    model_dim: int = 512             # residual width
    num_heads: int = 8               # query heads; head dim = MODEL_DIM / NUM_HEADS
    num_kv_heads: int = 4            # grouped-query attention: num_heads must be a multiple
    mlp_mult: float = 3.0            # MLP hidden width = mlp_mult * model_dim
    mlp_act: str = "relu2"           # relu2 | leaky_relu2 (LeakyReLU(0.5)^2, PR #1125)
    logit_softcap: float = 20.0      # logits = c * tanh(z / c) (1.1271 record: 30; 20 from PR #1125 and the proxy)
    # The records build rotary for a hard-coded length of 1024 and NTK-rescale the base at 2048, which
    # gives 10000 * 2**(64/62) = 20452; here the base is the one actually used, at every length.
    rope_base: float = 20452.0       # rotary base, the one actually used (see above)
    rope_dims: int = 0               # rotary on the first ROPE_DIMS dims of each head; 0 = all
    ln_scale: bool = False           # scale each block's normalised input by 1/sqrt(layer+1)
    xsa_last_n: int = 4              # exclusive self attention on the last N blocks (0..NUM_LAYERS)
    bigram_vocab_size: int = 2048    # BigramHash rows; 0 = off
    bigram_dim: int = 128            # width of a BigramHash row
    ve_layers: str = ""              # value embeddings added to v in these blocks, e.g. "9,10"; "" = off
    ve_dim: int = 128                # width of a value-embedding row
    residual_dtype: str = "bf16"     # bf16 | fp32 (the records): the residual stream under CUDA autocast
    doc_mask: bool = False           # attention, SmearGate, BigramHash stop at each BOS (docs/DOC_MASK.md)
    # Structure of the later records, off by default (docs/MODEL.md):
    recur_layers: str = ""           # blocks run again after their first pass, e.g. "4,5"
    recur_repeats: int = 1           # extra passes of RECUR_LAYERS (shared weights)
    parallel_resid_start: int = 7    # attn and MLP read one input from this block; 0 = off
    parallel_resid_lanes: int = 1    # 1 | 2: from PARALLEL_RESID_START, attn and MLP each read a lane of their own
    attn_gate: str = "off"           # off | head (per-head output gate) | sparse (12 inputs)
    smear_gate: str = "fixed"        # fixed (per channel) | input (shifted by x_t)

    # ---- initialisation
    qk_gain_init: float = 4.0        # initial per-head query gain (1.1271 record: 1.5; 4.0 from PR #1125 and the proxy)
    tied_embed_init_std: float = 0.005  # init std of the tied embedding

    # ---- training schedule
    iterations: int = 9000           # step limit; the time cap usually ends training first
    train_batch_tokens: int = 786_432   # global tokens per step, over all ranks and micro-steps
    train_seq_len: int = 2048        # tokens per training sequence
    grad_accum_steps: int = 0        # micro-steps per rank; 0 = 8 // world size
    max_wallclock_seconds: float = 600.0  # training-time cap; 0 = none
    warmup_steps: int = 20           # compile-priming steps, undone before the clock starts
    warmdown_iters: int = 3000       # linear LR decay to 0 over the last N steps (in time, under a cap)
    grad_clip_norm: float = 0.3      # global gradient norm; 0 = off
    recur_start: float = 0.0         # fraction of training before the RECUR_LAYERS repeats start

    # ---- optimisers
    matrix_lr: float = 0.025         # Muon, block matrices
    scalar_lr: float = 0.025         # AdamW, vectors and scalars
    tied_embed_lr: float = 0.035     # AdamW, embeddings
    muon_momentum: float = 0.99      # after the warm-up
    muon_momentum_warmup_start: float = 0.92  # at step 0, then linear ...
    muon_momentum_warmup_steps: int = 1500    # ... over this many steps
    muon_backend_steps: int = 5      # Newton-Schulz iterations
    muon_wd: float = 0.04            # decoupled: p <- p * (1 - lr * wd)
    adam_wd: float = 0.04            # decoupled, every AdamW group
    beta1: float = 0.9               # AdamW
    beta2: float = 0.95              # AdamW
    adam_eps: float = 1e-8           # AdamW

    # ---- optimiser and schedule variants (docs/OPTIM.md)
    muon_row_norm: bool = False      # MuonEq-R: unit rows before Newton-Schulz
    muon_ns: str = "ns5"             # ns5 (one quintic) | polar (Polar Express)
    min_lr: float = 0.0              # floor of the LR scale; 0 = none
    wd_taper: str = ""               # MULT@START: Muon WD x1 -> xMULT, e.g. 0.5@0.7
    train_seq_schedule: str = ""     # LEN@FRACTION,...: e.g. 1024@0,2048@0.3,3072@0.7

    # ---- weight averaging and late QAT
    weight_avg: str = "ema"          # ema | swa | none: what is loaded before export
    ema_decay: float = 0.997         # shadow <- decay * shadow + (1 - decay) * weights, every step
    swa_every: int = 50              # steps between SWA snapshots ...
    swa_threshold: float = 0.5       # ... once the LR scale is below this (PR #265)
    late_qat_threshold: float = 0.0  # fake-quantize matrices once the LR scale is below it; 0 = off

    # ---- export
    # int5 with GPTQ: int6 everywhere does not fit the cap (bench/RESULTS.md, "The export"); int6 GPTQ
    # embeddings: sp4096's 4096 x 512 table at int8 does not either (sp1024 fits it: EMBED_BITS=8 GPTQ_EMBED=0)
    attn_bits: int = 5               # per-row integer width of attention matrices
    mlp_bits: int = 5                # ... of MLP matrices
    embed_bits: int = 6              # ... of embedding tables
    quant_method: str = "gptq"       # rtn (row max) | gptq_lite (best clip a row) | gptq (+ Hessian rounding)
    gptq_calib_batches: int = 1      # training batches (of TRAIN_BATCH_TOKENS) for GPTQ's Hessians
    gptq_damp: float = 0.01          # GPTQ damping, times the mean Hessian diagonal
    gptq_embed: bool = True          # GPTQ for the embedding tables too (docs/EXPORT.md)
    target_bytes: int = 16_000_000   # artifact + code; quantized +-1 values are zeroed until it fits

    # ---- export techniques of the later records (docs/EXPORT.md), off until measured
    clip: str = "search"             # row clip: search (QUANT_METHOD's) | std (k x row std)
    clip_std_k_attn: float = 12.85   # CLIP=std: attention (and side-projection) k
    clip_std_k_mlp: float = 12.85    # CLIP=std: MLP k
    clip_std_k_embed: float = 20.0   # CLIP=std: embedding k
    attn_layer_bits: str = ""        # ATTN_BITS per block, e.g. 5,5,6,...; "" = ATTN_BITS
    mlp_layer_bits: str = ""         # MLP_BITS per block; "" = MLP_BITS
    lqer_rank: int = 0               # low-rank correction of the rounding error; 0 = off
    lqer_tensors: int = 3            # ... of this many most damaged block matrices
    lqer_bits: int = 8               # ... its factors' per-row integer width
    calib: str = "train"             # GPTQ calibration: train | self (sampled, after clock)
    fit_method: str = "ones"         # fit by: ones (zero +-1 values) | cheapest (+ whole tensors)

    # ---- evaluation and logging
    eval_seq_len: int = 2048         # evaluation window
    eval_stride: int = 64            # sliding-window stride, the submission score
    eval_batch_seqs: int = 64        # windows per forward pass per rank
    val_loss_every: int = 4000       # steps between validations; 0 = only after the last step
    train_log_every: int = 100       # steps between train_loss lines (steps 1-10 always)
    eval_doc_scores: str = ""        # CSV of per-document scores of the scored evaluation; "" = none

    # ---- test-time training (docs/TTT.md): score first, then adapt
    ttt_mode: str = "lora"           # off | lora (per-document adapters) | sgd (global phases)
    ttt_chunk: int = 256             # targets scored, then adapted on, at a time in a document
    ttt_lr: float = 0.003            # adapter learning rate
    ttt_epochs: int = 1              # adapter steps on each scored chunk
    ttt_optimizer: str = "adam"      # adam | sgd: the adapters' optimiser
    ttt_lora_rank: int = 8           # rank of each adapter
    ttt_lora_targets: str = "q,k,v,o,fc,proj"  # adapted projections of every block, of q,k,v,o,fc,proj
    ttt_batch_docs: int = 16         # documents scored (and adapted) side by side on a rank
    ttt_context: str = "stream"      # document | stream: windows also read the text before a BOS
    ttt_phases: int = 0              # global SGD phases on the documents scored so far
    ttt_global_lr: float = 0.002     # SGD (momentum 0.9) on all weights after a phase
    ttt_global_epochs: int = 1       # passes over a phase's documents
    ttt_global_batch: int = 64       # sequences per global SGD step, over all ranks

    # ---- machine
    compile: str = "auto"            # auto (CUDA only) | 1 | 0
    attn_backend: str = "auto"       # auto (fa3, fa4, flex or sdpa) | fa3 | fa4 | flex | sdpa
    mlp_kernel: str = "auto"         # auto (triton on Hopper with MLP_ACT=relu2) | triton | torch
    qk_kernel: str = "auto"          # q/k RMSNorm, rotary, gain: auto (triton on Hopper) | triton | torch
    xsa_kernel: str = "auto"         # exclusive self attention: auto (triton on Hopper) | triton | torch
    loss_kernel: str = "torch"       # training loss: torch | triton (fused soft cap + CE) | auto

    from_environment = frozenset()   # (not a setting) the names set in the environment, see from_env

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
        h.check_unread(values)
        h.from_environment = frozenset(n for n in values)
        return h

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)
        for f in fields(self):
            value = getattr(self, f.name)
            need(f.type != "float" or math.isfinite(value), f"{f.name.upper()}={value}: expected a finite number")
        for names, ok, expected in SETTING_RANGES:
            for name in names:
                value = getattr(self, name)
                need(ok(value), f"{name.upper()}={value}: expected {expected}")
        need(int(self.mlp_mult * self.model_dim) >= 1, f"MLP_MULT={self.mlp_mult}: expected MLP_MULT * MODEL_DIM >= 1 (the MLP hidden width)")
        need(1 <= self.target_bytes <= SIZE_CAP_BYTES, f"TARGET_BYTES={self.target_bytes}: expected 1..{SIZE_CAP_BYTES} (the size cap)")
        choices = {"mlp_act": ("relu2", "leaky_relu2"), "residual_dtype": ("bf16", "fp32"), "weight_avg": ("ema", "swa", "none"), "quant_method": ("rtn", "gptq_lite", "gptq"),
                   "clip": ("search", "std"), "calib": ("train", "self"), "fit_method": ("ones", "cheapest"),
                   "compile": ("auto", "1", "0"), "attn_backend": ("auto", "fa3", "fa4", "flex", "sdpa"),
                   "mlp_kernel": ("auto", "triton", "torch"), "qk_kernel": ("auto", "triton", "torch"),
                   "xsa_kernel": ("auto", "triton", "torch"), "loss_kernel": ("auto", "triton", "torch"),
                   "attn_gate": ("off", "head", "sparse"), "smear_gate": ("fixed", "input"),
                   "ttt_mode": ("off", "lora", "sgd"), "ttt_optimizer": ("adam", "sgd"),
                   "ttt_context": ("document", "stream")}
        for name, allowed in choices.items():
            need(getattr(self, name) in allowed, f"{name.upper()}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        need(self.attn_backend != "flex" or self.doc_mask, "ATTN_BACKEND=flex needs DOC_MASK=1 (plain causal attention: use sdpa, fa3 or fa4)")
        need(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} is not a multiple of NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0, f"NUM_HEADS={self.num_heads} is not a multiple of NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.head_dim
        need(head_dim % 2 == 0, f"head dim {head_dim} (MODEL_DIM / NUM_HEADS) must be even for rotary")
        need(self.rope_dims % 2 == 0 and 0 <= self.rope_dims <= head_dim, f"ROPE_DIMS={self.rope_dims}: expected an even number in 0..{head_dim}")
        need(0 <= self.xsa_last_n <= self.num_layers, f"XSA_LAST_N={self.xsa_last_n}: expected 0..NUM_LAYERS={self.num_layers}")
        need(self.num_layers >= 2, f"NUM_LAYERS={self.num_layers}: expected at least 2 (U-Net encoder and decoder)")
        need(self.bigram_vocab_size == 0 or self.bigram_vocab_size >= 2, f"BIGRAM_VOCAB_SIZE={self.bigram_vocab_size}: expected 0 (off) or at least 2")
        for layer in self.value_embedding_layers():
            need(0 <= layer < self.num_layers, f"VE_LAYERS={self.ve_layers!r}: layer {layer} is outside 0..{self.num_layers - 1}")
        recur = self.recurrence_layers()
        need(all(0 <= layer < self.num_layers - 1 for layer in recur),
             f"RECUR_LAYERS={self.recur_layers!r}: expected blocks in 0..{self.num_layers - 2} (the last block is not looped)")
        need(not recur or recur == list(range(recur[0], recur[-1] + 1)),
             f"RECUR_LAYERS={self.recur_layers!r}: expected consecutive blocks in increasing order, e.g. 4,5")
        need(recur or self.recur_repeats == 1, f"RECUR_REPEATS={self.recur_repeats}: expected 1 without RECUR_LAYERS (nothing to repeat)")
        need(recur or self.recur_start == 0, f"RECUR_START={self.recur_start}: expected 0 without RECUR_LAYERS (nothing to turn on)")
        # The warm-up compiles the model with and without the repeats, one priming step at least each.
        need(self.recur_start == 0 or self.warmup_steps >= 2 or self.compile == "0",
             f"WARMUP_STEPS={self.warmup_steps}: expected at least 2 with RECUR_START > 0 (the warm-up compiles both structures)")
        need(0 <= self.parallel_resid_start < self.num_layers,
             f"PARALLEL_RESID_START={self.parallel_resid_start}: expected 0 (off) or a block in 1..{self.num_layers - 1}")
        need(self.parallel_resid_lanes in (1, 2), f"PARALLEL_RESID_LANES={self.parallel_resid_lanes}: expected 1 or 2")
        need(self.parallel_resid_lanes == 1 or self.parallel_resid_start > 0,
             "PARALLEL_RESID_LANES=2: expected PARALLEL_RESID_START > 0 (the first block of two lanes)")
        # The lanes, once split, run to the last block: no looped block may run before a lane block and again after it.
        split = self.parallel_resid_start
        need(self.parallel_resid_lanes == 1 or not recur or recur[-1] < split or recur[0] >= split,
             f"RECUR_LAYERS={self.recur_layers!r}: with PARALLEL_RESID_LANES=2, expected looped blocks all below "
             f"PARALLEL_RESID_START={self.parallel_resid_start} or all from it")
        need(self.attn_gate != "sparse" or self.model_dim >= SPARSE_GATE_CHANNELS,
             f"ATTN_GATE=sparse: expected MODEL_DIM >= {SPARSE_GATE_CHANNELS} (the channels the gate reads)")
        need(0 < self.eval_stride <= self.eval_seq_len, f"EVAL_STRIDE={self.eval_stride}: expected 1..EVAL_SEQ_LEN={self.eval_seq_len}")
        need(self.swa_every > 0, f"SWA_EVERY={self.swa_every}: expected a positive number of steps")
        need(0.0 <= self.ema_decay < 1.0, f"EMA_DECAY={self.ema_decay}: expected 0 <= decay < 1")
        for name in ("attn_bits", "mlp_bits", "embed_bits", "lqer_bits"):
            need(2 <= getattr(self, name) <= 8, f"{name.upper()}={getattr(self, name)}: expected 2..8")
        need(self.clip != "std" or self.quant_method != "gptq_lite",
             "CLIP=std replaces GPTQ-lite's clip search: expected QUANT_METHOD=gptq or rtn with it")
        for category in ("attn", "mlp"):
            widths = self.block_bits(category)
            need(not widths or self.late_qat_threshold == 0, f"{category.upper()}_LAYER_BITS with LATE_QAT_THRESHOLD: "
                 f"late QAT fake-quantizes at {category.upper()}_BITS; expected one of them off")
        narrowest = min(self.num_kv_heads * head_dim, int(self.mlp_mult * self.model_dim))
        need(self.lqer_rank <= narrowest, f"LQER_RANK={self.lqer_rank}: expected 0..{narrowest} (the narrowest block matrix's side)")
        need(self.calib != "self" or self.quant_method == "gptq", f"CALIB=self: calibrates GPTQ, expected QUANT_METHOD=gptq")
        for name in ("iterations", "train_batch_tokens", "train_seq_len", "eval_seq_len", "eval_batch_seqs", "train_log_every",
                     "gptq_calib_batches", "target_bytes", "lqer_tensors"):
            need(getattr(self, name) > 0, f"{name.upper()}={getattr(self, name)}: expected a positive number")
        # The optimiser and schedule variants: a floor the thresholds could never pass, a taper of nothing, and a
        # schedule whose lengths are not all compiled before the clock make no sense.
        need(self.muon_ns in ("ns5", "polar"), f"MUON_NS={self.muon_ns!r}: expected one of ns5, polar")
        if self.min_lr > 0:
            need(self.warmdown_iters > 0, f"MIN_LR={self.min_lr}: expected 0 without a warm-down (WARMDOWN_ITERS=0: the LR scale is always 1)")
            need(self.weight_avg != "swa" or self.swa_threshold > self.min_lr,
                 f"SWA_THRESHOLD={self.swa_threshold}: expected above MIN_LR={self.min_lr}, the lowest LR scale (no snapshot would be taken)")
            need(self.late_qat_threshold == 0 or self.late_qat_threshold > self.min_lr,
                 f"LATE_QAT_THRESHOLD={self.late_qat_threshold}: expected 0 (off) or above MIN_LR={self.min_lr}, the lowest LR scale (QAT would never start)")
        if self.wd_taper_schedule() is not None:
            need(self.muon_wd > 0, f"WD_TAPER={self.wd_taper!r}: MUON_WD=0, there is no weight decay to taper")
        lengths = {length for _, length in self.seq_schedule()}
        need(not self.train_seq_schedule.strip() or self.warmup_steps >= len(lengths),
             f"WARMUP_STEPS={self.warmup_steps}: expected at least {len(lengths)} with TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r} "
             "(a priming step per length, so that each is compiled before the clock)")
        need(not self.train_seq_schedule.strip() or self.recur_start == 0 or self.warmup_steps >= 2 * len(lengths) or self.compile == "0",
             f"WARMUP_STEPS={self.warmup_steps}: expected at least {2 * len(lengths)} with TRAIN_SEQ_SCHEDULE and RECUR_START > 0 "
             "(a priming step per length, with and without the repeats)")
        need(self.ttt_mode != "lora" or self.ttt_chunk <= self.eval_seq_len, f"TTT_CHUNK={self.ttt_chunk}: expected 1..EVAL_SEQ_LEN={self.eval_seq_len} (a chunk is adapted on in one window): "
             "lower TTT_CHUNK, or set TTT_MODE=off")
        self.lora_targets()
        need(self.ttt_mode != "sgd" or self.ttt_phases >= 1, "TTT_MODE=sgd adapts only between global phases: expected TTT_PHASES >= 1")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def block_bits(self, category: str) -> list[int]:
        """ATTN_LAYER_BITS or MLP_LAYER_BITS as one width per block; [] when unset."""
        raw = {"attn": self.attn_layer_bits, "mlp": self.mlp_layer_bits}[category]
        name = f"{category.upper()}_LAYER_BITS"
        try:
            widths = [int(s) for s in raw.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected comma-separated widths, one per block, e.g. 5,5,6") from None
        if widths and (len(widths) != self.num_layers or not all(2 <= b <= 8 for b in widths)):
            raise ConfigError(f"{name}={raw!r}: expected {self.num_layers} widths (NUM_LAYERS), each in 2..8")
        return widths

    def lora_targets(self) -> list[str]:
        names = [s.strip() for s in self.ttt_lora_targets.split(",") if s.strip()]
        if not names or any(n not in LORA_TARGETS for n in names) or len(set(names)) < len(names):
            raise ConfigError(f"TTT_LORA_TARGETS={self.ttt_lora_targets!r}: expected distinct names from {','.join(LORA_TARGETS)}, e.g. q,v,o")
        return names

    def check_unread(self, given) -> None:
        """Settings that the chosen TTT_MODE (or TTT_PHASES=0) does not read are refused when given: they would do nothing."""
        unread = {"off": TTT_SETTINGS, "sgd": TTT_LORA_SETTINGS}.get(self.ttt_mode, ())
        for name in sorted(set(unread) & set(given)):
            raise ConfigError(f"{name.upper()}={getattr(self, name)} has no effect with TTT_MODE={self.ttt_mode}: remove it or choose another TTT_MODE")
        if self.ttt_mode != "off" and self.ttt_phases == 0:
            for name in sorted(set(TTT_GLOBAL_SETTINGS[1:]) & set(given)):
                raise ConfigError(f"{name.upper()}={getattr(self, name)} has no effect with TTT_PHASES=0 (no global SGD): remove it or set TTT_PHASES")

    def value_embedding_layers(self) -> list[int]:
        try:
            return [int(s) for s in self.ve_layers.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"VE_LAYERS={self.ve_layers!r}: expected comma-separated layer numbers, e.g. 9,10") from None

    def recurrence_layers(self) -> list[int]:
        try:
            return [int(s) for s in self.recur_layers.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"RECUR_LAYERS={self.recur_layers!r}: expected comma-separated block numbers, e.g. 4,5") from None

    def wd_taper_schedule(self) -> tuple[float, float] | None:
        """WD_TAPER as (multiplier at the end, start fraction of the training time); None when empty."""
        if not self.wd_taper.strip():
            return None
        shown = f"WD_TAPER={self.wd_taper!r}"
        parts = re.fullmatch(rf"\s*({FRACTION_PATTERN})@({FRACTION_PATTERN})\s*", self.wd_taper)
        if parts is None:
            raise ConfigError(f"{shown}: expected MULT@START, e.g. 0.5@0.7 (Muon weight decay falls linearly from 1x at START, "
                              "a fraction of the training time, to MULT x at its end)")
        mult, start = float(parts[1]), float(parts[2])
        if not mult < 1:
            raise ConfigError(f"{shown}: expected a multiplier MULT in 0..1 (below 1: 1 would change nothing)")
        if not start < 1:
            raise ConfigError(f"{shown}: expected a start START in 0..1 (a fraction of the training time, below 1)")
        return mult, start

    def seq_schedule(self) -> list[tuple[float, int]]:
        """TRAIN_SEQ_SCHEDULE as (start fraction, length) pairs in order; [(0.0, TRAIN_SEQ_LEN)] when empty."""
        text = self.train_seq_schedule
        if not text.strip():
            return [(0.0, self.train_seq_len)]

        def need(ok: bool, expected: str) -> None:
            if not ok:
                raise ConfigError(f"TRAIN_SEQ_SCHEDULE={text!r}: expected {expected}")
        entries = []
        for item in text.split(","):
            parts = re.fullmatch(rf"\s*(\d+)@({FRACTION_PATTERN})\s*", item)
            need(parts is not None, "LEN@FRACTION entries separated by commas, e.g. 1024@0,2048@0.3,3072@0.7")
            entries.append((float(parts[2]), int(parts[1])))
        starts, lengths = [f for f, _ in entries], [n for _, n in entries]
        need(len(entries) <= MAX_SEQ_LENGTHS, f"at most {MAX_SEQ_LENGTHS} entries (each length is a compiled graph)")
        need(starts[0] == 0, "a first entry at fraction 0 (the length training starts with)")
        need(all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < 1, "fractions that increase from 0 and stay below 1")
        need(min(lengths) >= 1 and all(a != b for a, b in zip(lengths, lengths[1:])), "lengths of at least 1, each entry changing it")
        need(lengths[-1] == self.train_seq_len and max(lengths) <= self.train_seq_len,
             f"its last length to be TRAIN_SEQ_LEN={self.train_seq_len} (the length training ends with) and none longer")
        return entries


# The range of every number (validate() checks these first, then the relations between settings;
# every float must also be finite). Each refusal reads `NAME=value: expected <text>`.
SETTING_RANGES = (
    (("vocab_size", "model_dim", "num_heads", "num_kv_heads", "bigram_dim", "ve_dim", "muon_backend_steps", "recur_repeats"),
     lambda v: v >= 1, "a positive number"),
    (("mlp_mult", "logit_softcap", "rope_base", "adam_eps", "gptq_damp", "clip_std_k_attn", "clip_std_k_mlp", "clip_std_k_embed"),
     lambda v: v > 0, "a number > 0"),
    (("lqer_rank",), lambda v: v >= 0, "a number >= 0 (0 = off)"),
    (("seed",), lambda v: 0 <= v < 2**63, "0 <= seed < 2**63"),
    (("grad_accum_steps",), lambda v: v >= 0, "a number >= 0 (0 = 8 // world size)"),
    (("warmup_steps", "warmdown_iters", "muon_momentum_warmup_steps", "val_loss_every"), lambda v: v >= 0, "a number >= 0"),
    (("max_wallclock_seconds",), lambda v: v >= 0, "a number >= 0 (0 = no cap)"),
    (("grad_clip_norm", "matrix_lr", "scalar_lr", "tied_embed_lr", "muon_wd", "adam_wd", "tied_embed_init_std"),
     lambda v: v >= 0, "a number >= 0"),
    (("muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2"), lambda v: 0 <= v < 1, "0 <= value < 1"),
    (("swa_threshold", "late_qat_threshold"), lambda v: 0 <= v <= 1, "0 <= value <= 1 (an LR scale)"),
    (("recur_start",), lambda v: 0 <= v < 1, "0 <= value < 1 (a fraction of the training time)"),
    (("min_lr",), lambda v: 0 <= v < 1, "0 <= value < 1 (an LR scale; 0 = no floor)"),
    (("ttt_chunk", "ttt_lora_rank", "ttt_batch_docs", "ttt_global_batch"), lambda v: v >= 1, "a positive number"),
    (("ttt_lr", "ttt_global_lr", "ttt_epochs", "ttt_global_epochs", "ttt_phases"), lambda v: v >= 0, "a number >= 0"),
)
# WD_TAPER's and TRAIN_SEQ_SCHEDULE's fractions of the training time (and WD_TAPER's multiplier): plain decimals,
# no sign or exponent. A schedule has at most MAX_SEQ_LENGTHS entries: each length is a compiled training graph,
# and torch.compile keeps 8 graphs of a function before it falls back to eager.
FRACTION_PATTERN = r"\d*\.?\d+"
MAX_SEQ_LENGTHS = 8
# The TTT settings each mode reads (Hyperparameters.check_unread refuses the others when given).
TTT_LORA_SETTINGS = ("ttt_chunk", "ttt_lr", "ttt_epochs", "ttt_optimizer", "ttt_lora_rank", "ttt_lora_targets")
TTT_GLOBAL_SETTINGS = ("ttt_phases", "ttt_global_lr", "ttt_global_epochs", "ttt_global_batch")
TTT_SETTINGS = TTT_LORA_SETTINGS + TTT_GLOBAL_SETTINGS + ("ttt_batch_docs", "ttt_context")
# TTT_LORA_TARGETS: the names of the adapted projections, and where each sits in a Block.
LORA_TARGETS = {"q": "attn.c_q", "k": "attn.c_k", "v": "attn.c_v", "o": "attn.proj", "fc": "mlp.fc", "proj": "mlp.proj"}


class RunError(Exception):
    """A problem with the settings, the input files or the run itself: reported as one line, exit status 2."""


class ConfigError(RunError):
    pass


class DataError(RunError):
    pass


# Settings of the record scripts that are spelled differently here. EMA_ENABLED / SWA_ENABLED work as
# written (mapped onto WEIGHT_AVG); the others stop the run with the setting to use instead.
LEGACY_SETTINGS = ("EMA_ENABLED", "SWA_ENABLED")
RETIRED_SETTINGS = {
    "TIE_EMBEDDINGS": "embeddings are always tied here; remove the setting",
    "EMBED_LR": "embeddings are always tied here; use TIED_EMBED_LR",
    "HEAD_LR": "embeddings are always tied here; there is no separate head",
    "QAT_ENABLED": "use LATE_QAT_THRESHOLD (LR scale below which fake quantization starts; 0 = off)",
    "LEAKY_RELU": "use MLP_ACT=leaky_relu2",
    "VE_ENABLED": "use VE_LAYERS (e.g. VE_LAYERS=9,10; empty = off)",
    "LN_SCALE_ENABLED": "use LN_SCALE",
    "WD_TAPER_START_FRAC": "use WD_TAPER=MULT@START (WD_TAPER_FINAL_MULT=0.5 WD_TAPER_START_FRAC=0.7 is WD_TAPER=0.5@0.7)",
    "WD_TAPER_FINAL_MULT": "use WD_TAPER=MULT@START (WD_TAPER_FINAL_MULT=0.5 WD_TAPER_START_FRAC=0.7 is WD_TAPER=0.5@0.7)",
}
# Families of record-script settings for features this script does not have.
RETIRED_PREFIXES = {
    "MTP_": "multi-token prediction heads are not implemented in this script",
}
# Other training scripts' names for what is spelled differently here (where the word rule below would
# not name the right setting); they stop the run with the setting to use.
ALIASES = {name: hint for names, hint in (
    (("LR", "LEARNING_RATE"), "use MATRIX_LR (Muon, block matrices), SCALAR_LR or TIED_EMBED_LR (AdamW)"),
    (("MUON_LR",), "use MATRIX_LR (Muon, block matrices)"),
    (("ADAM_LR",), "use SCALAR_LR or TIED_EMBED_LR (AdamW)"),
    (("WD", "WEIGHT_DECAY"), "use MUON_WD (Muon) and ADAM_WD (AdamW)"),
    (("EPOCHS", "NUM_EPOCHS", "MAX_STEPS", "MAX_ITERS", "NUM_STEPS", "TRAIN_STEPS"),
     "use ITERATIONS (training steps; MAX_WALLCLOCK_SECONDS usually ends training first)"),
    (("WARMUP_ITERS",), "use WARMUP_STEPS (compile priming) or MUON_MOMENTUM_WARMUP_STEPS; the LR has no warm-up"),
    (("BATCH_SIZE",), "use TRAIN_BATCH_TOKENS (global tokens per step) or EVAL_BATCH_SEQS"),
    (("MICRO_BATCH_SIZE",), "use GRAD_ACCUM_STEPS (micro-steps per rank; TRAIN_BATCH_TOKENS is split over them)"),
    (("SEQ_LEN", "BLOCK_SIZE"), "use TRAIN_SEQ_LEN (training) or EVAL_SEQ_LEN (evaluation windows)"),
    (("DATA_DIR", "DATASET"), "use DATA_PATH (the folder of the fineweb_{train,val}_*.bin shards)"),
    (("RUN_NAME",), "use RUN_ID (names logs/<RUN_ID>.txt)"),
    (("EMA",), "use WEIGHT_AVG=ema (the default) and EMA_DECAY"),
    (("SWA",), "use WEIGHT_AVG=swa, SWA_EVERY and SWA_THRESHOLD"),
    (("QAT",), "use LATE_QAT_THRESHOLD (LR scale below which fake quantization starts; 0 = off)"),
    (("TTT_ENABLED",), "use TTT_MODE=lora (per-document adapters) or TTT_MODE=sgd (global SGD phases); TTT_MODE=lora is the default"),
) for name in names}
# Words of setting names that are also common in unrelated environment variables (MAX_JOBS, DATA_DIR,
# GDK_BACKEND, CGO_ENABLED, CMAKE_BUILD_PARALLEL_LEVEL, AB_STEPS of bench/ab_step.py, the launchers' LOCAL_RANK
# and GROUP_RANK, ...): alone they do not make a name a setting's.
COMMON_WORDS = frozenset({
    "ACT", "ARTIFACT", "BACKEND", "BASE", "BATCH", "DATA", "ENABLED", "GLOBAL", "ID", "INIT", "KERNEL", "LAST", "LOG",
    "MAX", "METHOD", "MIN", "MODE", "MODEL", "N", "NUM", "PARALLEL", "PATH", "RANK", "RUN", "SCALE", "SECONDS", "SIZE",
    "START", "STD", "STEPS", "TARGET"})
# First words of other programs' variables: never read, never refused (also any first word PYTHON...).
FOREIGN_PREFIXES = frozenset({
    "APPTAINER", "AWS", "AZ", "AZURE", "AZUREML", "BUILDKITE", "BUILDKIT", "CARGO", "CI", "CLOUDSDK", "COMPOSE",
    "CONDA", "CUBLAS", "CUDA", "CUDNN", "DOCKER", "FI", "GCE", "GIT", "GITHUB", "GITLAB", "GOOGLE", "HF",
    "HUGGINGFACE", "HYDRA", "I", "JAX", "JPY", "JUPYTER", "KMP", "KUBERNETES", "LC", "LD", "LSB", "MAMBA", "MKL",
    "MLFLOW", "MPI", "MV2", "NCCL", "NV", "NVIDIA", "NVSHMEM", "NVTE", "OMP", "OMPI", "OPENBLAS", "PBS", "PIP",
    "PMI", "PMIX", "PYENV", "PYTORCH", "RUNNER", "SAGEMAKER", "SGE", "SINGULARITY", "SLURM", "SM", "SSH", "TF",
    "TOKENIZERS", "TORCH", "TORCHDYNAMO", "TORCHELASTIC", "TORCHINDUCTOR", "TRANSFORMERS", "TRITON", "UCX",
    "VSCODE", "WANDB", "XDG", "XLA"})


def setting_names(legacy: bool = False) -> set[str]:
    """The settings' environment names; with legacy, also the record scripts' spellings accepted here."""
    names = {f.name.upper() for f in fields(Hyperparameters)}
    return names | set(LEGACY_SETTINGS) if legacy else names


def settings_source_lines() -> list[tuple[str, str, str]]:
    """Hyperparameters as written, from the readable source (also when the self-extracting form runs):
    ("group", title, "") for each "# ---- title" line, ("setting", name, comment) for each field.
    `--help` and the settings tables of docs/SETTINGS.md and README.md (tests/readme_settings.py) are made from it."""
    source = SOURCE.decode("utf-8")
    body = source[source.index("class Hyperparameters"):source.index("    from_environment = frozenset()")]
    lines = []
    for line in body.splitlines():
        if group := re.match(r"    # ---- (.*)", line):
            lines.append(("group", group.group(1), ""))
        elif field := re.match(r"    (\w+): \w+ = [^#]+?\s*(?:#\s*(.*))?$", line):
            lines.append(("setting", field.group(1), field.group(2) or ""))
    return lines


def settings_groups() -> list[tuple[str, str]]:
    """(group title, setting name) for every setting, in the order of Hyperparameters."""
    group, pairs = "", []
    for kind, name, _ in settings_source_lines():
        if kind == "group":
            group = name
        else:
            pairs.append((group, name))
    return pairs


def settings_help() -> str:
    """`train_gpt.py --help`: every setting with its default and the comment on its line of Hyperparameters."""
    defaults = {f.name: f.default for f in fields(Hyperparameters)}
    lines = [__doc__.strip(), "",
             "Settings are environment variables (NAME=value), shown with their defaults; see docs/SETTINGS.md for the",
             "rule that refuses names that look like settings but are not. The only arguments are --help and -h."]
    for kind, name, comment in settings_source_lines():
        if kind == "group":
            lines += ["", f"{name}:"]
        else:
            default = int(defaults[name]) if isinstance(defaults[name], bool) else defaults[name]
            lines.append(f"  {name.upper()}={default}".ljust(48) + (f"  # {comment}" if comment else ""))
    return "\n".join(lines)


def name_words(name: str) -> set[str]:
    return {w for w in name.split("_") if w}


def distinctive_words() -> set[str]:
    """The words of the settings' names that mark a variable as meant for this script (LR, QAT, WALLCLOCK, ...)."""
    return {w for n in setting_names(legacy=True) for w in name_words(n)} - COMMON_WORDS


def nearest_setting(name: str) -> str:
    """The setting sharing the most words with `name`, then the larger share of its own words, then the
    closest spelling: QAT_THRESHOLD -> LATE_QAT_THRESHOLD, NUM_KV -> NUM_KV_HEADS, MATRX_LR -> MATRIX_LR."""
    mine = name_words(name)

    def score(setting: str):
        shared = len(mine & name_words(setting))
        return shared, shared / len(name_words(setting)), difflib.SequenceMatcher(None, name, setting).ratio()
    return max(sorted(setting_names()), key=score)


def setting_problem(name: str) -> str | None:
    """Why an environment variable that is not a setting must stop the run, or None if it is a setting or
    unrelated (PATH, MAX_JOBS, LOCAL_RANK, ...). The rule (docs/SETTINGS.md, "Which environment variables stop a
    run"): a name that is not a setting is refused if, in upper case, it is a setting (iterations), a
    retired or other-script name (TTT_ENABLED, LR, EPOCHS), a near-spelling of a setting (XSA_LAST) or
    shares a distinctive word with one (MAX_WALLCLOCK, GRAD_CLIP); other programs' namespaces (NCCL_*) pass."""
    accepted = setting_names(legacy=True)
    if name in accepted:
        return None
    upper = name.upper()
    if upper != name:
        if upper in accepted:
            return f"{name} is not read: settings are upper case, use {upper}"
        problem = setting_problem(upper)
        return f"{name} is not read (settings are upper case); as {upper}: {problem}" if problem else None
    if name in RETIRED_SETTINGS:
        return f"{name} is not a setting of this script: {RETIRED_SETTINGS[name]}"
    for prefix, reason in RETIRED_PREFIXES.items():
        if name.startswith(prefix):
            return f"unknown setting {name}: {reason}"
    if name in ALIASES:
        return f"unknown setting {name}: {ALIASES[name]}"
    first = name.split("_")[0]
    if first in FOREIGN_PREFIXES or first.startswith("PYTHON"):
        return None
    typo = difflib.get_close_matches(name, sorted(accepted), n=1, cutoff=0.8)
    if name_words(name) & distinctive_words():
        best = nearest_setting(name)
        if name_words(name) <= name_words(best) or best in typo:
            return f"unknown setting {name}: did you mean {best}? (python train_gpt.py --help lists the settings)"
        return f"unknown setting {name}: no setting has that name; the nearest is {best} (python train_gpt.py --help lists the settings)"
    if typo:
        return f"unknown setting {name}: did you mean {typo[0]}? (python train_gpt.py --help lists the settings)"
    return None


def check_setting_names(environ) -> None:
    for name in sorted(environ):
        if problem := setting_problem(name):
            raise ConfigError(problem)


def without_settings(environ) -> dict[str, str]:
    """The environment minus everything this script would read or refuse: a clean base for launching it."""
    accepted = setting_names(legacy=True)
    return {k: v for k, v in environ.items() if k not in accepted and setting_problem(k) is None}


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
            try:
                return int(text)  # exact, also for seeds beyond 2**53; accepts 786_432
            except ValueError:
                pass
            number = float(text)  # accepts 1e3; rejects 2.5
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


def write_atomic(path, *chunks: bytes) -> None:
    """Write the chunks under a temporary name, then rename: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, a read-only folder, a signal: nothing is left under either name
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RunError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def write_shard(path, tokens) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(SHARD_TOKEN_DTYPE).max):
        raise DataError(f"{path}: token ids must be in 0..65535")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    write_atomic(path, header.tobytes(), tokens.astype(SHARD_TOKEN_DTYPE).tobytes())


# Per-token byte sidecars (fineweb_val_bytes_*.bin, beside the token shards): they match fineweb_val_*.bin
# but are not token shards. Their format and rule: data/README.md.
BYTE_SIDECAR_PREFIX = "fineweb_val_bytes_"


def shard_files(pattern: str, what: str) -> list[str]:
    files = sorted(f for f in glob.glob(pattern) if not os.path.basename(f).startswith((BYTE_SIDECAR_PREFIX, "fineweb_train_bytes_")))
    if not files:
        raise DataError(f"no {what} shards match {pattern} (set DATA_PATH; see data/README.md)")
    return files


class TokenStream:
    """All training shards in sorted order, read as one endless stream of tokens."""

    def __init__(self, pattern: str, vocab_size: int):
        self.files = shard_files(pattern, "training")
        if sum(read_shard_header(f) for f in self.files) == 0:  # checks every header before any work
            raise DataError(f"the training shards matching {pattern} hold no tokens")
        self.vocab_size = vocab_size
        self.file_index = -1
        self.tokens = np.zeros(0, dtype=SHARD_TOKEN_DTYPE)
        self.pos = 0

    def _next_file(self) -> None:
        self.file_index = (self.file_index + 1) % len(self.files)
        self.tokens = load_shard(self.files[self.file_index])
        if self.tokens.size and int(self.tokens.max()) >= self.vocab_size:
            raise DataError(f"{self.files[self.file_index]}: token id {int(self.tokens.max())} >= VOCAB_SIZE={self.vocab_size}")
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        chunks = []
        while n > 0:
            if self.pos == len(self.tokens):
                self._next_file()
            k = min(n, len(self.tokens) - self.pos)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            n -= k
        return np.concatenate(chunks)


class TrainLoader:
    """Each step takes TRAIN_BATCH_TOKENS + 1 consecutive tokens (inputs and shifted targets) and gives
    every rank a disjoint slice, cut into its micro-steps: the batch does not depend on the world size."""

    def __init__(self, h: Hyperparameters, rt: Runtime):
        self.stream = TokenStream(os.path.join(h.data_path, "fineweb_train_*.bin"), h.vocab_size)
        self.batch_tokens, self.rank, self.device = h.train_batch_tokens, rt.rank, rt.device
        self.rank_tokens = h.train_batch_tokens // rt.world_size
        self.shape = (rt.grad_accum_steps, rt.micro_batch_seqs, h.train_seq_len)
        self.last = self.stream.take(1)
        pinned = rt.device.type == "cuda"
        self.host = torch.empty(self.rank_tokens + 1, dtype=torch.int32, pin_memory=pinned)
        self.copied = torch.cuda.Event() if pinned else None

    def next_batch(self) -> tuple[Tensor, Tensor]:
        fresh = self.stream.take(self.batch_tokens)
        span = np.concatenate([self.last, fresh])
        self.last = fresh[-1:]
        begin = self.rank * self.rank_tokens
        if self.copied is not None:
            self.copied.synchronize()  # the previous batch has left the pinned buffer
        self.host.numpy()[:] = span[begin:begin + self.rank_tokens + 1]
        tokens = self.host.to(self.device, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        tokens = tokens.long()
        return tokens[:-1].view(self.shape), tokens[1:].view(self.shape)


def load_validation_tokens(h: Hyperparameters) -> Tensor:
    pattern = os.path.join(h.data_path, "fineweb_val_*.bin")
    tokens = np.concatenate([load_shard(f) for f in shard_files(pattern, "validation")])
    if len(tokens) < h.eval_seq_len + 1:
        raise DataError(f"the validation shards ({pattern}) hold {len(tokens)} tokens, fewer than one window of EVAL_SEQ_LEN={h.eval_seq_len} + 1")
    if int(tokens.max()) >= h.vocab_size:
        raise DataError(f"validation token id {int(tokens.max())} >= VOCAB_SIZE={h.vocab_size} (wrong tokenizer or VOCAB_SIZE?)")
    return torch.from_numpy(tokens.astype(np.int64))


def load_validation_bytes(data_path: str) -> Tensor | None:
    """The bytes of original text of each validation token, from the fineweb_val_bytes_*.bin sidecars
    (shard format, one uint16 count per token), checked against the token shards; None without any."""
    sidecars = sorted(glob.glob(os.path.join(data_path, BYTE_SIDECAR_PREFIX + "*.bin")))
    if not sidecars:
        return None
    shards = shard_files(os.path.join(data_path, "fineweb_val_*.bin"), "validation")
    if len(sidecars) != len(shards):
        raise DataError(f"{data_path}: {len(sidecars)} byte sidecar(s) {BYTE_SIDECAR_PREFIX}*.bin but {len(shards)} validation shard(s): expected one per shard")
    for sidecar, shard in zip(sidecars, shards):
        if read_shard_header(sidecar) != read_shard_header(shard):
            raise DataError(f"{sidecar}: {read_shard_header(sidecar)} byte counts, but {os.path.basename(shard)} holds {read_shard_header(shard)} tokens: expected one per token")
    return torch.from_numpy(np.concatenate([load_shard(f) for f in sidecars]).astype(np.int32))


# =============================================================================================
# Metric: bytes per token from the SentencePiece model
# =============================================================================================

@dataclass
class ByteTables:
    """Per token id: UTF-8 bytes without a leading space, whether a leading space ("▁") is counted, and
    whether it is a boundary (control/unknown/unused, e.g. BOS) after which that space is not counted.
    `transformed`: the tokenizer has user-defined pieces (the markers of a text transform such as the
    case transform), so its pieces do not spell the original text and the bytes must come from a sidecar.
    `position_bytes`: per validation position, the sidecar's bytes (then the tables are not used)."""
    base_bytes: Tensor
    leading_space: Tensor
    boundary: Tensor
    transformed: bool = False
    position_bytes: Tensor | None = None
    source: str = "tokenizer pieces"

    def to(self, device) -> ByteTables:
        position_bytes = None if self.position_bytes is None else self.position_bytes.to(device)
        return ByteTables(self.base_bytes.to(device), self.leading_space.to(device), self.boundary.to(device),
                          self.transformed, position_bytes, self.source)


MAX_VOCAB_SIZE = 65_536  # shards store token ids as uint16


def user_defined_pieces(model_proto: bytes) -> list[int]:
    """Ids of the USER_DEFINED pieces (type 4) of a serialized SentencePiece ModelProto (field 1: the pieces,
    each with field 3: the type), read from the protobuf wire format directly."""
    def varint(buf: bytes, i: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            b = buf[i]
            value, shift, i = value | (b & 0x7F) << shift, shift + 7, i + 1
            if b < 0x80:
                return value, i

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            kind = key & 7
            if kind == 0:
                value, i = varint(buf, i)
            elif kind == 2:
                n, i = varint(buf, i)
                value, i = buf[i:i + n], i + n
            else:
                n = {1: 8, 5: 4}[kind]
                value, i = buf[i:i + n], i + n
            yield key >> 3, value

    found, index = [], 0
    for number, value in fields(model_proto):
        if number == 1:
            if any(n == 3 and v == 4 for n, v in fields(value)):
                found.append(index)
            index += 1
    return found


def build_byte_tables(tokenizer_path: str, vocab_size: int) -> ByteTables:
    import sentencepiece as spm
    path = Path(tokenizer_path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer model not found (set TOKENIZER_PATH)")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"{path}: not a SentencePiece model ({reason}); set TOKENIZER_PATH to the .model file") from None
    if sp.vocab_size() != vocab_size:
        raise DataError(f"{path}: the tokenizer has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"{path}: {vocab_size} pieces; expected at most {MAX_VOCAB_SIZE} (shards store token ids as uint16)")
    base = np.zeros(vocab_size, dtype=np.int64)
    leading = np.zeros(vocab_size, dtype=bool)
    boundary = np.zeros(vocab_size, dtype=bool)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            leading[i] = piece.startswith("\u2581")
            base[i] = len(piece.removeprefix("\u2581").encode("utf-8"))
    transformed = bool(user_defined_pieces(sp.serialized_model_proto()))
    return ByteTables(torch.from_numpy(base), torch.from_numpy(leading), torch.from_numpy(boundary), transformed)


def with_byte_sidecar(tables: ByteTables, data_path: str, n_tokens: int) -> ByteTables:
    """The tables with the validation sidecar's bytes when DATA_PATH has one (always, for a transformed
    tokenizer); `source` says where the bytes come from, for the log."""
    counts = load_validation_bytes(data_path)
    if counts is None:
        if tables.transformed:
            raise DataError(f"{data_path}: the tokenizer has user-defined pieces (a transform such as the case transform: its pieces "
                            f"do not spell the original text), so the metric needs the byte sidecars {BYTE_SIDECAR_PREFIX}*.bin beside the validation shards")
        return tables
    if len(counts) < n_tokens:
        raise DataError(f"{data_path}: the byte sidecars hold {len(counts)} counts for {n_tokens} validation tokens")
    return ByteTables(tables.base_bytes, tables.leading_space, tables.boundary, tables.transformed, counts[:n_tokens],
                      f"sidecar {os.path.join(data_path, BYTE_SIDECAR_PREFIX)}*.bin ({int(counts[:n_tokens].sum())} bytes)")


def token_bytes(prev: Tensor, target: Tensor, tables: ByteTables, positions: Tensor | None = None) -> Tensor:
    """Bytes of each target token given the token before it, or the sidecar's at the targets' positions."""
    if tables.position_bytes is not None and positions is not None:
        return tables.position_bytes[positions].long()
    space = tables.leading_space[target] & ~tables.boundary[prev]
    return tables.base_bytes[target] + space.long()


# =============================================================================================
# Model
# =============================================================================================

# Parameter routing: every parameter gets one role where it is created (`tagged`); this table maps the
# role to its optimiser and export category. `route_parameters` asserts that it covers everything once.
ROUTES = {
    # role       optimiser       export category
    "attn":     ("muon",        "attn"),     # q, k, v, output projections
    "mlp":      ("muon",        "mlp"),      # MLP matrices
    "proj":     ("muon",        "proj"),     # projections of the side inputs (BigramHash, value embeddings)
    "embed":    ("adam_embed",  "embed"),    # embedding tables
    "control":  ("adam_scalar", "control"),  # gains, scales, mixes, gates, skip weights
}


@dataclass(frozen=True)
class Kernels:
    """How the model's fused parts run, chosen once at start-up (choose_kernels) and handed to the modules:
    the attention backend (sdpa | fa3 | fa4 | flex) and, for the MLP, the q/k preparation, XSA and the training
    loss, "triton" (the kernels) or "torch" (the plain code of the model, the reference the kernels are tested against)."""
    attention: str = "sdpa"
    mlp: str = "torch"
    qk: str = "torch"
    xsa: str = "torch"
    loss: str = "torch"


# ATTN_GATE=sparse: the gate reads the first channels of the attention input only (8 heads x 12 = 96
# weights a block, the size of the 04-23 record's sparse gate).
SPARSE_GATE_CHANNELS = 12


def tagged(param: nn.Parameter, role: str) -> nn.Parameter:
    assert role in ROUTES, role
    param.role = role
    return param


def route_parameters(model: nn.Module) -> dict[str, str]:
    routes = {name: getattr(p, "role", None) for name, p in model.named_parameters()}
    untagged = [name for name, role in routes.items() if role is None]
    assert not untagged, f"parameters without a role: {untagged}"
    assert len({id(p) for p in model.parameters()}) == len(routes), "a parameter is registered twice"
    return routes


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


# Late QAT's width for a matrix, given its role and size (0: no fake quantization). The model is given it
# (late_qat_widths of the export section: a matrix trains against the grid it is exported on).
QatWidths = Callable[[str, int], int]


def no_qat(role: str, numel: int) -> int:
    return 0


class Linear(nn.Module):
    """x @ W^T with an fp32 master weight (matmuls run in bf16 under autocast). With late QAT the
    weight goes through the export's per-row fake quantizer once its `qat_gate` buffer is set to 1:
    a tensor, not a Python flag, so the switch takes effect inside an already compiled graph."""

    def __init__(self, in_features: int, out_features: int, role: str, init: str, qat: QatWidths, gain: float = 1.0):
        super().__init__()
        self.weight = tagged(nn.Parameter(torch.empty(out_features, in_features)), role)
        if init == "zero":
            nn.init.zeros_(self.weight)
        elif min(in_features, out_features) >= 64:
            nn.init.orthogonal_(self.weight)
        else:  # tiny test models
            nn.init.uniform_(self.weight, -in_features ** -0.5, in_features ** -0.5)
        with torch.no_grad():
            self.weight.mul_(gain)
        self.qat_bits = qat(role, self.weight.numel())
        if self.qat_bits:
            self.register_buffer("qat_gate", torch.zeros(()), persistent=False)

    def forward_weight(self) -> Tensor:
        w = self.weight
        if self.qat_bits:  # straight-through: forward sees q(w), backward sees w
            w = w + self.qat_gate * (fake_quantize(w, self.qat_bits) - w).detach()
        return w

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.forward_weight())


class Rotary(nn.Module):
    """Rotary position embedding on the first `dims` channels of each head (all when dims = 0)."""

    def __init__(self, h: Hyperparameters):
        super().__init__()
        head_dim = h.head_dim
        self.dims = h.rope_dims or head_dim
        inv_freq = 1.0 / h.rope_base ** (torch.arange(0, self.dims, 2, dtype=torch.float64) / self.dims)
        angles = torch.outer(torch.arange(max(h.train_seq_len, h.eval_seq_len), dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, start: int = 0) -> Tensor:  # x: (B, T, H, D) at positions start, start+1, ...
        cos = self.cos[None, start:start + x.size(1), None, :].to(x.dtype)
        sin = self.sin[None, start:start + x.size(1), None, :].to(x.dtype)
        x1, x2 = x[..., :self.dims].chunk(2, dim=-1)
        rotated = (x1 * cos + x2 * sin, x2 * cos - x1 * sin, x[..., self.dims:])
        return torch.cat(rotated, dim=-1)


def document_mask(idx: Tensor, tail: int, backend: str):
    """For the last `tail` queries of the rows idx (B, T), what `backend` needs to keep each query to the
    keys of its own document, at or before it (DOC_MASK). A document starts at each BOS and at a row's
    start (a window that begins inside a document sees that document's visible part).
    sdpa: a boolean mask (B, 1, tail, T); flex: a BlockMask (sparse over blocks, so whole blocks of other
    documents are skipped); fa3, fa4: the rows as one stream of documents, (cu_q, cu_k) int32 of B*T + 1
    entries: document i's queries and keys start at cu_q[i] and cu_k[i]. One entry per position that may
    start a document keeps the shape static (one compiled graph); the entries past the last document
    repeat the stream's end, as empty documents."""
    B, T = idx.shape
    starts = idx == BOS_ID
    if backend in ("fa3", "fa4"):
        flat = torch.arange(B * T, device=idx.device)
        first = starts.flatten() | (flat % T == 0)
        cu_k = torch.cat([torch.where(first, flat, B * T).sort().values, flat.new_full((1,), B * T)])
        cu_q = cu_k // T * tail + (cu_k % T - (T - tail)).clamp(min=0)  # the queries before each start
        return cu_q.int(), cu_k.int()
    doc, offset = starts.cumsum(1), T - tail  # each position's document, counted within its row
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(b, h, q, kv):
            return (kv <= q + offset) & (doc[b, q + offset] == doc[b, kv])
        return create_block_mask(same_document, B, None, tail, T, device=idx.device)
    causal = torch.ones(tail, T, dtype=torch.bool, device=idx.device).tril(offset)
    return ((doc[:, None, :] == doc[:, offset:, None]) & causal)[:, None]


def forward_backend(backend: str) -> str:
    """The attention backend of this forward pass. Compiled without autograd (scoring), flex attention
    fuses the building of its block mask into its kernel, which fails on the GPU (an illegal address,
    torch 2.11): scoring takes sdpa's boolean mask there instead, the same attention."""
    return "sdpa" if backend == "flex" and not torch.is_grad_enabled() else backend


def document_attention(q: Tensor, k: Tensor, v: Tensor, backend: str, docs) -> Tensor:
    """causal_attention within documents: docs = document_mask(idx, Tq, backend) of these rows."""
    q, k = q.to(v.dtype), k.to(v.dtype)
    B, Tq, H, D = q.shape
    T = k.size(1)
    if backend in ("fa3", "fa4"):
        cu_q, cu_k = docs
        q, k, v = q.reshape(B * Tq, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D)
        if backend == "fa3":
            out = fa3_varlen_attention(q, k, v, cu_q, cu_k, Tq, T, causal=True)
            out = out[0] if isinstance(out, tuple) else out
        else:
            out = fa4_varlen_attention(q, k, v, cu_q, cu_k, Tq, T)[0]
        return out.view(B, Tq, H, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        y = flex_attention(q, k, v, block_mask=docs, enable_gqa=k.size(1) != q.size(1))
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=docs, enable_gqa=k.size(1) != q.size(1))
    return y.transpose(1, 2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """q: (B, Tq, H, D), the last Tq of the T positions; k, v: (B, T, Hkv, D), Hkv dividing H.
    Returns (B, Tq, H, D)."""
    q, k = q.to(v.dtype), k.to(v.dtype)
    if backend == "fa3":  # its causal mask is aligned to the last positions
        out = fa3_attention(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    if backend == "fa4":  # so is FlashAttention-4's
        return fa4_attention(q, k, v)[0]
    Tq, T = q.size(1), k.size(1)
    mask = None if Tq == T else torch.ones(Tq, T, dtype=torch.bool, device=q.device).tril(T - Tq)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA (arXiv:2603.09078, PR #287): remove from each head's output its component along the
    normalised value vector of the same position. With GQA the query heads of one kv group share
    that v: y is viewed as (B, T, Hkv, group, D) and v broadcast, with no repeat_interleave or copy."""
    B, T, H, D = y.shape
    y = y.view(B, T, v.size(2), H // v.size(2), D)
    v_hat = F.normalize(v, dim=-1).unsqueeze(3)
    y = y - (y * v_hat).sum(dim=-1, keepdim=True) * v_hat
    return y.view(B, T, H, D)


class Attention(nn.Module):
    def __init__(self, h: Hyperparameters, layer: int, kernels: Kernels, qat: QatWidths):
        super().__init__()
        self.num_heads, self.num_kv_heads = h.num_heads, h.num_kv_heads
        self.head_dim = h.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = Linear(h.model_dim, h.model_dim, "attn", "ortho", qat)
        self.c_k = Linear(h.model_dim, kv_dim, "attn", "ortho", qat)
        self.c_v = Linear(h.model_dim, kv_dim, "attn", "ortho", qat)
        self.proj = Linear(h.model_dim, h.model_dim, "attn", "zero", qat)
        self.q_gain = tagged(nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init)), "control")
        self.rotary = Rotary(h)
        self.xsa = layer >= h.num_layers - h.xsa_last_n
        self.backend = kernels.attention
        self.qk_fused = kernels.qk == "triton"  # norm_rotary
        self.xsa_fused = kernels.xsa == "triton"  # xsa, the custom op
        # Output gate per head, 2 sigmoid(w . x): zero weights make it 1, so a new model computes as ungated.
        self.gate_channels = {"off": 0, "head": h.model_dim, "sparse": SPARSE_GATE_CHANNELS}[h.attn_gate]
        if self.gate_channels:
            self.gate = tagged(nn.Parameter(torch.zeros(h.num_heads, self.gate_channels)), "control")

    def forward(self, x: Tensor, value_embed: Tensor | None, tail: int, docs=None) -> Tensor:
        """The outputs of the last `tail` positions, attending to all T (or, with docs, to their document's)."""
        B, T, _ = x.shape
        q = self.c_q(x[:, T - tail:]).view(B, tail, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        if value_embed is not None:
            v = v + value_embed.view_as(v)
        if self.qk_fused:
            q = norm_rotary(q, self.q_gain, self.rotary.cos, self.rotary.sin, T - tail)
            k = norm_rotary(k, None, self.rotary.cos, self.rotary.sin, 0)
        else:
            q = self.rotary(rms_norm(q), start=T - tail) * self.q_gain.to(q.dtype)[:, None]
            k = self.rotary(rms_norm(k))
        if docs is None:
            y = causal_attention(q, k, v, self.backend)
        else:
            y = document_attention(q, k, v, forward_backend(self.backend), docs)
        if self.xsa:
            y = (xsa if self.xsa_fused else exclusive_self_attention)(y, v[:, T - tail:])
        if self.gate_channels:
            gate = 2 * torch.sigmoid(F.linear(x[:, T - tail:, :self.gate_channels], self.gate.to(x.dtype)))
            y = y * gate.unsqueeze(-1).to(y.dtype)
        return self.proj(y.reshape(B, tail, -1))


class MLP(nn.Module):
    def __init__(self, h: Hyperparameters, kernels: Kernels, qat: QatWidths):
        super().__init__()
        hidden = int(h.mlp_mult * h.model_dim)
        self.fc = Linear(h.model_dim, hidden, "mlp", "ortho", qat)
        self.proj = Linear(hidden, h.model_dim, "mlp", "zero", qat)
        self.leaky = h.mlp_act == "leaky_relu2"
        self.fused = kernels.mlp == "triton"  # relu2_mlp

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            weights = (self.fc.forward_weight().to(dtype), self.proj.forward_weight().to(dtype))
            return relu2_mlp(x.reshape(-1, x.size(-1)).to(dtype), *weights)[0].view(*x.shape[:-1], -1)
        return self.plain(x)

    def plain(self, x: Tensor) -> Tensor:
        """The torch path: fc and proj called as modules (GPTQ calibration hooks their inputs)."""
        x = self.fc(x)
        x = F.leaky_relu(x, 0.5) if self.leaky else F.relu(x)
        return self.proj(x.square())


class Block(nn.Module):
    def __init__(self, h: Hyperparameters, layer: int, kernels: Kernels, qat: QatWidths):
        super().__init__()
        dim = h.model_dim
        self.attn = Attention(h, layer, kernels, qat)
        self.mlp = MLP(h, kernels, qat)
        self.attn_scale = tagged(nn.Parameter(torch.ones(dim)), "control")
        self.mlp_scale = tagged(nn.Parameter(torch.ones(dim)), "control")
        self.resid_mix = tagged(nn.Parameter(torch.stack([torch.ones(dim), torch.zeros(dim)])), "control")  # x <- a*x + b*x0
        self.input_scale = (layer + 1) ** -0.5 if h.ln_scale else 1.0
        self.ve_scale = tagged(nn.Parameter(torch.tensor(0.1)), "control") if layer in h.value_embedding_layers() else None
        self.parallel = 0 < h.parallel_resid_start <= layer  # attention and MLP both read the block's input
        # PARALLEL_RESID_LANES=2: what the MLP adds to the attention's lane and the attention to the MLP's
        lanes = self.parallel and h.parallel_resid_lanes == 2
        self.lane_cross = tagged(nn.Parameter(torch.ones(2, dim)), "control") if lanes else None

    def forward(self, x: Tensor, x0: Tensor, value_embed: Tensor | None, tail: int | None = None, docs=None) -> Tensor:
        """Outputs of every position, or of the last `tail` only (their attention still reads all);
        docs: None, or the document_mask() of this tail. A block of two lanes takes and gives x of shape
        (2, B, T, D): lane 0 feeds the attention, lane 1 the MLP."""
        mix = self.resid_mix.to(x.dtype)  # the stream keeps its dtype (see GPT.trunk)
        x = mix[0] * x + mix[1] * x0
        ve = self.ve_scale * value_embed if self.ve_scale is not None else None
        T = x.size(-2)
        tail = tail or T
        if self.lane_cross is not None:
            attn = self.attn(rms_norm(x[0]) * self.input_scale, ve, tail, docs)
            mlp = self.mlp(rms_norm(x[1, :, T - tail:]) * self.input_scale)
            cross = self.lane_cross.to(x.dtype)
            return torch.stack([x[0, :, T - tail:] + self.attn_scale.to(x.dtype) * attn + cross[0] * mlp,
                                x[1, :, T - tail:] + cross[1] * attn + self.mlp_scale.to(x.dtype) * mlp])
        normed = rms_norm(x) * self.input_scale
        attn = self.attn(normed, ve, tail, docs)
        x = x[:, T - tail:] + self.attn_scale.to(x.dtype) * attn
        mlp_in = normed[:, T - tail:] if self.parallel else rms_norm(x) * self.input_scale
        return x + self.mlp_scale.to(x.dtype) * self.mlp(mlp_in)


class BigramHash(nn.Module):
    """Embedding of a hash of (previous token, token), projected to the model width (PR #198)."""

    def __init__(self, h: Hyperparameters, qat: QatWidths = no_qat):
        super().__init__()
        self.rows = h.bigram_vocab_size
        self.embed = nn.Embedding(h.bigram_vocab_size, h.bigram_dim)
        nn.init.zeros_(tagged(self.embed.weight, "embed"))
        self.proj = Linear(h.bigram_dim, h.model_dim, "proj", "ortho", qat, gain=(2 * h.num_layers) ** -0.5)
        self.scale = tagged(nn.Parameter(torch.tensor(0.05)), "control")

    def forward(self, idx: Tensor, starts: Tensor | None = None) -> Tensor:
        """starts (DOC_MASK): BOS positions, which take the first position's row, as at a sequence start."""
        rows = bigram_rows(idx, self.rows)
        if starts is not None:
            rows = rows.masked_fill(starts, self.rows - 1)
        return self.scale * self.proj(self.embed(rows))


def bigram_rows(idx: Tensor, rows: int) -> Tensor:
    """Row (36313*t[i] XOR 27191*t[i-1]) mod (rows-1); the first position of a sequence uses rows-1."""
    hashed = torch.bitwise_xor(36313 * idx[:, 1:], 27191 * idx[:, :-1]) % (rows - 1)
    return torch.cat([torch.full_like(idx[:, :1], rows - 1), hashed], dim=1)


class SmearGate(nn.Module):
    """x_t <- (1-g) x_t + g x_{t-1}, with a learned per-channel gate g = sigmoid(w), w = 0 at init.
    SMEAR_GATE=input: g_t = sigmoid(w + x_t . u), the token's own state shifting every channel's gate
    (u = 0 at init, so it starts as the fixed gate)."""

    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.gate = tagged(nn.Parameter(torch.zeros(h.model_dim)), "control")
        self.shift = tagged(nn.Parameter(torch.zeros(h.model_dim)), "control") if h.smear_gate == "input" else None

    def forward(self, x: Tensor, starts: Tensor | None = None) -> Tensor:
        """starts (DOC_MASK): BOS positions, which mix in nothing, as a sequence's first position."""
        logit = self.gate if self.shift is None else self.gate + (x @ self.shift.to(x.dtype)).unsqueeze(-1)
        g = torch.sigmoid(logit).to(x.dtype)
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))
        if starts is not None:
            previous = previous.masked_fill(starts[..., None], 0.0)
        return (1 - g) * x + g * previous


class ValueEmbedding(nn.Module):
    """A second token embedding, projected to the key/value width and added to v in chosen blocks (PR #609)."""

    def __init__(self, h: Hyperparameters, qat: QatWidths = no_qat):
        super().__init__()
        self.embed = nn.Embedding(h.vocab_size, h.ve_dim)
        nn.init.normal_(tagged(self.embed.weight, "embed"), std=0.01)
        kv_dim = h.num_kv_heads * h.head_dim
        self.proj = Linear(h.ve_dim, kv_dim, "proj", "ortho", qat, gain=(2 * h.num_layers) ** -0.5)

    def forward(self, idx: Tensor) -> Tensor:
        return self.proj(self.embed(idx))


class GPT(nn.Module):
    def __init__(self, h: Hyperparameters, kernels: Kernels = Kernels(), qat: QatWidths = no_qat):
        super().__init__()
        self.softcap = h.logit_softcap
        self.residual_bf16 = h.residual_dtype == "bf16"
        self.doc_mask, self.attn_backend = h.doc_mask, kernels.attention
        self.loss_fused = kernels.loss == "triton"  # softcap_ce, training only: scoring keeps the plain path
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)  # tied: also the output layer
        nn.init.normal_(tagged(self.tok_emb.weight, "embed"), std=h.tied_embed_init_std)
        self.bigram = BigramHash(h, qat) if h.bigram_vocab_size else None
        self.smear = SmearGate(h)
        self.value_embed = ValueEmbedding(h, qat) if h.value_embedding_layers() else None
        self.blocks = nn.ModuleList(Block(h, layer, kernels, qat) for layer in range(h.num_layers))
        # U-Net: the first half (encoder) pushes its outputs, the decoder pops them in reverse order.
        self.num_encoder = h.num_layers // 2
        num_skips = min(self.num_encoder, h.num_layers - self.num_encoder)
        self.skip_weights = tagged(nn.Parameter(torch.ones(num_skips, h.model_dim)), "control")
        self.recur_layers, self.recur_repeats = h.recurrence_layers(), h.recur_repeats
        self.recur_on = True  # the final structure; train() holds the repeats back until RECUR_START

    def block_order(self) -> list[tuple[int, bool]]:
        """(block, first pass?) in running order: the repeats of the looped blocks follow their first
        pass. A Python value on purpose: torch.compile keeps one graph with the repeats, one without."""
        order = [(i, True) for i in range(len(self.blocks))]
        if self.recur_on and self.recur_layers:
            end = self.recur_layers[-1] + 1
            order[end:end] = [(i, False) for i in self.recur_layers] * self.recur_repeats
        return order

    def trunk(self, idx: Tensor, tail: int | None = None) -> Tensor:
        """The one forward pass shared by training and evaluation: tokens -> final normalised states,
        of every position or of the last `tail` (then the last block computes only those)."""
        # DOC_MASK: no position reads one of an earlier document (a document starts at its BOS)
        starts = idx == BOS_ID if self.doc_mask else None
        backend = forward_backend(self.attn_backend)
        docs = document_mask(idx, idx.size(1), backend) if self.doc_mask else None
        last_docs = document_mask(idx, tail, backend) if self.doc_mask and tail not in (None, idx.size(1)) else docs
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx, starts)
        x = self.smear(rms_norm(x), starts)
        if self.residual_bf16 and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # halves the traffic of every residual op
        x0 = x
        value_embed = self.value_embed(idx) if self.value_embed is not None else None
        skips, order = [], self.block_order()
        for n, (i, first) in enumerate(order):  # the U-Net skips join the blocks' first passes
            block = self.blocks[i]
            if block.lane_cross is not None and x.dim() == 3:  # the first block of two lanes: both start as x
                x = torch.stack([x, x])
            if first and i >= self.num_encoder and skips:
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            last = n == len(order) - 1
            x = block(x, x0, value_embed if block.ve_scale is not None else None, tail if last else None, last_docs if last else docs)
            if first and i < self.num_encoder:
                skips.append(x)
        return rms_norm(x.mean(0) if x.dim() == 4 else x)  # two lanes end as their mean

    def logits(self, x: Tensor) -> Tensor:
        logits = F.linear(x, self.tok_emb.weight).float()
        return self.softcap * torch.tanh(logits / self.softcap)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over all positions (training)."""
        if self.loss_fused:
            z = F.linear(self.trunk(idx), self.tok_emb.weight)
            return softcap_ce(z.flatten(0, 1), targets.flatten(), self.softcap).mean()
        logits = self.logits(self.trunk(idx))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def token_nll(self, idx: Tensor, targets: Tensor, tail: int) -> Tensor:
        """Cross-entropy of each of the last `tail` positions, shape (B, tail) (evaluation)."""
        logits = self.logits(self.trunk(idx, tail))
        return F.cross_entropy(logits.flatten(0, 1), targets[:, -tail:].flatten(), reduction="none").view(idx.size(0), tail)


def build_model(h: Hyperparameters, kernels: Kernels = Kernels()) -> GPT:
    """The same construction for training and for scoring a saved artifact; CPU, seeded init."""
    torch.manual_seed(h.seed)
    model = GPT(h, kernels, late_qat_widths(h))
    route_parameters(model)
    return model


def set_recurrence(model: GPT, on: bool) -> None:
    """Run the repeats of RECUR_LAYERS (the final structure) or not (training before RECUR_START)."""
    model.recur_on = on


def set_late_qat(model: nn.Module, on: bool) -> int:
    """Switch the fake quantizer of every quantized matrix; returns how many there are."""
    gated = [m for m in model.modules() if isinstance(m, Linear) and m.qat_bits]
    for module in gated:
        module.qat_gate.fill_(float(on))
    return len(gated)


# =============================================================================================
# Kernels: the fused implementations that Kernels selects. Each is tested against the plain torch
# code of the model section, which stays the reference (tests/triton_kernel_check.py).
# =============================================================================================

try:  # FlashAttention-3 (Hopper); PyTorch SDPA otherwise
    from flash_attn_interface import flash_attn_func as fa3_attention
except ImportError:
    fa3_attention = None
try:  # its packed-documents form, for DOC_MASK
    from flash_attn_interface import flash_attn_varlen_func as fa3_varlen_attention
except ImportError:
    fa3_varlen_attention = None
try:  # FlashAttention-4 (pip install flash-attn-4: CuTe DSL kernels for Hopper and Blackwell)
    from flash_attn.cute import interface as fa4_interface
    import importlib.metadata
    FA4_VERSION = importlib.metadata.version("flash-attn-4")
except Exception:  # not installed, or a build that cannot load on this machine
    fa4_interface, FA4_VERSION = None, None
try:  # Triton ships with PyTorch's CUDA builds: the fused MLP, q/k and XSA kernels (Hopper)
    import triton
    import triton.language as tl
    if not hasattr(tl, "make_tensor_descriptor"):  # before Triton 3.4 (PyTorch 2.8)
        triton = None
except ImportError:
    triton = None


if triton is not None:
    @triton.jit
    def norm_rotary_kernel(x_ptr, grad_ptr, gain_ptr, cos_ptr, sin_ptr, out_ptr, gain_grad_ptr, rows, positions, heads, start,
                           D: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, PASS: tl.constexpr, PASS_P2: tl.constexpr,
                           HAS_GAIN: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        """out = rotary(rms_norm(x)) * gain[head] for rows of D channels, one head at one position each
        (position start + (row // heads) % positions): channel i < HALF turns with channel i + HALF, the
        last PASS pass through. In the backward, out = x's gradient given grad at out, and gain_grad[row]
        = that row's term of gain's gradient. Each part of a row is loaded on its own, contiguously."""
        row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = row[:, None] < rows
        c, p = tl.arange(0, HALF_P2)[None, :], tl.arange(0, PASS_P2)[None, :]
        cm, pm = live & (c < HALF), live & (p < PASS)
        at, past = row[:, None] * D + c, row[:, None] * D + 2 * HALF + p
        x1 = tl.load(x_ptr + at, mask=cm, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + at + HALF, mask=cm, other=0.0).to(tl.float32)
        x3 = tl.load(x_ptr + past, mask=pm, other=0.0).to(tl.float32)
        r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1) + tl.sum(x3 * x3, 1))[:, None] / D + 1.1920928955078125e-07)
        n1, n2, n3 = x1 * r, x2 * r, x3 * r
        table = (start + (row[:, None] // heads) % positions) * HALF + c
        cos, sin = tl.load(cos_ptr + table, mask=cm, other=0.0), tl.load(sin_ptr + table, mask=cm, other=0.0)
        gain = tl.load(gain_ptr + row[:, None] % heads, mask=live, other=0.0) if HAS_GAIN else 1.0
        if BACKWARD:
            g1 = tl.load(grad_ptr + at, mask=cm, other=0.0).to(tl.float32)
            g2 = tl.load(grad_ptr + at + HALF, mask=cm, other=0.0).to(tl.float32)
            g3 = tl.load(grad_ptr + past, mask=pm, other=0.0).to(tl.float32)
            if HAS_GAIN:
                term = tl.sum(g1 * (n1 * cos + n2 * sin) + g2 * (n2 * cos - n1 * sin), 1) + tl.sum(g3 * n3, 1)
                tl.store(gain_grad_ptr + row, term, mask=row < rows)
            d1, d2, d3 = (g1 * cos - g2 * sin) * gain, (g2 * cos + g1 * sin) * gain, g3 * gain  # at n
            along = (tl.sum(d1 * n1, 1) + tl.sum(d2 * n2, 1) + tl.sum(d3 * n3, 1))[:, None] / D
            y1, y2, y3 = r * (d1 - n1 * along), r * (d2 - n2 * along), r * (d3 - n3 * along)
        else:
            y1, y2, y3 = (n1 * cos + n2 * sin) * gain, (n2 * cos - n1 * sin) * gain, n3 * gain
        tl.store(out_ptr + at, y1.to(out_ptr.dtype.element_ty), mask=cm)
        tl.store(out_ptr + at + HALF, y2.to(out_ptr.dtype.element_ty), mask=cm)
        tl.store(out_ptr + past, y3.to(out_ptr.dtype.element_ty), mask=pm)


def launch_norm_rotary(x: Tensor, gain: Tensor | None, cos: Tensor, sin: Tensor, start: int, grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """norm_rotary_kernel on x: (B, T, H, D) at positions start, start+1, ...: (out, empty), or with grad
    (x's gradient, gain's gradient term per row of D)."""
    x = x.contiguous()
    rows, half, rest = x.numel() // x.size(-1), cos.size(-1), x.size(-1) - 2 * cos.size(-1)
    out = torch.empty_like(x)
    gain_grad = x.new_empty(rows if grad is not None and gain is not None else 0, dtype=torch.float32)
    block = 16  # rows per program, 4 warps: at memory bandwidth anywhere from 8 to 64 rows
    norm_rotary_kernel[(triton.cdiv(rows, block),)](
        x, x if grad is None else grad.contiguous(), x if gain is None else gain, cos, sin, out, gain_grad,
        rows, x.size(1), x.size(2), start, D=x.size(-1), HALF=half, HALF_P2=triton.next_power_of_2(half),
        PASS=rest, PASS_P2=max(1, triton.next_power_of_2(rest)), HAS_GAIN=gain is not None, BACKWARD=grad is not None,
        BLOCK=block, num_warps=4)
    return out, gain_grad


@torch.library.custom_op("golf::norm_rotary", mutates_args=())
def norm_rotary(x: Tensor, gain: Tensor | None, cos: Tensor, sin: Tensor, start: int) -> Tensor:
    """rotary(rms_norm(x)) * gain[head] (gain may be None) for x (B, T, H, D) at positions start, start+1, ...,
    in one kernel each way, computed in fp32. Inductor's kernels for the same ran at about half the memory
    bandwidth; the backward recomputes the normalised x from x instead of reading a stored copy."""
    return launch_norm_rotary(x, gain, cos, sin, start, None)[0]


@norm_rotary.register_fake
def _(x: Tensor, gain: Tensor | None, cos: Tensor, sin: Tensor, start: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("golf::norm_rotary_backward", mutates_args=())
def norm_rotary_backward(grad: Tensor, x: Tensor, gain: Tensor | None, cos: Tensor, sin: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """norm_rotary's gradient at x given grad at its output, and gain's gradient term of each row of D channels
    (float32; empty without gain)."""
    return launch_norm_rotary(x, gain, cos, sin, start, grad)


@norm_rotary_backward.register_fake
def _(grad: Tensor, x: Tensor, gain: Tensor | None, cos: Tensor, sin: Tensor, start: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.numel() // x.size(-1) if gain is not None else 0, dtype=torch.float32)


def _norm_rotary_save(ctx, inputs: tuple, output: Tensor) -> None:
    x, gain, cos, sin, ctx.start = inputs
    ctx.save_for_backward(x, gain, cos, sin)


def _norm_rotary_grads(ctx, grad: Tensor) -> tuple:
    x, gain, cos, sin = ctx.saved_tensors
    grad_x, gain_terms = norm_rotary_backward(grad, x, gain, cos, sin, ctx.start)
    return grad_x, None if gain is None else gain_terms.view(-1, x.size(2)).sum(0), None, None, None  # rows of a head summed


norm_rotary.register_autograd(_norm_rotary_grads, setup_context=_norm_rotary_save)


@torch.library.custom_op("golf::fa4_attention", mutates_args=())
def fa4_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """FlashAttention-4's causal forward in the (B, T, H, D) layout, GQA by head count, the mask aligned
    to the last positions: (out, log-sum-exp (B, H, Tq)). A custom op, so that torch.compile keeps it whole."""
    out, lse = fa4_interface._flash_attn_fwd(q, k, v, causal=True, return_lse=True)[:2]
    return out, lse


@fa4_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty((q.size(0), q.size(2), q.size(1)), dtype=torch.float32)


@torch.library.custom_op("golf::fa4_attention_backward", mutates_args=())
def fa4_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = fa4_interface._flash_attn_bwd(q, k, v, out, grad.contiguous(), lse, causal=True)[:3]
    return dq, dk, dv


@fa4_attention_backward.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa4_save(ctx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs, *output)


def _fa4_backward(ctx, grad: Tensor, grad_lse: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return fa4_attention_backward(grad, *ctx.saved_tensors)  # lse is not an output the model uses


fa4_attention.register_autograd(_fa4_backward, setup_context=_fa4_save)


@torch.library.custom_op("golf::fa4_varlen_attention", mutates_args=())
def fa4_varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> tuple[Tensor, Tensor]:
    """fa4_attention over documents packed into one stream: q (total_q, H, D), k, v (total_k, Hkv, D); document i's
    queries q[cu_q[i]:cu_q[i+1]] are the last of its keys k[cu_k[i]:cu_k[i+1]]. Returns (out, lse (H, total_q))."""
    out, lse = fa4_interface._flash_attn_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                             max_seqlen_k=max_k, causal=True, return_lse=True)[:2]
    return out, lse


@fa4_varlen_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty((q.size(1), q.size(0)), dtype=torch.float32)


@torch.library.custom_op("golf::fa4_varlen_attention_backward", mutates_args=())
def fa4_varlen_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                                  cu_k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = fa4_interface._flash_attn_bwd(q, k, v, out, grad.contiguous(), lse, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)[:3]
    return dq, dk, dv


@fa4_varlen_attention_backward.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa4_varlen_save(ctx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs[:5], *output)


def _fa4_varlen_backward(ctx, grad: Tensor, grad_lse: Tensor | None) -> tuple:
    q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
    return *fa4_varlen_attention_backward(grad, q, k, v, out, lse, cu_q, cu_k), None, None, None, None


fa4_varlen_attention.register_autograd(_fa4_varlen_backward, setup_context=_fa4_varlen_save)


if triton is not None:
    @triton.jit
    def xsa_kernel(y_ptr, v_ptr, grad_ptr, out_ptr, grad_v_ptr, rows, G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr,
                   D_P2: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        """exclusive_self_attention on rows of one kv head at one position: v (rows, D) and the G query heads'
        outputs y (rows, G, D). In the backward, out = y's gradient given grad at the output, and grad_v = v's."""
        row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        d, g = tl.arange(0, D_P2)[None, :], tl.arange(0, G_P2)[None, :, None]
        vm = (row[:, None] < rows) & (d < D)
        ym = vm[:, None, :] & (g < G)
        at = (row[:, None, None] * G + g) * D + d[:, None, :]
        v = tl.load(v_ptr + row[:, None] * D + d, mask=vm, other=0.0).to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(v * v, 1)), 1e-12)[:, None]  # F.normalize's
        v_hat = v * inv
        y = tl.load(y_ptr + at, mask=ym, other=0.0).to(tl.float32)
        along = tl.sum(y * v_hat[:, None, :], 2)[:, :, None]
        if BACKWARD:
            grad = tl.load(grad_ptr + at, mask=ym, other=0.0).to(tl.float32)
            grad_along = tl.sum(grad * v_hat[:, None, :], 2)[:, :, None]
            out = grad - grad_along * v_hat[:, None, :]
            grad_v_hat = -tl.sum(along * grad + grad_along * y, 1)
            grad_v = (grad_v_hat - tl.sum(grad_v_hat * v_hat, 1)[:, None] * v_hat) * inv
            tl.store(grad_v_ptr + row[:, None] * D + d, grad_v.to(grad_v_ptr.dtype.element_ty), mask=vm)
        else:
            out = y - along * v_hat[:, None, :]
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=ym)


def launch_xsa(y: Tensor, v: Tensor, grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """xsa_kernel: (exclusive_self_attention(y, v), empty), or with grad (y's gradient, v's gradient)."""
    y, v = y.contiguous(), v.contiguous()
    rows, D = v.numel() // v.size(-1), v.size(-1)
    out, grad_v = torch.empty_like(y), torch.empty_like(v) if grad is not None else v.new_empty(0)
    block = 16  # rows per program, 4 warps, as norm_rotary's
    xsa_kernel[(triton.cdiv(rows, block),)](y, v, y if grad is None else grad.contiguous(), out, grad_v, rows,
                                            G=y.size(2) // v.size(2), G_P2=triton.next_power_of_2(y.size(2) // v.size(2)),
                                            D=D, D_P2=triton.next_power_of_2(D), BACKWARD=grad is not None, BLOCK=block, num_warps=4)
    return out, grad_v


@torch.library.custom_op("golf::xsa", mutates_args=())
def xsa(y: Tensor, v: Tensor) -> Tensor:
    """exclusive_self_attention(y, v) in one kernel each way, computed in fp32 (inductor's took about twice
    the time, the backward in three kernels)."""
    return launch_xsa(y, v, None)[0]


@xsa.register_fake
def _(y: Tensor, v: Tensor) -> Tensor:
    return torch.empty_like(y)


@torch.library.custom_op("golf::xsa_backward", mutates_args=())
def xsa_backward(grad: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """xsa's gradients at y and v given grad at its output."""
    return launch_xsa(y, v, grad)


@xsa_backward.register_fake
def _(grad: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(y), torch.empty_like(v)


def _xsa_save(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _xsa_grads(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
    return xsa_backward(grad, *ctx.saved_tensors)


xsa.register_autograd(_xsa_grads, setup_context=_xsa_save)


if triton is not None:
    @triton.jit
    def relu2_matmul_kernel(a_ptr, b_ptr, act_ptr, out_ptr, M, N, K, BACKWARD: tl.constexpr, PROGRAMS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """out = relu(A @ B^T)^2, or in the backward out = (A @ B^T) * 2 sqrt(act), where A @ B^T is the
        gradient at act = relu(h)^2, so sqrt(act) = relu(h). A: (M, K), B: (N, K), act and out: (M, N),
        all row-major. Persistent: PROGRAMS programs walk the output tiles, GROUP_M tile rows at a time
        so that B's tiles stay in L2; loads and stores go through TMA, the epilogue in two halves."""
        half: tl.constexpr = BLOCK_N // 2
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        act_desc = tl.make_tensor_descriptor(act_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, half])
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, half])
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=True):
            group, within = tile // (GROUP_M * tiles_n), tile % (GROUP_M * tiles_n)
            rows = min(tiles_m - group * GROUP_M, GROUP_M)
            m0, n0 = (group * GROUP_M + within % rows) * BLOCK_M, (within // rows) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                acc = tl.dot(a_desc.load([m0, k0]), b_desc.load([n0, k0]).T, acc)
            halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))
            for i in tl.static_range(2):
                if BACKWARD:
                    out = halves[i] * 2.0 * tl.sqrt(act_desc.load([m0, n0 + i * half]).to(tl.float32))
                else:
                    out = tl.maximum(halves[i], 0.0)
                    out = out * out
                out_desc.store([m0, n0 + i * half], out.to(out_ptr.dtype.element_ty))


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the fastest of a sweep at the record's shapes on an H100
RELU2_TILES = {False: (128, 256, 64, 8, 4), True: (128, 256, 64, 8, 3)}


def relu2_matmul(a: Tensor, b: Tensor, act: Tensor | None) -> Tensor:
    """relu(a @ b.T)^2, or (a @ b.T) * 2 sqrt(act) when act is given: relu2_matmul_kernel."""
    a, b = a.contiguous(), b.contiguous()
    out = a.new_empty(a.size(0), b.size(0))
    block_m, block_n, block_k, warps, stages = RELU2_TILES[act is not None]
    tiles = triton.cdiv(a.size(0), block_m) * triton.cdiv(b.size(0), block_n)
    programs = min(tiles, torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 2)
    # Scratch for the TMA descriptors. Set on every call: Triton keeps it in a ContextVar, and the
    # backward runs on autograd's own thread, which a setting made once at start-up would not reach.
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=a.device))
    relu2_matmul_kernel[(programs,)](a, b, out if act is None else act, out, a.size(0), b.size(0), a.size(1),
                                     BACKWARD=act is not None, PROGRAMS=programs, BLOCK_M=block_m, BLOCK_N=block_n,
                                     BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages)
    return out


@torch.library.custom_op("golf::relu2_mlp", mutates_args=())
def relu2_mlp(x: Tensor, w_fc: Tensor, w_proj: Tensor) -> tuple[Tensor, Tensor]:
    """(relu(x @ w_fc^T)^2 @ w_proj^T, act = relu(x @ w_fc^T)^2) for 2-D x, with relu^2 inside the Triton
    matmuls. Against the separate matmuls and relu^2 kernels this never writes the pre-activation h: the
    backward reads relu(h) back as sqrt(act) from the act that w_proj's gradient needs anyway."""
    act = relu2_matmul(x, w_fc, None)
    return act @ w_proj.T, act


@relu2_mlp.register_fake
def _(x: Tensor, w_fc: Tensor, w_proj: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.size(0), w_proj.size(0)), x.new_empty(x.size(0), w_fc.size(0))


@torch.library.custom_op("golf::relu2_mlp_backward", mutates_args=())
def relu2_mlp_backward(grad: Tensor, x: Tensor, w_fc: Tensor, w_proj: Tensor, act: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """relu2_mlp's gradients at x, w_fc and w_proj given grad at its output, from its act."""
    grad_h = relu2_matmul(grad, w_proj.T, act)
    return grad_h @ w_fc, grad_h.T @ x, grad.T @ act


@relu2_mlp_backward.register_fake
def _(grad: Tensor, x: Tensor, w_fc: Tensor, w_proj: Tensor, act: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(w_fc), torch.empty_like(w_proj)


def _relu2_mlp_save(ctx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs, output[1])


def _relu2_mlp_grads(ctx, grad: Tensor, grad_act: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return relu2_mlp_backward(grad, *ctx.saved_tensors)  # act is not an output the model uses


relu2_mlp.register_autograd(_relu2_mlp_grads, setup_context=_relu2_mlp_save)


def relu2_mlp_fits(h: Hyperparameters) -> bool:
    """Whether relu2_mlp can run this model's MLP: relu^2 (its backward reads relu(h) back as sqrt(act),
    which loses leaky_relu's sign), and widths that are whole 16-byte rows for TMA."""
    return h.mlp_act == "relu2" and h.model_dim % 8 == 0 and int(h.mlp_mult * h.model_dim) % 8 == 0


if triton is not None:
    @triton.jit
    def softcap_ce_kernel(z_ptr, target_ptr, grad_ptr, out_ptr, V, cap, BACKWARD: tl.constexpr, BLOCK_V: tl.constexpr):
        """One row of logits z (rows, V), s = cap * tanh(z / cap): out[row] = logsumexp(s) - s[target], or in the
        backward out[row, :] = z's gradient, grad[row] * (softmax(s) - onehot(target)) * (1 - tanh^2)."""
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, BLOCK_V)
        live = col < V
        z = tl.load(z_ptr + row * V + col, mask=live, other=0.0).to(tl.float32)
        # tanh(z / cap) and its derivative 1 - tanh^2 from e = exp(-2|z| / cap) in (0, 1]: no overflow, and
        # 1 - tanh^2 keeps its precision where the cap saturates (1 - t * t would cancel there)
        e = tl.exp(-2.0 * tl.abs(z) / cap)
        t = tl.where(z < 0, e - 1.0, 1.0 - e) / (1.0 + e)
        s = tl.where(live, cap * t, float("-inf"))
        top = tl.max(s, 0)
        p = tl.exp(s - top)
        total = tl.sum(p, 0)
        hit = col == tl.load(target_ptr + row)
        if BACKWARD:
            g = tl.load(grad_ptr + row).to(tl.float32)
            dz = g * (p / total - hit.to(tl.float32)) * (4.0 * e / ((1.0 + e) * (1.0 + e)))
            tl.store(out_ptr + row * V + col, dz.to(out_ptr.dtype.element_ty), mask=live)
        else:
            tl.store(out_ptr + row, top + tl.log(total) - tl.sum(tl.where(hit, s, 0.0), 0))


def launch_softcap_ce(z: Tensor, targets: Tensor, cap: float, grad: Tensor | None) -> Tensor:
    """softcap_ce_kernel on logits z (rows, V): each row's loss (float32), or with grad (rows,) z's gradient."""
    z, targets = z.contiguous(), targets.contiguous()
    out = torch.empty_like(z) if grad is not None else z.new_empty(z.size(0), dtype=torch.float32)
    softcap_ce_kernel[(z.size(0),)](z, targets, z if grad is None else grad.contiguous(), out, z.size(1), cap,
                                    BACKWARD=grad is not None, BLOCK_V=triton.next_power_of_2(z.size(1)),
                                    num_warps=4 if z.size(1) <= 2048 else 8)
    return out


@torch.library.custom_op("golf::softcap_ce", mutates_args=())
def softcap_ce(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """F.cross_entropy(cap * tanh(z / cap), targets, reduction="none") for 2-D z (float32), in one kernel each way,
    computed in fp32 from z as it comes out of the output matmul: the float32 logits and their soft-capped
    copy (rows x vocabulary each) are never written; the backward recomputes them from z."""
    return launch_softcap_ce(z, targets, cap, None)


@softcap_ce.register_fake
def _(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    return z.new_empty(z.size(0), dtype=torch.float32)


@torch.library.custom_op("golf::softcap_ce_backward", mutates_args=())
def softcap_ce_backward(grad: Tensor, z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """softcap_ce's gradient at z given grad (rows,) at its losses."""
    return launch_softcap_ce(z, targets, cap, grad)


@softcap_ce_backward.register_fake
def _(grad: Tensor, z: Tensor, targets: Tensor, cap: float) -> Tensor:
    return torch.empty_like(z)


def _softcap_ce_save(ctx, inputs: tuple, output: Tensor) -> None:
    z, targets, ctx.cap = inputs
    ctx.save_for_backward(z, targets)


def _softcap_ce_grads(ctx, grad: Tensor) -> tuple:
    z, targets = ctx.saved_tensors
    return softcap_ce_backward(grad, z, targets, ctx.cap), None, None


softcap_ce.register_autograd(_softcap_ce_grads, setup_context=_softcap_ce_save)


# =============================================================================================
# Optimisers
# =============================================================================================

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz iteration of Muon (modded-nanogpt)

# MUON_NS=polar: Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932), an odd quintic per
# iteration, each the minimax approximation of 1 on the interval the iterations before leave the singular
# values in (from [1e-3, 1]), so that the small ones grow as fast as possible. Derived with the paper's method
# (its cushion and recentring, docs/OPTIM.md; tests/test_train_optim.py derives them again); they agree with
# the paper's table. From the 8th iteration on the interval is within 1e-9 of 1 and the polynomial is the
# limit one, (15, -10, 3) / 8 (p(1) = 1, p'(1) = p''(1) = 0).
POLAR_EXPRESS = (
    (8.287212018145622, -23.595886519098816, 17.30038731253092),
    (4.1070591115422035, -2.9478499167379124, 0.5448431082926607),
    (3.948690853482292, -2.9089021159629462, 0.5518191394370129),
    (3.3184196573706, -2.488488024314874, 0.51004894012372),
    (2.300652019954819, -1.66890398457475, 0.41880731195256693),
    (1.891301407787398, -1.2679958271945877, 0.37680408948524907),
    (1.8750014808356787, -1.2500016453643534, 0.3750001645295991),
)
POLAR_EXPRESS_LIMIT = (15 / 8, -10 / 8, 3 / 8)
# The paper's safety margins: the input is scaled to a Frobenius norm of 1 / 1.01 and each derived polynomial
# is applied as p(x / 1.01), so that singular values that bf16 rounding pushed up to 1% above the interval's
# top stay inside it (a quintic grows fast outside it).
POLAR_SAFETY = 1.01


def ns_coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` iterations: Muon's fixed quintic (ns5) or Polar Express's (polar)."""
    if method == "ns5":
        return [NS_COEFFS] * steps
    s = POLAR_SAFETY
    table = [(a / s, b / s**3, c / s**5) for a, b, c in POLAR_EXPRESS]
    return [table[i] if i < len(table) else POLAR_EXPRESS_LIMIT for i in range(steps)]


def newton_schulz(g: Tensor, steps: int, method: str = "ns5", row_norm: bool = False) -> Tensor:
    """Approximately orthogonalise every matrix of a (n, rows, cols) batch, in bf16: `steps` iterations of
    X <- aX + (bA + cA^2)X, A = XX^T (coefficients: ns_coefficients). row_norm (MuonEq-R, MUON_ROW_NORM):
    each row of g is first scaled to unit norm, so that no row's scale decides the update's directions."""
    if row_norm:
        g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-7)  # a zero row (bucket padding) stays zero
    x = g.bfloat16()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True)
    x = x / ((norm * POLAR_SAFETY if method == "polar" else norm) + 1e-7)
    for a, b, c in ns_coefficients(method, steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if transposed else x


class MuonBucket:
    """Muon matrices of one shape. Each rank owns `per_rank` consecutive slots of the (padded) stack."""

    def __init__(self, params: list[nn.Parameter], world_size: int):
        self.params = params
        self.per_rank = math.ceil(len(params) / world_size)
        self.padding = [torch.zeros_like(params[0])] * (self.per_rank * world_size - len(params))
        rows, cols = params[0].shape
        self.update_scale = max(1.0, rows / cols) ** 0.5
        self.momentum = None  # this rank's slots only


class Optimizers:
    """Muon for the block matrices, AdamW for embeddings and control tensors (routing: ROUTES).

    One step: average the gradients over ranks (Muon buckets are reduce-scattered, so each rank holds
    only the slots it orthogonalises; the rest is all-reduced), clip by the global norm, then Muon on
    each rank's slots with the updates all-gathered, then AdamW. Communication overlaps compute: the
    reductions are all in flight together, and each bucket's all-gather runs during the Newton-Schulz
    of the buckets after it. The arithmetic applied to each matrix is the same for any world size."""

    def __init__(self, model: nn.Module, routes: dict[str, str], h: Hyperparameters, rt: Runtime, orthogonalize):
        self.h, self.rt, self.orthogonalize = h, rt, orthogonalize
        named = dict(model.named_parameters())
        group = {key: [named[n] for n, role in routes.items() if ROUTES[role][0] == key] for key in ("muon", "adam_embed", "adam_scalar")}
        by_shape: dict[tuple, list] = {}
        for p in group["muon"]:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        self.buckets = [MuonBucket(ps, rt.world_size) for ps in by_shape.values()]
        self.adam_params = group["adam_embed"] + group["adam_scalar"]
        self.adam = torch.optim.AdamW(
            [dict(params=group["adam_embed"], lr=h.tied_embed_lr, base_lr=h.tied_embed_lr),
             dict(params=group["adam_scalar"], lr=h.scalar_lr, base_lr=h.scalar_lr)],
            betas=(h.beta1, h.beta2), eps=h.adam_eps, weight_decay=h.adam_wd, fused=rt.device.type == "cuda")

    @torch.no_grad()
    def step(self, lr_scale: float, momentum: float, wd_scale: float = 1.0) -> None:
        h, rt = self.h, self.rt
        adam_grads = torch.cat([p.grad.flatten() for p in self.adam_params])
        pending = [dist.all_reduce(adam_grads, op=dist.ReduceOp.AVG, async_op=True)] if rt.distributed else []
        shards = []
        for bucket in self.buckets:  # every reduction is in flight at once
            stack = torch.stack([p.grad for p in bucket.params] + bucket.padding)
            if rt.distributed:
                shard = stack.new_empty((bucket.per_rank, *stack.shape[1:]))
                pending.append(dist.reduce_scatter_tensor(shard, stack, op=dist.ReduceOp.AVG, async_op=True))
                stack = shard
            shards.append(stack)
        for work in pending:
            work.wait()

        if h.grad_clip_norm > 0:
            square_sum = sum(s.float().square().sum() for s in shards)
            if rt.distributed:
                dist.all_reduce(square_sum)  # the ranks' slots are disjoint
            total_norm = (square_sum + adam_grads.float().square().sum()).sqrt()
            clip = (h.grad_clip_norm / (total_norm + 1e-6)).clamp(max=1.0)
            adam_grads.mul_(clip)
            for s in shards:
                s.mul_(clip)

        lr = h.matrix_lr * lr_scale
        updates = []
        for bucket, grad in zip(self.buckets, shards):
            if bucket.momentum is None:
                bucket.momentum = torch.zeros_like(grad)
            bucket.momentum.mul_(momentum).add_(grad)
            update = self.orthogonalize(grad.add(bucket.momentum, alpha=momentum), h.muon_backend_steps,  # Nesterov
                                        h.muon_ns, h.muon_row_norm)
            update, work = update * bucket.update_scale, None
            if rt.distributed:  # gathered while the next buckets are orthogonalised
                gathered = update.new_empty((bucket.per_rank * rt.world_size, *update.shape[1:]))
                work = dist.all_gather_into_tensor(gathered, update, async_op=True)
                update = gathered
            updates.append((bucket, update, work))
        for bucket, update, work in updates:
            if work is not None:
                work.wait()
            torch._foreach_mul_(bucket.params, 1.0 - lr * h.muon_wd * wd_scale)
            torch._foreach_add_(bucket.params, list(update[:len(bucket.params)].float().unbind(0)), alpha=-lr)

        torch._foreach_copy_([p.grad for p in self.adam_params],
                             [g.view_as(p) for g, p in zip(adam_grads.split([p.numel() for p in self.adam_params]), self.adam_params)])
        for group in self.adam.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        self.adam.step()
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = None
        self.adam.zero_grad(set_to_none=True)


def lr_scale_at(h: Hyperparameters, step: int, elapsed_ms: float, cap_ms: float) -> float:
    """Constant, then linear warm-down to 0 over the last WARMDOWN_ITERS steps before ITERATIONS.
    Under a time cap (cap_ms > 0: the end of the training loop) the warm-down also lasts WARMDOWN_ITERS
    times the mean step time so far and ends at the cap: whichever limit comes first reaches 0.
    Never below MIN_LR (the records' floor: the last steps still learn)."""
    if h.warmdown_iters <= 0:
        return 1.0
    by_steps = min(max((h.iterations - step) / h.warmdown_iters, 0.0), 1.0)
    if cap_ms <= 0 or step == 0 or elapsed_ms <= 0:  # no cap, or no step time known yet
        return max(by_steps, h.min_lr)
    warmdown_ms = h.warmdown_iters * elapsed_ms / step
    return max(min(max(cap_ms - elapsed_ms, 0.0) / warmdown_ms, by_steps), h.min_lr)


def training_fraction(h: Hyperparameters, step: int, elapsed_ms: float, cap_ms: float) -> float:
    """How far training is after `step` steps, 0..1: of ITERATIONS, or under a time cap (cap_ms > 0) of the
    time if that is further (whichever limit ends training first)."""
    by_time = elapsed_ms / cap_ms if cap_ms > 0 else 0.0
    return min(max(step / h.iterations, by_time), 1.0)


def wd_scale_at(h: Hyperparameters, fraction: float) -> float:
    """WD_TAPER=MULT@START: Muon's weight decay times 1 until START, then linearly down to MULT at the end."""
    taper = h.wd_taper_schedule()
    if taper is None:
        return 1.0
    mult, start = taper
    return 1.0 - (1.0 - mult) * max(fraction - start, 0.0) / (1.0 - start)


def train_seq_len_at(h: Hyperparameters, fraction: float) -> int:
    """TRAIN_SEQ_SCHEDULE: the length of the last entry that has started by `fraction`."""
    return [length for start, length in h.seq_schedule() if start <= fraction][-1]


def muon_momentum_at(h: Hyperparameters, step: int) -> float:
    frac = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum


# =============================================================================================
# Weight averaging
# =============================================================================================

class WeightAverager:
    """EMA of every parameter (updated every step) or SWA (uniform mean of snapshots taken every
    SWA_EVERY steps once the LR scale is below SWA_THRESHOLD), in fp32; `apply` loads it into the
    model before export."""

    def __init__(self, model: nn.Module, h: Hyperparameters):
        self.h = h
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params] if h.weight_avg == "ema" else None
        self.swa_sum = [torch.zeros_like(p, dtype=torch.float32) for p in self.params] if h.weight_avg == "swa" else None
        self.swa_count = 0

    @torch.no_grad()
    def update(self, step: int, lr_scale: float) -> None:
        if self.shadow is not None:
            torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.h.ema_decay)
        elif self.swa_sum is not None and lr_scale < self.h.swa_threshold and step % self.h.swa_every == 0:
            torch._foreach_add_(self.swa_sum, self.params)
            self.swa_count += 1

    @torch.no_grad()
    def apply(self) -> str:
        if self.shadow is not None:
            torch._foreach_copy_(self.params, self.shadow)
            return f"weight_avg:ema decay:{self.h.ema_decay} applied"
        if self.swa_sum is None:
            return "weight_avg:none (live weights exported)"
        if self.swa_count == 0:
            return f"weight_avg:swa took no snapshot (the LR scale never fell below {self.h.swa_threshold}): live weights exported"
        torch._foreach_copy_(self.params, torch._foreach_div(self.swa_sum, float(self.swa_count)))
        return f"weight_avg:swa snapshots:{self.swa_count} applied"


# =============================================================================================
# Quantization and export
# =============================================================================================

SIZE_CAP_BYTES = 16_000_000      # artifact + code, decimal
GPTQ_LITE_CLIPS = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # clip quantiles tried per row (PR #531)
SMALL_TENSOR_NUMEL = 65_536      # quantizable tensors this small are stored as fp16
EMBED_CLIP_QUANTILE = 0.9999984  # int8 embeddings clip each row at this quantile of |w|
FP16_MIN_NORMAL = 2.0 ** -14
ZSTD_LEVEL = 22
ARTIFACT_MAGIC = b"PGOLF-ARTIFACT\x00\x01"

try:
    import zstandard
except ImportError:
    zstandard = None


def block_of(name: str) -> int | None:
    """The block index of a parameter name (blocks.<i>. ...), None outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def late_qat_widths(h: Hyperparameters) -> QatWidths:
    """With LATE_QAT_THRESHOLD > 0, each integer-exported matrix fake-quantizes to its export width."""
    def width(role: str, numel: int) -> int:
        fmt = export_format(h, role, numel)
        return fmt.bits if h.late_qat_threshold > 0 and fmt.encoding == "int" else 0
    return width


class Format(NamedTuple):
    """How a tensor is stored: "int" rows of `bits` with one fp16 scale each (clip: see export_format),
    or "fp16", or "fp32"."""
    encoding: str
    bits: int = 0
    clip: float = 1.0


def export_format(h: Hyperparameters, role: str, numel: int, block: int | None = None) -> Format:
    """The Format of a parameter of this role and size (in this block): int, fp16 or fp32.
    The clip is a quantile of |w| with CLIP=search, a multiple of the row's standard deviation with
    CLIP=std (side projections take the attention's)."""
    category = ROUTES[role][1]
    if category == "control":
        return Format("fp32")
    if numel <= SMALL_TENSOR_NUMEL:
        return Format("fp16")
    bits = {"attn": h.attn_bits, "mlp": h.mlp_bits, "embed": h.embed_bits, "proj": 8}[category]
    if block is not None and category in ("attn", "mlp") and (widths := h.block_bits(category)):
        bits = widths[block]
    if h.clip == "std":
        return Format("int", bits, {"attn": h.clip_std_k_attn, "mlp": h.clip_std_k_mlp, "embed": h.clip_std_k_embed, "proj": h.clip_std_k_attn}[category])
    return Format("int", bits, EMBED_CLIP_QUANTILE if category == "embed" else 1.0)


def fp16_steps(magnitude: Tensor, bits: int) -> Tensor:
    """The per-row step magnitude / (2^(bits-1) - 1), rounded up to an fp16 value so that weights up to
    the magnitude stay within the integer range."""
    qmax = 2 ** (bits - 1) - 1
    scale = (magnitude / qmax).clamp_min(FP16_MIN_NORMAL)
    scale16 = scale.half()
    return torch.where(scale16.float() < scale, (scale * (1 + 2.0 ** -10)).half(), scale16)


def row_scales(w: Tensor, bits: int, clip: float = 1.0) -> Tensor:
    """One fp16 step per row: the row's max |w|, or its `clip` quantile."""
    return fp16_steps(w.abs().amax(dim=-1) if clip >= 1.0 else torch.quantile(w.abs(), clip, dim=-1), bits)


def std_scales(w: Tensor, bits: int, k: float) -> Tensor:
    """One fp16 step per row for a clip of k row standard deviations (the 2026-04-05 record's SDClip):
    one rounding pass instead of a clip search; a large k leaves levels unused, which compresses."""
    return fp16_steps(k * w.float().std(dim=-1, correction=0), bits)


def round_to_grid(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / scale.float()[..., None]), -qmax, qmax).to(torch.int8)


def quantize_rows(w: Tensor, bits: int, clip: float = 1.0) -> tuple[Tensor, Tensor]:
    """Round to nearest: symmetric per-row integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1] and fp16
    row scales. Unclipped weights are off by at most scale / 2."""
    scale = row_scales(w.float(), bits, clip)
    return round_to_grid(w.float(), scale, bits), scale


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[..., None]


def fake_quantize(w: Tensor, bits: int) -> Tensor:
    return dequantize_rows(*quantize_rows(w, bits))


def best_clip_scales(w: Tensor, bits: int) -> Tensor:
    """GPTQ-lite (PR #531), done per row: each row takes the clip quantile among GPTQ_LITE_CLIPS whose
    rounding leaves the least squared error in that row."""
    w = w.float()
    best_scale, best_error = None, None
    for clip in GPTQ_LITE_CLIPS:
        scale = row_scales(w, bits, clip)
        error = (dequantize_rows(round_to_grid(w, scale, bits), scale) - w).square().sum(dim=-1)
        if best_error is None:
            best_scale, best_error = scale, error
        else:
            best_scale = torch.where(error < best_error, scale, best_scale)
            best_error = torch.minimum(error, best_error)
    return best_scale


def gptq_round(w: Tensor, hessian: Tensor, scale: Tensor, bits: int, block: int = 128, damp: float = 0.01) -> Tensor:
    """GPTQ (Frantar et al. 2022, as in PR #609) for a batch of matrices w (n, rows, cols) with input
    Hessians (n, cols, cols) = sum of x x^T over calibration inputs and fixed row scales (n, rows).
    Columns are quantized in order of decreasing Hessian diagonal; each column's rounding error is
    spread over the columns not yet quantized through the Cholesky factor of the inverse Hessian
    (dampened by `damp` times its mean diagonal), block by block. Returns int8 values."""
    qmax = 2 ** (bits - 1) - 1
    w, H = w.float().clone(), hessian.float().clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    diag.masked_fill_(diag == 0, 1.0)  # inputs never active in calibration: plain rounding, weights kept
    diag.add_(damp * diag.mean(dim=-1, keepdim=True))
    order = diag.argsort(dim=-1, descending=True)
    w = w.take_along_dim(order[:, None, :], dim=2)
    H = H.take_along_dim(order[:, :, None], dim=1).take_along_dim(order[:, None, :], dim=2)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    step = scale.float()[:, :, None]
    q = torch.zeros_like(w)
    cols = w.size(2)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, E1, U1 = w[:, :, i1:i2].clone(), torch.zeros_like(w[:, :, i1:i2]), U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = W1[:, :, i:i + 1]
            qc = torch.clamp(torch.round(column / step), -qmax, qmax)
            q[:, :, i1 + i:i1 + i + 1] = qc
            error = (column - qc * step) / U1[:, None, i:i + 1, i]
            W1[:, :, i:] -= error * U1[:, None, i, i:]
            E1[:, :, i:i + 1] = error
        w[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]
    return q.take_along_dim(order.argsort(dim=-1)[:, None, :], dim=2).to(torch.int8)


def quantize_state(state: dict[str, Tensor], formats: dict[str, Format], h: Hyperparameters,
                   hessians: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """(int8 values, fp16 row scales) of every tensor exported as integers. Embeddings use their fixed
    clip quantile; matrices use QUANT_METHOD: rtn (row max), gptq_lite (best clip per row) or gptq
    (best clip per row, then GPTQ rounding with the Hessians of their inputs). With CLIP=std every
    row's clip is k row standard deviations, then GPTQ rounds where there is a Hessian, otherwise
    rounding to nearest. Matrices of one shape are solved together; the work runs where the Hessians are."""
    quantized, batches = {}, {}
    for name, fmt in formats.items():
        if fmt.encoding != "int":
            continue
        w, bits, clip = state[name], fmt.bits, fmt.clip
        if h.clip == "std":  # the row step is fixed by the row's spread; GPTQ, where there is a Hessian, rounds
            if h.quant_method == "gptq" and name in hessians:
                batches.setdefault((tuple(w.shape), bits), []).append(name)
            else:
                scale = std_scales(w, bits, clip)
                quantized[name] = (round_to_grid(w.float(), scale, bits), scale)
        elif clip < 1.0 and h.quant_method == "gptq" and name in hessians:  # the tied embedding, as the output layer
            scale = row_scales(w.float(), bits, clip)
            quantized[name] = (gptq_round(w[None].to(hessians[name].device), hessians[name][None], scale[None].to(hessians[name].device),
                                          bits, damp=h.gptq_damp)[0], scale)
        elif clip < 1.0 or h.quant_method == "rtn":
            quantized[name] = quantize_rows(w, bits, clip)
        elif h.quant_method == "gptq" and name in hessians:
            batches.setdefault((tuple(w.shape), bits), []).append(name)
        else:
            scale = best_clip_scales(w, bits)
            quantized[name] = (round_to_grid(w.float(), scale, bits), scale)
    for (_, bits), names in batches.items():
        H = torch.stack([hessians[n] for n in names])
        w = torch.stack([state[n] for n in names]).to(H.device)
        if h.clip == "std":
            scale = torch.stack([std_scales(w[i], bits, formats[n].clip) for i, n in enumerate(names)])
        else:
            scale = best_clip_scales(w, bits)
        q = gptq_round(w, H, scale, bits, damp=h.gptq_damp)
        for i, name in enumerate(names):
            quantized[name] = (q[i], scale[i])
    return {name: (q.cpu(), scale.cpu()) for name, (q, scale) in quantized.items()}  # packing reads host memory


# A matrix with a low-rank correction stores it as two int tensors of its own: a (rank, rows) and
# b (rank, cols), one row scale per singular direction; the loader adds a^T b to the matrix.
LQER_SUFFIXES = (".lqer_a", ".lqer_b")


def rounding_damage(w: Tensor, q: Tensor, scale: Tensor, hessian: Tensor | None, correction: Tensor | None = None) -> float:
    """The squared output error of the rounded (and corrected) matrix over the calibration inputs,
    tr(E H E^T) with E = w - dequantized (- correction); the squared error of the weights without a Hessian."""
    e = w.float() - dequantize_rows(q, scale)
    if correction is not None:
        e = e - correction
    if hessian is None:
        return float(e.square().sum())
    e = e.to(hessian.device)
    return float(((e @ hessian.float()) * e).sum())


def low_rank_correction(w: Tensor, q: Tensor, scale: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """LQER (Zhang et al. 2024; the 2026-04-27 record): the best rank-r approximation a^T b of the
    rounding error E = w - dequantized, by SVD, split evenly between the factors (a = sqrt(S) U^T,
    b = sqrt(S) V^T) so that both round well per row."""
    U, S, Vh = torch.linalg.svd(w.float() - dequantize_rows(q, scale), full_matrices=False)
    root = S[:rank].sqrt()[:, None]
    return root * U[:, :rank].T, root * Vh[:rank]


def with_low_rank_corrections(state: dict[str, Tensor], formats: dict[str, Format], quantized: dict[str, tuple[Tensor, Tensor]],
                              hessians: dict[str, Tensor], candidates: list[str], h: Hyperparameters) -> tuple[dict, dict, dict]:
    """State, formats and integers with the LQER factors of the LQER_TENSORS candidates the rounding damaged
    most (rounding_damage) added as int tensors (LQER_BITS, row max), so that they are packed and counted
    like any other."""
    state, formats, quantized = dict(state), dict(formats), dict(quantized)
    damage = {n: rounding_damage(state[n], *quantized[n], hessians.get(n)) for n in candidates}
    for name in sorted(candidates, key=lambda n: -damage[n])[:h.lqer_tensors]:
        for suffix, factor in zip(LQER_SUFFIXES, low_rank_correction(state[name], *quantized[name], h.lqer_rank)):
            state[name + suffix] = factor.contiguous()
            formats[name + suffix] = Format("int", h.lqer_bits)
            quantized[name + suffix] = quantize_rows(factor, h.lqer_bits)
    return state, formats, quantized


def fold_low_rank_corrections(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The unpacked tensors with every stored correction added to its matrix (a^T b) and the factors removed."""
    state = dict(state)
    for name in [n for n in state if n.endswith(LQER_SUFFIXES[0])]:
        base = name[:-len(LQER_SUFFIXES[0])]
        a, b, w = state.pop(name), state.pop(base + LQER_SUFFIXES[1], None), state.get(base)
        if b is None or w is None or a.size(0) != b.size(0) or (a.size(1), b.size(1)) != tuple(w.shape):
            raise DataError(f"{source}: tensor {name}: a low-rank correction without its matrix {base} or factor "
                            f"{base + LQER_SUFFIXES[1]} of matching shape (corrupt)")
        state[base] = w + a.T @ b
    return state


FP16_MAX = 65504.0


def check_storable(state: dict[str, Tensor], formats: dict[str, Format], quantized: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Stop, naming the tensor, before an artifact would hold a value its storage type cannot: a non-finite
    weight, an fp16 tensor or row scale beyond the fp16 range (it would be stored as inf)."""
    for name, fmt in formats.items():
        w = state[name].float()
        if not bool(torch.isfinite(w).all()):
            problem = f"holds {int((~torch.isfinite(w)).sum())} non-finite values"
        elif fmt.encoding == "fp16" and w.numel() and float(w.abs().max()) > FP16_MAX:
            problem = f"has |w| up to {float(w.abs().max()):.3g}, beyond fp16's {FP16_MAX:.0f}"
        elif fmt.encoding == "int" and not bool(torch.isfinite(quantized[name][1].float()).all()):
            problem = f"has rows whose int{fmt.bits} step is beyond fp16's range (|w| up to {float(w.abs().max()):.3g})"
        else:
            continue
        raise RunError(f"tensor {name} {problem}: no artifact is written (the weights diverged; lower the learning rates)")


def quantization_targets(model: nn.Module, h: Hyperparameters) -> dict[str, Linear]:
    """The Linear layers whose weights are exported as integers, by parameter name."""
    routes = route_parameters(model)
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, Linear)
            and export_format(h, routes[f"{name}.weight"], m.weight.numel(), block_of(name)).encoding == "int"}


@torch.no_grad()
def collect_hessians(model: GPT, batches: list[tuple[Tensor, Tensor]], h: Hyperparameters, rt: Runtime) -> dict[str, Tensor]:
    """Sum of x x^T over the inputs x of every integer-exported Linear, and with GPTQ_EMBED of the output
    layer (the tied embedding, when it is exported as integers), from training batches, summed over ranks
    (GPTQ calibration). With GPTQ_EMBED the integer side tables (BigramHash, value embeddings) get the
    Hessian of their projection instead."""
    hessians, hooks = {}, []
    if h.gptq_embed and export_format(h, "embed", model.tok_emb.weight.numel()).encoding == "int":
        H_out = hessians["tok_emb.weight"] = torch.zeros(h.model_dim, h.model_dim, device=rt.device)

        def output_inputs(module, args, out):  # the output layer reads rms_norm of the last block's output
            x = rms_norm(out.detach().float()).flatten(0, -2)
            H_out.addmm_(x.T, x)
        hooks.append(model.blocks[-1].register_forward_hook(output_inputs))

    def plain_path(mlp, args):  # the fused kernel calls neither fc nor proj: run the torch path beside it for their hooks
        mlp.plain(args[0])
    hooks += [m.register_forward_pre_hook(plain_path) for m in model.modules() if isinstance(m, MLP) and m.fused]
    for name, layer in quantization_targets(model, h).items():
        hessians[name] = torch.zeros(layer.weight.size(1), layer.weight.size(1), device=rt.device)

        def accumulate(module, args, H=hessians[name]):
            x = args[0].detach().flatten(0, -2).float()
            H.addmm_(x.T, x)
        hooks.append(layer.register_forward_pre_hook(accumulate))
    try:
        for batch in batches:
            forward_backward(model, batch, rt, backward=False)
    finally:
        for hook in hooks:
            hook.remove()
    if h.gptq_embed:  # a side table's row error e reaches the residual stream as proj e: Hessian proj^T proj
        tokens = sum(x.numel() for x, _ in batches)
        for prefix, side in (("bigram", model.bigram), ("value_embed", model.value_embed)):
            if side is not None and export_format(h, "embed", side.embed.weight.numel()).encoding == "int":
                P = side.proj.weight.detach().float().to(rt.device)
                # times a row's mean use in calibration, so that fit_to_budget weighs it like the token-summed ones
                hessians[f"{prefix}.embed.weight"] = P.T @ P * (tokens / side.embed.weight.size(0))
    if rt.distributed:
        for H in hessians.values():
            dist.all_reduce(H)
    return hessians


SELF_CALIB_TEMPERATURE = 0.8  # sampling temperature of the 2026-03-25 record's self-generated calibration


@torch.no_grad()
def self_generated_batches(model: GPT, h: Hyperparameters, rt: Runtime) -> list[tuple[Tensor, Tensor]]:
    """CALIB=self: GPTQ_CALIB_BATCHES batches shaped like this rank's training batches, of text the model
    samples itself from BOS (temperature SELF_CALIB_TEMPERATURE, seeded by SEED and the rank). No training
    data is read, so the calibration may run after the training clock."""
    generator = torch.Generator(device=rt.device).manual_seed(h.seed + rt.rank)
    batches = []
    for _ in range(h.gptq_calib_batches):
        tokens = torch.full((rt.grad_accum_steps * rt.micro_batch_seqs, 1), BOS_ID, dtype=torch.long, device=rt.device)
        for _ in range(h.train_seq_len):
            with autocast(rt):
                logits = model.logits(model.trunk(tokens, tail=1))[:, -1]
            probs = torch.softmax(logits.float() / SELF_CALIB_TEMPERATURE, dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
        tokens = tokens.view(rt.grad_accum_steps, rt.micro_batch_seqs, -1)
        batches.append((tokens[..., :-1], tokens[..., 1:]))
    return batches


@dataclass
class Export:
    """The export quantization's result, what the artifact is packed from: CPU weights, each tensor's
    storage format, the integer tensors (values, fp16 row scales), and the GPTQ Hessians by which
    fit_to_budget weighs what it zeroes."""
    state: dict[str, Tensor]
    formats: dict[str, Format]
    quantized: dict[str, tuple[Tensor, Tensor]]
    hessians: dict[str, Tensor]


# What an artifact may make the loader allocate, checked before anything is decompressed or built.
# A compressed artifact is at most SIZE_CAP_BYTES. Every weight is stored as at least one byte (int8,
# even at the narrowest setting, 2 bits), and 2-bit weights compress best: zstd stores int2-rounded
# Gaussian weights in 0.57 bits a value (14:1), so a 16 MB artifact decompresses to at most about
# 225 MB (the int5 default: about 1.9:1, some 30 MB). Twice that, rounded up, is the bound.
MAX_CONTAINER_BYTES = 32 * SIZE_CAP_BYTES   # 512,000,000 bytes
MAX_HEADER_BYTES = 1 << 20                  # the default model's JSON header is about 17 kB
MAX_ARTIFACT_TENSORS = 2048                 # the default model has 116, about 10 a block; bounds NUM_LAYERS too
# Header format 1 stored every setting under "config" (older artifacts: the non-model ones are ignored);
# format 2 stores only MODEL_SETTINGS.
ARTIFACT_FORMAT = 2
ARTIFACT_DTYPES = {"int": np.dtype(np.int8), "fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}
SCALE_DTYPE = np.dtype("<f2")


def pack_artifact(state: dict[str, Tensor], formats: dict[str, Format], quantized: dict[str, tuple[Tensor, Tensor]], config: dict) -> bytes:
    """The uncompressed container: magic, 4-byte header length, a JSON header naming every tensor
    (encoding, shape, byte ranges), then raw little-endian arrays grouped by kind. No pickle."""
    sections: dict[str, list[bytes]] = {"int": [], "scale": [], "fp16": [], "fp32": []}
    sizes = dict.fromkeys(sections, 0)
    entries = []

    def put(kind: str, array: np.ndarray) -> list:
        data = array.tobytes()
        sections[kind].append(data)
        sizes[kind] += len(data)
        return [kind, sizes[kind] - len(data), len(data)]

    for name, tensor in state.items():
        fmt = formats[name]
        entry = {"name": name, "shape": list(tensor.shape), "encoding": fmt.encoding}
        if fmt.encoding == "int":
            q, scale = quantized[name]
            entry.update(bits=fmt.bits, data=put("int", q.numpy()), scale=put("scale", scale.numpy().astype("<f2")))
        elif fmt.encoding == "fp16":
            entry["data"] = put("fp16", tensor.half().numpy().astype("<f2"))
        else:
            entry["data"] = put("fp32", tensor.float().numpy().astype("<f4"))
        entries.append(entry)
    base, offset = {}, 0
    for kind in sections:
        base[kind], offset = offset, offset + sizes[kind]
    for entry in entries:
        for key in ("data", "scale"):
            if key in entry:
                kind, start, length = entry[key]
                entry[key] = [base[kind] + start, length]
    header = json.dumps({"format": ARTIFACT_FORMAT, "config": config, "tensors": entries}).encode()
    payload = b"".join(b"".join(chunks) for chunks in sections.values())
    return ARTIFACT_MAGIC + len(header).to_bytes(4, "little") + header + payload


def parse_artifact_header(raw: bytes, source: str) -> dict:
    """The header as strict JSON: UTF-8, no NaN or Infinity, no key twice in an object."""
    def refuse_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    def unique_keys(pairs: list) -> dict:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} appears twice in an object")
            seen.add(key)
        return dict(pairs)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=refuse_constant, object_pairs_hook=unique_keys)
    except RecursionError:
        raise DataError(f"{source}: the artifact header is nested too deeply to be one of this script's") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise DataError(f"{source}: the artifact header is not valid JSON ({e})") from None


def check_artifact_header(header, payload_bytes: int, source: str) -> list[dict]:
    """The header's tensor entries, after checking every field that unpacking reads: known format and
    keys, each entry's name, encoding, bits, shape and byte ranges, which must lie within the payload,
    hold exactly the entry's values and together use no more bytes than the payload has."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise DataError(f"{source}: {message}")

    def is_int(value) -> bool:  # a non-negative integer (JSON true is not one)
        return type(value) is int and value >= 0

    need(isinstance(header, dict), f"the artifact header is a JSON {type(header).__name__}, not an object")
    fmt = header.get("format")
    need(type(fmt) is int and fmt in (1, ARTIFACT_FORMAT), f"unknown artifact format {fmt!r} (this script reads 1 and {ARTIFACT_FORMAT})")
    need(set(header) == {"format", "config", "tensors"}, f"artifact header keys {sorted(header)}: expected config, format, tensors")
    need(isinstance(header["config"], dict), "the artifact's config is not a JSON object")
    tensors = header["tensors"]
    need(isinstance(tensors, list), "the artifact's tensors are not a JSON list")
    need(len(tensors) <= MAX_ARTIFACT_TENSORS, f"{len(tensors)} tensors, more than the {MAX_ARTIFACT_TENSORS} an artifact may hold")
    names, used = set(), 0
    for i, e in enumerate(tensors):
        need(isinstance(e, dict), f"tensor entry {i} is not a JSON object")
        name = e.get("name")
        need(type(name) is str and name != "", f"tensor entry {i}: name {name!r} is not a non-empty string")
        need(name not in names, f"tensor {name} appears twice")
        names.add(name)
        encoding = e.get("encoding")
        need(type(encoding) is str and encoding in ARTIFACT_DTYPES, f"tensor {name}: unknown encoding {encoding!r} (expected one of {', '.join(ARTIFACT_DTYPES)})")
        keys = {"name", "shape", "encoding", "data"} | ({"bits", "scale"} if encoding == "int" else set())
        need(set(e) == keys, f"tensor {name}: keys {sorted(e)}: expected {', '.join(sorted(keys))}")
        shape = e["shape"]
        need(isinstance(shape, list) and len(shape) <= 8 and all(is_int(d) for d in shape),
             f"tensor {name}: shape {shape!r} is not a list of at most 8 non-negative integers")
        count = math.prod(shape)
        need(count <= payload_bytes, f"tensor {name}: shape {shape} has {count} values, more than the payload's {payload_bytes} bytes")
        spans = [("data", count * ARTIFACT_DTYPES[encoding].itemsize)]
        if encoding == "int":
            need(is_int(e["bits"]) and 2 <= e["bits"] <= 8, f"tensor {name}: bits {e['bits']!r}: expected an integer in 2..8")
            need(len(shape) == 2, f"tensor {name}: an int tensor has 2 dimensions (rows, columns), not shape {shape}")
            spans.append(("scale", shape[0] * SCALE_DTYPE.itemsize))  # one fp16 scale a row
        for key, length in spans:
            span = e[key]
            need(isinstance(span, list) and len(span) == 2 and all(is_int(x) for x in span),
                 f"tensor {name}: {key} byte range {span!r} is not [offset, length] of non-negative integers")
            need(span[1] == length, f"tensor {name}: {key} byte range {span} holds {span[1]} bytes, but shape {shape} needs {length}")
            need(span[0] + span[1] <= payload_bytes, f"tensor {name}: {key} byte range {span} does not fit the payload of "
                                                     f"{payload_bytes} bytes (truncated or corrupt)")
            used += length
    need(used <= payload_bytes, f"the tensors' byte ranges add up to {used} bytes, more than the payload's {payload_bytes}: they overlap")
    return tensors


def unpack_artifact(container: bytes, source: str = "artifact") -> tuple[dict[str, Tensor], dict]:
    """Inverse of pack_artifact: fp32 tensors (dequantized) and the saved model settings (of an older,
    format-1 artifact, only MODEL_SETTINGS). The whole header is checked before any tensor is made."""
    if not container.startswith(ARTIFACT_MAGIC):
        raise DataError(f"{source}: not an artifact of this script (bad magic)")
    start = len(ARTIFACT_MAGIC) + 4
    if len(container) < start:
        raise DataError(f"{source}: the artifact ends inside its header length (truncated)")
    header_len = int.from_bytes(container[len(ARTIFACT_MAGIC):start], "little")
    if header_len > min(MAX_HEADER_BYTES, len(container) - start):
        raise DataError(f"{source}: header length {header_len} runs past the end of the artifact "
                        f"({len(container) - start} bytes) or over {MAX_HEADER_BYTES} bytes (truncated or corrupt)")
    header = parse_artifact_header(bytes(container[start:start + header_len]), source)
    payload = memoryview(container)[start + header_len:]
    entries = check_artifact_header(header, len(payload), source)

    def read(span: list[int], dtype, count: int) -> np.ndarray:
        return np.frombuffer(payload, dtype=dtype, count=count, offset=span[0]) if count else np.zeros(0, dtype)

    state = {}
    for e in entries:
        shape, encoding = e["shape"], e["encoding"]
        values = read(e["data"], ARTIFACT_DTYPES[encoding], math.prod(shape))
        if encoding == "int":
            qmax = 2 ** (e["bits"] - 1) - 1
            if values.size and not -qmax <= int(values.min()) <= int(values.max()) <= qmax:
                raise DataError(f"{source}: tensor {e['name']}: values outside -{qmax}..{qmax}, the range of {e['bits']} bits (corrupt)")
            scale = torch.from_numpy(read(e["scale"], SCALE_DTYPE, shape[0]).copy())
            state[e["name"]] = dequantize_rows(torch.from_numpy(values.copy()).view(shape), scale)
        else:
            state[e["name"]] = torch.from_numpy(values.astype(np.float32)).view(shape)
    state = fold_low_rank_corrections(state, source)
    config = header["config"]
    if header["format"] == 1:  # every setting, local paths included: keep the model's
        config = {name: value for name, value in config.items() if name in MODEL_SETTINGS}
    return state, config


def require_zstandard() -> None:
    if zstandard is None:
        raise ConfigError("the zstandard package is missing (pip install zstandard): the artifact is zstd-compressed "
                          "and there is no fallback, since another compressor would change the byte count")


def compress(container: bytes, level: int = ZSTD_LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(container)


FAST_ZSTD_LEVEL = 3  # for estimates; the artifact itself is always compressed at ZSTD_LEVEL
FIT_ROUNDS, FIT_SLACK = 4, 2048  # fit_to_budget: rounds of level-22 compressions at most, and bytes left unused at most
FIT_SPREAD = (-0.5, -0.25, 0.0, 0.25)  # a round's counts: the estimate's times 1 + these, each round's spread a quarter of the last


def whole_tensor_moves(state: dict[str, Tensor], formats: dict[str, Format], quantized: dict[str, tuple[Tensor, Tensor]],
                       hessians: dict[str, Tensor]) -> list[tuple[float, int, str]]:
    """The ways to save bytes a whole tensor at a time, each (damage, bytes saved, name): dropping the
    low-rank correction of `name`, or narrowing the integer matrix `name` (without a correction) by one
    bit, rounded to nearest at its row max. Damage is the rise of rounding_damage; the bytes are the
    values and scales compressed alone at ZSTD_LEVEL (a fast level sees about 0.6 of the savings of
    narrowing a real matrix, and 0.4 of those of zeroing its +-1 values: bench/RESULTS.md)."""
    size = lambda q, scale: len(compress(q.numpy().tobytes() + scale.numpy().tobytes()))
    corrected = {n[:-len(LQER_SUFFIXES[0])] for n in quantized if n.endswith(LQER_SUFFIXES[0])}
    moves = []
    for name, (q, scale) in quantized.items():
        if name.endswith(LQER_SUFFIXES):
            continue
        w, H = state[name], hessians.get(name)
        now = rounding_damage(w, q, scale, H)
        if name in corrected:
            a, b = (quantized[name + suffix] for suffix in LQER_SUFFIXES)
            damage = now - rounding_damage(w, q, scale, H, dequantize_rows(*a).T @ dequantize_rows(*b))
            moves.append((damage, size(*a) + size(*b), name))
        elif formats[name].bits > 2:
            narrow = quantize_rows(w, formats[name].bits - 1)
            moves.append((rounding_damage(w, *narrow, H) - now, size(q, scale) - size(*narrow), name))
    return [m for m in moves if m[1] > 0]


def cheapest_whole_moves(state: dict[str, Tensor], formats: dict[str, Format], quantized: dict[str, tuple[Tensor, Tensor]],
                         config: dict, hessians: dict[str, Tensor], budget: int) -> tuple[dict, dict, dict, list[str]]:
    """FIT_METHOD=cheapest: the whole-tensor moves (whole_tensor_moves) whose damage per byte is below that
    of zeroing ±1 values, taken in that order while the artifact is over `budget`; fit_to_budget zeroes ±1
    values for the rest. The ±1 rate: the summed cost of the cheapest ±1 values that close the gap, over
    the gap, at their mean bytes a value (plus_minus_one_bytes). Returns the state, formats and integers
    after the moves, and the moves ("narrowed <name> to intN", "dropped <name>'s correction")."""
    full = len(compress(pack_artifact(state, formats, quantized, config)))
    over = full - budget
    if over <= 0:
        return state, formats, quantized, []
    costs, _ = plus_minus_one_costs(state, quantized, hessians)
    cumulative = torch.cat(costs).sort().values.double().cumsum(0)
    per_value = plus_minus_one_bytes(state, formats, quantized, config, full)
    state, formats, quantized, applied = dict(state), dict(formats), dict(quantized), []
    for damage, saved, name in sorted(whole_tensor_moves(state, formats, quantized, hessians), key=lambda m: m[0] / m[1]):
        if over <= 0:
            break
        needed = math.ceil(over / per_value)
        rate = float(cumulative[needed - 1]) / over if needed <= len(cumulative) else math.inf
        if damage / saved >= rate:
            break
        if name + LQER_SUFFIXES[0] in quantized:
            for suffix in LQER_SUFFIXES:
                del state[name + suffix], formats[name + suffix], quantized[name + suffix]
            applied.append(f"dropped {name}'s correction")
        else:
            bits = formats[name].bits - 1
            formats[name], quantized[name] = Format("int", bits), quantize_rows(state[name], bits)
            applied.append(f"narrowed {name} to int{bits}")
        over -= saved
    return state, formats, quantized, applied


def plus_minus_one_bytes(state: dict[str, Tensor], formats: dict[str, Format], quantized: dict[str, tuple[Tensor, Tensor]],
                         config: dict, full: int) -> float:
    """The artifact's bytes saved per quantized +-1 value zeroed, on average over all of them: `full` (the
    artifact's size) less its size with every one zeroed, both at ZSTD_LEVEL, over their count."""
    ones = {name: q.abs() == 1 for name, (q, _) in quantized.items() if not name.endswith(LQER_SUFFIXES)}
    zeroed = {name: (quantized[name][0].masked_fill(mask, 0), quantized[name][1]) for name, mask in ones.items()}
    count = sum(int(mask.sum()) for mask in ones.values())
    return max(full - len(compress(pack_artifact(state, formats, quantized | zeroed, config))), 1) / max(count, 1)


def plus_minus_one_costs(state: dict[str, Tensor], quantized: dict[str, tuple[Tensor, Tensor]],
                         hessians: dict[str, Tensor]) -> tuple[list[Tensor], list[tuple[str, Tensor]]]:
    """The cost of zeroing each quantized ±1 value (the rise in its squared rounding error, weighted by its
    input's Hessian diagonal where there is one) and where they are: per tensor, the costs and (name, flat indices)."""
    costs, places = [], []
    for name, (q, scale) in quantized.items():
        if name.endswith(LQER_SUFFIXES):  # a correction is dropped whole, not thinned
            continue
        w = state[name].float()
        error_now = (w - dequantize_rows(q, scale)).square()
        cost = w.square() - error_now
        if name in hessians:
            cost = cost * hessians[name].diagonal().cpu()[None, :]
        ones = (q.abs() == 1).flatten().nonzero().squeeze(1)
        costs.append(cost.flatten()[ones])
        places += [(name, ones)]
    return costs, places


def fit_to_budget(state: dict[str, Tensor], formats: dict[str, Format], quantized: dict[str, tuple[Tensor, Tensor]],
                  config: dict, hessians: dict[str, Tensor], budget: int) -> tuple[bytes, int]:
    """The compressed artifact, at most `budget` bytes: if needed, quantized +-1 values are set to 0,
    cheapest first (PR #609). The cost of zeroing one is the rise in its squared rounding error,
    weighted by its input's Hessian diagonal where there is one. The count is bisected on sizes at a
    fast zstd level times the ratio of level 22's size to the fast level's; that ratio changes as values
    are zeroed (level 22 packs the zeros better), so each count tried at level 22 adds a measured ratio
    (linear in between) and the bisection runs again. A round compresses the bisection's count and three
    around it (FIT_SPREAD) at once, in threads (zstd releases the GIL): the counts depend on the sizes
    alone, never on the machine. Rounds run until the artifact fits within FIT_SLACK bytes or FIT_ROUNDS
    are spent. Returns (artifact, values zeroed)."""
    blob = compress(pack_artifact(state, formats, quantized, config))
    if len(blob) <= budget:
        return blob, 0
    costs, places = plus_minus_one_costs(state, quantized, hessians)
    order = torch.cat(costs).argsort()
    offsets = np.cumsum([0] + [len(i) for _, i in places])

    def artifact(k: int, level: int) -> bytes:
        pruned = dict(quantized)
        chosen = order[:k]
        for (name, flat), lo, hi in zip(places, offsets[:-1], offsets[1:]):
            mine = chosen[(chosen >= lo) & (chosen < hi)] - lo
            if len(mine):
                q = pruned[name][0].clone()
                q.view(-1)[flat[mine]] = 0
                pruned[name] = (q, pruned[name][1])
        return compress(pack_artifact(state, formats, pruned, config), level)

    fast = functools.cache(lambda k: len(artifact(k, FAST_ZSTD_LEVEL)))
    ratios = {0: len(blob) / fast(0)}  # level 22's size over the fast level's, at the counts measured

    def estimate(k: int) -> float:  # the ratio linear between the counts measured, flat beyond the last
        known = sorted(ratios)
        return fast(k) * float(np.interp(k, known, [ratios[c] for c in known]))

    def cannot_fit() -> RunError:
        return RunError(f"the artifact cannot fit {budget} bytes even with all {len(order)} quantized +-1 values zeroed "
                        f"(it is {len(blob) - budget} bytes over before pruning): lower MLP_BITS or ATTN_BITS")

    tolerance = max(1, len(order) // 2000)
    lo, hi, packed = 0, len(order), None  # lo: over the budget at level 22; hi: fits (once packed is set)
    spread = 1.0
    for _ in range(FIT_ROUNDS):
        a, b = lo, hi
        while b - a > tolerance:
            mid = (a + b) // 2
            a, b = (a, mid) if estimate(mid) <= budget - FIT_SLACK // 2 else (mid, b)  # aim inside the slack
        counts = {min(round(b * (1 + spread * f)), len(order)) for f in FIT_SPREAD}
        counts = sorted(k for k in counts if lo < k < hi or (k == hi and packed is None))
        if not counts:
            break
        with concurrent.futures.ThreadPoolExecutor(len(counts)) as pool:
            trials = dict(zip(counts, pool.map(lambda k: artifact(k, ZSTD_LEVEL), counts)))
        for k, trial in trials.items():
            ratios[k] = len(trial) / fast(k)
        fits = [k for k in counts if len(trials[k]) <= budget]
        if fits:
            hi, packed = fits[0], trials[fits[0]]
        lo = max([lo] + [k for k in counts if k < hi and len(trials[k]) > budget])
        if packed is None and counts[-1] == len(order):
            raise cannot_fit()
        if packed is not None and budget - len(packed) <= FIT_SLACK:
            break
        spread /= 4
    while packed is None:  # every count tried was over: step up from the largest
        hi = min(len(order), lo + max(1000, lo // 20))
        if len(trial := artifact(hi, ZSTD_LEVEL)) <= budget:
            packed = trial
        elif hi == len(order):
            raise cannot_fit()
        lo = hi
    return packed, hi


def export_artifact(export: Export, h: Hyperparameters, path: Path, budget: int) -> tuple[int, int, list[str]]:
    """Pack, fit to the byte budget (with FIT_METHOD=cheapest, whole-tensor moves first), compress and write
    (temporary name, then rename). Returns (artifact bytes, quantized values zeroed to fit, whole-tensor moves)."""
    state, formats, quantized, moves = export.state, export.formats, export.quantized, []
    if h.fit_method == "cheapest":
        state, formats, quantized, moves = cheapest_whole_moves(state, formats, quantized, model_settings(h), export.hessians, budget)
    blob, pruned = fit_to_budget(state, formats, quantized, model_settings(h), export.hessians, budget)
    check_size_cap(len(blob) + CODE_BYTES)  # an artifact over the cap never gets a name
    write_atomic(path, blob)
    return len(blob), pruned, moves


def load_artifact(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Decompress and unpack, refusing before decompression a file or a zstd frame that does not
    declare its size or declares more than MAX_CONTAINER_BYTES."""
    if not path.is_file():
        raise DataError(f"{path}: artifact not found")
    if path.stat().st_size > MAX_CONTAINER_BYTES:
        raise DataError(f"{path}: {path.stat().st_size} bytes, more than any artifact ({MAX_CONTAINER_BYTES})")
    blob = path.read_bytes()
    try:
        declared = zstandard.frame_content_size(blob)
    except zstandard.ZstdError as e:
        raise DataError(f"{path}: not a zstd artifact ({e})") from None
    if declared < 0:
        raise DataError(f"{path}: the zstd frame does not declare its decompressed size (this script's artifacts do)")
    if declared > MAX_CONTAINER_BYTES:
        raise DataError(f"{path}: the zstd frame declares {declared} bytes, more than any artifact decompresses to ({MAX_CONTAINER_BYTES})")
    try:
        container = zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_CONTAINER_BYTES, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise DataError(f"{path}: not a zstd artifact ({e})") from None
    return unpack_artifact(container, str(path))


# =============================================================================================
# Evaluation
# =============================================================================================

def sliding_windows(n_targets: int, window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Window starts and, per window, the first scored position. The first window scores all its
    positions, each later one its last `stride`; the final window is placed to end exactly at the last
    target and scores only what is new. Every target is scored exactly once, with up to
    window - stride tokens of context. Window k reads tokens[s : s+window+1] for start s."""
    starts = np.arange(0, n_targets - window + 1, stride, dtype=np.int64)
    if starts[-1] != n_targets - window:
        starts = np.append(starts, n_targets - window)
    previous_end = np.concatenate([[0], starts[:-1] + window])
    return starts, previous_end - starts


def disjoint_windows(n_targets: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows, each scored fully; the ragged tail is dropped so every rank agrees."""
    starts = np.arange(0, n_targets - window + 1, window, dtype=np.int64)
    return starts, np.zeros_like(starts)


def document_starts(tokens: Tensor) -> Tensor:
    """Where each document of the validation stream begins: at its BOS token (and at 0 when the stream does
    not begin with one). Document d owns the targets at positions starts[d]+1 .. starts[d+1]: its last target
    is the next document's BOS, predicted from its own text. A BOS as the stream's last token begins nothing."""
    bos = torch.nonzero(tokens[:-1] == BOS_ID).flatten()
    return bos if len(bos) and bos[0] == 0 else torch.cat([bos.new_zeros(1), bos])


def write_document_scores(path: str, documents: Tensor) -> None:
    """EVAL_DOC_SCORES: one CSV row per document, in stream order, of its (nats, targets, bytes) sums."""
    rows = ["doc,tokens,bytes,nats"] + [f"{d},{int(t)},{int(b)},{n!r}" for d, (n, t, b) in enumerate(documents.tolist())]
    write_atomic(path, ("\n".join(rows) + "\n").encode())


class Evaluator:
    """Scores the validation stream: summed nats, tokens and bytes in float64, all-reduced over ranks."""

    def __init__(self, model: GPT, h: Hyperparameters, rt: Runtime, val_tokens: Tensor, tables: ByteTables):
        self.h, self.rt, self.model = h, rt, model
        self.token_nll = torch.compile(model.token_nll, dynamic=False, fullgraph=True) if rt.compile else model.token_nll
        self.tokens = val_tokens.to(rt.device)
        self.tables = with_byte_sidecar(tables, h.data_path, len(val_tokens)).to(rt.device)
        self.doc_starts = document_starts(self.tokens)

    @torch.no_grad()
    def prime(self) -> float:
        """Compile the scoring graphs (whole windows, and the sliding windows' tails) on a batch of
        zeros, so that an evaluation's eval_time is scoring, not compiling. Returns the seconds taken."""
        t0 = time.perf_counter()
        if self.rt.compile:
            rows = torch.zeros(self.h.eval_batch_seqs, self.h.eval_seq_len + 1, dtype=torch.long, device=self.rt.device)
            for tail in sorted({self.h.eval_seq_len, self.h.eval_stride}):
                self._nll(rows, tail)
            synchronize(self.rt)
        return time.perf_counter() - t0

    def _nll(self, rows: Tensor, tail: int) -> Tensor:
        """token_nll of (B, window + 1) token rows, inputs and targets as views of them: the one call
        of the compiled function, so that prime() compiles what scoring runs (strides select the graph too)."""
        with autocast(self.rt):
            return self.token_nll(rows[:, :-1], rows[:, 1:], tail)

    @torch.no_grad()
    def score(self, sliding: bool, documents: Tensor | None = None) -> tuple[float, float, float]:
        """(val_loss in nats per token, val_bpb, eval milliseconds); with `documents` (one row per document of
        document_starts), also each document's (nats, targets, bytes), summed over ranks, into it."""
        h, rt = self.h, self.rt
        synchronize(rt)
        t0 = time.perf_counter()
        window, n_targets = h.eval_seq_len, self.tokens.numel() - 1
        totals = torch.zeros(3, dtype=torch.float64, device=rt.device)
        if sliding:
            starts, first = sliding_windows(n_targets, window, h.eval_stride)
            if rt.master:  # the first window scores all its positions
                totals += self._score(starts[:1], first[:1], window, documents)
            starts, first, tail = starts[1:], first[1:], h.eval_stride
        else:
            (starts, first), tail = disjoint_windows(n_targets, window), window
        mine = slice(rt.rank * len(starts) // rt.world_size, (rt.rank + 1) * len(starts) // rt.world_size)
        totals += self._score(starts[mine], first[mine], tail, documents)
        if rt.distributed:
            dist.all_reduce(totals)
            if documents is not None:
                dist.all_reduce(documents)
        loss_sum, tokens, n_bytes = totals.tolist()
        synchronize(rt)
        return loss_sum / tokens, loss_sum / (math.log(2) * n_bytes), 1000 * (time.perf_counter() - t0)

    def _score(self, starts: np.ndarray, first: np.ndarray, tail: int, documents: Tensor | None = None) -> Tensor:
        """Sums over windows that score positions >= first[i] (always within the last `tail`), and per document into `documents`."""
        h, device, window = self.h, self.rt.device, self.h.eval_seq_len
        batch = h.eval_batch_seqs
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        offsets = torch.arange(window + 1, device=device)
        positions = torch.arange(window - tail, window, device=device)
        # Padded to whole batches (one compiled shape; padding scores nothing) and copied to the GPU
        # once: a copy per batch would make the host wait for the GPU before every batch.
        padded = -(-len(starts) // batch) * batch
        all_s, all_f = np.zeros(padded, dtype=np.int64), np.full(padded, window, dtype=np.int64)
        all_s[:len(starts)], all_f[:len(starts)] = starts, first
        all_s, all_f = torch.from_numpy(all_s).to(device), torch.from_numpy(all_f).to(device)
        for i in range(0, len(starts), batch):
            s, f = all_s[i:i + batch], all_f[i:i + batch]
            index = s[:, None] + offsets
            rows = self.tokens[index]
            nll = self._nll(rows, tail)
            scored = positions[None, :] >= f[:, None]
            n_bytes = token_bytes(rows[:, -tail - 1:-1], rows[:, -tail:], self.tables, index[:, -tail:])
            totals += torch.stack([(nll.double() * scored).sum(), scored.sum().double(), (n_bytes * scored).sum().double()])
            if documents is not None:  # a target belongs to the last document that starts before it
                doc = torch.searchsorted(self.doc_starts, index[:, -tail:].contiguous()) - 1
                sums = torch.stack([nll.double() * scored, scored.double(), (n_bytes * scored).double()], -1)
                documents.index_add_(0, doc.flatten(), sums.flatten(0, 1))
        return totals


# Score-first test-time training (TTT_MODE, docs/TTT.md). Adam's moments for the adapters and the momentum of
# the global SGD are the usual values; the settings choose the rates.
TTT_ADAM_BETAS, TTT_ADAM_EPS, TTT_GLOBAL_MOMENTUM = (0.9, 0.999), 1e-8, 0.9


def queued_copy(a: np.ndarray, device: torch.device) -> Tensor:
    """a on `device` without making the host wait: a copy from pageable memory first waits for all the work queued
    on the GPU, while one from pinned memory is queued behind it (the caching allocator keeps the pinned block
    until the copy has run)."""
    t = torch.from_numpy(a)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def chunk_windows(lo: int, hi: int, window: int, stride: int, before: int = 0) -> list[tuple[int, int, int]]:
    """(start, first, end) of the windows that score a document's targets lo..hi-1 (document positions: target j
    is token j+1, predicted from tokens start..j): those below `window` by one window from the document's start,
    the others `stride` at a time by a window ending at the last of them. Every target gets at least
    window - stride tokens of its document as context, as in the sliding evaluation, whose grid this is on a
    single document when window, lo and hi are multiples of stride. With `before` > 0 (TTT_CONTEXT=stream: that
    many tokens of the stream come before the document) every target is scored the second way, and a window
    may start up to `before` tokens before the document (start < 0), so that the context is the stream's."""
    spans = []
    if lo < window and before == 0:
        spans.append((0, lo, min(hi, window)))
        lo = min(hi, window)
    for first in range(lo, hi, stride):
        end = min(first + stride, hi)
        spans.append((max(end - window, -before), first, end))
    return spans


class DocumentAdapters:
    """The LoRA adapters of TTT_MODE=lora, one per slot: for the rows of slot s, each adapted projection W of every
    block computes x W^T + (x A_s^T) B_s^T (A: rank x in, B: out x rank). B starts at zero, so a fresh adapter
    changes nothing; a slot serves one document at a time and is reset when it takes the next. Forward hooks add
    the term, so the model is the one that was trained; their gradients are the only ones taken."""

    def __init__(self, model: GPT, h: Hyperparameters, device: torch.device):
        self.h, self.slots = h, h.ttt_batch_docs
        self.row_slots: Tensor | None = None  # the slot of each row of the next forward; None: row i is slot i
        self.enabled = True
        generator = torch.Generator().manual_seed(h.seed)
        self.tensors, self.initial = [], []
        for block in model.blocks:
            block.mlp.fused = False  # the fused MLP kernel does not call its Linear modules, so it would skip their hooks
            for name in h.lora_targets():
                linear = block.get_submodule(LORA_TARGETS[name])
                out_features, in_features = linear.weight.shape
                a = (torch.randn(h.ttt_lora_rank, in_features, generator=generator) * in_features ** -0.5).to(device)
                A = a.expand(self.slots, -1, -1).clone().requires_grad_()
                B = torch.zeros(self.slots, out_features, h.ttt_lora_rank, device=device, requires_grad=True)
                self.tensors += [A, B]
                self.initial += [a, torch.zeros_like(B[0])]
                linear.register_forward_hook(self._hook(A, B))
        self.moments = [(torch.zeros_like(t), torch.zeros_like(t)) for t in self.tensors]
        self.steps = torch.zeros(self.slots, device=device)

    def _hook(self, A: Tensor, B: Tensor):
        def add_adapter(module, inputs, output):
            if not self.enabled:
                return output
            a, b = (A, B) if self.row_slots is None else (A[self.row_slots], B[self.row_slots])
            return output + torch.bmm(torch.bmm(inputs[0], a.transpose(1, 2)), b.transpose(1, 2))
        return add_adapter

    @torch.no_grad()
    def reset(self, slot: int) -> None:
        for t, initial, (m, v) in zip(self.tensors, self.initial, self.moments):
            t[slot], m[slot], v[slot] = initial, 0, 0
        self.steps[slot] = 0

    @torch.no_grad()
    def step(self, active: Tensor) -> None:
        """One TTT_OPTIMIZER step of the adapters of the slots in `active`; the others keep their weights and state."""
        lr, (b1, b2) = self.h.ttt_lr, TTT_ADAM_BETAS
        self.steps += active
        for p, (m, v) in zip(self.tensors, self.moments):
            keep = active.view(-1, *[1] * (p.dim() - 1))
            if self.h.ttt_optimizer == "sgd":
                p.sub_(lr * p.grad * keep)
            else:
                m.copy_(torch.where(keep, b1 * m + (1 - b1) * p.grad, m))
                v.copy_(torch.where(keep, b2 * v + (1 - b2) * p.grad.square(), v))
                t = self.steps.clamp(min=1).view_as(keep)
                p.sub_(lr * keep * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + TTT_ADAM_EPS))
            p.grad = None


class TestTimeTraining:
    """Score-first test-time training over the validation documents (document_starts), on a copy of the scored model.
    Each document is scored chunk by chunk (TTT_CHUNK targets) under no gradient, by windows of its own tokens
    (chunk_windows; with TTT_CONTEXT=stream they also read the tokens before it), and with TTT_MODE=lora its
    adapter then trains on the chunk just scored, so every target is scored once, by weights adapted only on
    targets before it. With TTT_PHASES=P the documents form P + 1 phases of
    equal document counts; after each phase but the last, SGD on all weights over that phase's documents, which
    every rank has scored by then. A phase's documents are split over the ranks by their target counts, each rank
    scoring its own, TTT_BATCH_DOCS side by side."""

    def __init__(self, evaluator: Evaluator):
        h, rt = evaluator.h, evaluator.rt
        self.h, self.rt, self.tables = h, rt, evaluator.tables
        self.model = copy.deepcopy(evaluator.model)  # adapted here: the evaluator's model stays the artifact's
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.adapters = DocumentAdapters(self.model, h, rt.device) if h.ttt_mode == "lora" else None
        self.nll = torch.compile(self.model.token_nll, dynamic=False) if rt.compile else self.model.token_nll
        self.offsets = torch.arange(h.eval_seq_len + 1, device=rt.device)
        self.use_tokens(evaluator.tokens)

    def use_tokens(self, tokens: Tensor) -> None:
        self.tokens = tokens
        self.starts = document_starts(tokens)
        self.lengths = (torch.cat([self.starts[1:], self.starts.new_full((1,), len(tokens) - 1)]) - self.starts).tolist()
        # what a window may read before each document's start: nothing, or the stream's tokens before it
        self.before = self.starts.tolist() if self.h.ttt_context == "stream" else [0] * len(self.lengths)

    def _rows(self, spans: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """For spans (document, start, first, end, slot) in document positions (start < 0: before the document):
        token rows (R, window + 1) from each document's token `start` on, filled with token 0 after token `end`
        (never context of a scored target), the mask of the targets first..end-1 and the bytes of every target."""
        doc, start, first, end = queued_copy(spans[:, :4], self.rt.device).unbind(1)
        index = (self.starts[doc] + start)[:, None] + self.offsets
        index = index.clamp(max=len(self.tokens) - 1)
        rows = torch.where(self.offsets <= (end - start)[:, None], self.tokens[index], 0)
        target = self.offsets[:-1]
        scored = (target >= (first - start)[:, None]) & (target < (end - start)[:, None])
        return rows, scored, token_bytes(rows[:, :-1], rows[:, 1:], self.tables, index[:, 1:])

    def _forward(self, rows: Tensor, slots: np.ndarray | None) -> Tensor:
        if self.adapters is not None:
            self.adapters.row_slots = None if slots is None else queued_copy(slots, self.rt.device)
        with autocast(self.rt):
            return self.nll(rows[:, :-1], rows[:, 1:], self.h.eval_seq_len)

    @torch.no_grad()
    def score_spans(self, spans: np.ndarray, documents: Tensor) -> Tensor:
        """Score the spans with the current weights, EVAL_BATCH_SEQS rows a forward (padded with spans that score
        nothing: one shape), add each row's (nats, targets, bytes) to its document's row of `documents` and return them."""
        batch = self.h.eval_batch_seqs
        padded = np.zeros((-(-len(spans) // batch) * batch, 5), dtype=np.int64)
        padded[:len(spans)] = spans
        sums = []
        for i in range(0, len(padded), batch):
            part = padded[i:i + batch]
            rows, scored, n_bytes = self._rows(part)
            nll = self._forward(rows, part[:, 4])
            sums.append(torch.stack([(nll.double() * scored).sum(1), scored.sum(1).double(), (n_bytes * scored).sum(1).double()], 1))
            documents.index_add_(0, queued_copy(part[:, 0], self.rt.device), sums[-1])
        return torch.cat(sums)[:len(spans)]

    def _adapt(self, spans: np.ndarray, active: Tensor) -> None:
        """TTT_EPOCHS steps of the adapters of the active slots, each on its own chunk (spans: one per slot, in order).
        The loss is the sum of the documents' mean losses, so no document's gradient depends on another document."""
        rows, scored, _ = self._rows(spans)
        count = scored.sum(1).clamp(min=1)
        for _ in range(self.h.ttt_epochs):
            ((self._forward(rows, None) * scored).sum(1) / count).sum().backward()
            self.adapters.step(active)

    def _score_documents(self, docs: list[int], documents: Tensor) -> None:
        """This rank's documents of a phase, TTT_BATCH_DOCS at a time (longest first, so the slots stay busy): each
        step scores every slot's next chunk, then trains each slot's adapter on its chunk, unless the chunk ends
        its document (nothing of it is left to score)."""
        h, window, slots = self.h, self.h.eval_seq_len, self.h.ttt_batch_docs
        queue = collections.deque(sorted(docs, key=lambda d: -self.lengths[d]))
        doc, lo = [-1] * slots, [0] * slots
        while True:
            for s in range(slots):
                if doc[s] < 0 and queue:
                    doc[s], lo[s] = queue.popleft(), 0
                    if self.adapters is not None:
                        self.adapters.reset(s)
            busy = [s for s in range(slots) if doc[s] >= 0]
            if not busy:
                return
            chunk = {s: h.ttt_chunk if self.adapters is not None else self.lengths[doc[s]] for s in busy}
            hi = {s: min(lo[s] + chunk[s], self.lengths[doc[s]]) for s in busy}
            self.score_spans(np.array([(doc[s], start, first, end, s) for s in busy for start, first, end
                                       in chunk_windows(lo[s], hi[s], window, h.eval_stride, self.before[doc[s]])]), documents)
            training = [s for s in busy if hi[s] < self.lengths[doc[s]]]
            if self.adapters is not None and training:
                spans, active = np.zeros((slots, 5), dtype=np.int64), np.zeros(slots, dtype=bool)
                for s in training:
                    spans[s], active[s] = (doc[s], max(-self.before[doc[s]], hi[s] - window), lo[s], hi[s], s), True
                self._adapt(spans, queued_copy(active, self.rt.device))
            for s in busy:
                lo[s], doc[s] = hi[s], doc[s] if hi[s] < self.lengths[doc[s]] else -1

    def _global_sgd(self, docs: list[int]) -> None:
        """TTT_GLOBAL_EPOCHS passes of SGD on all weights over a phase's documents (all scored): windows of `window`
        targets of each document, TTT_GLOBAL_BATCH a step over all ranks, each rank taking its share; the gradients
        are summed over the ranks, so that every rank takes the same step. The adapters are off meanwhile."""
        h, rt, window = self.h, self.rt, self.h.eval_seq_len
        spans = np.array([(d, k, k, min(k + window, self.lengths[d]), 0) for d in docs for k in range(0, self.lengths[d], window)],
                         dtype=np.int64).reshape(-1, 5)
        params = list(self.model.parameters())
        optimizer = torch.optim.SGD(params, lr=h.ttt_global_lr, momentum=TTT_GLOBAL_MOMENTUM)
        if self.adapters is not None:
            self.adapters.enabled = False
        for p in params:
            p.requires_grad_(True)
        share = -(-h.ttt_global_batch // rt.world_size)
        for _ in range(h.ttt_global_epochs):
            for i in range(0, len(spans), h.ttt_global_batch):
                step = spans[i:i + h.ttt_global_batch]
                mine = np.zeros((share, 5), dtype=np.int64)
                part = step[rt.rank * len(step) // rt.world_size:(rt.rank + 1) * len(step) // rt.world_size]
                mine[:len(part)] = part
                rows, scored, _ = self._rows(mine)
                ((self._forward(rows, None) * scored).sum() / float((step[:, 3] - step[:, 2]).sum())).backward()
                if rt.distributed:
                    flat = torch.cat([p.grad.flatten() for p in params])
                    dist.all_reduce(flat)
                    for p, g in zip(params, flat.split([p.numel() for p in params])):
                        p.grad.copy_(g.view_as(p))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
        if self.adapters is not None:
            self.adapters.enabled = True

    def run(self) -> tuple[float, float, float, Tensor]:
        """(val_loss, val_bpb, eval milliseconds, each document's (nats, targets, bytes) summed over the ranks)."""
        synchronize(self.rt)
        t0 = time.perf_counter()
        documents = self.score_and_adapt()
        loss_sum, tokens, n_bytes = documents.sum(0).tolist()
        synchronize(self.rt)
        return loss_sum / tokens, loss_sum / (math.log(2) * n_bytes), 1000 * (time.perf_counter() - t0), documents

    def score_and_adapt(self) -> Tensor:
        """The one left-to-right pass: each document's (nats, targets, bytes), summed over the ranks."""
        h, rt = self.h, self.rt
        n_docs = len(self.lengths)
        documents = torch.zeros(n_docs, 3, dtype=torch.float64, device=rt.device)
        for phase in range(h.ttt_phases + 1):
            docs = list(range(n_docs * phase // (h.ttt_phases + 1), n_docs * (phase + 1) // (h.ttt_phases + 1)))
            before = np.cumsum([0] + [self.lengths[d] for d in docs])
            owner = before[:-1] * rt.world_size // max(int(before[-1]), 1)  # contiguous shares of equal target counts
            self._score_documents([d for d, r in zip(docs, owner) if r == rt.rank], documents)
            if phase < h.ttt_phases:
                self._global_sgd(docs)
        if rt.distributed:
            dist.all_reduce(documents)  # each document was scored on one rank: the others add zeros
        return documents

    def prime(self) -> float:
        """With COMPILE: one whole pass over synthetic documents (BOS, then token 0), which compiles every graph
        the scoring runs, then the weights are restored. No validation token reaches the compiler. Returns the seconds taken."""
        t0 = time.perf_counter()
        if self.rt.compile:
            tokens, state = self.tokens, copy.deepcopy(self.model.state_dict())
            length = self.h.eval_seq_len + self.h.ttt_chunk
            synthetic = torch.zeros(max(2, self.h.ttt_phases + 1) * self.rt.world_size, length, dtype=tokens.dtype, device=tokens.device)
            synthetic[:, 0] = BOS_ID
            self.use_tokens(synthetic.flatten()[:len(tokens)])
            self.score_and_adapt()  # the synthetic tokens may have no bytes: no score is formed
            self.model.load_state_dict(state)
            self.use_tokens(tokens)
            synchronize(self.rt)
        return time.perf_counter() - t0


# =============================================================================================
# Main: runtime, log, training, export
# =============================================================================================

# The training loop gives up this multiple of the (warm) export quantization's time, or the cold time if
# that is less: the export after training took up to about 1.5x the warm time, and never longer than the
# cold one (bench/RESULTS.md, "The export's time reserve"). A run whose training and export go over the cap fails.
RESERVE_FACTOR = 2.0


def self_extracting(source: bytes) -> bytes:
    """The form of the script that is counted against the cap: two lines that decompress the readable
    source (lzma, base85), hand it over as READABLE_SOURCE, put it in linecache (tracebacks and Triton's
    inspect.getsource see the readable lines) and run it compiled as train_gpt.py, so that line numbers
    are the readable file's. Deterministic: the same source gives the same bytes. records/package.py
    runs this function from the logged source to write a submission's train_gpt.py."""
    import base64, lzma
    packed = base64.b85encode(lzma.compress(source, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME))
    return (b'import base64,linecache,lzma;READABLE_SOURCE=lzma.decompress(base64.b85decode(b"' + packed + b'"))\n'
            b'linecache.cache["train_gpt.py"]=(len(READABLE_SOURCE),None,READABLE_SOURCE.decode().splitlines(True),"train_gpt.py");'
            b'exec(compile(READABLE_SOURCE,"train_gpt.py","exec"))\n')


# Read once at start: the readable source, logged in full (this file's bytes, or those its self-extracting
# form ran), and the code size counted against the cap: the bytes of that form (CODE_BYTES, computed here).
SOURCE = globals().get("READABLE_SOURCE") or Path(__file__).read_bytes()
CODE_BYTES = len(self_extracting(SOURCE))


@dataclass
class Runtime:
    """Where and how this process runs (one GPU per rank under torchrun, or the CPU), and the choices
    resolved from the settings for it: the settings themselves stay as given."""
    rank: int
    world_size: int
    device: torch.device
    micro_batch_seqs: int
    compile: bool
    grad_accum_steps: int = 1
    kernels: Kernels = Kernels()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def choose_attention(setting: str, major: int, doc_mask: bool = False) -> str:
    """ATTN_BACKEND for a GPU of this major compute capability (0: no GPU). auto: FlashAttention-3 on
    Hopper, else FlashAttention-4 on Hopper or later (faster than SDPA, bench/RESULTS.md), else SDPA;
    with DOC_MASK, flex attention (a compiled block-sparse kernel) instead of SDPA on a GPU.
    An explicit choice that cannot run here is refused."""
    fa3 = fa3_attention is not None and major == 9
    fa4 = fa4_interface is not None and major >= 9
    if setting == "auto":
        return "fa3" if fa3 and (fa3_varlen_attention is not None or not doc_mask) else "fa4" if fa4 else \
            "flex" if doc_mask and major > 0 else "sdpa"
    if setting == "fa3" and not fa3:
        raise ConfigError("ATTN_BACKEND=fa3 needs a Hopper GPU and the flash_attn_interface package (FlashAttention-3)")
    if setting == "flex" and major == 0:
        raise ConfigError("ATTN_BACKEND=flex needs a GPU (flex attention has no backward on the CPU; DOC_MASK uses sdpa there)")
    if setting == "fa3" and doc_mask and fa3_varlen_attention is None:
        raise ConfigError("ATTN_BACKEND=fa3 with DOC_MASK=1 needs flash_attn_varlen_func in flash_attn_interface (FlashAttention-3)")
    if setting == "fa4" and not fa4:
        raise ConfigError("ATTN_BACKEND=fa4 needs a Hopper or Blackwell GPU and the flash-attn-4 package "
                          "(pip install flash-attn-4; FlashAttention-4)" + ("" if fa4_interface is not None else ": it does not import here"))
    return setting


def choose_kernels(h: Hyperparameters, device: torch.device) -> Kernels:
    """The Kernels for this model on this device: "auto" takes each kernel where it runs and fits the
    model; an explicit choice that cannot run is refused."""
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    chosen = {}
    for name, fits, also in (("mlp", relu2_mlp_fits(h), ", MLP_ACT=relu2, and MODEL_DIM and the MLP width "
                                                        "(MLP_MULT x MODEL_DIM) multiples of 8"),
                             ("qk", True, ""), ("xsa", True, ""), ("loss", True, "")):
        usable, setting = triton is not None and major == 9 and fits, getattr(h, f"{name}_kernel")
        if setting == "triton" and not usable:
            raise ConfigError(f"{name.upper()}_KERNEL=triton needs a Hopper GPU and Triton 3.4 or later{also}")
        chosen[name] = "triton" if setting == "triton" or (setting == "auto" and usable) else "torch"
    return Kernels(attention=choose_attention(h.attn_backend, major, h.doc_mask), **chosen)


def setup_runtime(h: Hyperparameters, environ) -> Runtime:
    """Distributed and compile setup in one place; the "auto" settings are resolved onto the Runtime."""
    world_size, rank = int(environ.get("WORLD_SIZE", "1")), int(environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    grad_accum_steps = h.grad_accum_steps or max(1, 8 // world_size)
    compile = h.compile == "1" or (h.compile == "auto" and cuda)
    kernels = choose_kernels(h, device)
    pieces = world_size * grad_accum_steps * h.train_seq_len
    if h.train_batch_tokens % pieces:
        raise ConfigError(f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} is not a multiple of world size {world_size} x "
                          f"GRAD_ACCUM_STEPS={grad_accum_steps} x TRAIN_SEQ_LEN={h.train_seq_len} = {pieces}")
    for _, length in h.seq_schedule():  # every scheduled length cuts the same tokens into whole rows
        if h.train_batch_tokens % (world_size * grad_accum_steps * length):
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE={h.train_seq_schedule!r}: length {length} does not divide TRAIN_BATCH_TOKENS="
                              f"{h.train_batch_tokens} into world size {world_size} x GRAD_ACCUM_STEPS={grad_accum_steps} whole rows")
    if compile:
        import torch._inductor.config as inductor
        # Its mix-order reductions (RMSNorm backward fused with the mixing vectors' per-channel
        # gradient sums) ran far below memory bandwidth on the H100 (bench/RESULTS.md, "Step time").
        if hasattr(inductor.triton, "mix_order_reduction"):
            inductor.triton.mix_order_reduction = False
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Runtime(rank, world_size, device, h.train_batch_tokens // pieces, compile, grad_accum_steps, kernels)


def synchronize(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def autocast(rt: Runtime):
    return torch.autocast("cuda", dtype=torch.bfloat16) if rt.device.type == "cuda" else torch.autocast("cpu", enabled=False)


def rank_max(value: float, rt: Runtime) -> float:
    """The largest of the ranks' values (a host sync), for a figure that every rank's decisions use."""
    if not rt.distributed:
        return value
    stat = torch.full((), value, dtype=torch.float64, device=rt.device)
    dist.all_reduce(stat, op=dist.ReduceOp.MAX)
    return stat.item()


class StepRecords:
    """Per-step figures that every rank must agree on (train_loss, elapsed time), averaged over ranks
    and read one step late: the host waits for step k-1 while step k is already queued, so the GPU
    never idles between steps (a host sync after each step cost a measurable part of a step,
    bench/RESULTS.md)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.pending = collections.deque()  # (host values, CUDA event or None), oldest first

    def post(self, values: list) -> None:
        """Queue the rank mean of `values` (tensors or numbers) behind the work already queued. Numbers
        are filled in on the device: torch.as_tensor would copy them from pageable host memory, and
        that copy waits for the GPU to finish everything queued."""
        stats = torch.stack([v.float() if isinstance(v, Tensor) else torch.full((), v, device=self.rt.device) for v in values])
        if self.rt.distributed:
            dist.all_reduce(stats, op=dist.ReduceOp.AVG)
        if self.rt.device.type != "cuda":
            self.pending.append((stats, None))
            return
        host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
        host.copy_(stats, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.pending.append((host, done))

    def take(self) -> list[float] | None:
        """The oldest posted values, once the GPU has reached them; None if nothing is pending."""
        if not self.pending:
            return None
        host, done = self.pending.popleft()
        if done is not None:
            done.synchronize()
        return host.tolist()


class RunLog:
    """Rank 0 writes logs/<RUN_ID>.txt and echoes to stdout. The file is named .part until the run ends;
    it then takes its final name if every line reached the disk, so a failed run's log ends in its
    `error:` line, and a log that could not be completed (a full disk) keeps the .part name."""

    def __init__(self, path: Path, master: bool):
        self.path, self.part = path, path.with_name(path.name + ".part")
        self.complete = True
        try:
            self.file = open(self.part, "w", encoding="utf-8") if master else None
        except OSError as e:
            raise ConfigError(f"{self.part}: cannot create the run log ({e.strerror or e})") from None

    def __call__(self, line: str, console: bool = True) -> None:
        if self.file is None:
            return
        if console:
            print(line, flush=True)
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except OSError as e:
            if self.complete:  # one complaint; the run goes on, its log stays .part
                print(f"warning: {self.part}: cannot write the run log ({e.strerror or e}); it keeps the .part name", file=sys.stderr)
            self.complete = False

    def close(self) -> None:
        if self.file is None:
            return
        with contextlib.suppress(OSError):
            self.file.close()
        if self.complete:
            os.replace(self.part, self.path)


RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")  # a plain file name: nothing outside logs/


def claim_run_paths(h: Hyperparameters, rt: Runtime) -> tuple[Path, Path]:
    """logs/<RUN_ID>.txt and logs/<RUN_ID>.model.zst (RUN_ID "": a time stamp, the same on every rank);
    an earlier run's files are never overwritten."""
    if h.run_id and not RUN_ID_PATTERN.fullmatch(h.run_id):
        raise ConfigError(f"RUN_ID={h.run_id!r}: expected a plain file name of letters, digits, '.', '_' and '-' "
                          "(at most 200, not starting with '.'); the run writes logs/<RUN_ID>.txt")
    run_id = [h.run_id or time.strftime("%Y%m%d_%H%M%S_") + os.urandom(2).hex()]
    if rt.distributed and not h.run_id:
        dist.broadcast_object_list(run_id, src=0)
    log_path, artifact_path = Path("logs") / f"{run_id[0]}.txt", Path("logs") / f"{run_id[0]}.model.zst"
    taken = [p for p in (log_path, artifact_path, log_path.with_name(log_path.name + ".part")) if p.exists()]
    if taken:
        raise ConfigError(f"RUN_ID={run_id[0]} was used before ({taken[0]} exists): choose another RUN_ID")
    if rt.distributed:
        dist.barrier()  # every rank checked before rank 0 creates the log
    if rt.master:
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{log_path.parent}/: cannot create the folder for the run's log and artifact ({e.strerror or e})") from None
    return log_path, artifact_path


def log_header(log: RunLog, h: Hyperparameters, rt: Runtime) -> None:
    import hashlib
    log(f"==== source: {Path(__file__).name} bytes:{len(SOURCE)} sha256:{hashlib.sha256(SOURCE).hexdigest()} ====", console=False)
    text = SOURCE.decode("utf-8")
    log(text[:-1] if text.endswith("\n") else text, console=False)
    log("==== end of source ====", console=False)
    for f in fields(h):
        log(f"setting {f.name.upper()}={getattr(h, f.name)}")
    log(f"versions python:{platform.python_version()} torch:{torch.__version__} cuda:{torch.version.cuda}")
    if rt.device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            log(f"gpu {i}: {torch.cuda.get_device_name(i)}")
    else:
        log("gpu none (cpu)")
    log(f"world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum_steps} micro_batch_seqs:{rt.micro_batch_seqs} device:{rt.device.type} compile:{int(rt.compile)}")
    kernels = rt.kernels
    version = {"fa4": f" (flash-attn-4 {FA4_VERSION})", "sdpa": f" (torch {torch.__version__})", "flex": f" (torch {torch.__version__})"}.get(kernels.attention, "")
    log(f"attention_backend:{kernels.attention} mlp_kernel:{kernels.mlp} qk_kernel:{kernels.qk} xsa_kernel:{kernels.xsa} "
        f"loss_kernel:{kernels.loss}{version}")
    head_dim = h.head_dim
    log(f"rope effective_base:{h.rope_base} dims:{h.rope_dims or head_dim}/{head_dim}")


def log_sizes(log: RunLog, artifact_bytes: int) -> None:
    import hashlib
    log(f"Serialized model quant+zstd: {artifact_bytes} bytes")
    log(f"Code size: {CODE_BYTES} bytes")
    log(f"Code source: {len(SOURCE)} bytes sha256:{hashlib.sha256(SOURCE).hexdigest()} (counted as its self-extracting form)")
    log(f"Total submission size quant+zstd: {artifact_bytes + CODE_BYTES} bytes")


def finite_score(evaluator: Evaluator, sliding: bool, documents: Tensor | None = None) -> tuple[float, float, float]:
    """evaluator.score, or the run fails (on every rank: the sums are all-reduced) when it is not finite."""
    loss, bpb, ms = evaluator.score(sliding) if documents is None else evaluator.score(sliding, documents)
    if not (math.isfinite(loss) and math.isfinite(bpb)):
        raise RunError(f"the {'sliding-window' if sliding else 'round-trip'} score is val_loss:{loss} val_bpb:{bpb}: "
                       "the model's outputs are not finite, so the run has no score")
    return loss, bpb, ms


def log_final_scores(log: RunLog, evaluator: Evaluator, h: Hyperparameters) -> None:
    loss, bpb, ms = finite_score(evaluator, sliding=False)
    log(f"final_quant_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms")
    log(f"final_quant_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    scored = "sliding-window"
    documents = torch.zeros(len(evaluator.doc_starts), 3, dtype=torch.float64, device=evaluator.rt.device) if h.eval_doc_scores else None
    loss, bpb, ms = finite_score(evaluator, sliding=True, documents=documents if h.ttt_mode == "off" else None)
    log(f"final_quant_sliding_window val_loss:{loss:.4f} val_bpb:{bpb:.4f} stride:{h.eval_stride} eval_time:{ms:.0f}ms")
    log(f"final_quant_sliding_window_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    if h.ttt_mode != "off":
        scored, ttt = "TTT", TestTimeTraining(evaluator)
        if evaluator.rt.compile:
            log(f"ttt: graphs compiled on synthetic documents in {ttt.prime():.1f}s")
        loss, bpb, ms, documents = ttt.run()
        if not (math.isfinite(loss) and math.isfinite(bpb)):
            raise RunError(f"the TTT score is val_loss:{loss} val_bpb:{bpb}: the adapted model's outputs are not finite "
                           "(lower TTT_LR or TTT_GLOBAL_LR), so the run has no TTT score")
        log(f"final_ttt val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms mode:{h.ttt_mode} phases:{h.ttt_phases} documents:{len(documents)} context:{h.ttt_context}")
        log(f"final_ttt_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    if h.eval_doc_scores:
        on_master(evaluator.rt, lambda: write_document_scores(h.eval_doc_scores, documents.cpu()))
        log(f"document_scores: {h.eval_doc_scores} ({len(documents)} documents of the {scored} score)")


def check_size_cap(total_bytes: int) -> None:
    if total_bytes > SIZE_CAP_BYTES:
        raise RunError(f"total submission size {total_bytes} bytes is over the {SIZE_CAP_BYTES:,}-byte cap by {total_bytes - SIZE_CAP_BYTES} bytes")


def check_budget(h: Hyperparameters) -> None:
    """At start: TARGET_BYTES must hold the code and at least an empty artifact container."""
    floor = CODE_BYTES + len(compress(pack_artifact({}, {}, {}, model_settings(h))))
    if h.target_bytes < floor:
        raise ConfigError(f"TARGET_BYTES={h.target_bytes}: expected at least {floor} (the code counted as its self-extracting form, {CODE_BYTES} bytes, "
                          f"and an empty artifact) and at most {SIZE_CAP_BYTES}")


def on_master(rt: Runtime, work):
    """work() on rank 0 only, with its outcome shared: every rank returns its result, or every rank
    raises its error (a rank left waiting at the next collective would hang)."""
    result, error = None, None
    if rt.master:
        try:
            result = work()
        except Exception as e:
            if not rt.distributed:
                raise
            error = e
    if rt.distributed:
        shared = [result, None if error is None else f"rank 0: {error}"]
        dist.broadcast_object_list(shared, src=0)
        if error is not None:
            raise error
        if shared[1] is not None:
            raise RunError(shared[1])
        result = shared[0]
    return result


def forward_backward(model: nn.Module, batch: tuple[Tensor, Tensor], rt: Runtime, backward: bool = True) -> Tensor:
    """The mean loss of a rank's batch (its micro-steps, the first dimension of x and y) under autocast;
    with backward, the gradient of that mean accumulates in the parameters. The loss stays on the device:
    nothing waits for the GPU."""
    x, y = batch
    total = torch.zeros((), device=rt.device)
    for micro in range(x.size(0)):
        with autocast(rt):
            loss = model(x[micro], y[micro])
        if backward:
            (loss / x.size(0)).backward()
        total += loss.detach()
    return total / x.size(0)


def train_step(model: nn.Module, opt: Optimizers, batch: tuple[Tensor, Tensor], rt: Runtime, lr_scale: float, momentum: float,
               wd_scale: float = 1.0) -> Tensor:
    """One optimiser step on a batch (train(), and the step time of bench/); returns its mean loss."""
    loss = forward_backward(model, batch, rt)
    opt.step(lr_scale, momentum, wd_scale)
    return loss


def as_rows(batch: tuple[Tensor, Tensor], seq_len: int) -> tuple[Tensor, Tensor]:
    """A batch's tokens in rows of seq_len (TRAIN_SEQ_SCHEDULE): the tokens of a step do not depend on it."""
    return tuple(t.view(t.size(0), -1, seq_len) for t in batch)


def quantize_for_export(model: GPT, batches: list, h: Hyperparameters, rt: Runtime) -> Export:
    """The export quantization, which may use training data (GPTQ calibration), so it runs inside the
    training budget."""
    routes = route_parameters(model)
    state = {name: t.detach().float() for name, t in model.state_dict().items()}
    formats = {name: export_format(h, routes[name], t.numel(), block_of(name)) for name, t in state.items()}
    hessians = collect_hessians(model, batches, h, rt) if h.quant_method == "gptq" else {}
    quantized = quantize_state(state, formats, h, hessians)
    state = {name: t.cpu() for name, t in state.items()}
    if h.lqer_rank:
        matrices = [name for name in quantized if ROUTES[routes[name]][1] in ("attn", "mlp")]
        state, formats, quantized = with_low_rank_corrections(state, formats, quantized, hessians, matrices, h)
    return Export(state, formats, quantized, hessians)


def self_calibrated_export(model: GPT, h: Hyperparameters, rt: Runtime, log: RunLog) -> Export:
    """CALIB=self: quantize_for_export calibrated on self-generated text, after the clock; its time is
    logged as evaluation-side work."""
    t = time.perf_counter()
    batches = self_generated_batches(model, h, rt)
    synchronize(rt)
    generation_ms = 1000 * (time.perf_counter() - t)
    export = quantize_for_export(model, batches, h, rt)
    synchronize(rt)
    log(f"self_calibration: {sum(x.numel() for x, _ in batches)} generated tokens a rank, generation:{generation_ms:.0f}ms "
        f"quantization:{1000 * (time.perf_counter() - t) - generation_ms:.0f}ms after the clock (evaluation-side: no training data)")
    return export


class TrainingClock:
    """The training time budget: the clock (paused while validating), the loop's cap (MAX_WALLCLOCK_SECONDS
    less the export's reserve), and the decisions every rank takes alike, from the step-end times that all
    ranks agree on (StepRecords delivers them two steps late)."""

    def __init__(self, cap_ms: float, reserve_ms: float):
        self.cap_ms, self.reserve_ms = cap_ms, reserve_ms
        self.loop_cap_ms = cap_ms - reserve_ms if cap_ms > 0 else 0.0  # 0: no cap
        self.training_ms, self.t0 = 0.0, time.perf_counter()  # the time up to the last pause, and since then
        self.ended_ms = []  # the agreed training time at the end of steps 0, 1, 2, ... as it becomes known

    def now_ms(self) -> float:
        return self.training_ms + 1000 * (time.perf_counter() - self.t0)

    def pause(self) -> float:
        """Stop the clock (validation is not training time); returns the training time so far."""
        self.training_ms = self.now_ms()
        self.t0 = None
        return self.training_ms

    def resume(self) -> None:
        self.t0 = time.perf_counter()

    def estimate(self, step: int) -> tuple[float, float]:
        """(when step `step` ends, a step's time), extrapolated from the last agreed end; (0, 0) before two are known."""
        known = len(self.ended_ms) - 1  # the last step whose end all ranks know
        if known < 1:
            return 0.0, 0.0
        step_ms = max(self.ended_ms[-1] / known, self.ended_ms[-1] - self.ended_ms[-2])
        return self.ended_ms[-1] + (step - known) * step_ms, step_ms

    def out_of_time(self, ends_ms: float, step_ms: float) -> bool:
        """Whether another step could end past the cap. The next one's end is three steps of extrapolation from
        figures two steps old, so one more step is kept as a margin (CPU runs overran by a quarter step without it)."""
        return self.loop_cap_ms > 0 and len(self.ended_ms) >= 2 and ends_ms + 2 * step_ms > self.loop_cap_ms


def train(model: GPT, routes: dict[str, str], evaluator: Evaluator, h: Hyperparameters, rt: Runtime, log: RunLog) -> Export:
    """Train until ITERATIONS or the time cap, load the weight average, and quantize for export inside
    the training budget. Returns the Export of quantize_for_export."""
    train_model = torch.compile(model, dynamic=False, fullgraph=True) if rt.compile else model
    orthogonalize = torch.compile(newton_schulz, dynamic=False, fullgraph=True) if rt.compile else newton_schulz
    loader = TrainLoader(h, rt)
    calibration_batches = h.gptq_calib_batches if h.quant_method == "gptq" and h.calib == "train" else 0
    after_clock = h.calib == "self"  # the quantization reads no training data: not charged, nothing reserved

    def timed_quantization() -> tuple[tuple, float]:
        """quantize_for_export on the next calibration batches, and its milliseconds (reading the batches
        included: the training data it uses is charged to the budget)."""
        t = time.perf_counter()
        export = quantize_for_export(model, [loader.next_batch() for _ in range(calibration_batches)], h, rt)
        synchronize(rt)
        return export, 1000 * (time.perf_counter() - t)

    # Before the clock: prime the compiled kernels and time the export quantization (its time is
    # reserved from the budget), then undo every trace of it. The first quantization is cold (library
    # set-up, first kernels: 2-4x the export's time on GPUs), so it is timed twice.
    t0 = time.perf_counter()
    initial = {name: t.detach().clone() for name, t in model.state_dict().items()}
    opt = Optimizers(model, routes, h, rt, orthogonalize)
    # Every training graph is primed (compiled) in turn: each length of TRAIN_SEQ_SCHEDULE, and with a delayed
    # recurrence each without the repeats, then with them (the final structure: scoring and the export's
    # calibration use it), so that nothing compiles on the clock.
    lengths = list(dict.fromkeys(length for _, length in h.seq_schedule()))
    structures = [False, True] if h.recurrence_layers() and h.recur_start > 0 else [True]
    graphs = [(recur, length) for recur in structures for length in lengths]
    for i in range(h.warmup_steps):
        recur, length = graphs[i * len(graphs) // h.warmup_steps]
        set_recurrence(model, recur)
        train_step(train_model, opt, as_rows(loader.next_batch(), length), rt, 1.0, h.muon_momentum_warmup_start)
    set_recurrence(model, True)
    evaluator.prime()
    synchronize(rt)
    (_, cold_ms), (_, warm_ms) = ((0.0, 0.0), (0.0, 0.0)) if after_clock else (timed_quantization(), timed_quantization())
    # One loop cap for all ranks, so that they stop after the same step: the slowest rank's time.
    reserve_ms = rank_max(min(cold_ms, RESERVE_FACTOR * warm_ms), rt)
    cap_ms = 1000.0 * h.max_wallclock_seconds
    if cap_ms > 0 and reserve_ms >= cap_ms:
        raise RunError(f"the export quantization needs {reserve_ms:.0f}ms reserved, at or above MAX_WALLCLOCK_SECONDS="
                       f"{h.max_wallclock_seconds:g}: no time would be left to train (raise the cap, or lower GPTQ_CALIB_BATCHES)")
    model.load_state_dict(initial)
    set_recurrence(model, structures == [True])  # a delayed recurrence starts without the repeats
    loader = TrainLoader(h, rt)
    quantizations = ("no export quantization (CALIB=self: it runs after the clock, reserved:0ms)" if after_clock else
                     f"two export quantizations (cold:{cold_ms:.0f}ms warm:{warm_ms:.0f}ms reserved:{reserve_ms:.0f}ms)")
    log(f"warmup: {h.warmup_steps} priming steps, the scoring graphs and {quantizations} in "
        f"{time.perf_counter() - t0:.1f}s; weights, optimiser state and data stream restored")

    opt = Optimizers(model, routes, h, rt, orthogonalize)
    averager = WeightAverager(model, h)
    step, lr_scale, stop, qat_on, ends_ms = 0, 1.0, False, False, 0.0
    fraction = 0.0  # of the training done (training_fraction), from the agreed step-end times
    seq_len, wd_scale = train_seq_len_at(h, fraction), wd_scale_at(h, fraction)
    records = StepRecords(rt)

    def accept_record(n: int, figures: list[float], elapsed_ms: float) -> None:
        """Step n's record (its mean train_loss, and when step n-1 ended by the ranks' mean clock):
        check the loss, keep the time in ended_ms, and log the step at this rank's time elapsed_ms."""
        train_loss, previous_ended_ms = figures
        if not math.isfinite(train_loss):
            raise RunError(f"train_loss is {train_loss} at step {n}: stopping (check the data and the learning rates)")
        clock.ended_ms.append(previous_ended_ms)
        if n % h.train_log_every == 0 or n <= 10:
            log(f"step:{n}/{h.iterations} train_loss:{train_loss:.4f} train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / n:.2f}ms")

    batch = loader.next_batch()
    synchronize(rt)
    if rt.distributed:
        dist.barrier()  # the ranks' clocks start together: each checks the cap on its own clock
    clock = TrainingClock(cap_ms, reserve_ms)
    while True:
        last = stop or step >= h.iterations
        if last or (h.val_loss_every > 0 and step % h.val_loss_every == 0):  # the clock pauses here
            synchronize(rt)
            training_ms = clock.pause()
            if (figures := records.take()) is not None:
                accept_record(step, figures, training_ms)
            recur_on = model.recur_on
            set_recurrence(model, True)  # every evaluation scores the final structure
            val_loss, val_bpb, _ = evaluator.score(sliding=False)
            set_recurrence(model, recur_on)
            log(f"step:{step}/{h.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{training_ms:.0f}ms step_avg:{training_ms / max(step, 1):.2f}ms")
            clock.resume()
        if last:
            break
        if h.late_qat_threshold > 0 and not qat_on and lr_scale < h.late_qat_threshold:
            qat_on = True
            log(f"late_qat: on from step:{step} lr_scale:{lr_scale:.4f} matrices:{set_late_qat(model, True)}")
        # ends_ms comes from the agreed step-end times: all ranks switch at the same step.
        if not model.recur_on and fraction >= h.recur_start:
            set_recurrence(model, True)
            log(f"recurrence: on from step:{step} train_time:{ends_ms:.0f}ms blocks:{h.recur_layers} repeats:{h.recur_repeats}")
        started_ms = clock.now_ms()
        loss = train_step(train_model, opt, as_rows(batch, seq_len), rt, lr_scale, muon_momentum_at(h, step), wd_scale)
        batch = loader.next_batch()  # host work overlaps the GPU running this step
        step += 1
        averager.update(step, lr_scale)
        # This step is queued: wait for the previous one to end, then queue this step's record
        # behind it. On the GPU the previous step ended when take() returned; on the CPU (nothing
        # is queued) or with nothing pending, before this step began.
        figures = records.take()
        previous_ended_ms = clock.now_ms() if figures is not None and rt.device.type == "cuda" else started_ms
        records.post([loss, previous_ended_ms])
        if figures is not None:
            accept_record(step - 1, figures, previous_ended_ms)
        # Every rank decides from the agreed end times, which lag two steps behind.
        ends_ms, step_ms = clock.estimate(step)  # this step's end, estimated
        lr_scale = lr_scale_at(h, step, ends_ms, clock.loop_cap_ms)
        fraction = training_fraction(h, step, ends_ms, clock.loop_cap_ms)
        wd_scale = wd_scale_at(h, fraction)
        if (length := train_seq_len_at(h, fraction)) != seq_len:
            seq_len = length
            log(f"train_seq_len: {seq_len} from step:{step} fraction:{fraction:.4f}")
        if clock.out_of_time(ends_ms, step_ms):  # no step may end past the cap
            stop = True
            log(f"stopping_early: wallclock_cap train_time:{ends_ms:.0f}ms (estimated) step:{step}/{h.iterations}: "
                f"another step could end past {clock.loop_cap_ms:.0f}ms (export quantization reserved {reserve_ms:.0f}ms)")
    if rt.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    log(averager.apply())
    set_late_qat(model, False)
    set_recurrence(model, True)

    if after_clock:
        export, quantization_ms = self_calibrated_export(model, h, rt, log), 0.0
    else:
        export, quantization_ms = timed_quantization()
    check_storable(export.state, export.formats, export.quantized)  # every rank holds the same weights: all stop together
    total_ms = rank_max(training_ms + quantization_ms, rt)  # the slowest rank's: every rank passes or fails together
    log(f"training_budget: train_time:{training_ms:.0f}ms quantization:{quantization_ms:.0f}ms "
        f"total:{total_ms:.0f}ms cap:{cap_ms:.0f}ms method:{h.quant_method} "
        f"calibration_tokens:{calibration_batches * h.train_batch_tokens}")
    if cap_ms > 0 and total_ms > cap_ms:
        raise RunError(f"training and export quantization took {total_ms:.0f}ms, over MAX_WALLCLOCK_SECONDS: "
                       f"the quantization took longer than the {reserve_ms:.0f}ms reserved before the clock")
    return export


def model_and_evaluator(h: Hyperparameters, rt: Runtime, kernels: Kernels, log: RunLog) -> tuple[GPT, Evaluator]:
    """The model on the device and the evaluator that scores it on the validation shards: the same for
    training and for re-scoring."""
    tables = build_byte_tables(h.tokenizer_path, h.vocab_size)
    val_tokens = load_validation_tokens(h)
    model = build_model(h, kernels).to(rt.device)
    evaluator = Evaluator(model, h, rt, val_tokens, tables)
    log(f"val_bytes: from the {evaluator.tables.source}")
    return model, evaluator


def train_and_export(h: Hyperparameters, rt: Runtime, log: RunLog, artifact_path: Path) -> None:
    model, evaluator = model_and_evaluator(h, rt, rt.kernels, log)
    routes = route_parameters(model)
    log(f"model_params:{sum(p.numel() for p in model.parameters())} xsa_layers:{h.xsa_last_n} weight_avg:{h.weight_avg}")
    export = train(model, routes, evaluator, h, rt, log)

    val_loss, val_bpb, ms = evaluator.score(sliding=False)
    log(f"post_average_prequant val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{ms:.0f}ms")
    _, zeroed, moves = on_master(rt, lambda: export_artifact(export, h, artifact_path, h.target_bytes - CODE_BYTES))
    log(f"artifact: {artifact_path} ({h.quant_method}; {zeroed} quantized +-1 values zeroed to fit TARGET_BYTES={h.target_bytes}"
        + "".join(f"; {move}" for move in moves) + ")")
    score_artifact(artifact_path, model, evaluator, h, log)


def score_artifact(path: Path, model: GPT, evaluator: Evaluator, h: Hyperparameters, log: RunLog) -> None:
    """The score of a run, after training and when re-scoring: the artifact's bytes on disk, loaded into
    the evaluator's model, the sizes counted against the cap, the final lines, and the time all that took."""
    started = time.perf_counter()
    state, _ = load_artifact(path)
    model.load_state_dict(state)
    log_sizes(log, path.stat().st_size)
    log_final_scores(log, evaluator, h)
    total_ms = rank_max(1000 * (time.perf_counter() - started), evaluator.rt)
    log(f"evaluation_time: total:{total_ms:.0f}ms cap:600000ms on 8xH100 (the artifact read back and every score "
        "above, compiling included, on the slowest rank)")


# The "model shape" group of Hyperparameters: the settings that fix the saved weights and the function they
# compute, stored in every artifact; re-scoring builds its model from them.
MODEL_SETTINGS = tuple(name for group, name in settings_groups() if group == "model shape")


def model_settings(h: Hyperparameters) -> dict:
    """The settings an artifact stores: the model's shape, no paths."""
    return {name: getattr(h, name) for name in MODEL_SETTINGS}


def stored_model_settings(config: dict, h: Hyperparameters, source: str) -> dict:
    """The model settings an artifact was trained with, checked like the environment's: only MODEL_SETTINGS
    names, each of its setting's type, within bounds, then Hyperparameters.validate() on the model settings
    the re-scoring will use (the stored ones, this run's for any not stored). Every count of a model is a dimension of a stored tensor, so no larger than MAX_CONTAINER_BYTES
    (and NUM_LAYERS, a block holding at least one tensor, no larger than MAX_ARTIFACT_TENSORS)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise DataError(f"{source}: stored model setting {message}")

    kinds = {f.name: f.type for f in fields(Hyperparameters)}
    values = {}
    for name, value in config.items():
        need(name in MODEL_SETTINGS, f"{name!r} is not one (expected some of {', '.join(MODEL_SETTINGS)})")
        kind, shown = kinds[name], f"{name.upper()}={value!r}"
        if kind == "bool":
            need(type(value) is bool, f"{shown}: expected true or false")
        elif kind == "str":
            need(type(value) is str, f"{shown}: expected a string")
        elif kind == "int":
            need(type(value) is int and 0 <= value <= MAX_CONTAINER_BYTES, f"{shown}: expected an integer in 0..{MAX_CONTAINER_BYTES}")
        else:
            need(type(value) in (int, float) and abs(value) <= MAX_CONTAINER_BYTES, f"{shown}: expected a number of at most {MAX_CONTAINER_BYTES}")
            value = float(value)
        values[name] = value
    try:
        settings = Hyperparameters(**(model_settings(h) | values))  # the rest: defaults
        settings.validate()
    except ConfigError as e:
        raise DataError(f"{source}: stored model settings: {e}") from None
    need(settings.num_layers <= MAX_ARTIFACT_TENSORS, f"NUM_LAYERS={settings.num_layers}: more blocks than an artifact may hold tensors ({MAX_ARTIFACT_TENSORS})")
    need(settings.mlp_mult * settings.model_dim <= MAX_CONTAINER_BYTES, f"MLP_MULT={settings.mlp_mult}: an MLP wider than any artifact holds")
    return values


def check_artifact_tensors(state: dict[str, Tensor], h: Hyperparameters, source: str) -> None:
    """The artifact holds exactly the tensors, of exactly the shapes, of the model these settings build
    (built on the meta device: shapes only, nothing allocated)."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build_model(h).state_dict().items()}
    for name in expected:
        if name not in state:
            raise DataError(f"{source}: tensor {name} is missing ({len(state)} stored, {len(expected)} in the model of the stored settings)")
    for name in state:
        if name not in expected:
            raise DataError(f"{source}: unexpected tensor {name} (not in the model of the stored settings)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise DataError(f"{source}: tensor {name} has shape {list(tensor.shape)}, the model of the stored settings {list(expected[name])}")


def rescore(h: Hyperparameters, rt: Runtime, log: RunLog) -> None:
    """Score a saved artifact on the validation shards, without training."""
    path = Path(h.eval_artifact)
    state, config = load_artifact(path)
    check_size_cap(path.stat().st_size + CODE_BYTES)  # an artifact over the cap is refused, not scored
    stored = stored_model_settings(config, h, str(path))  # an artifact older than a setting: this run's value
    for name, value in stored.items():
        if name in h.from_environment and getattr(h, name) != value:
            raise ConfigError(f"{name.upper()}={getattr(h, name)} but {path} was trained with {name.upper()}={value}")
    h = replace(h, **stored)  # the settings of the stored model, this run's for the rest
    kernels = choose_kernels(h, rt.device)  # again: e.g. no relu^2 kernel for an artifact trained with MLP_ACT=leaky_relu2
    log("rescore: model settings from the artifact: " + " ".join(f"{n.upper()}={getattr(h, n)}" for n in MODEL_SETTINGS)
        + f" (mlp_kernel:{kernels.mlp})")
    check_artifact_tensors(state, h, str(path))
    model, evaluator = model_and_evaluator(h, rt, kernels, log)
    log(f"scoring graphs compiled in {evaluator.prime():.1f}s")
    score_artifact(path, model, evaluator, h, log)


class Stopped(BaseException):
    """SIGINT or SIGTERM (torchrun sends it to every rank when one fails): unwinds like an error, so
    that the log gets its last line and temporary files go."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, raise_stopped)
    h = Hyperparameters.from_env(os.environ)
    require_zstandard()
    if not h.eval_artifact:
        check_budget(h)
    rt = setup_runtime(h, os.environ)
    try:
        log_path, artifact_path = claim_run_paths(h, rt)
        log = RunLog(log_path, rt.master)
        try:
            log_header(log, h, rt)
            if h.eval_artifact:
                rescore(h, rt, log)
            else:
                train_and_export(h, rt, log, artifact_path)
            if rt.distributed:
                dist.barrier()  # no rank tears down its process group while another still uses it
        except RunError as e:
            log(f"error: {e}", console=False)
            raise
        except BaseException as e:  # a bug, SIGINT, SIGTERM: the log says so in its last line
            if not isinstance(e, Stopped):
                log(traceback.format_exc().rstrip(), console=False)
            log(f"error: the run did not finish: {e if isinstance(e, Stopped) else type(e).__name__ + ': ' + str(e)}", console=False)
            raise
        finally:
            log.close()
    finally:
        if rt.distributed:
            dist.destroy_process_group()
            # Free tensors held in reference cycles now: freed during interpreter shutdown instead,
            # they can abort the process inside gloo's teardown (seen on CPU; see pytorch PR #179291).
            gc.collect()


if __name__ == "__main__":
    try:
        if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
            if os.environ.get("RANK", "0") == "0":
                print(settings_help())
            sys.exit(0)
        if sys.argv[1:]:
            raise ConfigError(f"unexpected argument {sys.argv[1]!r}: train_gpt.py takes its settings from "
                              "environment variables only (python train_gpt.py --help lists them)")
        main()
    except RunError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stopped:
        print(f"error: {stopped}", file=sys.stderr)
        sys.exit(128 + stopped.signum)
