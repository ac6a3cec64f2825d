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
            "MAX_WALLCLOCK_SECONDS": "600.0", "NUM_LAYERS": "11", "XSA_LAST_N": "4"}


def write_log(path, *, seed=1337, val_loss=1.9031, val_bpb=1.1271, source=SOURCE, steps=7103,
              train_time_ms=599_912.0, model_bytes=15_468_512, code_bytes=None, total_bytes=None,
              eval_time_ms=70_000, gpus=(H100,) * 8, settings=None, drop=(), quantisation_ms=None) -> Path:
    """Write one seed's log and return its path. val_loss/val_bpb are the score (sliding window, exact)."""
    code_bytes = len(source) if code_bytes is None else code_bytes
    total_bytes = model_bytes + code_bytes if total_bytes is None else total_bytes
    iterations = 9000
    step_avg = train_time_ms / steps
    lines = [f"setting {k}={v}" for k, v in sorted({**SETTINGS, "RUN_ID": f"run_s{seed}", "SEED": str(seed), **(settings or {})}.items())]
    lines += ["versions python:3.12.3 torch:2.11.0+cu130 cuda:13.0"]
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
        *([f"training_budget: train_time:{train_time_ms:.0f}ms quantisation:{quantisation_ms:.0f}ms "
           f"total:{train_time_ms + quantisation_ms:.0f}ms cap:600000ms method:gptq calibration_tokens:786432"]
          if quantisation_ms is not None else []),
        f"post_average_prequant val_loss:{val_loss + 0.0259:.4f} val_bpb:{val_bpb + 0.0154:.4f} eval_time:1800ms",
        f"Serialized model int6+zstd: {model_bytes} bytes",
        f"Code size: {code_bytes} bytes",
        f"Total submission size int6+zstd: {total_bytes} bytes",
        f"final_int6_roundtrip val_loss:{val_loss + 0.0373:.4f} val_bpb:{val_bpb + 0.0223:.4f} eval_time:1843ms",
        f"final_int6_roundtrip_exact val_loss:{val_loss + 0.0373:.8f} val_bpb:{val_bpb + 0.0223:.8f}",
        f"final_int6_sliding_window val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} stride:64 eval_time:{eval_time_ms}ms",
        f"final_int6_sliding_window_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}",
    ]
    lines = [line for line in lines if not line.startswith(tuple(drop))]
    header = f"==== source: train_gpt.py bytes:{len(source)} sha256:{hashlib.sha256(source).hexdigest()} ====\n".encode()
    block = header + source + (b"" if source.endswith(b"\n") else b"\n") + b"==== end of source ====\n"
    path = Path(path)
    path.write_bytes(block + "\n".join(lines).encode() + b"\n")
    return path


def write_public_log(path, *, seed=1337, val_loss=1.88976776, val_bpb=1.11922988, steps=7179) -> Path:
    """A log in the public record format: no source block or settings, a `seed:` line, TTT lines after the sliding window."""
    lines = ["logs/af2d01c8.txt", "model_params:26928220", "world_size:8 grad_accum_steps:1", f"seed:{seed}",
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
