"""Score-first test-time training (TTT_MODE) and the per-document scores (EVAL_DOC_SCORES): causal, scored
before each update, nothing without updates, adapters per document, ranks, and the run against a re-score."""
import csv
import math
import re

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import gloo_ranks, log_body
from test_train_model import tiny_h

VOCAB = 96


def cpu(rank: int = 0, world_size: int = 1) -> tg.Runtime:
    return tg.Runtime(rank=rank, world_size=world_size, device=torch.device("cpu"), micro_batch_seqs=1, compile=False)


def documents(seed: int, lengths) -> list[torch.Tensor]:
    """Documents of the given lengths: BOS, then random tokens other than BOS."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([tg.BOS_ID]), torch.randint(2, VOCAB, (n,), generator=g)]) for n in lengths]


def stream(docs) -> torch.Tensor:
    """The documents in order and a closing BOS, so that every document's last target is a BOS."""
    return torch.cat([*docs, torch.tensor([tg.BOS_ID])])


def setup(**kw):
    """A tiny model with non-trivial outputs, byte tables, and the TTT settings (chunks of 16, windows of 32)."""
    h = tiny_h(**(dict(eval_seq_len=32, eval_stride=8, eval_batch_seqs=4, ttt_mode="lora", ttt_chunk=16, ttt_lr=0.05,
                       ttt_batch_docs=3, ttt_global_batch=4, ttt_context="document") | kw))
    h.validate()
    model = tg.build_model(h)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tables = tg.ByteTables(torch.randint(0, 5, (VOCAB,), generator=g), torch.rand(VOCAB, generator=g) < 0.5,
                           torch.rand(VOCAB, generator=g) < 0.1)
    return h, model, tables


def ttt_documents(tokens, rt=None, **kw) -> torch.Tensor:
    h, model, tables = setup(**kw)
    return tg.TestTimeTraining(tg.Evaluator(model, h, rt or cpu(), tokens, tables)).run()[3]


LENGTHS = [70, 5, 33, 16, 48, 90, 1, 40, 17, 64]  # chunks of 16 and windows of 32: one to six chunks each


def test_documents_begin_at_bos_and_own_the_next_bos():
    tokens = torch.tensor([5, 1, 7, 8, 1, 9, 1])
    assert tg.document_starts(tokens).tolist() == [0, 1, 4]  # no BOS at 0: a document from 0; the last BOS begins none
    assert tg.document_starts(tokens[1:]).tolist() == [0, 3]


def test_sliding_document_scores_are_the_sliding_scores_of_each_documents_targets():
    h, model, tables = setup()
    tokens = stream(documents(1, LENGTHS))
    evaluator = tg.Evaluator(model, h, cpu(), tokens, tables)
    per_doc = torch.zeros(len(LENGTHS), 3, dtype=torch.float64)
    loss, bpb, _ = evaluator.score(sliding=True, documents=per_doc)
    # the direct computation: each target's loss from the sliding grid, one window at a time
    n_targets, nll = len(tokens) - 1, torch.zeros(len(tokens))
    starts, first = tg.sliding_windows(n_targets, 32, 8)
    with torch.no_grad():
        for s, f in zip(starts, first):
            x = tokens[s:s + 33]
            nll[s + 1 + f:s + 33] = model.token_nll(x[None, :-1], x[None, 1:], 32)[0, f:]
    edges = np.cumsum([0] + [n + 1 for n in LENGTHS])  # document d owns targets edges[d]+1 .. edges[d+1]
    for d in range(len(LENGTHS)):
        targets = slice(edges[d] + 1, edges[d + 1] + 1)
        n_bytes = tg.token_bytes(tokens[edges[d]:edges[d + 1]], tokens[targets], tables).sum().item()
        assert per_doc[d, 1] == LENGTHS[d] + 1 and per_doc[d, 2] == n_bytes
        assert per_doc[d, 0].item() == pytest.approx(nll[targets].double().sum().item(), rel=1e-6)
    assert per_doc[:, 0].sum().item() / per_doc[:, 1].sum().item() == pytest.approx(loss, rel=1e-12)


def per_document_reference(model, tokens, window, stride) -> list[float]:
    """Each document scored alone, one window at a time, by the sliding evaluation's grid on its own tokens."""
    out = []
    for s, e in zip(tg.document_starts(tokens).tolist(), [*tg.document_starts(tokens).tolist()[1:], len(tokens) - 1]):
        doc = tokens[s:e + 1]
        n = len(doc) - 1
        if n <= window:
            windows = [(0, 0, n)]
        else:
            starts, first = tg.sliding_windows(n, window, stride)
            windows = [(a, f, window) for a, f in zip(starts, first)]
        with torch.no_grad():
            out.append(sum(model.token_nll(doc[None, a:a + w], doc[None, a + 1:a + w + 1], w)[0, f:].double().sum().item()
                           for a, f, w in windows))
    return out


