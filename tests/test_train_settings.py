"""Settings: environment parsing, typo detection, the record scripts' spellings."""
import dataclasses
import re

import pytest

import train_gpt as tg

RECORD_1271 = ("NUM_LAYERS=11 BIGRAM_VOCAB_SIZE=2048 XSA_LAST_N=4 EMA_ENABLED=1 EMA_DECAY=0.997 SWA_ENABLED=0 "
               "MUON_WD=0.04 ADAM_WD=0.04 MATRIX_LR=0.025 SCALAR_LR=0.025 TIED_EMBED_LR=0.035 MUON_MOMENTUM=0.99 "
               "MUON_MOMENTUM_WARMUP_START=0.92 MUON_MOMENTUM_WARMUP_STEPS=1500 WARMDOWN_ITERS=3000 ITERATIONS=9000 "
               "MAX_WALLCLOCK_SECONDS=600 EVAL_STRIDE=64")


def env(line: str) -> dict:
    return dict(item.split("=", 1) for item in line.split())


def test_defaults_are_the_1_1271_record_run():
    h = tg.Hyperparameters()
    assert (h.num_layers, h.xsa_last_n, h.weight_avg, h.ema_decay, h.bigram_vocab_size, h.bigram_dim) == (11, 4, "ema", 0.997, 2048, 128)
    assert (h.matrix_lr, h.muon_momentum_warmup_start, h.muon_momentum, h.muon_momentum_warmup_steps) == (0.025, 0.92, 0.99, 1500)
    assert (h.muon_wd, h.adam_wd, h.tied_embed_lr, h.scalar_lr, h.warmdown_iters) == (0.04, 0.04, 0.035, 0.025, 3000)
    assert (h.max_wallclock_seconds, h.eval_stride, h.train_batch_tokens, h.train_seq_len) == (600, 64, 786432, 2048)


def test_record_environment_lines_mean_what_they_meant():
    assert tg.Hyperparameters.from_env(env(RECORD_1271)) == tg.Hyperparameters()
    h = tg.Hyperparameters.from_env(env("SWA_ENABLED=1 SWA_EVERY=120 XSA_LAST_N=3"))
    assert (h.weight_avg, h.swa_every, h.xsa_last_n) == ("swa", 120, 3)
    assert tg.Hyperparameters.from_env(env("EMA_ENABLED=0")).weight_avg == "none"


