#!/usr/bin/env python3
"""Download the published challenge data (tokenized FineWeb shards and tokenizer) from Hugging Face.

    python data/cached_challenge_fineweb.py                                    # sp4096: validation + 80 training shards
    python data/cached_challenge_fineweb.py --train-shards 1                   # a quick start
    python data/cached_challenge_fineweb.py --variant sp1024 --with-docs       # the official sp1024, and its raw documents

Source: a dataset repository's folder datasets/, driven by its manifest.json; by default the one that holds
the variant (sp1024: the official willdepueoai/parameter-golf; sp4096 and sp8192: kevclark/parameter-golf):
    manifest.json                              "datasets": [{"name": "fineweb10B_<variant>", "tokenizer_name": T,
                                                             "stats": {"files_train": N, "files_val": M, ...}}],
                                               "tokenizers": [{"name": T, "model_path": ..., "vocab_path": ...}]
    datasets/fineweb10B_<variant>/fineweb_val_%06d.bin, fineweb_train_%06d.bin
    datasets/fineweb10B_<variant>/fineweb_val_bytes_%06d.bin   byte sidecars, where the dataset entry lists them
                                               under "files" or counts them as stats.files_val_bytes
    tokenizers/<the tokenizer's files>
    docs_selected.jsonl, docs_selected.source_manifest.json     (the documents the shards were made from)
Each file lands at the same relative path under --output-root (default: this data/ directory), so the shards
are where train_gpt.py looks by default (./data/datasets/fineweb10B_sp4096 from the repository root).

Every file is checked, whether it was already there or just downloaded: its size against the server's (and
against "bytes" where a dataset entry of the manifest lists {"name", "bytes"} under "files"), a shard's header
against its size (train_gpt.read_shard_header), JSON files and tokenizers by loading them. A complete valid file
is skipped; an invalid one is downloaded again. Downloads go to <name>.part and are renamed when complete, so
an interrupted run leaves only .part files, which the next run resumes (HTTP Range) or restarts.

Other repositories of the same layout (--repo-id): romeerp/parameter-golf-caseops-v1 (the case-transformed
sp8192 with byte sidecars); see docs/VOCAB.md. A byte sidecar must hold one count per token of its validation
shard (checked after every run, like the files).

Only the standard library is used (urllib). Set HF_ENDPOINT for a Hugging Face mirror, or --base-url for any
other copy: an http(s) URL, a local directory or a file:// URL of a folder laid out as above.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402
from data.build_shards import exit_status, load_tokenizer  # noqa: E402
from train_gpt import DataError  # noqa: E402

DEFAULT_VARIANT = "sp4096"          # train_gpt.py's default data
OFFICIAL_REPO_ID = "willdepueoai/parameter-golf"
VARIANT_REPO_IDS = {"sp1024": OFFICIAL_REPO_ID, "sp4096": "kevclark/parameter-golf", "sp8192": "kevclark/parameter-golf"}
REMOTE_ROOT = "datasets"            # folder of the dataset repository that holds manifest.json
DEFAULT_TRAIN_SHARDS = 80           # 8B training tokens, more than a 600 s run reads
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")
CHUNK_BYTES = 1 << 20
ATTEMPTS = 3                        # per file, for connections that drop mid-transfer (each resumes)


class DownloadError(DataError):
    pass


class RangeNotSatisfiable(Exception):
    """The server refuses to resume from the requested offset (the .part file is as long as the file, or longer)."""


# =============================================================================================
# Sources: where the files come from
# =============================================================================================

def default_base_url(repo_id: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/datasets/{repo_id}/resolve/main/{REMOTE_ROOT}"


class HttpSource:
    def __init__(self, base_url: str, timeout: float):
        self.base, self.timeout = base_url.rstrip("/"), timeout

    def location(self, rel: str) -> str:
        return f"{self.base}/{urllib.parse.quote(rel)}"

    def open(self, rel: str, offset: int = 0, method: str = "GET"):
        """Return (response, offset the body starts at, total size of the file or None)."""
        headers = {"User-Agent": "parameter-golf-data/1"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        url = self.location(rel)
        request = urllib.request.Request(url, headers=headers, method=method)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416:
                raise RangeNotSatisfiable() from None
            listed = e.code == 404 and rel != "manifest.json"
            hint = " (the manifest lists it, but the server does not have it)" if listed else ""
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(
                f"could not reach {url}: {reason}. Check the network connection (and HTTPS_PROXY if you need a "
                "proxy), set HF_ENDPOINT to a Hugging Face mirror, or pass --base-url with another copy of the "
                "files (an http(s) URL or a local directory holding manifest.json).") from None
        if response.status == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                response.close()
                raise DownloadError(f"{url}: asked for bytes from {offset}, got Content-Range "
                                    f"{response.headers.get('Content-Range')!r}")
            total = None if match.group(2) == "*" else int(match.group(2))
            return response, offset, total
        length = response.headers.get("Content-Length")
        return response, 0, int(length) if length is not None else None

    def size(self, rel: str) -> int | None:
        response, _, total = self.open(rel, method="HEAD")
        response.close()
        return total


class DirectorySource:
    """A local copy of the remote folder (a path or a file:// URL); resumes like a server with Range support."""

    def __init__(self, root: Path):
        self.root = root
        if not (root / "manifest.json").is_file():
            raise DownloadError(f"{root}: no manifest.json here; --base-url must point at the folder that holds it")

    def location(self, rel: str) -> str:
        return str(self.root / rel)

    def open(self, rel: str, offset: int = 0):
        path = self.root / rel
        if not path.is_file():
            raise DownloadError(f"{path}: not found (the manifest lists it, but the source folder does not have it)")
        total = path.stat().st_size
        if offset > total or (offset and offset == total):
            raise RangeNotSatisfiable()
        f = open(path, "rb")
        f.seek(offset)
        return f, offset, total

    def size(self, rel: str) -> int | None:
        path = self.root / rel
        return path.stat().st_size if path.is_file() else None


def make_source(base_url: str | None, repo_id: str, timeout: float):
    if base_url is None:
        return HttpSource(default_base_url(repo_id), timeout)
    parsed = urllib.parse.urlparse(base_url)
    if parsed.scheme in ("http", "https"):
        return HttpSource(base_url, timeout)
    if parsed.scheme == "file":
        return DirectorySource(Path(urllib.parse.unquote(parsed.path)))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (a one-letter "scheme" is a Windows drive)
        return DirectorySource(Path(base_url))
    raise DownloadError(f"--base-url {base_url}: expected an http(s) URL, a file:// URL or a directory")


# =============================================================================================
# Checking and fetching one file
# =============================================================================================

def problem_with(path: Path, name: str, expected_size: int | None) -> str | None:
    """Why the file at `path` (to be called `name`) is not a complete, valid copy; None if it is."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"{size} bytes, expected {expected_size}"
    try:
        if name.endswith(".bin"):
            train_gpt.read_shard_header(path)
        elif name.endswith(".json"):
            json.loads(path.read_bytes())
        elif name.endswith(".model"):
            load_tokenizer(path)
    except (DataError, ValueError) as e:
        return str(e)
    return None


def fetch(source, rel: str, dest: Path, expected_size: int | None, log, refresh: bool = False) -> str:
    """Make `dest` a complete, checked copy of `rel`. Returns "present", "downloaded" or "resumed".
    With `refresh`, download it even if a valid copy is there (which stays until the new one is complete)."""
    if dest.exists() and not refresh:
        # Without a size from the manifest, ask the source, except for shards: their header fixes their size.
        if expected_size is None and not dest.name.endswith(".bin"):
            expected_size = source.size(rel)
        problem = problem_with(dest, dest.name, expected_size)
        if problem is None:
            return "present"
        log(f"{dest}: {problem}; downloading it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = False
    for attempt in range(1, ATTEMPTS + 1):
        offset = part.stat().st_size if part.exists() else 0
        try:
            stream, start, total = source.open(rel, offset)
        except RangeNotSatisfiable:
            part.unlink()
            continue
        if expected_size is not None and total is not None and total != expected_size:
            stream.close()
            raise DownloadError(f"{source.location(rel)}: the source has {total} bytes, the manifest says {expected_size}")
        resumed |= start > 0
        try:
            with stream, open(part, "ab" if start else "wb") as f:
                while block := stream.read(CHUNK_BYTES):
                    f.write(block)
        except (OSError, http.client.HTTPException, socket.timeout) as e:
            log(f"{rel}: transfer interrupted after {part.stat().st_size} bytes ({e}); attempt {attempt} of {ATTEMPTS}")
            continue
        size = part.stat().st_size
        if total is not None and size < total:
            log(f"{rel}: got {size} of {total} bytes; attempt {attempt} of {ATTEMPTS}")
            continue
        problem = problem_with(part, dest.name, expected_size if expected_size is not None else total)
        if problem is not None:
            part.unlink()
            raise DownloadError(f"{source.location(rel)}: the downloaded file is not valid: {problem}")
        os.replace(part, dest)
        return "resumed" if resumed else "downloaded"
    raise DownloadError(f"{source.location(rel)}: incomplete after {ATTEMPTS} attempts; run the command again to "
                        f"resume from the {part.stat().st_size if part.exists() else 0} bytes in {part}")


# =============================================================================================
# The manifest: which files make up a variant
# =============================================================================================

def manifest_variants(manifest: dict) -> list[str]:
    return sorted(d["name"].removeprefix("fineweb10B_") for d in manifest.get("datasets", [])
                  if isinstance(d, dict) and str(d.get("name", "")).startswith("fineweb10B_"))


def plan(manifest: dict, variant: str, train_shards: int, with_docs: bool) -> list[tuple[str, int | None]]:
    """(remote path relative to the manifest's folder, expected size or None) of each file to fetch."""
    name = f"fineweb10B_{variant}"
    dataset = next((d for d in manifest.get("datasets", []) if isinstance(d, dict) and d.get("name") == name), None)
    if dataset is None:
        raise DownloadError(f"variant {variant!r} is not in the manifest; it lists: {', '.join(manifest_variants(manifest)) or 'none'}")
    stats = dataset.get("stats") or {}
    try:
        files_train, files_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"manifest entry {name}: expected stats.files_train and stats.files_val") from None
    if not 0 <= train_shards <= files_train:
        raise DownloadError(f"--train-shards {train_shards}: {name} has {files_train} training shards; pass at most that")
    sizes = {f["name"]: int(f["bytes"]) for f in dataset.get("files", []) if "name" in f and "bytes" in f}
    tokenizer_name = dataset.get("tokenizer_name")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if isinstance(t, dict) and t.get("name") == tokenizer_name), None)
    if tokenizer is None:
        raise DownloadError(f"manifest entry {name}: its tokenizer {tokenizer_name!r} is not listed under \"tokenizers\"")
    tokenizer_files = [tokenizer[k] for k in ("model_path", "vocab_path", "path") if tokenizer.get(k)]
    if not tokenizer_files:
        raise DownloadError(f"manifest tokenizer {tokenizer_name!r}: no model_path / vocab_path / path to download")

    prefix = train_gpt.BYTE_SIDECAR_PREFIX
    listed = {f["name"] for f in dataset.get("files", []) if isinstance(f, dict) and str(f.get("name", "")).startswith(prefix)}
    try:
        listed |= {f"{prefix}{i:06d}.bin" for i in range(int(stats.get("files_val_bytes") or 0))}
    except (TypeError, ValueError):
        raise DownloadError(f"manifest entry {name}: stats.files_val_bytes {stats.get('files_val_bytes')!r}: expected a number") from None
    sidecars = sorted(listed)
    if sidecars and sidecars != [f"{prefix}{i:06d}.bin" for i in range(files_val)]:
        raise DownloadError(f"manifest entry {name}: {len(sidecars)} byte sidecar(s) {prefix}*.bin for {files_val} "
                            f"validation shard(s): expected {prefix}000000.bin ... one per shard")
    shards = [f"fineweb_val_{i:06d}.bin" for i in range(files_val)] + sidecars + [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files = [(f"datasets/{name}/{shard}", sizes.get(shard)) for shard in shards]
    files += [(path, None) for path in tokenizer_files]
    files += [(path, None) for path in DOCS_FILES] if with_docs else []
    return files


def check_sidecar(path: Path) -> None:
    """A byte sidecar holds one count per token of its validation shard (fetched before it)."""
    shard = path.with_name(path.name.replace(train_gpt.BYTE_SIDECAR_PREFIX, "fineweb_val_"))
    counts, tokens = train_gpt.read_shard_header(path), train_gpt.read_shard_header(shard)
    if counts != tokens:
        raise DownloadError(f"{path}: {counts} byte counts, but {shard.name} holds {tokens} tokens: expected one per token "
                            "(the source's sidecar does not belong to its shard)")


def download(variant: str, train_shards: int, with_docs: bool, output_root: Path, source, log=print) -> dict:
    """Fetch the manifest and every file of the variant into `output_root`; return counts per outcome."""
    started = time.time()
    manifest_path = output_root / "manifest.json"
    # The manifest is small and may change: fetch it fresh each time (this is also the network check).
    fetch(source, "manifest.json", manifest_path, None, log, refresh=True)
    manifest = json.loads(manifest_path.read_text())
    files = plan(manifest, variant, train_shards, with_docs)
    counts = {"present": 0, "downloaded": 0, "resumed": 0}
    for i, (rel, size) in enumerate(files, start=1):
        outcome = fetch(source, rel, output_root / rel, size, log)
        if Path(rel).name.startswith(train_gpt.BYTE_SIDECAR_PREFIX):
            check_sidecar(output_root / rel)
        counts[outcome] += 1
        log(f"[{i}/{len(files)}] {outcome:<10} {rel}")
    log(f"{len(files)} files in {output_root} ({counts['downloaded']} downloaded, {counts['resumed']} resumed, "
        f"{counts['present']} already complete) in {time.time() - started:.1f}s")
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See data/README.md.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default=DEFAULT_VARIANT, help="tokenizer variant listed in the manifest (default %(default)s)")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                   help="training shards to fetch, the first N (default %(default)s; 100M tokens each)")
    p.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl, the raw documents")
    p.add_argument("--output-root", type=Path, default=Path(__file__).resolve().parent,
                   help="where datasets/ and tokenizers/ go (default: this data/ directory)")
    p.add_argument("--repo-id", help="Hugging Face dataset repository (default: the variant's, "
                                     + ", ".join(f"{v}: {r}" for v, r in VARIANT_REPO_IDS.items()) + f"; others: {OFFICIAL_REPO_ID})")
    p.add_argument("--base-url", help="fetch from here instead of Hugging Face: the folder holding manifest.json, "
                                      "as an http(s) URL, a file:// URL or a local directory")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a connection or data (default %(default)s)")
    args = p.parse_args(argv)

    def command():
        download(args.variant, args.train_shards, args.with_docs, args.output_root,
                 make_source(args.base_url, args.repo_id or VARIANT_REPO_IDS.get(args.variant, OFFICIAL_REPO_ID), args.timeout))
    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())
