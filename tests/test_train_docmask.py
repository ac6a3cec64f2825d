"""DOC_MASK (attention, SmearGate and BigramHash stop at each BOS) and LOSS_KERNEL: a document's losses do
not depend on the text before it, every attention backend masks the same way, the settings are checked
at start, and a tiny run end to end stores and re-scores the setting. The fused cross-entropy kernel
itself is checked against the plain loss in tests/triton_kernel_check.py."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

VOCAB, BOS = 64, tg.BOS_ID


def tiny_h(**kw):
    base = dict(vocab_size=VOCAB, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, bigram_vocab_size=32,
                bigram_dim=16, train_seq_len=32, eval_seq_len=32, xsa_last_n=3, ve_layers="0,2", ve_dim=8,
                rope_dims=8, doc_mask=True, attn_backend="sdpa", parallel_resid_start=0, ttt_mode="off")
    return tg.Hyperparameters(**(base | kw))


def weighted_model(h, seed=0, kernels=tg.Kernels()):
    """A model whose zero-initialised projections and control parameters have random values, so that
    SmearGate, BigramHash, the value embeddings and every block change the output."""
    model = tg.build_model(h, kernels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("attn_scale", "mlp_scale", "resid_mix", "skip_weights", "smear.gate", "bigram.embed.weight", "ve_scale")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def words(n, seed):
    """n tokens that are not BOS."""
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def rows(*docs):
    """One row of 33 tokens: the documents, each BOS + its tokens, back to back."""
    tokens = [t for doc in docs for t in [BOS] + doc]
    assert len(tokens) == 33, len(tokens)
    return torch.tensor([tokens])


def nll(model, row, tail=32):
    with torch.no_grad():
        return model.token_nll(row[:, :-1], row[:, 1:], tail)


def test_a_documents_losses_do_not_depend_on_the_document_before_it():
    """Document b after a document a, then after another a' of the same length: with DOC_MASK every loss
    of b's tokens (inputs from b's BOS on) is the same, bit for bit, over the whole window and over the
    scorer's last positions; with it off they change. XSA is on in every block, and the value embeddings,
    SmearGate and BigramHash are live."""
    a, other_a, b = words(9, 1), words(9, 2), words(22, 3)
    first, second = rows(a, b), rows(other_a, b)
    model = weighted_model(tiny_h())
    for tail in (32, 8):
        b_from = max(0, 10 - (32 - tail))  # b's BOS is input position 10
        assert torch.equal(nll(model, first, tail)[:, b_from:], nll(model, second, tail)[:, b_from:])
    assert not torch.equal(nll(model, first)[:, :10], nll(model, second)[:, :10])  # a's own losses do change
    plain = weighted_model(tiny_h(doc_mask=False))
    assert (nll(plain, first)[:, 10:] - nll(plain, second)[:, 10:]).abs().max() > 1e-3


def test_a_document_scores_the_same_wherever_it_starts():
    """Document b after a 9-token document, or after a 5-token one (b 4 positions earlier, a third document
    after it): b's losses agree to float precision (rotary depends only on relative positions)."""
    b, c = words(22, 3), words(3, 4)
    model = weighted_model(tiny_h())
    late, early = nll(model, rows(words(9, 1), b)), nll(model, rows(words(5, 2), b, c))
    torch.testing.assert_close(early[:, 6:28], late[:, 10:32], rtol=1e-5, atol=1e-5)


def test_smear_gate_and_bigram_hash_take_nothing_from_before_a_bos():
    h = tiny_h()
    idx = torch.tensor([[5, 9, BOS, 7, BOS, BOS, 3]])
    starts = idx == BOS
    gate = tg.SmearGate(h)
    with torch.no_grad():
        gate.gate.fill_(0.0)  # g = 0.5
    x = torch.randn(1, 7, 64)
    expected = 0.5 * x + 0.5 * F.pad(x[:, :-1], (0, 0, 1, 0)) * (~starts[..., None])
    torch.testing.assert_close(gate(x, starts), expected)
    bigram = tg.BigramHash(h)
    with torch.no_grad():
        bigram.embed.weight.copy_(torch.randn(32, 16))
    hashed = tg.bigram_rows(idx, 32)
    rows_used = torch.where(starts, 31, hashed)
    assert rows_used[0, 2] == 31 and rows_used[0, 3] == hashed[0, 3]
    torch.testing.assert_close(bigram(idx, starts), bigram.scale * bigram.proj(bigram.embed(rows_used)))