def test_without_updates_ttt_scores_each_document_by_its_own_sliding_windows():
    h, model, tables = setup()
    tokens = stream(documents(2, LENGTHS))
    reference = per_document_reference(model, tokens, 32, 8)
    for kw in (dict(ttt_lr=0.0, ttt_epochs=2), dict(ttt_lr=0.0, ttt_optimizer="sgd"),
               dict(ttt_lr=0.0, ttt_phases=1, ttt_global_lr=0.0)):
        per_doc = ttt_documents(tokens, **kw)
        assert torch.equal(per_doc, ttt_documents(tokens, ttt_epochs=0)), kw  # exactly the evaluation without any update
        np.testing.assert_allclose(per_doc[:, 0].numpy(), reference, rtol=1e-5)
    # on a single document the grid is the sliding evaluation's
    one = documents(8, [150])[0]
    loss, _, _ = tg.Evaluator(model, h, cpu(), one, tables).score(sliding=True)
    per_doc = ttt_documents(one, ttt_epochs=0)
    assert len(per_doc) == 1 and per_doc[0, 0].item() / per_doc[0, 1].item() == pytest.approx(loss, rel=1e-5)


def test_with_stream_context_and_no_updates_ttt_is_the_sliding_evaluation():
    """TTT_CONTEXT=stream: the windows read the documents before a document, so with updates off every document
    scores exactly as in the stream's sliding evaluation (stride 1: the grids agree wherever a document starts),
    in both modes; with document context the first targets of every document but the first score otherwise."""
    tokens = stream(documents(9, LENGTHS))
    h, model, tables = setup(eval_stride=1)
    want = torch.zeros(len(LENGTHS), 3, dtype=torch.float64)
    tg.Evaluator(model, h, cpu(), tokens, tables).score(sliding=True, documents=want)
    for kw in (dict(ttt_epochs=0), dict(ttt_mode="sgd", ttt_phases=1, ttt_global_lr=0.0)):
        per_doc = ttt_documents(tokens, eval_stride=1, ttt_context="stream", **kw)
        assert torch.equal(per_doc[:, 1:], want[:, 1:]), kw
        np.testing.assert_allclose(per_doc[:, 0].numpy(), want[:, 0].numpy(), rtol=1e-5)
    own = ttt_documents(tokens, eval_stride=1, ttt_epochs=0)
    np.testing.assert_allclose(own[0, 0].item(), want[0, 0].item(), rtol=1e-5)  # the first document has nothing before it
    assert all(abs(own[d, 0] - want[d, 0]) > 1e-3 for d in range(1, len(LENGTHS)))
    adapted = ttt_documents(tokens, ttt_context="stream")  # and the adapters still learn
    assert all(adapted[d, 0] != want[d, 0] for d, n in enumerate(LENGTHS) if n + 1 > 16)


def test_with_stream_context_the_adapters_train_on_windows_with_the_same_context():
    """An adapter trains on the chunk it has just scored with the context a window scoring it would have: with
    TTT_CONTEXT=stream the EVAL_SEQ_LEN tokens up to the chunk's end, reaching back before the document."""
    tokens = stream(documents(9, LENGTHS))
    for context in ("document", "stream"):
        h, model, tables = setup(ttt_context=context)
        ttt = tg.TestTimeTraining(tg.Evaluator(model, h, cpu(), tokens, tables))
        starts, adapted, adapt = tg.document_starts(tokens).tolist(), [], ttt._adapt
        ttt._adapt = lambda spans, active: adapted.extend(spans[active.numpy()].tolist()) or adapt(spans, active)
        ttt.run()
        assert adapted
        for doc, start, first, end, _ in adapted:
            before = starts[doc] if context == "stream" else 0
            assert first == end - 16 and start == max(end - 32, -before)  # a whole chunk, a window of 32


def test_updates_change_the_score():
    tokens = stream(documents(2, LENGTHS))
    adapted, plain = ttt_documents(tokens), ttt_documents(tokens, ttt_epochs=0)
    longer = [d for d, n in enumerate(LENGTHS) if n + 1 > 16]
    assert all(adapted[d, 0] != plain[d, 0] for d in longer)  # a later chunk of each longer document
    assert all(adapted[d, 0] == plain[d, 0] for d, n in enumerate(LENGTHS) if n + 1 <= 16)  # one chunk: nothing to adapt for
    for kw, reference in ((dict(ttt_mode="sgd", ttt_phases=1), plain), (dict(ttt_phases=2), adapted)):
        changed = ttt_documents(tokens, **kw)
        first = len(LENGTHS) // (kw["ttt_phases"] + 1)
        assert torch.equal(changed[:first], reference[:first])  # the first phase: no global step yet
        assert (changed[first:, 0] != reference[first:, 0]).all()


