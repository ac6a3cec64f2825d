"""Settings: environment parsing, typo detection, the record scripts' spellings."""
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
