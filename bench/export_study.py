"""Export study (bench/RESULTS.md, "The export"): the normal run of train_gpt.py with its settings from the environment, then the
same post-average checkpoint exported with the export settings of docs/EXPORT.md and the embeddings' other widths;
bytes and sliding-window quantization gaps.

    DATA_PATH=... TOKENIZER_PATH=... <proxy settings> [STUDY="LQER_RANK=4;EMBED_BITS=7"] python3 bench/export_study.py

STUDY picks variants by their labels (as the log prints them, separated by ';'), run in that order; unset, all.
"""
import dataclasses, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_gpt as tg
seen = {}
train, final_scores = tg.train, tg.log_final_scores
def picked_variants(h) -> list[tuple[str, dict]]:
    """The export settings of docs/EXPORT.md, each on the same checkpoint and Hessians, and the embeddings'
    other widths; from a run with GPTQ_EMBED=1 (whose Hessians include the embeddings') also without it.
    STUDY (labels separated by ';') picks some, in its order."""
    widths = [b for b in (6, 7, 8) if b != h.embed_bits]
    study = [dict(clip="std"), dict(lqer_rank=4),
             *(dict(embed_bits=b) for b in widths), dict(clip="std", lqer_rank=4, embed_bits=7),
             dict(fit_method="cheapest", lqer_rank=4)]
    study += [dict(gptq_embed=False)] if h.gptq_embed else []
    labelled = {" ".join(f"{k.upper()}={v}" for k, v in settings.items()): settings for settings in study}
    picked = [w.strip() for w in os.environ.get("STUDY", "").split(";") if w.strip()] or list(labelled)
    if unknown := [w for w in picked if w not in labelled]:
        sys.exit(f"STUDY: unknown variant(s) {unknown}; expected some of {list(labelled)}")
    return [(label, labelled[label]) for label in picked]
def capture_train(model, routes, evaluator, h, rt, log):
    picked_variants(h)  # a misspelt STUDY stops here, before the training
    seen.update(model=model, routes=routes, evaluator=evaluator, h=h, log=log)
    seen["export"] = train(model, routes, evaluator, h, rt, log)
    _, seen["pre"], ms = evaluator.score(True)
    log(f"study prequant_sliding_bpb:{seen['pre']:.5f} eval_ms:{ms:.0f}")
    return seen["export"]
def variants(log_, evaluator, h_):
    final_scores(log_, evaluator, h_)
    h, log, model, ev, routes = seen["h"], seen["log"], seen["model"], seen["evaluator"], seen["routes"]
    export = seen["export"]
    state, formats, hessians = {k: v.clone() for k, v in export.state.items()}, export.formats, export.hessians  # on the CPU the state shares the model's storage, which each variant reloads
    code = tg.CODE_BYTES
    device = "cuda" if tg.torch.cuda.is_available() else "cpu"
    for label, settings in picked_variants(h):
        hm = dataclasses.replace(h, **settings)
        hm.validate()
        t0 = time.time()
        f = {name: tg.export_format(hm, routes[name], t.numel(), tg.block_of(name)) for name, t in state.items()}
        q = tg.quantize_state({k: v.to(device) for k, v in state.items()}, f, hm, hessians)
        s, f, q = (state, f, q) if not hm.lqer_rank else tg.with_low_rank_corrections(
            state, f, q, hessians, [n for n in q if tg.ROUTES[routes[n]][1] in ("attn", "mlp")], hm)
        tq = time.time() - t0
        moves = []
        if hm.fit_method == "cheapest":
            s, f, q, moves = tg.cheapest_whole_moves(s, f, q, tg.model_settings(hm), hessians, h.target_bytes - code)
        blob, zeroed = tg.fit_to_budget(s, f, q, tg.model_settings(hm), hessians, h.target_bytes - code)
        tf = time.time() - t0 - tq
        loaded, _ = tg.unpack_artifact(tg.zstandard.ZstdDecompressor().decompress(blob))
        model.load_state_dict(loaded)
        _, flat, _ = ev.score(False)
        _, slide, _ = ev.score(True)
        log(f"study {label} int{h.attn_bits}/{h.mlp_bits}: artifact:{len(blob)} total:{len(blob) + code} zeroed:{zeroed} moves:{len(moves)} "
            f"quantize_s:{tq:.1f} fit_s:{tf:.1f} roundtrip_nonoverlap_bpb:{flat:.5f} roundtrip_sliding_bpb:{slide:.5f} gap_sliding:{slide - seen['pre']:+.5f}")
tg.train, tg.log_final_scores = capture_train, variants
tg.main()