def reference_document_attention(q, k, v, idx):
    """Causal attention of the last Tq queries, each to the keys of its own document only (a document starts
    at a BOS of idx or at the row's start), written out with the repeated kv heads."""
    B, Tq, H, D = q.shape
    T, Hkv = k.size(1), k.size(2)
    doc = (idx == BOS).cumsum(1)
    pos = torch.arange(T - Tq, T)
    allowed = (torch.arange(T)[None, None, :] <= pos[None, :, None]) & (doc[:, None, :] == doc[:, T - Tq:, None])
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True):
    """The varlen contract of FlashAttention's flash_attn_varlen_func (FA3) and _flash_attn_fwd with cu_seqlens
    (FA4), written out: packed (total, heads, D) tensors, document i = rows cu[i]:cu[i+1] of q and of k, v, its
    causal mask aligned to its last positions, query head h reading kv head h // (H / Hkv). Returns (out, lse (H, total_q))."""
    assert causal and cu_q.dtype == cu_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
    H, D = q.shape[1:]
    out, lse = torch.zeros_like(q), torch.zeros(H, q.size(0))
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        assert 0 <= q1 - q0 <= max_q and 0 <= k1 - k0 <= max_k and q1 - q0 <= k1 - k0
        if q1 == q0:
            continue
        qs, ks, vs = q[q0:q1], k[k0:k1].repeat_interleave(H // k.size(1), 1), v[k0:k1].repeat_interleave(H // k.size(1), 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(D)
        behind = torch.arange(k1 - k0)[None, :] > torch.arange(k1 - k0 - (q1 - q0), k1 - k0)[:, None]
        scores = scores.masked_fill(behind, float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
        lse[:, q0:q1] = scores.logsumexp(-1)
    return out, lse


class ReferenceVarlenFA4:
    """flash_attn.cute.interface's entry points as fa4_varlen_attention calls them, written out: the forward
    by reference_varlen, the backward by hand for each document, from its lse: P = exp(S - lse), dV = P^T dO,
    dS = P (dO V^T - rowsum(dO * O)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D), a kv head's gradients summed
    over its query heads."""
    calls = []

    @classmethod
    def _flash_attn_fwd(cls, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, return_lse):
        assert return_lse
        cls.calls.append("fwd")
        return (*reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal), None)

    @classmethod
    def _flash_attn_bwd(cls, q, k, v, out, dout, lse, causal, cu_seqlens_q, cu_seqlens_k):
        assert causal
        cls.calls.append("bwd")
        H, D = q.shape[1:]
        group = H // k.size(1)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i in range(len(cu_seqlens_q) - 1):
            q0, q1 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
            k0, k1 = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
            if q1 == q0:
                continue
            ks, vs = k[k0:k1].repeat_interleave(group, 1), v[k0:k1].repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", q[q0:q1], ks) / math.sqrt(D)
            P = torch.exp(scores - lse[:, q0:q1, None])
            P = P.masked_fill(torch.arange(k1 - k0)[None, :] > torch.arange(k1 - k0 - (q1 - q0), k1 - k0)[:, None], 0.0)
            do, o = dout[q0:q1], out[q0:q1]
            dS = P * (torch.einsum("qhd,khd->hqk", do, vs) - (do * o).sum(-1).T[..., None])
            dq[q0:q1] = torch.einsum("hqk,khd->qhd", dS, ks) / math.sqrt(D)
            dk[k0:k1] = (torch.einsum("hqk,qhd->khd", dS, q[q0:q1]) / math.sqrt(D)).view(k1 - k0, -1, group, D).sum(2)
            dv[k0:k1] = torch.einsum("hqk,qhd->khd", P, do).view(k1 - k0, -1, group, D).sum(2)
        return dq, dk, dv


# Rows with documents of several lengths, one beginning before the row (no BOS at position 0), a BOS at the
# last position, and BOS twice in a row.
IDX = torch.tensor([[7, 9, BOS, 4, 5, 6, BOS, 8, 3, 2, 2, BOS],
                    [BOS, 3, 3, BOS, BOS, 5, 6, 7, 8, 9, BOS, 4]])


@pytest.mark.parametrize("tail", [12, 5])
def test_every_backend_keeps_each_query_to_its_own_document(monkeypatch, tail):
    """document_attention on sdpa (a boolean mask), flex (a block mask; forward only: it has no CPU backward),
    and fa3 / fa4 (packed documents, given their varlen contract) against the attention written out, over a
    whole window and over its last positions; fa4's gradients against sdpa's."""
    monkeypatch.setattr(tg, "fa3_varlen_attention", reference_varlen)
    monkeypatch.setattr(tg, "fa4_interface", ReferenceVarlenFA4)
    ReferenceVarlenFA4.calls = []
    g = torch.Generator().manual_seed(tail)
    q, k, v = (torch.randn(2, 12, heads, 8, generator=g) for heads in (4, 2, 2))
    want = reference_document_attention(q[:, -tail:], k, v, IDX)
    grads = {}
    for backend in ("sdpa", "flex", "fa3", "fa4"):
        leaves = [t.clone().requires_grad_(backend in ("sdpa", "fa4")) for t in (q, k, v)]
        y = tg.document_attention(leaves[0][:, -tail:], leaves[1], leaves[2], backend, tg.document_mask(IDX, tail, backend))
        torch.testing.assert_close(y, want, msg=backend)
        if backend in ("sdpa", "fa4"):
            grads[backend] = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), leaves)
    for a, b in zip(grads["fa4"], grads["sdpa"]):
        torch.testing.assert_close(a, b)
    assert ReferenceVarlenFA4.calls == ["fwd", "bwd"]


