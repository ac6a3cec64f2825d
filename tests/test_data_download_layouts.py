"""The downloader for each repository layout of the larger vocabularies, through --repo-id and a loopback
HTTP server standing in for Hugging Face (HF_ENDPOINT=http://127.0.0.1:...): kevclark/parameter-golf (sp4096,
sp8192) and romeerp/parameter-golf-caseops-v1 (case-transformed sp8192 with byte sidecars)."""

import json

import numpy as np
import pytest

from data_fixtures import FakeHub, make_tokenizer  # first: sets sys.path

import train_gpt
from data import cached_challenge_fineweb as dl

N_VAL, N_TRAIN, TOKENS = 2, 2, 3000


def make_repo(root, tokenizer, variants: dict[str, str | None]) -> None:
    """A dataset repository at root/datasets/<repo>/resolve/main/datasets: per variant (sidecars: None, "files"
    or "stats", how the manifest lists them) its shards, tokenizer and manifest entry."""
    rng = np.random.default_rng(0)
    datasets, tokenizers = [], []
    for variant, sidecars in variants.items():
        folder = root / f"datasets/fineweb10B_{variant}"
        folder.mkdir(parents=True)
        files = []
        for split, count in (("val", N_VAL), ("train", N_TRAIN)):
            for i in range(count):
                tokens = rng.integers(0, 300, TOKENS + i)
                train_gpt.write_shard(folder / f"fineweb_{split}_{i:06d}.bin", tokens)
                files.append({"name": f"fineweb_{split}_{i:06d}.bin", "bytes": (folder / f"fineweb_{split}_{i:06d}.bin").stat().st_size})
                if split == "val" and sidecars:
                    name = f"fineweb_val_bytes_{i:06d}.bin"
                    train_gpt.write_shard(folder / name, rng.integers(0, 6, TOKENS + i))
                    files.append({"name": name, "bytes": (folder / name).stat().st_size})
        stats = {"files_val": N_VAL, "files_train": N_TRAIN} | ({"files_val_bytes": N_VAL} if sidecars == "stats" else {})
        if sidecars == "stats":
            files = [f for f in files if "_bytes_" not in f["name"]]
        model = f"tokenizers/fineweb_{variant}_bpe.model"
        (root / "tokenizers").mkdir(exist_ok=True)
        (root / model).write_bytes(tokenizer.read_bytes())
        datasets.append({"name": f"fineweb10B_{variant}", "tokenizer_name": variant, "stats": stats, "files": files})
        tokenizers.append({"name": variant, "model_path": model})
    (root / "manifest.json").write_text(json.dumps({"datasets": datasets, "tokenizers": tokenizers}))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    tokenizer = make_tokenizer(root / "tok.model")
    make_repo(root / "datasets/kevclark/parameter-golf/resolve/main/datasets", tokenizer, {"sp4096": None, "sp8192": None})
    make_repo(root / "datasets/romeerp/parameter-golf-caseops-v1/resolve/main/datasets", tokenizer, {"sp8192_caseops": "files"})
    make_repo(root / "datasets/someone/caseops-stats/resolve/main/datasets", tokenizer, {"sp8192_caseops": "stats"})
    with FakeHub(root) as server:
        yield server, root


def download(hub, monkeypatch, tmp_path, repo, variant, capsys):
    server, _ = hub
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    out = tmp_path / "data"
    status = dl.main(["--repo-id", repo, "--variant", variant, "--train-shards", "1", "--output-root", str(out), "--timeout", "5"])
    return status, out, capsys.readouterr()


@pytest.mark.parametrize("repo, variant, sidecars", [
    ("kevclark/parameter-golf", "sp4096", False),
    ("kevclark/parameter-golf", "sp8192", False),
    ("romeerp/parameter-golf-caseops-v1", "sp8192_caseops", True),
    ("someone/caseops-stats", "sp8192_caseops", True),
])
def test_each_layout_in_one_command(hub, monkeypatch, tmp_path, capsys, repo, variant, sidecars):
    status, out, output = download(hub, monkeypatch, tmp_path, repo, variant, capsys)
    assert status == 0, output.err
    remote = hub[1] / f"datasets/{repo}/resolve/main/datasets"
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    shards = [f"datasets/fineweb10B_{variant}/fineweb_{s}_{i:06d}.bin" for s, n in (("val", N_VAL), ("train", 1)) for i in range(n)]
    shards += [f"datasets/fineweb10B_{variant}/fineweb_val_bytes_{i:06d}.bin" for i in range(N_VAL)] if sidecars else []
    assert got == sorted(["manifest.json", f"tokenizers/fineweb_{variant}_bpe.model", *shards])
    assert all((out / rel).read_bytes() == (remote / rel).read_bytes() for rel in got if rel != "manifest.json")
    status, _, output = download(hub, monkeypatch, tmp_path, repo, variant, capsys)  # again: all present
    assert status == 0 and f"{len(got) - 1} files in" in output.out and f"{len(got) - 1} already complete" in output.out


def test_a_sidecar_that_does_not_fit_its_shard_is_one_line(hub, monkeypatch, tmp_path, capsys):
    _, root = hub
    folder = root / "datasets/romeerp/parameter-golf-caseops-v1/resolve/main/datasets/datasets/fineweb10B_sp8192_caseops"
    good = (folder / "fineweb_val_bytes_000001.bin").read_bytes()
    manifest_path = folder.parent.parent / "manifest.json"
    manifest = manifest_path.read_text()
    try:
        train_gpt.write_shard(folder / "fineweb_val_bytes_000001.bin", np.ones(TOKENS))  # one count short
        entry = json.loads(manifest)
        for f in entry["datasets"][0]["files"]:
            if f["name"] == "fineweb_val_bytes_000001.bin":
                f["bytes"] -= 2
        manifest_path.write_text(json.dumps(entry))
        status, out, output = download(hub, monkeypatch, tmp_path, "romeerp/parameter-golf-caseops-v1", "sp8192_caseops", capsys)
    finally:
        (folder / "fineweb_val_bytes_000001.bin").write_bytes(good)
        manifest_path.write_text(manifest)
    assert status == 2 and output.err.count("\n") == 1
    assert output.err.startswith("error: ") and f"{TOKENS} byte counts, but fineweb_val_000001.bin holds {TOKENS + 1} tokens" in output.err


def test_sidecars_must_be_one_per_validation_shard():
    manifest = {"datasets": [{"name": "fineweb10B_x", "tokenizer_name": "t", "stats": {"files_val": 2, "files_train": 0, "files_val_bytes": 1}}],
                "tokenizers": [{"name": "t", "model_path": "tokenizers/t.model"}]}
    with pytest.raises(dl.DownloadError, match=r"1 byte sidecar\(s\) fineweb_val_bytes_\*.bin for 2 validation shard\(s\)"):
        dl.plan(manifest, "x", 0, False)
