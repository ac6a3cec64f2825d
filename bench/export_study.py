"""Export study (bench/RESULTS.md, "The export"): the normal run of train_gpt.py with its settings from the environment, then the
same post-average checkpoint exported with GPTQ-lite and round to nearest; bytes and sliding-window quantization gaps.

    DATA_PATH=... TOKENIZER_PATH=... <proxy settings> python3 bench/export_study.py
"""
import dataclasses, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_gpt as tg
seen = {}
train, final_scores = tg.train, tg.log_final_scores
def capture_train(model, routes, evaluator, h, rt, log):
    seen.update(model=model, routes=routes, evaluator=evaluator, h=h, log=log)
    seen["export"] = train(model, routes, evaluator, h, rt, log)
    _, seen["pre"], ms = evaluator.score(True)
    log(f"study prequant_sliding_bpb:{seen['pre']:.5f} eval_ms:{ms:.0f}")
    return seen["export"]
def variants(log_, evaluator, h_):
    final_scores(log_, evaluator, h_)
    h, log, model, ev, routes = seen["h"], seen["log"], seen["model"], seen["evaluator"], seen["routes"]
    export = seen["export"]
    state, formats, hessians = export.state, export.formats, export.hessians
    code = tg.CODE_BYTES
    for method in ("gptq_lite", "rtn"):
        hm = dataclasses.replace(h, quant_method=method)
        t0 = time.time(); q = tg.quantize_state({k: v.cuda() for k, v in state.items()}, formats, hm, hessians); tq = time.time() - t0
        blob, zeroed = tg.fit_to_budget(state, formats, q, tg.model_settings(hm), hessians, h.target_bytes - code)
        loaded, _ = tg.unpack_artifact(tg.zstandard.ZstdDecompressor().decompress(blob))
        model.load_state_dict(loaded)
        _, flat, _ = ev.score(False)
        _, slide, _ = ev.score(True)
        log(f"study {method} int{h.attn_bits}/{h.mlp_bits}: artifact:{len(blob)} total:{len(blob) + code} zeroed:{zeroed} "
            f"quantize_s:{tq:.1f} roundtrip_nonoverlap_bpb:{flat:.5f} roundtrip_sliding_bpb:{slide:.5f} gap_sliding:{slide - seen['pre']:+.5f}")
tg.train, tg.log_final_scores = capture_train, variants
tg.main()
