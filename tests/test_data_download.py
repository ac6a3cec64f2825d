"""data/cached_challenge_fineweb.py against a fake of the published folder: from a local directory and from a
loopback HTTP server (127.0.0.1); never the network."""

import json
import time
from pathlib import Path

import pytest

from data_fixtures import FakeHub, closed_port_url, make_fake_remote, make_tokenizer, remote_files  # first: sets sys.path

from data import cached_challenge_fineweb as dl

SHARDS = ["datasets/fineweb10B_sp1024/fineweb_val_000000.bin"] + \
         [f"datasets/fineweb10B_sp1024/fineweb_train_{i:06d}.bin" for i in range(3)]
TOKENIZER_FILES = ["tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model")


@pytest.fixture
def remote(tmp_path, tokenizer):
    root = tmp_path / "remote"
    make_fake_remote(root, tokenizer)
    return root


def write_part(out, rel, data):
    """A .part file as an interrupted download leaves it."""
    part = out / (rel + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    return part


def run(source, out, train_shards=3, with_docs=False, variant="sp1024"):
    lines = []
    counts = dl.download(variant, train_shards, with_docs, out, source, log=lines.append)
    return counts, lines


def test_download_from_directory_copies_every_listed_file(remote, tmp_path):
    out = tmp_path / "data"
    counts, _ = run(dl.make_source(str(remote), "unused", 5), out, train_shards=2)
    want = remote_files(remote)
    got = remote_files(out)
    expected = ["manifest.json", *SHARDS[:3], *TOKENIZER_FILES]
    assert sorted(got) == sorted(expected)  # two of three training shards, no docs
    assert all(got[k] == want[k] for k in expected)
    assert counts == {"present": 0, "downloaded": len(expected) - 1, "resumed": 0}


def test_second_run_skips_complete_files_and_redoes_damaged_ones(remote, tmp_path):
    out = tmp_path / "data"
    source = dl.make_source(f"file://{remote}", "unused", 5)
    run(source, out)
    counts, _ = run(source, out)
    assert counts == {"present": 6, "downloaded": 0, "resumed": 0}

    shard = out / SHARDS[1]
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: header and size disagree
    (out / TOKENIZER_FILES[1]).write_text("x")   # wrong size compared with the source
    counts, lines = run(source, out)
    assert counts == {"present": 4, "downloaded": 2, "resumed": 0}
    assert any("truncated" in line and "downloading it again" in line for line in lines)
    assert remote_files(out)[SHARDS[1]] == remote_files(remote)[SHARDS[1]]


def test_partial_file_is_resumed_from_directory(remote, tmp_path):
    out = tmp_path / "data"
    full = (remote / SHARDS[2]).read_bytes()
    part = write_part(out, SHARDS[2], full[:3000])
    counts, _ = run(dl.make_source(str(remote), "unused", 5), out)
    assert counts["resumed"] == 1
    assert (out / SHARDS[2]).read_bytes() == full and not part.exists()


def test_with_docs_and_unknown_variant_and_too_many_shards(remote, tmp_path):
    source = dl.make_source(str(remote), "unused", 5)
    out = tmp_path / "data"
    run(source, out, train_shards=0, with_docs=True)
    assert (out / "docs_selected.jsonl").read_bytes() == (remote / "docs_selected.jsonl").read_bytes()
    assert (out / "docs_selected.source_manifest.json").exists()
    assert not (out / SHARDS[1]).exists()
    with pytest.raises(dl.DownloadError, match=r"'sp4096' is not in the manifest; it lists: byte260, sp1024"):
        run(source, out, variant="sp4096")
    with pytest.raises(dl.DownloadError, match="has 3 training shards"):
        run(source, out, train_shards=4)


def test_sizes_listed_in_the_manifest_are_enforced(tmp_path, tokenizer):
    root = tmp_path / "remote"
    manifest = make_fake_remote(root, tokenizer, sizes_in_manifest=True)
    manifest["datasets"][0]["files"][1]["bytes"] += 2  # the manifest disagrees with the file on the server
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(dl.DownloadError, match="the manifest says"):
        run(dl.make_source(str(root), "unused", 5), tmp_path / "data")
    assert not list((tmp_path / "data" / "datasets").rglob("*.part"))


def test_invalid_file_at_the_source_is_rejected_and_not_kept(remote, tmp_path):
    shard = remote / SHARDS[1]
    data = bytearray(shard.read_bytes())
    data[0] ^= 1  # wrong magic number
    shard.write_bytes(bytes(data))
    out = tmp_path / "data"
    with pytest.raises(dl.DownloadError, match="not valid.*magic"):
        run(dl.make_source(str(remote), "unused", 5), out)
    assert not (out / SHARDS[1]).exists() and not (out / (SHARDS[1] + ".part")).exists()


def test_http_download_resumes_after_a_dropped_connection(remote, tmp_path):
    out = tmp_path / "data"
    with FakeHub(remote) as hub:
        hub.drop_after[SHARDS[3]] = 4000
        counts, lines = run(dl.make_source(hub.url, "unused", 5), out)
    assert remote_files(out)[SHARDS[3]] == remote_files(remote)[SHARDS[3]]
    assert counts["resumed"] == 1 and any("attempt 1 of" in line for line in lines)
    assert ("GET", SHARDS[3], "bytes=4000-") in hub.requests


def test_http_second_run_checks_sizes_with_head_requests(remote, tmp_path):
    out = tmp_path / "data"
    with FakeHub(remote) as hub:
        run(dl.make_source(hub.url, "unused", 5), out)
        (out / TOKENIZER_FILES[1]).write_text("<pad>\t0\n")  # valid-looking, but not the size of the source
        hub.requests.clear()
        counts, _ = run(dl.make_source(hub.url, "unused", 5), out)
    assert counts == {"present": 5, "downloaded": 1, "resumed": 0}
    assert {r for r in hub.requests if r[0] == "HEAD"} == {("HEAD", f, None) for f in TOKENIZER_FILES}
    assert ("GET", TOKENIZER_FILES[1], None) in hub.requests and ("GET", SHARDS[0], None) not in hub.requests


def test_http_partial_file_resumed_or_restarted(remote, tmp_path):
    out = tmp_path / "data"
    full = (remote / SHARDS[0]).read_bytes()
    part = write_part(out, SHARDS[0], full[:1500])
    with FakeHub(remote) as hub:
        counts, _ = run(dl.make_source(hub.url, "unused", 5), out)
    assert counts["resumed"] == 1 and ("GET", SHARDS[0], "bytes=1500-") in hub.requests
    assert (out / SHARDS[0]).read_bytes() == full

    (out / SHARDS[0]).unlink()
    part.write_bytes(b"garbage that a server without Range support makes us throw away")
    with FakeHub(remote) as hub:
        hub.honour_range = False
        counts, _ = run(dl.make_source(hub.url, "unused", 5), out)
    assert counts["downloaded"] == 1 and (out / SHARDS[0]).read_bytes() == full


def test_http_missing_file_names_the_url(remote, tmp_path):
    (remote / SHARDS[2]).unlink()
    with FakeHub(remote) as hub:
        with pytest.raises(dl.DownloadError, match=r"fineweb_train_000001\.bin: HTTP 404"):
            run(dl.make_source(hub.url, "unused", 5), tmp_path / "data")


def test_without_network_fails_fast_with_advice(tmp_path, capsys):
    with closed_port_url() as url:
        started = time.time()
        status = dl.main(["--base-url", url, "--output-root", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert status == 2 and time.time() - started < 5
    assert f"could not reach {url}/manifest.json" in err
    assert "HF_ENDPOINT" in err and "--base-url" in err
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_default_source_is_hugging_face_or_hf_endpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert dl.make_source(None, "willdepueoai/parameter-golf", 5).location("manifest.json") == \
        "https://huggingface.co/datasets/willdepueoai/parameter-golf/resolve/main/datasets/manifest.json"
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert dl.make_source(None, "a/b", 5).location("x.bin") == "https://mirror.example/datasets/a/b/resolve/main/datasets/x.bin"
    with pytest.raises(dl.DownloadError, match="no manifest.json"):
        dl.make_source("/nonexistent/folder", "a/b", 5)


def test_by_default_each_variant_comes_from_the_repository_that_holds_it(tmp_path, capsys, monkeypatch):
    # train_gpt.py's default data, sp4096, is not in the official repository; sp1024 is. The default
    # variant is the data train_gpt.py reads by default, at the path it reads from.
    h = dl.train_gpt.Hyperparameters()
    assert (f"fineweb10B_{dl.DEFAULT_VARIANT}", f"sp{h.vocab_size}") == (Path(h.data_path).name, dl.DEFAULT_VARIANT)
    assert Path(h.tokenizer_path).name == f"fineweb_{h.vocab_size}_bpe.model"
    with closed_port_url() as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        for args, repo in [([], "kevclark/parameter-golf"), (["--variant", "sp8192"], "kevclark/parameter-golf"),
                           (["--variant", "sp1024"], "willdepueoai/parameter-golf"),
                           (["--variant", "sp1024", "--repo-id", "a/b"], "a/b")]:
            assert dl.main([*args, "--output-root", str(tmp_path / "data")]) == 2
            assert f"could not reach {url}/datasets/{repo}/resolve/main/datasets/manifest.json" in capsys.readouterr().err