def test_a_flex_model_scores_with_sdpas_mask_and_trains_with_flex(monkeypatch):
    """Compiled without autograd, flex attention fails on the GPU, so a flex model's scoring passes (no
    grad) build sdpa's boolean masks and attend with sdpa, and its training passes keep flex. Both give the
    sdpa model's losses with the same weights, over a whole window and over the scorer's last positions."""
    h = tiny_h(attn_backend="auto")
    sdpa, flex = (weighted_model(h, kernels=tg.Kernels(attention=backend)) for backend in ("sdpa", "flex"))
    flex.load_state_dict(sdpa.state_dict())
    flex.requires_grad_(False)  # flex has no CPU backward; the pass below still runs with autograd on
    asked, mask = [], tg.document_mask
    monkeypatch.setattr(tg, "document_mask", lambda idx, tail, backend: asked.append((tail, backend)) or mask(idx, tail, backend))
    row = torch.cat([rows(words(9, 1), words(22, 3)), rows(words(32, 4))])
    for tail in (32, 5):
        want = nll(sdpa, row, tail)
        asked.clear()
        torch.testing.assert_close(nll(flex, row, tail), want)
        assert {backend for _, backend in asked} == {"sdpa"}, asked
        asked.clear()
        torch.testing.assert_close(flex.token_nll(row[:, :-1], row[:, 1:], tail), want)
        assert {backend for _, backend in asked} == {"flex"}, asked


def test_attention_at_a_bos_reads_only_itself_so_xsa_leaves_nothing():
    """A BOS query attends to itself alone: its output is its own v (for every query head of the group), and
    XSA, which removes the component along that v, leaves zero there."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 12, 4, 8), torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    y = tg.document_attention(q, k, v, "sdpa", tg.document_mask(IDX, 12, "sdpa"))
    at = IDX == BOS
    torch.testing.assert_close(y[at], v.repeat_interleave(2, 2)[at])
    assert tg.exclusive_self_attention(y, v)[at].abs().max() < 1e-5
    assert tg.exclusive_self_attention(y, v)[~at].abs().max() > 0.1


def test_packed_documents_start_at_each_bos_and_each_row():
    """fa3 / fa4: rows of 4, the last 2 queried. Documents (row, positions): (0, 0), (0, 1-3), (1, 0-1), (1, 2-3);
    the rest of the B*T + 1 entries are empty documents at the stream's end."""
    cu_q, cu_k = tg.document_mask(torch.tensor([[5, BOS, 7, 8], [BOS, 6, BOS, 9]]), 2, "fa3")
    assert cu_k.tolist() == [0, 1, 4, 6, 8, 8, 8, 8, 8]
    assert cu_q.tolist() == [0, 0, 2, 2, 4, 4, 4, 4, 4]
    assert cu_q.dtype == cu_k.dtype == torch.int32