@pytest.mark.parametrize("context", ["document", "stream"])
def test_a_document_is_scored_by_weights_adapted_only_on_what_came_before(context):
    """The first k documents score exactly the same when every later document is other text (the same count of
    documents: phases are equal shares of it), with adapters and global phases, and windows that read only a
    document's own tokens or the stream before it too."""
    k = 7  # phase 0 holds documents 0..4, phase 1 documents 5..9: k spans both
    original = documents(3, LENGTHS)
    replaced = original[:k] + documents(4, [55, 3, 80])
    a = ttt_documents(stream(original), ttt_phases=1, ttt_global_lr=0.05, ttt_context=context)
    b = ttt_documents(stream(replaced), ttt_phases=1, ttt_global_lr=0.05, ttt_context=context)
    assert torch.equal(a[:k], b[:k])
    assert not torch.equal(a[k:], b[k:])


def test_each_chunk_is_scored_before_its_document_adapts_on_it():
    """With a learning rate that wrecks the adapters (Adam steps of 10), every document's first chunk scores exactly
    as without updates; every window after it scores otherwise."""
    tokens = stream(documents(5, LENGTHS))
    scored = {}
    for lr in (0.0, 10.0):
        h, model, tables = setup(ttt_lr=lr, ttt_optimizer="adam")
        ttt = tg.TestTimeTraining(tg.Evaluator(model, h, cpu(), tokens, tables))
        spans, score_spans = [], ttt.score_spans

        def recording(s, documents):
            sums = score_spans(s, documents)
            spans.extend(zip(map(tuple, s[:, :4].tolist()), sums[:, 0].tolist()))
            return sums
        ttt.score_spans = recording
        ttt.run()
        scored[lr] = dict(spans)
    assert scored[0.0].keys() == scored[10.0].keys()
    first = [key for key in scored[0.0] if key[2] < 16]
    later = [key for key in scored[0.0] if key[2] >= 16]
    assert first and later
    assert all(scored[10.0][key] == scored[0.0][key] for key in first)
    assert all(abs(scored[10.0][key] - scored[0.0][key]) > 1e-3 for key in later)


def test_adapters_start_afresh_with_every_document():
    """Documents in another order, or each alone (LoRA only, no global phases): each document's score is unchanged."""
    docs = documents(6, LENGTHS)
    order = [3, 9, 0, 5, 1, 8, 2, 7, 6, 4]
    a = ttt_documents(stream(docs), ttt_epochs=2)
    b = ttt_documents(stream([docs[i] for i in order]), ttt_epochs=2)
    assert torch.equal(b, a[order])
    for d in (2, 3, 7):  # each takes a slot after another document (longest first: 5, 0 and 9 come first)
        assert torch.equal(ttt_documents(stream([docs[d]]), ttt_epochs=2)[0], a[d])


def ranks_worker(rank, world_size, init_file, out_file):
    with gloo_ranks(rank, world_size, init_file):
        torch.set_num_threads(1)
        tokens = stream(documents(7, LENGTHS))
        torch.save([ttt_documents(tokens, cpu(rank, world_size)),
                    ttt_documents(tokens, cpu(rank, world_size), ttt_phases=1, ttt_global_lr=0.05)], f"{out_file}.{rank}")


