"""Helpers for the tests of data/: generated documents, a tiny tokenizer, a fake copy of the published dataset,
and a loopback HTTP server for it. Everything is made on the spot; nothing touches the network."""

from __future__ import annotations

import contextlib
import http.server
import json
import random
import sys
import threading
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402
from data.build_shards import train_tokenizer  # noqa: E402

# Data in the shared folder beside the repository, when this machine has it (tests using it skip otherwise).
SHARED_DATA = next((p for p in (Path("/work/shared/data"), REPO_ROOT.parent / "shared" / "data") if p.is_dir()), None)


def make_texts(n_docs: int, seed: int = 0, alphabet: str = "abcdefghijklmnop") -> list[str]:
    """`n_docs` documents of made-up words; every fifth has a second line with digits and non-ASCII letters."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    texts = []
    for i in range(n_docs):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))
        texts.append(text + f"\nline two {i} \u00fcber caf\u00e9" if i % 5 == 0 else text)
    return texts


def write_docs(path: Path, texts: list[str]) -> Path:
    """A JSONL file, one {"id", "text"} object per document."""
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


def make_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    train_tokenizer(make_texts(200, seed=99), vocab_size, path)
    return path


# =============================================================================================
# A fake of the published dataset folder (what datasets/ holds on Hugging Face)
# =============================================================================================

def make_fake_remote(root: Path, tokenizer_model: Path, *, variant: str = "sp1024", n_train: int = 3,
                     n_val: int = 1, shard_tokens: int = 5000, sizes_in_manifest: bool = False) -> dict:
    """Write manifest.json, the shards, the tokenizer and the docs files under `root`; return the manifest."""
    name = f"fineweb10B_{variant}"
    rng = np.random.default_rng(0)
    shard_dir = root / "datasets" / name
    shard_dir.mkdir(parents=True)
    files = []
    for split, count in (("val", n_val), ("train", n_train)):
        for i in range(count):
            shard = f"fineweb_{split}_{i:06d}.bin"
            tokens = rng.integers(0, 1024, size=shard_tokens + i, dtype=np.int64)  # distinct sizes
            tokens[0] = train_gpt.BOS_ID
            train_gpt.write_shard(shard_dir / shard, tokens)
            files.append({"name": shard, "bytes": (shard_dir / shard).stat().st_size})
    (root / "tokenizers").mkdir()
    model_bytes = tokenizer_model.read_bytes()
    (root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(model_bytes)
    (root / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("<pad>\t0\n<s>\t0\n")
    (root / "docs_selected.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (root / "docs_selected.source_manifest.json").write_text(json.dumps({"num_docs": 2}))
    dataset = {"name": name, "tokenizer_name": "sp_bpe_1024",
               "stats": {"files_train": n_train, "files_val": n_val, "tokens_train": n_train * shard_tokens}}
    if sizes_in_manifest:
        dataset["files"] = files
    manifest = {"datasets": [dataset, {"name": "fineweb10B_byte260", "tokenizer_name": "x", "stats": {}}],
                "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def remote_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# =============================================================================================
# A loopback HTTP server for the fake folder (127.0.0.1 only)
# =============================================================================================

class FakeHub:
    """Serves a folder over HTTP with Range support, and records what was asked. Knobs for the tests:
    `honour_range` (False: answer every request in full, like a server without Range support) and
    `drop_after` (path -> bytes: the first response for that path stops after so many bytes)."""

    def __init__(self, root: Path):
        self.root, self.requests, self.honour_range, self.drop_after = root, [], True, {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                rel = self.path.lstrip("/")
                wanted = self.headers.get("Range")
                hub.requests.append((self.command, rel, wanted))
                path = hub.root / rel
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(wanted.split("=")[1].rstrip("-")) if wanted and hub.honour_range else 0
                if start >= len(data) and start:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                cut = hub.drop_after.pop(rel, None)
                self.wfile.write(payload if cut is None else payload[:cut])
                self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def closed_port_url():
    """An http:// URL on 127.0.0.1 where nothing listens: connecting is refused at once, as when offline."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield f"http://127.0.0.1:{port}/datasets"
