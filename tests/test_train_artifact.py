"""A saved artifact is untrusted input: every malformed one is refused with one DataError / ConfigError
line, before anything large is decompressed or allocated, and what is stored holds no local paths."""
import json
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from test_train_model import tiny_h

SETTINGS = dict(quant_method="rtn", ve_layers="3", bigram_vocab_size=32)  # int, fp16 and fp32 tensors, a VE layer


def export(path: Path, h: tg.Hyperparameters | None = None, **kw) -> tg.Hyperparameters:
    h = h or tiny_h(**(SETTINGS | kw))
    model = tg.build_model(h)
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
    tg.export_artifact(tg.quantize_for_export(model, [], h, rt), h, path, budget=10**9)
    return h


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """(settings, header, payload) of a good tiny artifact."""
    path = tmp_path_factory.mktemp("artifact") / "good.model.zst"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tg, "SMALL_TENSOR_NUMEL", 1024)  # the tiny model's matrices as int
        h = export(path)
    header, payload = split(tg.zstandard.ZstdDecompressor().decompress(path.read_bytes()))
    return h, header, payload


def split(container: bytes) -> tuple[dict, bytes]:
    start = len(tg.ARTIFACT_MAGIC) + 4
    n = int.from_bytes(container[len(tg.ARTIFACT_MAGIC):start], "little")
    return json.loads(container[start:start + n]), container[start + n:]


def container(header, payload: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return tg.ARTIFACT_MAGIC + len(raw).to_bytes(4, "little") + raw + payload


def write(path: Path, header, payload: bytes = b"") -> Path:
    path.write_bytes(tg.compress(container(header, payload), level=3))
    return path


def copy(header: dict) -> dict:
    return json.loads(json.dumps(header))


def entry(header: dict, name: str) -> dict:
    return next(e for e in header["tensors"] if e["name"] == name)


def refused(path: Path, match: str):
    with pytest.raises(tg.DataError, match=match) as caught:
        tg.load_artifact(path)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(path))
    return caught


# ---- the zstd frame -------------------------------------------------------------------------

def test_the_export_declares_its_size_and_stores_only_the_model_settings(tmp_path):
    path = tmp_path / "a.model.zst"
    h = export(path, data_path=str(tmp_path / "secret_data"), tokenizer_path=str(tmp_path / "secret.model"),
               run_id="secret_run", eval_artifact=str(tmp_path / "secret.zst"))
    blob = path.read_bytes()
    unpacked = tg.zstandard.ZstdDecompressor().decompress(blob)
    assert tg.zstandard.frame_content_size(blob) == len(unpacked)
    header, _ = split(unpacked)
    assert header["format"] == tg.ARTIFACT_FORMAT and header["config"] == {n: getattr(h, n) for n in tg.MODEL_SETTINGS}
    assert b"secret" not in unpacked and str(tmp_path).encode() not in unpacked
    state, config = tg.load_artifact(path)
    assert config == header["config"] and state.keys() == tg.build_model(h).state_dict().keys()


def test_not_zstd(tmp_path):
    path = tmp_path / "x.model.zst"
    path.write_bytes(b"not zstd at all")
    refused(path, "not a zstd artifact")
    path.write_bytes(b"")
    refused(path, "not a zstd artifact")


def test_a_frame_that_does_not_declare_its_size(tmp_path, artifact):
    _, header, payload = artifact
    path = tmp_path / "x.model.zst"
    path.write_bytes(tg.zstandard.ZstdCompressor(level=3, write_content_size=False).compress(container(header, payload)))
    refused(path, "does not declare its decompressed size")