def test_two_ranks_score_as_one(tmp_path):
    mp.spawn(ranks_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    results = [torch.load(f"{tmp_path / 'out'}.{rank}") for rank in range(2)]
    tokens = stream(documents(7, LENGTHS))
    lora, phased = ttt_documents(tokens), ttt_documents(tokens, ttt_phases=1, ttt_global_lr=0.05)
    for ranked in results:  # every rank holds every document's scores
        assert torch.equal(ranked[0], lora)  # adapters only: each document scored as on one rank, exactly
        assert torch.equal(ranked[1][:, 1:], phased[:, 1:])  # global SGD: gradients summed in another order
        np.testing.assert_allclose(ranked[1][:, 0].numpy(), phased[:, 0].numpy(), rtol=1e-5)
        assert torch.equal(ranked[1][:5], phased[:5])  # the first phase comes before any global step


@pytest.mark.parametrize("settings, message", [
    (dict(TTT_MODE="on"), "TTT_MODE='on': expected one of off, lora, sgd"),
    (dict(TTT_MODE="sgd"), "TTT_MODE=sgd adapts only between global phases: expected TTT_PHASES >= 1"),
    (dict(TTT_MODE="off", TTT_LR="0.01"), "TTT_LR=0.01 has no effect with TTT_MODE=off"),
    (dict(TTT_MODE="sgd", TTT_PHASES="2", TTT_LORA_RANK="4"), "TTT_LORA_RANK=4 has no effect with TTT_MODE=sgd"),
    (dict(TTT_MODE="lora", TTT_GLOBAL_LR="0.01"), "TTT_GLOBAL_LR=0.01 has no effect with TTT_PHASES=0"),
    (dict(TTT_MODE="lora", TTT_CHUNK="4096"), "TTT_CHUNK=4096: expected 1..EVAL_SEQ_LEN=2048"),
    (dict(TTT_MODE="lora", TTT_CHUNK="0"), "TTT_CHUNK=0: expected a positive number"),
    (dict(TTT_MODE="lora", TTT_LR="-1"), "TTT_LR=-1.0: expected a number >= 0"),
    (dict(TTT_MODE="lora", TTT_LR="nan"), "TTT_LR=nan: expected a finite number"),
    (dict(TTT_MODE="lora", TTT_LORA_TARGETS="q,gate"), "TTT_LORA_TARGETS='q,gate': expected distinct names from q,k,v,o,fc,proj"),
    (dict(TTT_MODE="lora", TTT_LORA_TARGETS="q,q"), "TTT_LORA_TARGETS='q,q': expected distinct names"),
    (dict(TTT_MODE="lora", TTT_OPTIMIZER="muon"), "TTT_OPTIMIZER='muon': expected one of adam, sgd"),
    (dict(TTT_MODE="lora", TTT_CONTEXT="all"), "TTT_CONTEXT='all': expected one of document, stream"),
    (dict(TTT_MODE="off", TTT_CONTEXT="stream"), "TTT_CONTEXT=stream has no effect with TTT_MODE=off"),
    (dict(TTT_ENABLED="1"), "unknown setting TTT_ENABLED: use TTT_MODE=lora"),
    (dict(TTT_CHUNK_SIZE="32"), "unknown setting TTT_CHUNK_SIZE: no setting has that name; the nearest is TTT_CHUNK"),
])
def test_bad_ttt_settings_stop_with_a_clear_message(settings, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.Hyperparameters.from_env(settings)


def final(log: str, prefix: str) -> str:
    return re.search(rf"^{prefix} .*$", log_body(log), re.M).group(0)


def read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["doc", "tokens", "bytes", "nats"]
    return [(int(d), int(t), int(b), float(n)) for d, t, b, n in rows[1:]]


def evaluation_ms(log: str) -> tuple[int, int]:
    """The evaluation_time line's total, and the sum of the eval_time fields of the final scores it covers."""
    body = log_body(log)
    total = int(re.search(r"^evaluation_time: total:(\d+)ms cap:600000ms on 8xH100 ", body, re.M).group(1))
    return total, sum(int(ms) for ms in re.findall(r"^final_\w+ .*eval_time:(\d+)ms", body, re.M))


def test_the_runs_ttt_score_is_the_rescore_of_its_artifact(run):
    ttt = dict(TTT_MODE="lora", TTT_CHUNK="32", TTT_LR="0.01", TTT_PHASES="1", TTT_GLOBAL_LR="0.01")
    result = run(RUN_ID="ttt", EVAL_DOC_SCORES="trained.csv", **ttt)
    assert result.returncode == 0, result.stderr
    trained = (run.cwd / "logs/ttt.txt").read_text()
    assert re.search(r"^final_ttt val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms mode:lora phases:1 documents:\d+ context:stream$", trained, re.M)
    result = run(RUN_ID="rescore", EVAL_ARTIFACT="logs/ttt.model.zst", EVAL_DOC_SCORES="rescored.csv", **ttt)
    assert result.returncode == 0, result.stderr
    rescored = (run.cwd / "logs/rescore.txt").read_text()
    for prefix in ("final_ttt_exact", "final_quant_sliding_window_exact"):
        assert final(rescored, prefix) == final(trained, prefix)
    for log in (trained, rescored):  # the evaluation's time covers every score, the TTT pass included
        total, scores = evaluation_ms(log)
        assert total + 2 >= scores > 0  # each eval_time is rounded to the millisecond
    docs = read_csv(run.cwd / "trained.csv")
    assert docs == read_csv(run.cwd / "rescored.csv")
    loss = float(re.search(r"val_loss:([\d.]+)", final(trained, "final_ttt_exact")).group(1))
    assert [d for d, *_ in docs] == list(range(len(docs))) and int(final(trained, "final_ttt").split("documents:")[1].split()[0]) == len(docs)
    assert sum(n for *_, n in docs) / sum(t for _, t, _, _ in docs) == pytest.approx(loss, abs=1e-8)
    # TTT off: the file holds the sliding evaluation's documents, every target once
    result = run(RUN_ID="sliding", EVAL_ARTIFACT="logs/ttt.model.zst", EVAL_DOC_SCORES="sliding.csv")
    assert result.returncode == 0, result.stderr
    sliding_log, sliding = (run.cwd / "logs/sliding.txt").read_text(), read_csv(run.cwd / "sliding.csv")
    assert "final_ttt" not in log_body(sliding_log) and [t for _, t, _, _ in sliding] == [t for _, t, _, _ in docs]
    loss = float(re.search(r"val_loss:([\d.]+)", final(sliding_log, "final_quant_sliding_window_exact")).group(1))
    assert sum(n for *_, n in sliding) / sum(t for _, t, _, _ in sliding) == pytest.approx(loss, abs=1e-8)


def test_by_default_the_score_is_lora_ttt_with_the_streams_context(run):
    """With TTT_MODE unset, the run scores with score-first LoRA TTT in the stream's context at rate 0.003,
    with adapters on all six projections, and that is the score records/ reads from its log."""
    from records.logparse import parse_log
    default = run(RUN_ID="default", TTT_MODE=None, TTT_CHUNK="32")
    assert default.returncode == 0, default.stderr
    chosen = run(RUN_ID="chosen", TTT_MODE="lora", TTT_CHUNK="32", TTT_LR="0.003", TTT_CONTEXT="stream",
                 TTT_LORA_TARGETS="q,k,v,o,fc,proj")
    assert chosen.returncode == 0, chosen.stderr
    logs = [(run.cwd / f"logs/{name}.txt").read_text() for name in ("default", "chosen")]
    assert final(logs[0], "final_ttt_exact") == final(logs[1], "final_ttt_exact")
    assert final(logs[0], "final_ttt").endswith("context:stream")
    bpb = {prefix: float(final(logs[0], prefix).split("val_bpb:")[1]) for prefix in ("final_ttt_exact", "final_quant_sliding_window_exact")}
    parsed = parse_log(run.cwd / "logs/default.txt")
    assert parsed.score().val_bpb == bpb["final_ttt_exact"] != bpb["final_quant_sliding_window_exact"]
    assert parsed.evaluation_ms == evaluation_ms(logs[0])[0]  # what records/package.py holds against the 600 s


def test_a_bad_ttt_setting_is_one_line_and_exit_status_2(run):
    result = run(TTT_MODE="lora", TTT_CHUNK="32", TTT_LORA_TARGETS="gate")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: TTT_LORA_TARGETS='gate': expected distinct names from q,k,v,o,fc,proj, e.g. q,v,o"]


def test_a_ttt_score_that_is_not_finite_fails_the_run():
    h, model, tables = setup(ttt_lr=1e38)  # Adam steps of 1e38: the adapted outputs overflow
    lines = []
    with pytest.raises(tg.RunError, match=r"the TTT score is val_loss:nan val_bpb:nan: the adapted model's outputs are not finite"):
        tg.log_final_scores(lines.append, tg.Evaluator(model, h, cpu(), stream(documents(9, LENGTHS)), tables), h)
    assert len(lines) == 4 and not any(line.startswith("final_ttt") for line in lines)


def test_priming_runs_on_synthetic_documents_and_restores_the_weights():
    """prime() (with COMPILE; here the graphs stay eager) passes over documents of BOS and token 0, pieces of
    no bytes in the SentencePiece models, then the pass scores exactly as without it (global phases included,
    which change the weights)."""
    tokens = stream(documents(3, LENGTHS))
    scores = []
    for primed in (False, True):
        h, model, tables = setup(ttt_phases=1)
        tables = tg.ByteTables(tables.base_bytes.clone(), tables.leading_space, tables.boundary)
        tables.base_bytes[[0, tg.BOS_ID]] = 0
        ttt = tg.TestTimeTraining(tg.Evaluator(model, h, cpu(), tokens, tables))
        if primed:
            ttt.rt = tg.replace(ttt.rt, compile=True)
            assert ttt.prime() > 0
        scores.append(ttt.run()[:2])
    assert scores[0] == scores[1]
