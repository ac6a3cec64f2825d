"""Compressor study (bench/RESULTS.md, "The compressor"; conclusions in docs/EXPORT.md): one saved artifact's
container recompressed by zstd-22 (the artifact's), lzma-9e, bz2-9, zlib-9 and brotli-11 (when importable), each
over three layouts of the same bytes: the tensors one after another (values, then row scales), grouped by kind
(pack_artifact's layout: all integers, all scales, all fp16, all fp32), and grouped with the multi-byte sections
byte-shuffled (the low bytes of every fp16 / fp32 value, then the next bytes, ...).

    python3 bench/compress_study.py logs/<RUN_ID>.model.zst
"""
import bz2, json, lzma, os, sys, time, zlib
import numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_gpt as tg

try:
    import brotli
except ImportError:
    brotli = None

COMPRESSORS = {
    "zstd-22": lambda b: tg.zstandard.ZstdCompressor(level=22).compress(b),
    "lzma-9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
    "bz2-9": lambda b: bz2.compress(b, 9),
    "zlib-9": lambda b: zlib.compress(b, 9),
} | ({"brotli-11": lambda b: brotli.compress(b, quality=11)} if brotli else {})


def shuffled(data: bytes, width: int) -> bytes:
    """Byte planes of `width`-byte values: every value's byte 0, then every value's byte 1, ..."""
    return np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()


def layouts(container: bytes) -> dict[str, bytes]:
    start = len(tg.ARTIFACT_MAGIC) + 4
    length = int.from_bytes(container[start - 4:start], "little")
    head, payload = container[:start + length], container[start + length:]
    entries = json.loads(container[start:start + length])["tensors"]
    span = lambda s: payload[s[0]:s[0] + s[1]]
    by_tensor = b"".join(span(e["data"]) + (span(e["scale"]) if "scale" in e else b"") for e in entries)
    kinds = {"int": [], "scale": [], "fp16": [], "fp32": []}
    for e in entries:
        kinds[e["encoding"]].append(span(e["data"]))
        if "scale" in e:
            kinds["scale"].append(span(e["scale"]))
    grouped = {k: b"".join(v) for k, v in kinds.items()}
    assert head + b"".join(grouped.values()) == container  # pack_artifact's own order
    widths = {"int": 1, "scale": 2, "fp16": 2, "fp32": 4}
    return {"by tensor": head + by_tensor, "grouped by kind": container,
            "grouped + byte-shuffled": head + b"".join(shuffled(v, widths[k]) for k, v in grouped.items())}


def main(path: str) -> None:
    container = tg.zstandard.ZstdDecompressor().decompress(open(path, "rb").read())
    print(f"{path}: container {len(container)} bytes; brotli {'importable' if brotli else 'not importable'}")
    sizes = {}
    for layout, data in layouts(container).items():
        for name, compress in COMPRESSORS.items():
            t = time.perf_counter()
            sizes[layout, name] = len(compress(data)), time.perf_counter() - t
    ours = sizes["grouped by kind", "zstd-22"][0]  # what the script writes
    for (layout, name), (size, seconds) in sizes.items():
        print(f"{layout:24s} {name:10s} {size:>12,d} bytes {100 * (size - ours) / ours:+6.2f}% {seconds:6.1f}s")

if __name__ == "__main__":
    main(sys.argv[1])