def test_attention_backend_choice_with_doc_mask(monkeypatch):
    def fa3(*a, **kw):
        raise AssertionError("not called")
    monkeypatch.setattr(tg, "fa3_attention", fa3)
    monkeypatch.setattr(tg, "fa3_varlen_attention", reference_varlen)
    monkeypatch.setattr(tg, "fa4_interface", None)
    assert tg.choose_attention("auto", 9, True) == "fa3" and tg.choose_attention("fa3", 9, True) == "fa3"
    monkeypatch.setattr(tg, "fa3_varlen_attention", None)
    assert tg.choose_attention("auto", 9, False) == "fa3"
    assert tg.choose_attention("auto", 9, True) == "flex"  # FA3 without its varlen form
    with pytest.raises(tg.ConfigError, match="^ATTN_BACKEND=fa3 with DOC_MASK=1 needs flash_attn_varlen_func"):
        tg.choose_attention("fa3", 9, True)
    monkeypatch.setattr(tg, "fa4_interface", ReferenceVarlenFA4)
    assert tg.choose_attention("auto", 9, True) == "fa4"
    assert tg.choose_attention("auto", 8, True) == "flex" and tg.choose_attention("auto", 8, False) == "sdpa"
    assert tg.choose_attention("auto", 0, True) == "sdpa" and tg.choose_attention("sdpa", 9, True) == "sdpa"
    with pytest.raises(tg.ConfigError, match=r"^ATTN_BACKEND=flex needs a GPU"):
        tg.choose_attention("flex", 0, True)