def test_a_frame_declaring_too_much_is_refused_before_decompression(tmp_path, monkeypatch):
    path = tmp_path / "x.model.zst"
    # A frame header declaring 2 GiB (single segment, 8-byte content size), then one block of 64 KiB of zeros.
    path.write_bytes(b"\x28\xb5\x2f\xfd\xe0" + (2 ** 31).to_bytes(8, "little") + b"\x00" * 64)
    assert tg.zstandard.frame_content_size(path.read_bytes()) == 2 ** 31

    def forbidden(*args, **kwargs):
        raise AssertionError("decompressed before the size check")
    monkeypatch.setattr(tg.zstandard, "ZstdDecompressor", forbidden)
    refused(path, f"declares 2147483648 bytes, more than any artifact decompresses to \\({tg.MAX_CONTAINER_BYTES}\\)")
    monkeypatch.undo()
    monkeypatch.setattr(tg, "MAX_CONTAINER_BYTES", 1000)  # a real frame, just over the bound
    path.write_bytes(tg.compress(b"\0" * 1001, level=3))
    refused(path, "declares 1001 bytes")
    path.write_bytes(b"\0" * 1001)  # the file itself
    refused(path, "1001 bytes, more than any artifact")


def test_a_frame_that_lies_about_its_size_or_has_trailing_data(tmp_path, artifact):
    _, header, payload = artifact
    path = tmp_path / "x.model.zst"
    blob = bytearray(tg.compress(container(header, payload), level=3))
    good = len(container(header, payload))
    # The content size sits after the 4-byte magic and the descriptor (and, without single segment, a window byte).
    descriptor = blob[4]
    offset = 5 + (0 if descriptor & 0x20 else 1)
    width = {0: 1 if descriptor & 0x20 else 0, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    assert width in (4, 8), "the test expects a content size field of 4 or 8 bytes"
    blob[offset:offset + width] = (good - 100).to_bytes(width, "little")
    path.write_bytes(bytes(blob))
    refused(path, "not a zstd artifact")
    path.write_bytes(tg.compress(container(header, payload), level=3) + b"more")
    refused(path, "not a zstd artifact")


# ---- the container and its header ---------------------------------------------------------------

def test_bad_magic_and_truncated_header_length(tmp_path):
    path = tmp_path / "x.model.zst"
    path.write_bytes(tg.compress(b"PK\x03\x04 something else", level=3))
    refused(path, "bad magic")
    path.write_bytes(tg.compress(tg.ARTIFACT_MAGIC + b"\x10\x00", level=3))
    refused(path, "ends inside its header length")
    path.write_bytes(tg.compress(tg.ARTIFACT_MAGIC + (10 ** 6).to_bytes(4, "little") + b"{}", level=3))
    refused(path, "header length 1000000 runs past the end")
    path.write_bytes(tg.compress(container(b" " * (tg.MAX_HEADER_BYTES + 1)), level=3))
    refused(path, f"or over {tg.MAX_HEADER_BYTES} bytes")


@pytest.mark.parametrize("raw", [b"{not json", b'{"format": 2,', b"\xff\xfe\x00", b'{"format": NaN}', b'{"format": Infinity}',
                                 b'{"format": 2, "format": 2}', b'{"format": ' + b"1" * 5000 + b"}", b""])
def test_header_not_json(tmp_path, raw):
    refused(write(tmp_path / "x.model.zst", raw), "the artifact header is not valid JSON")


def test_deep_nesting(tmp_path, artifact):
    path = tmp_path / "x.model.zst"
    depth = 200_000
    refused(write(path, b"[" * depth + b"]" * depth), "nested too deeply")
    refused(write(path, b'{"a":' * (depth // 2) + b"1" + b"}" * (depth // 2)), "nested too deeply")
    h, header, payload = artifact
    bad = copy(header)
    bad["config"]["num_layers"] = json.loads("[" * 50 + "]" * 50)  # nested, but within what JSON parsing allows
    state, config = tg.load_artifact(write(path, bad, payload))
    with pytest.raises(tg.DataError, match=r"NUM_LAYERS=\[\[\[.*expected an integer"):
        tg.stored_model_settings(config, h, str(path))


@pytest.mark.parametrize("header, match", [
    ([], "header is a JSON list, not an object"),
    (3, "header is a JSON int, not an object"),
    (None, "header is a JSON NoneType, not an object"),
    ({"config": {}, "tensors": []}, "unknown artifact format None"),
    ({"format": 3, "config": {}, "tensors": []}, "unknown artifact format 3"),
    ({"format": "2", "config": {}, "tensors": []}, "unknown artifact format '2'"),
    ({"format": True, "config": {}, "tensors": []}, "unknown artifact format True"),
    ({"format": 2, "tensors": []}, r"header keys \['format', 'tensors'\]"),
    ({"format": 2, "config": {}}, r"header keys \['config', 'format'\]"),
    ({"format": 2, "config": {}, "tensors": [], "more": 1}, "header keys"),
    ({"format": 2, "config": [], "tensors": []}, "config is not a JSON object"),
    ({"format": 2, "config": {}, "tensors": {}}, "tensors are not a JSON list"),
    ({"format": 2, "config": {}, "tensors": [[]]}, "tensor entry 0 is not a JSON object"),
])
def test_header_structure(tmp_path, header, match):
    refused(write(tmp_path / "x.model.zst", header), match)


def test_too_many_tensors(tmp_path):
    tensors = [{"name": f"t{i}", "shape": [0], "encoding": "fp32", "data": [0, 0]} for i in range(tg.MAX_ARTIFACT_TENSORS + 1)]
    refused(write(tmp_path / "x.model.zst", {"format": 2, "config": {}, "tensors": tensors}), "2049 tensors, more than the 2048")
    tg.load_artifact(write(tmp_path / "y.model.zst", {"format": 2, "config": {}, "tensors": tensors[:-1]}))


INT, FP32 = "blocks.0.attn.c_q.weight", "blocks.0.attn_scale"  # a [64, 64] int tensor and a [64] fp32 one


def mutated(header: dict, tensor: str, **changes) -> dict:
    bad = copy(header)
    e = entry(bad, tensor)
    for key, value in changes.items():
        if value is ...:
            del e[key]
        else:
            e[key] = value
    return bad


@pytest.mark.parametrize("name, changes, match", [
    (INT, dict(name=7), r"tensor entry \d+: name 7 is not a non-empty string"),
    (INT, dict(name=""), "name '' is not a non-empty string"),
    (INT, dict(encoding="bf16"), "unknown encoding 'bf16'"),
    (INT, dict(encoding=["int"]), r"unknown encoding \['int'\]"),
    (INT, dict(encoding=...), "unknown encoding None"),
    (INT, dict(data=...), "keys .*: expected bits, data, encoding, name, scale, shape"),
    (INT, dict(scale=...), "keys .*: expected bits, data, encoding, name, scale, shape"),
    (FP32, dict(scale=[0, 0]), "keys .*: expected data, encoding, name, shape"),
    (INT, dict(shape="64,64"), "shape '64,64' is not a list of at most 8 non-negative integers"),
    (INT, dict(shape=[64.0, 64]), "shape .* is not a list"),
    (INT, dict(shape=[True, 64]), "shape .* is not a list"),
    (INT, dict(shape=[-64, -64]), r"shape \[-64, -64\] is not a list"),
    (FP32, dict(shape=[1] * 9), "is not a list of at most 8"),
    (INT, dict(shape=[2 ** 40, 2 ** 40]), "has 1208925819614629174706176 values, more than the payload"),
    (INT, dict(shape=[64, 32]), r"data byte range \[\d+, 4096\] holds 4096 bytes, but shape \[64, 32\] needs 2048"),
    (INT, dict(shape=[4096]), "an int tensor has 2 dimensions"),
    (FP32, dict(shape=[65]), "holds 256 bytes, but shape"),
    (INT, dict(bits="5"), "bits '5': expected an integer in 2..8"),
    (INT, dict(bits=9), "bits 9: expected"),
    (INT, dict(bits=1), "bits 1: expected"),
    (INT, dict(bits=...), "keys"),
    (INT, dict(data={"offset": 0}), "data byte range .* is not \\[offset, length\\]"),
    (INT, dict(data=[0]), "data byte range .* is not"),
    (INT, dict(data=[-1, 4096]), "data byte range .* is not"),
    (INT, dict(data=[0, 4096.0]), "data byte range .* is not"),
    (INT, dict(scale=[0, 126]), r"scale byte range \[0, 126\] holds 126 bytes, but shape \[64, 64\] needs 128"),
])
def test_tensor_entries(tmp_path, artifact, name, changes, match):
    _, header, payload = artifact
    assert entry(header, INT)["encoding"] == "int" and entry(header, INT)["shape"] == [64, 64] and entry(header, FP32)["shape"] == [64]
    refused(write(tmp_path / "x.model.zst", mutated(header, name, **changes), payload), match)


def test_byte_ranges_outside_the_payload_or_overlapping(tmp_path, artifact):
    _, header, payload = artifact
    path = tmp_path / "x.model.zst"
    n = len(payload)
    refused(write(path, mutated(header, FP32, data=[n, 256]), payload), "does not fit the payload .*truncated or corrupt")
    refused(write(path, mutated(header, FP32, data=[n - 255, 256]), payload), "does not fit the payload")
    refused(write(path, mutated(header, INT, scale=[2 ** 70, 128]), payload), "does not fit the payload")
    refused(write(path, header, payload[:-1]), "does not fit the payload")
    shared = copy(header)  # entries reading the same bytes again: more values than the payload holds
    shared["tensors"] += [dict(entry(header, INT), name=f"again{i}") for i in range(3)]
    refused(write(path, shared, payload), "add up to .* they overlap")


def test_duplicate_tensor(tmp_path, artifact):
    _, header, payload = artifact
    bad = copy(header)
    bad["tensors"].append(dict(entry(bad, FP32), data=[len(payload), 256]))
    refused(write(tmp_path / "x.model.zst", bad, payload + bytes(256)), f"tensor {FP32} appears twice")


def test_int_values_outside_their_bits(tmp_path, artifact):
    _, header, payload = artifact
    offset = entry(header, INT)["data"][0]
    corrupt = payload[:offset] + bytes([127]) + payload[offset + 1:]  # 5-bit values are -15..15
    refused(write(tmp_path / "x.model.zst", header, corrupt), "values outside -15..15, the range of 5 bits")


# ---- the stored model settings and the tensors of their model --------------------------------

def rescore(path: Path, monkeypatch, **kw):
    """tg.rescore up to the point where it would read the tokenizer: raises Reached if every check passed."""
    class Reached(Exception):
        pass

    def reached(*args):
        raise Reached
    checked = []  # the settings of the model that rescore builds
    check = tg.check_artifact_tensors
    monkeypatch.setattr(tg, "check_artifact_tensors", lambda state, h, source: checked.append(h) or check(state, h, source))
    monkeypatch.setattr(tg, "build_byte_tables", reached)
    h = tiny_h(**(SETTINGS | kw | {"eval_artifact": str(path)}))
    lines = []
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)
    try:
        tg.rescore(h, rt, lines.append)
    except Reached:
        return checked[0], lines
    raise AssertionError("rescore went on without reading the tokenizer")


def test_a_good_artifact_passes_every_check(tmp_path, artifact, monkeypatch):
    _, header, payload = artifact
    path = write(tmp_path / "x.model.zst", header, payload)
    h, lines = rescore(path, monkeypatch, num_layers=2, xsa_last_n=0, ve_layers="")
    assert (h.num_layers, h.xsa_last_n, h.ve_layers) == (4, 2, "3") and "NUM_LAYERS=4" in lines[0]


def test_an_older_artifact_that_stored_every_setting_is_read(tmp_path, artifact, monkeypatch):
    h, header, payload = artifact
    old = copy(header)
    old["format"] = 1
    old["config"] = json.loads(json.dumps(tg.asdict(h))) | {"data_path": "/home/someone/data", "a_retired_setting": 1}
    old["config"]["num_layers"] = 4
    path = write(tmp_path / "x.model.zst", old, payload)
    _, config = tg.load_artifact(path)
    assert config == {n: getattr(h, n) for n in tg.MODEL_SETTINGS}
    rescore(path, monkeypatch, num_layers=2, xsa_last_n=0)
    del old["config"]["bigram_dim"]  # older than the setting: this run's value
    rescore(write(path, old, payload), monkeypatch)


def stored(header: dict, **config) -> dict:
    bad = copy(header)
    bad["config"].update(config)
    return bad


@pytest.mark.parametrize("config, match", [
    (dict(mlp_act="evil"), r"stored model settings: MLP_ACT='evil': expected one of relu2, leaky_relu2"),
    (dict(logit_softcap=-1), r"stored model settings: LOGIT_SOFTCAP=-1.0: expected a number > 0"),
    (dict(logit_softcap=0.0), r"LOGIT_SOFTCAP=0.0: expected a number > 0"),
    (dict(num_layers=10 ** 9), r"NUM_LAYERS=1000000000: expected an integer in 0..512000000"),
    (dict(num_layers=10 ** 400), r"NUM_LAYERS=1000.*: expected an integer"),
    (dict(num_layers=5000), r"NUM_LAYERS=5000: more blocks than an artifact may hold tensors \(2048\)"),
    (dict(num_layers=1, xsa_last_n=1), r"NUM_LAYERS=1: expected at least 2"),
    (dict(num_layers="4"), r"NUM_LAYERS='4': expected an integer"),
    (dict(num_layers=4.0), r"NUM_LAYERS=4.0: expected an integer"),
    (dict(num_layers=True), r"NUM_LAYERS=True: expected an integer"),
    (dict(num_layers=None), r"NUM_LAYERS=None: expected an integer"),
    (dict(model_dim=-64), r"MODEL_DIM=-64: expected an integer in 0"),
    (dict(model_dim=10 ** 18), r"MODEL_DIM=1000000000000000000: expected an integer in 0"),
    (dict(model_dim=4, num_heads=4, rope_dims=0), r"head dim 1 \(MODEL_DIM / NUM_HEADS\) must be even"),
    (dict(model_dim=4, num_heads=8), r"MODEL_DIM=4 is not a multiple of NUM_HEADS=8"),
    (dict(num_heads=0), r"NUM_HEADS=0: expected a positive number"),
    (dict(num_kv_heads=0), r"NUM_KV_HEADS=0: expected a positive number"),
    (dict(num_kv_heads=3), r"NUM_HEADS=4 is not a multiple of NUM_KV_HEADS=3"),
    (dict(vocab_size=0), r"VOCAB_SIZE=0: expected a positive number"),
    (dict(mlp_mult="3"), r"MLP_MULT='3': expected a number"),
    (dict(mlp_mult=0), r"MLP_MULT=0.0: expected a number > 0"),
    (dict(mlp_mult=1e300), r"MLP_MULT=1e\+300: expected a number of at most"),
    (dict(mlp_mult=1e8), r"MLP_MULT=100000000.0: an MLP wider than any artifact holds"),
    (dict(rope_base=-1.0), r"ROPE_BASE=-1.0: expected a number > 0"),
    (dict(rope_dims=7), r"ROPE_DIMS=7: expected an even number"),
    (dict(xsa_last_n=9), r"XSA_LAST_N=9: expected 0..NUM_LAYERS=4"),
    (dict(bigram_vocab_size=-5), r"BIGRAM_VOCAB_SIZE=-5: expected an integer in 0"),
    (dict(ln_scale=1), r"LN_SCALE=1: expected true or false"),
    (dict(ve_layers=9), r"VE_LAYERS=9: expected a string"),
    (dict(ve_layers="9"), r"VE_LAYERS='9': layer 9 is outside 0..3"),
    (dict(ve_layers="x"), r"VE_LAYERS='x': expected comma-separated layer numbers"),
    (dict(residual_dtype=["bf16"]), r"RESIDUAL_DTYPE=\['bf16'\]: expected a string"),
    (dict(data_path="/home/someone/data"), r"stored model setting 'data_path' is not one"),
    (dict(evil=1), r"stored model setting 'evil' is not one"),
])
def test_bad_stored_settings_are_refused_before_the_model_is_built(tmp_path, artifact, monkeypatch, config, match):
    _, header, payload = artifact
    path = write(tmp_path / "x.model.zst", stored(header, **config), payload)

    def forbidden(h):
        raise AssertionError("built a model from refused settings")
    monkeypatch.setattr(tg, "build_model", forbidden)
    with pytest.raises(tg.DataError, match=match) as caught:
        rescore(path, monkeypatch)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


@pytest.mark.parametrize("change, match", [
    (lambda t, p: ([e for e in t if e["name"] != INT], p), rf"tensor {INT} is missing \(\d+ stored, \d+ in the model of the stored settings\)"),
    (lambda t, p: (t + [{"name": "extra", "shape": [2], "encoding": "fp32", "data": [len(p), 8]}], p + bytes(8)),
     "unexpected tensor extra .not in the model of the stored settings."),
    (lambda t, p: ([dict(e, shape=[8, 8]) if e["name"] == FP32 else e for e in t], p),
     rf"tensor {FP32} has shape \[8, 8\], the model of the stored settings \[64\]"),
])
def test_the_tensors_must_be_those_of_the_stored_model(tmp_path, artifact, monkeypatch, change, match):
    _, header, payload = artifact
    bad = copy(header)
    bad["tensors"], payload = change(bad["tensors"], payload)
    path = write(tmp_path / "x.model.zst", bad, payload)
    tg.load_artifact(path)  # well formed: only the model says what is wrong
    with pytest.raises(tg.DataError, match=match):
        rescore(path, monkeypatch)


def test_settings_that_build_another_model_are_refused_by_its_tensors(tmp_path, artifact, monkeypatch):
    _, header, payload = artifact
    for config, match in [(dict(num_layers=3, xsa_last_n=1, ve_layers=""), "unexpected tensor value_embed"),
                          (dict(num_layers=3, xsa_last_n=1, ve_layers="2"), "tensor blocks.2.ve_scale is missing"),
                          (dict(num_layers=6), "tensor blocks.4.* is missing"),
                          (dict(model_dim=128), r"has shape \[\d+, 64\], the model of the stored settings \[\d+, 128\]"),
                          (dict(bigram_vocab_size=0), "unexpected tensor bigram"),
                          (dict(ve_layers=""), "unexpected tensor (value_embed|blocks.3.ve_scale)")]:
        with pytest.raises(tg.DataError, match=match):
            rescore(write(tmp_path / "x.model.zst", stored(header, **config), payload), monkeypatch)


def test_logit_softcap_must_be_positive():
    for raw in ("0", "-1"):
        with pytest.raises(tg.ConfigError, match=f"LOGIT_SOFTCAP={float(raw)}: expected a number > 0"):
            tg.Hyperparameters.from_env({"LOGIT_SOFTCAP": raw})


def test_the_model_settings_are_settings():
    names = {f.name for f in tg.fields(tg.Hyperparameters)}
    assert set(tg.MODEL_SETTINGS) <= names
    assert not {"data_path", "tokenizer_path", "run_id", "eval_artifact"} & set(tg.MODEL_SETTINGS)


# A changed value of each model setting (valid with the others of MODEL_BASE).
MODEL_CHANGES = dict(vocab_size=80, num_layers=3, model_dim=48, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                     mlp_act="leaky_relu2", logit_softcap=7.0, rope_base=500.0, rope_dims=8, ln_scale=True, xsa_last_n=2,
                     bigram_vocab_size=48, bigram_dim=8, ve_layers="1", ve_dim=16, residual_dtype="fp32", doc_mask=True,
                     recur_layers="2", recur_repeats=2, parallel_resid_start=1, parallel_resid_lanes=2, attn_gate="head",
                     smear_gate="input")
MODEL_BASE = dict(vocab_size=96, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, bigram_vocab_size=32,
                  bigram_dim=16, xsa_last_n=1, ve_layers="2", ve_dim=8, train_seq_len=16, eval_seq_len=16, eval_stride=8,
                  recur_layers="1", parallel_resid_start=2, ttt_mode="off")


def model_function(h, state=None):
    """(tensor shapes, token_nll on fixed tokens) of the model these settings build, with `state` loaded if given."""
    torch.manual_seed(0)
    model = tg.build_model(h)
    if state is not None:
        model.load_state_dict(state)
    idx = torch.randint(0, 80, (2, 17))
    idx[:, 8] = tg.BOS_ID  # a document starts mid-window
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # residual_dtype acts under autocast
        nll = model.token_nll(idx[:, :-1], idx[:, 1:], 16)
    return {n: t.shape for n, t in model.state_dict().items()}, nll, model.state_dict()


def test_every_stored_model_setting_changes_the_model_or_what_it_computes():
    """The "model shape" group, which artifacts store, holds only settings that matter to the scored
    model: changing any one changes a tensor's shape or, with the same weights, the losses."""
    assert set(MODEL_CHANGES) == set(tg.MODEL_SETTINGS)
    base = tg.Hyperparameters(**MODEL_BASE)
    shapes, nll, state = model_function(base)
    with torch.no_grad():
        for t in state.values():  # away from the zero-initialised projections, which would hide changes
            t.add_(torch.randn_like(t) * 0.05)
    _, nll, _ = model_function(base, state)
    for name, value in MODEL_CHANGES.items():
        changed = tg.replace(base, **{name: value})
        changed.validate()
        other_shapes, _, _ = model_function(changed)
        if other_shapes == shapes:
            _, other_nll, _ = model_function(changed, state)
            assert not torch.equal(other_nll, nll), name


# ---- end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["settings", "bomb", "nesting", "tensors"])
def test_rescoring_a_crafted_artifact_stops_with_one_error_line(run, artifact, kind):
    _, header, payload = artifact
    path = run.cwd / "crafted.model.zst"
    if kind == "settings":
        write(path, stored(header, mlp_act="evil"), payload)
        message = "stored model settings: MLP_ACT='evil'"
    elif kind == "bomb":
        path.write_bytes(b"\x28\xb5\x2f\xfd\xe0" + (2 ** 31).to_bytes(8, "little") + b"\x00" * 64)
        message = "declares 2147483648 bytes"
    elif kind == "nesting":
        write(path, b"[" * 100_000 + b"]" * 100_000)
        message = "nested too deeply"
    else:  # an artifact of the run's model (its settings are set in the environment), stored with another MLP width
        from conftest import TINY_SETTINGS
        export(path, tg.Hyperparameters.from_env(TINY_SETTINGS))
        header, payload = split(tg.zstandard.ZstdDecompressor().decompress(path.read_bytes()))
        write(path, stored(header, mlp_mult=2.0), payload)
        message = "tensor blocks.0.mlp.fc.weight has shape [192, 64], the model of the stored settings [128, 64]"
    result = run(EVAL_ARTIFACT=str(path), RUN_ID=f"crafted_{kind}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:] and message in lines[-1], result.stderr