@pytest.mark.parametrize("line, message", [
    ("XSA_LAST=4", "unknown setting XSA_LAST: did you mean XSA_LAST_N?"),
    ("MATRX_LR=0.02", "did you mean MATRIX_LR?"),
    ("MUON_NESTEROV=0", "unknown setting MUON_NESTEROV: no setting has that name"),
    ("TTT_ENABLED=1", "unknown setting TTT_ENABLED"),
    ("EMA_ENABLED=1 SWA_ENABLED=1", "only one average can be exported"),
    ("WEIGHT_AVG=swa EMA_ENABLED=1", "WEIGHT_AVG=swa contradicts EMA_ENABLED=1"),
    ("LEAKY_RELU=1", "use MLP_ACT=leaky_relu2"),
    ("TIE_EMBEDDINGS=0", "embeddings are always tied"),
    ("NUM_LAYERS=eleven", "NUM_LAYERS='eleven': expected an integer"),
    ("MLP_ACT=gelu", "MLP_ACT='gelu': expected one of relu2, leaky_relu2"),
    ("XSA_LAST_N=12", "XSA_LAST_N=12: expected 0..NUM_LAYERS=11"),
    ("NUM_HEADS=6", "MODEL_DIM=512 is not a multiple of NUM_HEADS=6"),
    ("VE_LAYERS=9,x", "expected comma-separated layer numbers"),
    ("EVAL_STRIDE=0", "EVAL_STRIDE=0: expected 1..EVAL_SEQ_LEN=2048"),
])
def test_bad_settings_stop_with_a_clear_message(line, message):
    with pytest.raises(tg.ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        tg.Hyperparameters.from_env(env(line))


def test_unrelated_environment_variables_are_ignored():
    unrelated = env("PATH=/bin HOME=/root MAX_JOBS=4 LOCAL_RANK=0 WORLD_SIZE=8 RANK=0 MASTER_PORT=29500 "
                    "OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=0 TORCHELASTIC_RUN_ID=x NCCL_DEBUG=INFO DATA_DIR=/d")
    assert tg.Hyperparameters.from_env(unrelated) == tg.Hyperparameters()


def test_values_parse():
    h = tg.Hyperparameters.from_env(env("TRAIN_BATCH_TOKENS=786_432 ITERATIONS=1e3 LN_SCALE=true ROPE_BASE=1e4"))
    assert (h.train_batch_tokens, h.iterations, h.ln_scale, h.rope_base) == (786432, 1000, True, 10000.0)
    assert h.from_environment == {"train_batch_tokens", "iterations", "ln_scale", "rope_base"}


def test_readme_settings_table_is_current():
    import dataclasses
    import readme_settings
    readme = (readme_settings.REPO / "README.md").read_text()
    assert readme == readme_settings.readme_with_table(readme), "run: python tests/readme_settings.py"
    for f in dataclasses.fields(tg.Hyperparameters):
        assert f"| `{f.name.upper()}` |" in readme, f.name


def test_without_settings_keeps_only_what_the_script_ignores():
    environ = env("PATH=/bin MAX_JOBS=4 XSA_LAST_N=3 XSA_LAST=4 TTT_ENABLED=1 EMA_ENABLED=1 TIE_EMBEDDINGS=1 MUON_FOO=2")
    assert tg.without_settings(environ) == {"PATH": "/bin", "MAX_JOBS": "4"}
    assert tg.Hyperparameters.from_env(tg.without_settings(environ)) == tg.Hyperparameters()


# ---- ranges: every number has one, every float is finite

@pytest.mark.parametrize("line, message", [
    ("NUM_HEADS=0", "NUM_HEADS=0: expected a positive number"),
    ("NUM_KV_HEADS=0", "NUM_KV_HEADS=0: expected a positive number"),
    ("MODEL_DIM=0", "MODEL_DIM=0: expected a positive number"),
    ("MODEL_DIM=-8", "MODEL_DIM=-8: expected a positive number"),
    ("VOCAB_SIZE=0", "VOCAB_SIZE=0: expected a positive number"),
    ("BIGRAM_DIM=0", "BIGRAM_DIM=0: expected a positive number"),
    ("VE_DIM=0", "VE_DIM=0: expected a positive number"),
    ("MUON_BACKEND_STEPS=0", "MUON_BACKEND_STEPS=0: expected a positive number"),
    ("MLP_MULT=0", "MLP_MULT=0.0: expected a number > 0"),
    ("MLP_MULT=-1", "MLP_MULT=-1.0: expected a number > 0"),
    ("MLP_MULT=0.001", "MLP_MULT=0.001: expected MLP_MULT * MODEL_DIM >= 1"),
    ("LOGIT_SOFTCAP=0", "LOGIT_SOFTCAP=0.0: expected a number > 0"),
    ("ROPE_BASE=0", "ROPE_BASE=0.0: expected a number > 0"),
    ("ADAM_EPS=0", "ADAM_EPS=0.0: expected a number > 0"),
    ("GPTQ_DAMP=-1", "GPTQ_DAMP=-1.0: expected a number > 0"),
    ("GPTQ_DAMP=0", "GPTQ_DAMP=0.0: expected a number > 0"),
    ("SEED=-1", "SEED=-1: expected 0 <= seed < 2**63"),
    ("SEED=1e30", "SEED=1000000000000000019884624838656: expected 0 <= seed < 2**63"),
    ("SEED=9223372036854775808", "SEED=9223372036854775808: expected 0 <= seed < 2**63"),
    ("GRAD_ACCUM_STEPS=-1", "GRAD_ACCUM_STEPS=-1: expected a number >= 0 (0 = 8 // world size)"),
    ("WARMUP_STEPS=-1", "WARMUP_STEPS=-1: expected a number >= 0"),
    ("WARMDOWN_ITERS=-3", "WARMDOWN_ITERS=-3: expected a number >= 0"),
    ("MUON_MOMENTUM_WARMUP_STEPS=-1", "MUON_MOMENTUM_WARMUP_STEPS=-1: expected a number >= 0"),
    ("VAL_LOSS_EVERY=-1", "VAL_LOSS_EVERY=-1: expected a number >= 0"),
    ("MAX_WALLCLOCK_SECONDS=-1", "MAX_WALLCLOCK_SECONDS=-1.0: expected a number >= 0 (0 = no cap)"),
    ("GRAD_CLIP_NORM=-0.1", "GRAD_CLIP_NORM=-0.1: expected a number >= 0"),
    ("MATRIX_LR=-1", "MATRIX_LR=-1.0: expected a number >= 0"),
    ("SCALAR_LR=-1", "SCALAR_LR=-1.0: expected a number >= 0"),
    ("TIED_EMBED_LR=-1", "TIED_EMBED_LR=-1.0: expected a number >= 0"),
    ("MUON_WD=-0.1", "MUON_WD=-0.1: expected a number >= 0"),
    ("ADAM_WD=-0.1", "ADAM_WD=-0.1: expected a number >= 0"),
    ("TIED_EMBED_INIT_STD=-1", "TIED_EMBED_INIT_STD=-1.0: expected a number >= 0"),
    ("MUON_MOMENTUM=1", "MUON_MOMENTUM=1.0: expected 0 <= value < 1"),
    ("MUON_MOMENTUM_WARMUP_START=-0.1", "MUON_MOMENTUM_WARMUP_START=-0.1: expected 0 <= value < 1"),
    ("BETA1=1", "BETA1=1.0: expected 0 <= value < 1"),
    ("BETA2=-0.5", "BETA2=-0.5: expected 0 <= value < 1"),
    ("SWA_THRESHOLD=1.5", "SWA_THRESHOLD=1.5: expected 0 <= value <= 1"),
    ("LATE_QAT_THRESHOLD=-0.1", "LATE_QAT_THRESHOLD=-0.1: expected 0 <= value <= 1"),
    ("TARGET_BYTES=0", "TARGET_BYTES=0: expected 1..16000000"),
    ("TARGET_BYTES=16000001", "TARGET_BYTES=16000001: expected 1..16000000"),
    ("MATRIX_LR=nan", "MATRIX_LR=nan: expected a finite number"),
    ("ROPE_BASE=inf", "ROPE_BASE=inf: expected a finite number"),
    ("MAX_WALLCLOCK_SECONDS=inf", "MAX_WALLCLOCK_SECONDS=inf: expected a finite number"),
    ("EMA_DECAY=nan", "EMA_DECAY=nan: expected a finite number"),
    ("QK_GAIN_INIT=-inf", "QK_GAIN_INIT=-inf: expected a finite number"),
    ("ITERATIONS=inf", "ITERATIONS='inf': expected an integer"),
])
def test_numbers_out_of_range_stop_with_one_line(line, message):
    with pytest.raises(tg.ConfigError, match="^" + re.escape(message)):
        tg.Hyperparameters.from_env(env(line))


def test_every_float_setting_must_be_finite():
    for f in dataclasses.fields(tg.Hyperparameters):
        if f.type == "float":
            for value in ("nan", "inf", "-inf"):
                with pytest.raises(tg.ConfigError, match=f"^{f.name.upper()}={value}: expected a finite number"):
                    tg.Hyperparameters.from_env({f.name.upper(): value})


def test_boundary_values_are_accepted():
    h = tg.Hyperparameters.from_env(env("SEED=0 MAX_WALLCLOCK_SECONDS=0 WARMDOWN_ITERS=0 WARMUP_STEPS=0 GRAD_CLIP_NORM=0 "
                                        "MATRIX_LR=0 MUON_WD=0 MUON_MOMENTUM=0 BETA1=0 SWA_THRESHOLD=1 LATE_QAT_THRESHOLD=1 "
                                        "TARGET_BYTES=16000000 MUON_BACKEND_STEPS=1 VAL_LOSS_EVERY=0 TIED_EMBED_INIT_STD=0"))
    assert (h.seed, h.max_wallclock_seconds, h.target_bytes, h.late_qat_threshold) == (0, 0, 16_000_000, 1)
    assert tg.Hyperparameters.from_env({"SEED": str(2**63 - 1)}).seed == 2**63 - 1  # exact, not through a float


# ---- through the script: one `error:` line, exit status 2, nothing started

def assert_one_line_error(result, text):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], result.stderr


@pytest.mark.parametrize("settings, text", [
    ({"NUM_HEADS": "0"}, "error: NUM_HEADS=0: expected a positive number"),
    ({"SEED": "1e30"}, "expected 0 <= seed < 2**63"),
    ({"MAX_WALLCLOCK_SECONDS": "-1"}, "error: MAX_WALLCLOCK_SECONDS=-1.0: expected a number >= 0 (0 = no cap)"),
])
def test_the_script_refuses_bad_settings_in_one_line(run, settings, text):
    result = run(RUN_ID="bad", **settings)
    assert_one_line_error(result, text)
    assert not (run.cwd / "logs").exists()
