"""Realistic train_gpt.py logs for the records tests, written by the tests themselves.

`write_log` follows the line formats of DESIGN.md section 7 (and the log our train_gpt.py writes):
the source block with a correct byte count and sha256, `setting` lines, versions, GPUs, `step:`
lines, and the export and final lines. Keyword arguments bend one figure at a time; `drop` leaves
out every line that starts with one of the given prefixes.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

RECORDS = Path(__file__).resolve().parent.parent / "records"
if str(RECORDS) not in sys.path:
    sys.path.insert(0, str(RECORDS))  # the tools import each other as plain modules, as when run as scripts

SOURCE = b'"""Stand-in for train_gpt.py in the records tests."""\n\nprint("training")\n'
H100 = "NVIDIA H100 80GB HBM3"
SETTINGS = {"ADAM_EPS": "1e-08", "ATTN_BITS": "6", "EVAL_STRIDE": "64", "ITERATIONS": "9000",
            "MAX_WALLCLOCK_SECONDS": "600.0", "NUM_LAYERS": "11", "XSA_LAST_N": "4", "VOCAB_SIZE": "1024",
            "TOKENIZER_PATH": "./data/tokenizers/fineweb_1024_bpe.model"}
TOKENIZER_8192 = "/workspace/data/tokenizers/fineweb_8192_bpe.model"


def write_log(path, *, seed=1337, val_loss=1.9031, val_bpb=1.1271, source=SOURCE, steps=7103,
              train_time_ms=599_912.0, model_bytes=15_468_512, code_bytes=None, total_bytes=None,
              eval_time_ms=70_000, gpus=(H100,) * 8, settings=None, drop=(), quantization_ms=None,
              ttt=None, ttt_eval_time_ms=400_000, evaluation_ms=None, append=(), rename=None, versions=None) -> Path:
    """Write one seed's log and return its path. val_loss/val_bpb are the score (sliding window, exact).
    ttt=(loss, bpb) adds test-time-training progress lines and `final_ttt` / `final_ttt_exact` after the
    sliding window; evaluation_ms adds the `evaluation_time:` line after them; append adds lines at the end; rename={old: new} renames line prefixes (e.g. final_quant_)."""
    code_bytes = len(source) if code_bytes is None else code_bytes
    total_bytes = model_bytes + code_bytes if total_bytes is None else total_bytes
    iterations = 9000
    step_avg = train_time_ms / steps
    lines = [f"setting {k}={v}" for k, v in sorted({**SETTINGS, "RUN_ID": f"run_s{seed}", "SEED": str(seed), **(settings or {})}.items())]
    lines += [versions or "versions python:3.12.3 torch:2.11.0+cu130 cuda:13.0"]
    lines += [f"gpu {i}: {name}" for i, name in enumerate(gpus)] or ["gpu none (cpu)"]
    lines += [f"world_size:{len(gpus) or 1} grad_accum_steps:1 micro_batch_seqs:48 device:cuda", "attention_backend:sdpa",
              f"step:0/{iterations} val_loss:6.9315 val_bpb:4.1052 train_time:0ms step_avg:0.00ms"]
    for step in range(100, steps, 100):
        loss = 2.0 + 4.9 * math.exp(-step / 300) + 0.01 * math.sin(step + seed)
        lines.append(f"step:{step}/{iterations} train_loss:{loss:.4f} train_time:{step * step_avg:.0f}ms step_avg:{step_avg:.2f}ms")
        if step == 4000:
            lines.append(f"step:4000/{iterations} val_loss:2.0577 val_bpb:1.2187 train_time:{step * step_avg:.0f}ms step_avg:{step_avg:.2f}ms")
    if steps < iterations:
        lines.append(f"stopping_early: wallclock_cap train_time:{train_time_ms:.0f}ms step:{steps}/{iterations}")
    lines += [
        f"step:{steps}/{iterations} val_loss:{val_loss + 0.026:.4f} val_bpb:{val_bpb + 0.0155:.4f} train_time:{train_time_ms:.0f}ms step_avg:{step_avg:.2f}ms",
        "peak memory allocated: 20409 MiB reserved: 20746 MiB",
        *([f"training_budget: train_time:{train_time_ms:.0f}ms quantization:{quantization_ms:.0f}ms "
           f"total:{train_time_ms + quantization_ms:.0f}ms cap:600000ms method:gptq calibration_tokens:786432"]
          if quantization_ms is not None else []),
        f"post_average_prequant val_loss:{val_loss + 0.0259:.4f} val_bpb:{val_bpb + 0.0154:.4f} eval_time:1800ms",
        f"Serialized model quant+zstd: {model_bytes} bytes",
        f"Code size: {code_bytes} bytes",
        f"Total submission size quant+zstd: {total_bytes} bytes",
        f"final_quant_roundtrip val_loss:{val_loss + 0.0373:.4f} val_bpb:{val_bpb + 0.0223:.4f} eval_time:1843ms",
        f"final_quant_roundtrip_exact val_loss:{val_loss + 0.0373:.8f} val_bpb:{val_bpb + 0.0223:.8f}",
        f"final_quant_sliding_window val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} stride:64 eval_time:{eval_time_ms}ms",
        f"final_quant_sliding_window_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}",
    ]
    if ttt is not None:
        lines += ["ttt_start chunks:1893", "ttt_chunk [1/1893] bpb=1.159980 time=0.5s",
                  f"final_ttt val_loss:{ttt[0]:.4f} val_bpb:{ttt[1]:.4f} eval_time:{ttt_eval_time_ms}ms",
                  f"final_ttt_exact val_loss:{ttt[0]:.8f} val_bpb:{ttt[1]:.8f}"]
    if evaluation_ms is not None:
        lines.append(f"evaluation_time: total:{evaluation_ms:.0f}ms cap:600000ms on 8xH100 (the artifact read back and every score above)")
    lines += list(append)
    lines = [line for line in lines if not line.startswith(tuple(drop))]
    for old, new in (rename or {}).items():
        lines = [new + line[len(old):] if line.startswith(old) else line for line in lines]
    header = f"==== source: train_gpt.py bytes:{len(source)} sha256:{hashlib.sha256(source).hexdigest()} ====\n".encode()
    block = header + source + (b"" if source.endswith(b"\n") else b"\n") + b"==== end of source ====\n"
    path = Path(path)
    path.write_bytes(block + "\n".join(lines).encode() + b"\n")
    return path


def write_public_log(path, *, seed=1337, val_loss=1.88976776, val_bpb=1.11922988, steps=7179) -> Path:
    """A log in the public record format: no source block or settings, a `seed:` line, TTT lines after the sliding window."""
    lines = ["logs/af2d01c8.txt",
             "val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path=./data/tokenizers/fineweb_1024_bpe.model",
             "train_loader:dataset:fineweb10B_sp1024 train_shards:80",
             "model_params:26928220", "world_size:8 grad_accum_steps:1", f"seed:{seed}",
             "warmup_step:1/20", "step:0/9000 val_loss:6.9304 val_bpb:4.1046 train_time:0ms step_avg:0.01ms"]
    lines += [f"step:{s}/9000 train_loss:{2.0 + 4.9 * math.exp(-s / 300):.4f} train_time:{s * 83.6:.0f}ms step_avg:83.60ms" for s in range(500, steps, 500)]
    lines += [f"step:{steps}/9000 val_loss:1.9214 val_bpb:1.1379 train_time:600128ms step_avg:83.59ms",
              f"stopping_early: wallclock_cap train_time:600128ms step:{steps}/9000",
              "DIAGNOSTIC post_ema val_loss:1.9196 val_bpb:1.1369 eval_time:1971ms",
              "Serialized model int6+lzma: 15887928 bytes", "Code size: 89458 bytes",
              "Total submission size int6+lzma: 15977386 bytes",
              "final_int6_sliding_window_exact val_loss:1.89385556 val_bpb:1.12165091",
              "  ttt_chunk [1/1893] bpb=1.159980 time=0.5s",
              f"legal_ttt val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:410268ms",
              f"legal_ttt_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}"]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_april_log(path, *, seed=42, val_loss=2.31944212, val_bpb=1.05989454, steps=4945, train_time_ms=599_592,
                    model_bytes=15_865_260, code_bytes=31_999, cut_after=None, append=()) -> Path:
    """A log in the dialect of the later records (e.g. 2026-04-27): a Hyperparameters block, step lines without
    `step:` and with minutes, `diagnostic` evaluations, compressed code size, and the phased TTT score last.
    cut_after="prefix" ends the log after the first line starting with prefix (a run that died there)."""
    lines = ["W0426 19:59:28.614000 762659 torch/distributed/run.py:803] *****", "Hyperparameters:",
             "  adam_eps: 1e-08", "  iterations: 20000", f"  seed: {seed}", f"  tokenizer_path: {TOKENIZER_8192}",
             "  ttt_enabled: True", "  vocab_size: 8192", "  world_size: 8", "train_shards: 80", "val_tokens: 47851520",
             "model_params:35945671", "warmup_step: 1/20", "warmup_step: 20/20", "loop_warmup_step: 20/20"]
    minutes_per_step = train_time_ms / steps / 60_000
    lines += [f"{s}/20000 train_loss: {2.3 + 6.7 * math.exp(-s / 200):.4f} train_time: {s * minutes_per_step:.1f}m tok/s: 8217810"
              for s in (1, 2, 500, 1000, 2000, 3000, 4000, 4500) if s < steps]
    lines += [f"{steps}/20000 val_loss: 2.3539 val_bpb: 1.0756",
              f"stopping_early: wallclock_cap train_time: {train_time_ms}ms step: {steps}/20000",
              "peak memory allocated: 41717 MiB reserved: 47140 MiB", "ema:applying EMA weights",
              f"diagnostic pre-quantization post-ema val_loss:{val_loss + 0.009:.8f} val_bpb:{val_bpb + 0.00406:.8f} eval_time:6718ms",
              "Serialized model: 135417533 bytes", "Code size (uncompressed): 157868 bytes", f"Code size (compressed): {code_bytes} bytes",
              f"Serialized model quantized+pergroup: {model_bytes} bytes",
              f"Total submission size quantized+pergroup: {model_bytes + code_bytes} bytes",
              f"diagnostic quantized val_loss:{val_loss + 0.0278:.8f} val_bpb:{val_bpb + 0.0127:.8f} eval_time:49995ms",
              "beginning TTT eval timer",
              "ttt_phased: total_docs:50000 prefix_docs:2500 suffix_docs:47500 num_phases:3 boundaries:[833, 1666, 2500]",
              "ttp: b782/782 bl:2.1403 bb:1.0135 rl:2.1403 rb:1.0135 dl:30339-97114 gd:0",
              "tttg: c1/131 lr:0.001000 t:0.3s",
              f"quantized_ttt_phased val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:508785ms",
              "total_eval_time:508.8s", *append]
    if cut_after is not None:
        lines = lines[:next(i for i, line in enumerate(lines) if line.startswith(cut_after)) + 1]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def run_tool(main, argv, capsys) -> tuple[int, str, str]:
    """A records/ tool's main(argv) -> (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