@pytest.mark.parametrize("env, message", [
    ({"ATTN_BACKEND": "flex"}, "ATTN_BACKEND=flex needs DOC_MASK=1 (plain causal attention: use sdpa, fa3 or fa4)"),
    ({"DOC_MASK": "2"}, "DOC_MASK='2': expected 0 or 1"),
    ({"LOSS_KERNEL": "fused"}, "LOSS_KERNEL='fused': expected one of auto, triton, torch"),
])
def test_settings_are_checked_at_start(env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.Hyperparameters.from_env(env)


def test_loss_kernel_resolution_on_this_machine():
    usable = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and tg.triton is not None
    assert tg.setup_runtime(tg.Hyperparameters.from_env({}), {}).kernels.loss == "torch"  # off until measured
    kernels = tg.setup_runtime(tg.Hyperparameters.from_env({"LOSS_KERNEL": "auto"}), {}).kernels
    assert kernels.loss == ("triton" if usable else "torch")
    if not usable:
        with pytest.raises(tg.ConfigError, match="^LOSS_KERNEL=triton needs a Hopper GPU and Triton 3.4 or later$"):
            tg.setup_runtime(tg.Hyperparameters.from_env({"LOSS_KERNEL": "triton"}), {})


def test_fused_loss_is_the_training_loss_only(monkeypatch):
    """With LOSS_KERNEL=triton the training loss is the mean of softcap_ce over the logits before the
    cap (stood in for by its plain formula here); scoring keeps the plain path."""
    calls = []

    def plain_softcap_ce(z, targets, cap):
        calls.append(z.shape)
        return F.cross_entropy(cap * torch.tanh(z.float() / cap), targets, reduction="none")
    monkeypatch.setattr(tg, "softcap_ce", plain_softcap_ce)
    # logits well past the cap (|z| of several caps), so that capping twice or not at all would show
    fused, plain = (weighted_model(tiny_h(logit_softcap=2.0, tied_embed_init_std=0.5), kernels=tg.Kernels(loss=kernel))
                    for kernel in ("triton", "torch"))
    idx, targets = torch.randint(0, VOCAB, (2, 32)), torch.randint(0, VOCAB, (2, 32))
    assert F.linear(plain.trunk(idx), plain.tok_emb.weight).abs().max() > 6.0
    torch.testing.assert_close(fused(idx, targets), plain(idx, targets))
    assert calls == [(64, VOCAB)]
    torch.testing.assert_close(fused.token_nll(idx, targets, 5), plain.token_nll(idx, targets, 5))
    assert calls == [(64, VOCAB)]


def test_tiny_run_with_doc_mask_stores_it_and_rescores_to_the_same_lines(run):
    off = run(RUN_ID="off", ITERATIONS="8")
    on = run(RUN_ID="on", ITERATIONS="8", DOC_MASK="1")
    assert off.returncode == 0 and on.returncode == 0, on.stderr
    logs = {name: (run.cwd / f"logs/{name}.txt").read_text() for name in ("off", "on")}
    finals = {name: re.findall(r"^final_quant_\w+_exact .*$", log, re.M) for name, log in logs.items()}
    assert len(finals["on"]) == 2 and finals["on"][0] != finals["off"][0] and finals["on"][1] != finals["off"][1]
    assert "setting DOC_MASK=True" in logs["on"] and "attention_backend:sdpa" in logs["on"]
    _, config = tg.load_artifact(run.cwd / "logs/on.model.zst")
    assert config["doc_mask"] is True
    again = run(RUN_ID="again", EVAL_ARTIFACT="logs/on.model.zst")
    assert again.returncode == 0, again.stderr
    rescored = (run.cwd / "logs/again.txt").read_text()
    assert "DOC_MASK=True" in re.search(r"^rescore: model settings from the artifact: .*$", rescored, re.M).group(0)
    assert all(line in rescored.splitlines() for line in finals["on"])
    refused = run(RUN_ID="refused", EVAL_ARTIFACT="logs/on.model.zst", DOC_MASK="0")
    assert refused.returncode == 2 and "DOC_MASK=False but logs/on.model.zst was trained with DOC_MASK=True" in refused.stderr


def test_rescoring_a_doc_mask_artifact_chooses_attention_for_it(monkeypatch, tmp_path):
    """The attention backend is chosen for the model that is scored: on a (stand-in) Hopper GPU whose FA3 has
    no varlen form, auto takes flex for a DOC_MASK artifact, and an explicit ATTN_BACKEND=fa3 is refused."""
    (tmp_path / "a.model.zst").write_bytes(b"stand-in: load_artifact is replaced below")
    monkeypatch.setattr(tg, "load_artifact", lambda path: ({}, {"doc_mask": True}))
    monkeypatch.setattr(tg, "fa3_attention", object())
    monkeypatch.setattr(tg, "fa3_varlen_attention", None)
    monkeypatch.setattr(tg, "fa4_interface", None)
    monkeypatch.setattr(tg.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(tg, "check_artifact_tensors", lambda *a: None)
    monkeypatch.setattr(tg, "build_byte_tables", lambda *a: None)
    monkeypatch.setattr(tg, "load_validation_tokens", lambda h: None)
    built = []

    def build_model(h, kernels):
        built.append((h.doc_mask, kernels.attention))
        raise RuntimeError("stop here")
    monkeypatch.setattr(tg, "build_model", build_model)
    rt = tg.Runtime(rank=0, world_size=1, device=torch.device("cuda", 0), micro_batch_seqs=1, compile=False)
    with pytest.raises(RuntimeError, match="stop here"):
        tg.rescore(tiny_h(doc_mask=False, attn_backend="auto", eval_artifact=str(tmp_path / "a.model.zst")), rt, lambda line: None)
    assert built == [(True, "flex")]
    with pytest.raises(tg.ConfigError, match="ATTN_BACKEND=fa3"):
        tg.rescore(tiny_h(doc_mask=False, attn_backend="fa3", eval_artifact=str(tmp_path / "a.model.zst")), rt, lambda line: None)
