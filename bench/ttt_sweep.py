"""Test-time-training arms on one saved artifact, in one process: the artifact is read back and scored once
(round trip and sliding window, as a re-score with TTT_MODE=off), then each ARM's TTT pass runs on the same
loaded model, from the artifact's weights each time. One line per arm, after the usual log:

    DATA_PATH=... TOKENIZER_PATH=... EVAL_ARTIFACT=logs/<RUN_ID>.model.zst EVAL_SEQ_LEN=2048 EVAL_STRIDE=64 \\
        python3 bench/ttt_sweep.py defaults TTT_CHUNK=128 "TTT_EPOCHS=2 TTT_LR=0.002"

    sweep TTT_CHUNK=128: final_ttt_exact val_loss:X val_bpb:Y delta:D ttt_ms:T prime_s:P

An arm is `defaults` (the script's TTT settings) or space-separated TTT_* settings on top of them; D is the
arm's val_bpb minus the sliding window's. Each arm gives the `final_ttt_exact` that a re-score with its
settings (EVAL_ARTIFACT, one process) logs. TTT settings belong in the arms, not the environment; every arm
is checked before the artifact is read. Under torchrun the arms run on every rank, as a re-score does.
"""
import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

TTT_FIELDS = ("ttt_mode",) + tg.TTT_SETTINGS


def parse_arms(specs: list[str], environ) -> list[tuple[str, tg.Hyperparameters]]:
    """(label, the settings the arm's TTT pass reads) for each spec; a bad spec raises ConfigError."""
    if not specs:
        raise tg.ConfigError("expected at least one arm: `defaults` or TTT_* settings, e.g. TTT_CHUNK=128")
    if not environ.get("EVAL_ARTIFACT"):
        raise tg.ConfigError("EVAL_ARTIFACT: expected the artifact whose TTT arms to score (logs/<RUN_ID>.model.zst)")
    given = sorted(k for k in environ if k.startswith("TTT_"))
    if given:
        raise tg.ConfigError(f"{given[0]} in the environment: TTT settings go in the arms")
    arms = []
    for spec in specs:
        pairs = [] if spec == "defaults" else [kv.split("=", 1) for kv in spec.split()]
        for pair in pairs:
            if len(pair) != 2 or not pair[0].startswith("TTT_"):
                raise tg.ConfigError(f"arm {spec!r}: expected `defaults` or TTT_*=VALUE settings, e.g. TTT_CHUNK=128")
        try:
            arm = tg.Hyperparameters.from_env(dict(environ) | dict(pairs))
        except tg.ConfigError as e:
            raise tg.ConfigError(f"arm {spec!r}: {e}") from None
        if arm.ttt_mode == "off":
            raise tg.ConfigError(f"arm {spec!r}: TTT_MODE=off has no TTT pass (the sweep logs the sliding window's score once)")
        arms.append((spec, arm))
    return arms


def main() -> None:
    arms = parse_arms(sys.argv[1:], os.environ)
    os.environ["TTT_MODE"] = "off"  # the re-score itself: round trip and sliding window only
    final_scores, finite_score, sliding_bpb = tg.log_final_scores, tg.finite_score, []

    def recording_finite_score(evaluator, sliding, documents=None):
        result = finite_score(evaluator, sliding, documents)
        if sliding:
            sliding_bpb.append(result[1])
        return result

    def with_arms(log, evaluator, h):
        final_scores(log, evaluator, h)
        for label, arm in arms:
            torch._dynamo.reset()  # each arm compiles its own graphs, with no recompile limit reached by the earlier arms
            arm_evaluator = copy.copy(evaluator)
            arm_evaluator.h = tg.replace(h, **{name: getattr(arm, name) for name in TTT_FIELDS})
            ttt = tg.TestTimeTraining(arm_evaluator)
            primed = ttt.prime()
            loss, bpb, ms, _ = ttt.run()
            log(f"sweep {label}: final_ttt_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f} delta:{bpb - sliding_bpb[-1]:+.5f} "
                f"ttt_ms:{ms:.0f} prime_s:{primed:.1f}")

    tg.finite_score, tg.log_final_scores = recording_finite_score, with_arms
    tg.main()


if __name__ == "__main__":
    try:
        main()
    except tg.RunError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
