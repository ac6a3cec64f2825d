"""Export study (bench/RESULTS.md, "The export"): the normal run of train_gpt.py with its settings from the environment, then the
same post-average checkpoint exported with the export settings of docs/EXPORT.md and the embeddings' other widths;
bytes and sliding-window quantization gaps.

    DATA_PATH=... TOKENIZER_PATH=... <proxy settings> [STUDY="LQER_RANK=4;EMBED_BITS=7"] python3 bench/export_study.py

STUDY picks variants by their labels (as the log prints them, separated by ';'), run in that order; unset, all.
STUDY_SAVE=<file> also saves the checkpoint, its Hessians and its score before quantization after the training;
STUDY_LOAD=<file> then studies that checkpoint instead of training, in a run that re-scores the saved run's artifact,
so that the variants can be spread over several runs:

    EVAL_ARTIFACT=logs/<run>.model.zst STUDY_LOAD=<file> DATA_PATH=... TOKENIZER_PATH=... [STUDY=...] python3 bench/export_study.py
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
        raise tg.ConfigError(f"STUDY: unknown variant(s) {unknown}; expected some of {list(labelled)}")
    return [(label, labelled[label]) for label in picked]
def check_study_files(environ) -> None:
    """STUDY_LOAD goes with EVAL_ARTIFACT and an existing file, STUDY_SAVE with a training run; checked before anything runs."""
    save, load, artifact = (environ.get(k) for k in ("STUDY_SAVE", "STUDY_LOAD", "EVAL_ARTIFACT"))
    if load and save:
        raise tg.ConfigError("STUDY_LOAD and STUDY_SAVE: a run either saves a checkpoint (training) or studies a saved one")
    if load and not artifact:
        raise tg.ConfigError(f"STUDY_LOAD={load}: expected EVAL_ARTIFACT too (the artifact of the run that saved it)")
    if load and not os.path.isfile(load):
        raise tg.ConfigError(f"STUDY_LOAD={load}: no such file (STUDY_SAVE=<file> writes it)")
    if save and artifact:
        raise tg.ConfigError(f"STUDY_SAVE={save}: a re-scoring run (EVAL_ARTIFACT) has no checkpoint to save")
def capture_train(model, routes, evaluator, h, rt, log):
    seen.update(model=model, routes=routes, evaluator=evaluator, h=h, log=log)
    export = train(model, routes, evaluator, h, rt, log)
    # the weights now: on the CPU the export's state shares the model's storage, into which the artifact is loaded next
    seen["export"] = export = dataclasses.replace(export, state={k: v.clone() for k, v in export.state.items()})
    _, seen["pre"], ms = evaluator.score(True)
    log(f"study prequant_sliding_bpb:{seen['pre']:.5f} eval_ms:{ms:.0f}")
    if path := os.environ.get("STUDY_SAVE"):
        tg.torch.save(dict(state=export.state, formats=export.formats,
                           hessians=export.hessians, pre=seen["pre"], model=tg.model_settings(h)), path + ".part")
        os.replace(path + ".part", path)
        log(f"study checkpoint: {path}")
    return export
def load_checkpoint(path, log, evaluator, h) -> None:
    """A re-scoring run: the saved checkpoint, studied on this run's model (built from the artifact's settings)."""
    try:
        saved = tg.torch.load(path, weights_only=False)
        state, formats, hessians, pre, settings = (saved[k] for k in ("state", "formats", "hessians", "pre", "model"))
    except Exception as e:
        raise tg.DataError(f"STUDY_LOAD={path}: expected a checkpoint written by STUDY_SAVE ({type(e).__name__}: {e})") from None
    if settings != tg.model_settings(h):
        raise tg.ConfigError(f"STUDY_LOAD={path}: saved from another model than {h.eval_artifact}")
    seen.update(h=h, log=log, model=evaluator.model, evaluator=evaluator, routes=tg.route_parameters(evaluator.model),
                pre=pre, export=tg.Export(state, formats, {}, hessians))
    log(f"study checkpoint: {path} prequant_sliding_bpb:{pre:.5f}")
def variants(log_, evaluator, h_):
    final_scores(log_, evaluator, h_)
    if path := os.environ.get("STUDY_LOAD"):
        load_checkpoint(path, log_, evaluator, h_)
    h, log, model, ev, routes = seen["h"], seen["log"], seen["model"], seen["evaluator"], seen["routes"]
    export = seen["export"]
    state, hessians = export.state, export.hessians
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
if __name__ == "__main__":
    try:
        check_study_files(os.environ)
        picked_variants(tg.Hyperparameters.from_env(os.environ))  # a misspelt STUDY stops here, before anything runs
        tg.train, tg.log_final_scores = capture_train, variants
        tg.main()
    except tg.RunError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
