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


def test_the_defaults_that_differ_from_the_record_are_the_ones_the_docstring_names():
    h, doc = tg.Hyperparameters(), tg.Hyperparameters.__doc__
    differ = {"LOGIT_SOFTCAP": (h.logit_softcap, 20.0, "20"), "QK_GAIN_INIT": (h.qk_gain_init, 4.0, "4.0"),
              "RESIDUAL_DTYPE": (h.residual_dtype, "bf16", "bf16"), "PARALLEL_RESID_START": (h.parallel_resid_start, 7, "7")}
    for name, (value, expected, written) in differ.items():
        assert value == expected and f"{name} {written}" in doc
    assert (h.quant_method, h.attn_bits, h.mlp_bits) == ("gptq", 5, 5) and "GPTQ with int5 block matrices" in doc
    assert h.rope_base == round(10000 * 2 ** (64 / 62)) and "ROPE_BASE" in doc  # 1024-trained rotary NTK-scaled to 2048


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
                    "OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=0 TORCHELASTIC_RUN_ID=x NCCL_DEBUG=INFO")
    assert tg.Hyperparameters.from_env(unrelated) == tg.Hyperparameters()


def test_values_parse():
    h = tg.Hyperparameters.from_env(env("TRAIN_BATCH_TOKENS=786_432 ITERATIONS=1e3 LN_SCALE=true ROPE_BASE=1e4"))
    assert (h.train_batch_tokens, h.iterations, h.ln_scale, h.rope_base) == (786432, 1000, True, 10000.0)
    assert h.from_environment == {"train_batch_tokens", "iterations", "ln_scale", "rope_base"}


def test_the_settings_tables_are_current():
    import dataclasses
    import readme_settings
    for path, text in readme_settings.current().items():
        assert path.read_text() == text, f"{path.name}: run python tests/readme_settings.py"
    readme, doc = readme_settings.README.read_text(), readme_settings.SETTINGS_DOC.read_text()
    for f in dataclasses.fields(tg.Hyperparameters):
        assert f"| `{f.name.upper()}` | `{f.default}` |" in doc or f"| `{f.name.upper()}` | \"\" |" in doc, f.name
        assert f"`{f.name.upper()}`=" in readme, f.name


def test_without_settings_keeps_only_what_the_script_ignores():
    environ = env("PATH=/bin MAX_JOBS=4 XSA_LAST_N=3 XSA_LAST=4 TTT_ENABLED=1 EMA_ENABLED=1 TIE_EMBEDDINGS=1 MUON_FOO=2")
    assert tg.without_settings(environ) == {"PATH": "/bin", "MAX_JOBS": "4"}
    assert tg.Hyperparameters.from_env(tg.without_settings(environ)) == tg.Hyperparameters()


# ---- the name rule (docs/SETTINGS.md): refused with the nearest setting named, or passed untouched

@pytest.mark.parametrize("name, message", [
    ("GRAD_CLIP", "did you mean GRAD_CLIP_NORM?"),
    ("MAX_WALLCLOCK", "did you mean MAX_WALLCLOCK_SECONDS?"),
    ("WEIGHT_DECAY", "use MUON_WD (Muon) and ADAM_WD (AdamW)"),
    ("WD", "use MUON_WD (Muon) and ADAM_WD (AdamW)"),
    ("NUM_KV", "did you mean NUM_KV_HEADS?"),
    ("RUN_NAME", "use RUN_ID"),
    ("COMPILE_MODE", "the nearest is COMPILE "),
    ("WARMUP", "did you mean WARMUP_STEPS?"),
    ("MAX_STEPS", "use ITERATIONS"),
    ("LR", "use MATRIX_LR (Muon, block matrices), SCALAR_LR or TIED_EMBED_LR (AdamW)"),
    ("TOKENIZER", "did you mean TOKENIZER_PATH?"),
    ("EPOCHS", "use ITERATIONS"),
    ("BATCH_SIZE", "use TRAIN_BATCH_TOKENS"),
    ("SEQ_LEN", "use TRAIN_SEQ_LEN (training) or EVAL_SEQ_LEN"),
    ("EMA", "use WEIGHT_AVG=ema (the default) and EMA_DECAY"),
    ("SWA", "use WEIGHT_AVG=swa"),
    ("QAT", "use LATE_QAT_THRESHOLD"),
    ("DATA_DIR", "use DATA_PATH"),
    ("QAT_THRESHOLD", "did you mean LATE_QAT_THRESHOLD?"),
    ("LEARNING_RATE", "use MATRIX_LR"),
    ("MUON_LR", "use MATRIX_LR"),
    ("WARMUP_ITERS", "use WARMUP_STEPS"),
    ("BLOCK_SIZE", "use TRAIN_SEQ_LEN"),
    ("RANDOM_SEED", "the nearest is SEED "),
    ("ADAM_BETA1", "the nearest is BETA1 "),
    ("TIED_EMBED_LRR", "did you mean TIED_EMBED_LR?"),
    ("MUON_MOMENTUM_WARMUP_STEP", "did you mean MUON_MOMENTUM_WARMUP_STEPS?"),
    ("NUM_LAYER", "did you mean NUM_LAYERS?"),
    ("MODEL_DIMS", "did you mean MODEL_DIM?"),
    ("LATE_QAT", "did you mean LATE_QAT_THRESHOLD?"),
    ("EVAL_BATCH", "did you mean EVAL_BATCH_SEQS?"),
    ("BATCH_TOKENS", "did you mean TRAIN_BATCH_TOKENS?"),
    ("TRAIN_TOKENS", "did you mean TRAIN_BATCH_TOKENS?"),
    ("GPTQ_BLOCK", "the nearest is GPTQ_"),
    ("iterations", "iterations is not read: settings are upper case, use ITERATIONS"),
    ("Iterations", "Iterations is not read: settings are upper case, use ITERATIONS"),
    ("matrix_lr", "use MATRIX_LR"),
    ("lr", "as LR: unknown setting LR: use MATRIX_LR"),
    ("grad_clip", "as GRAD_CLIP: unknown setting GRAD_CLIP: did you mean GRAD_CLIP_NORM?"),
    ("ema_enabled", "use EMA_ENABLED"),
])
def test_names_that_look_like_settings_are_refused_naming_the_nearest(name, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.Hyperparameters.from_env({name: "1"})
    assert tg.without_settings({name: "1", "PATH": "/bin"}) == {"PATH": "/bin"}


ORDINARY_ENVIRONMENT = """
PATH HOME USER LOGNAME SHELL LANG LANGUAGE LC_ALL LC_CTYPE LC_NUMERIC TERM TERM_PROGRAM COLORTERM PWD OLDPWD SHLVL _
HOSTNAME HOSTTYPE MAIL EDITOR VISUAL PAGER LESS LESSOPEN LS_COLORS TZ TMPDIR DISPLAY WAYLAND_DISPLAY COLUMNS LINES
DBUS_SESSION_BUS_ADDRESS XDG_RUNTIME_DIR XDG_SESSION_ID XDG_DATA_DIRS XDG_CONFIG_DIRS XDG_CACHE_HOME
SSH_AUTH_SOCK SSH_CLIENT SSH_CONNECTION SSH_TTY GPG_TTY TMUX TMUX_PANE STY MANPATH INFOPATH MODULEPATH
LD_LIBRARY_PATH LIBRARY_PATH CPATH PKG_CONFIG_PATH CC CXX CFLAGS LDFLAGS MAKEFLAGS MAX_JOBS CMAKE_BUILD_PARALLEL_LEVEL
CUDA_HOME CUDA_PATH CUDA_VISIBLE_DEVICES CUDA_DEVICE_ORDER CUDA_LAUNCH_BLOCKING CUDA_DEVICE_MAX_CONNECTIONS
CUDA_VERSION CUDA_MODULE_LOADING CUBLAS_WORKSPACE_CONFIG CUDNN_VERSION NVIDIA_VISIBLE_DEVICES
NVIDIA_DRIVER_CAPABILITIES NVIDIA_REQUIRE_CUDA NV_CUDA_CUDART_VERSION NV_LIBCUBLAS_VERSION NVARCH NVTE_FLASH_ATTN
NCCL_DEBUG NCCL_DEBUG_SUBSYS NCCL_IB_DISABLE NCCL_P2P_LEVEL NCCL_SOCKET_IFNAME NCCL_NVLS_ENABLE NCCL_ALGO
NCCL_MAX_NCHANNELS NCCL_MIN_NCHANNELS NCCL_BUFFSIZE NCCL_TIMEOUT NCCL_VERSION NCCL_CUMEM_ENABLE
TORCH_HOME TORCH_LOGS TORCH_COMPILE_DEBUG TORCH_CUDA_ARCH_LIST TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_BLOCKING_WAIT
TORCH_DISTRIBUTED_DEBUG TORCH_SHOW_CPP_STACKTRACES TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_COMPILE_MODE
TORCHINDUCTOR_CACHE_DIR TORCHINDUCTOR_MAX_AUTOTUNE TORCHINDUCTOR_COMPILE_THREADS TORCHINDUCTOR_FX_GRAPH_CACHE
TORCHDYNAMO_VERBOSE PYTORCH_CUDA_ALLOC_CONF PYTORCH_NVML_BASED_CUDA_CHECK TRITON_CACHE_DIR TRITON_HOME
TORCHELASTIC_RUN_ID TORCHELASTIC_RESTART_COUNT TORCHELASTIC_MAX_RESTARTS TORCHELASTIC_USE_AGENT_STORE
TORCHELASTIC_ERROR_FILE TORCHELASTIC_ENABLE_FILE_TIMER TORCHELASTIC_HEALTH_CHECK_PORT
RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK ROLE_WORLD_SIZE ROLE_NAME
MASTER_ADDR MASTER_PORT OMP_NUM_THREADS OMP_PROC_BIND OMP_PLACES KMP_AFFINITY KMP_BLOCKTIME MKL_NUM_THREADS
MKL_THREADING_LAYER OPENBLAS_NUM_THREADS PYTHONPATH PYTHONHASHSEED PYTHONUNBUFFERED PYTHONDONTWRITEBYTECODE
PYTHONWARNINGS PYTHONFAULTHANDLER PYTHON_VERSION PYTHONSTARTUP PYENV_ROOT PIP_CACHE_DIR PIP_NO_CACHE_DIR
PIP_INDEX_URL VIRTUAL_ENV VIRTUAL_ENV_PROMPT CONDA_PREFIX CONDA_DEFAULT_ENV CONDA_EXE CONDA_SHLVL
CONDA_PYTHON_EXE CONDA_PROMPT_MODIFIER MAMBA_ROOT_PREFIX _CE_M _CE_CONDA
HF_HOME HF_TOKEN HF_ENDPOINT HF_HUB_CACHE HF_DATASETS_CACHE HF_HUB_ENABLE_HF_TRANSFER HF_HUB_OFFLINE
TRANSFORMERS_CACHE TOKENIZERS_PARALLELISM WANDB_API_KEY WANDB_PROJECT WANDB_RUN_NAME WANDB_MODE MLFLOW_TRACKING_URI
SLURM_JOB_ID SLURM_JOB_NAME SLURM_JOB_NUM_NODES SLURM_NTASKS SLURM_PROCID SLURM_LOCALID SLURM_NODEID
SLURM_CPUS_PER_TASK SLURM_STEP_NUM_TASKS SLURM_STEP_ID SLURM_ARRAY_TASK_ID SLURM_SUBMIT_DIR SLURM_GPUS_PER_NODE
PMI_RANK PMI_SIZE PMIX_RANK PMIX_NAMESPACE OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE OMPI_COMM_WORLD_LOCAL_RANK
OMPI_MCA_btl I_MPI_PIN_DOMAIN MV2_ENABLE_AFFINITY FI_PROVIDER FI_EFA_USE_DEVICE_RDMA UCX_TLS
KUBERNETES_SERVICE_HOST KUBERNETES_SERVICE_PORT KUBERNETES_PORT KUBERNETES_PORT_443_TCP_ADDR
AWS_REGION AWS_DEFAULT_REGION AWS_BATCH_JOB_ID SM_MODEL_DIR SM_NUM_GPUS SM_CHANNEL_TRAIN SAGEMAKER_REGION
AZ_BATCH_NODE_ID AZ_BATCH_TASK_ID AZUREML_RUN_ID GOOGLE_APPLICATION_CREDENTIALS CLOUDSDK_CORE_PROJECT
BATCH_TASK_INDEX BATCH_TASK_COUNT BATCH_HOSTS_FILE LSB_JOBID PBS_JOBID SGE_TASK_ID
GITHUB_ACTIONS GITHUB_TOKEN GITHUB_WORKSPACE RUNNER_OS RUNNER_TEMP CI GITLAB_CI BUILDKITE_BUILD_ID ACT ARTIFACT_DIR
DOCKER_HOST DOCKER_BUILDKIT JUPYTER_PATH JPY_PARENT_PID VSCODE_PID SINGULARITY_NAME APPTAINER_NAME
JAVA_HOME GOPATH GOROOT CGO_ENABLED CARGO_HOME RUSTUP_HOME RUST_LOG RUST_BACKTRACE NODE_OPTIONS NVM_DIR
HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy all_proxy npm_config_cache container
REQUESTS_CA_BUNDLE SSL_CERT_FILE SSL_CERT_DIR CURL_CA_BUNDLE DEBIAN_FRONTEND GDK_BACKEND QT_SCALE_FACTOR
KERAS_BACKEND MPLBACKEND MPLCONFIGDIR TF_CPP_MIN_LOG_LEVEL XLA_FLAGS JAX_PLATFORMS LOG_LEVEL LOG_DIR
DATA_ROOT MODEL_NAME RUN_DIR NUM_WORKERS MAX_SIZE SIZE BASE_URL TARGET TARGETARCH START_TIME SECONDS
AB_STEPS IS_SANDBOX CONTAINER_NAME
""".split()


def test_the_environment_of_ordinary_machines_and_launchers_passes():
    environ = {name: "x" for name in ORDINARY_ENVIRONMENT}
    assert {name: tg.setting_problem(name) for name in ORDINARY_ENVIRONMENT if tg.setting_problem(name)} == {}
    assert tg.Hyperparameters.from_env(environ) == tg.Hyperparameters()
    assert tg.without_settings(environ) == environ


def test_this_machines_environment_passes():
    import os
    environ = tg.without_settings(os.environ)
    assert tg.Hyperparameters.from_env(environ) == tg.Hyperparameters()
    settings = tg.setting_names(legacy=True)
    assert {k for k in os.environ if k not in settings} == set(environ), "refused: " + ", ".join(
        f"{k} ({tg.setting_problem(k)})" for k in os.environ if k not in environ and k not in settings)


def test_without_settings_is_exactly_what_from_env_neither_reads_nor_refuses():
    environ = {name: "1" for name in ORDINARY_ENVIRONMENT + ["LR", "iterations", "QAT_THRESHOLD", "ITERATIONS", "DATA_DIR"]}
    kept = tg.without_settings(environ)
    assert set(environ) - set(kept) == {"LR", "iterations", "QAT_THRESHOLD", "ITERATIONS", "DATA_DIR"}
    for name in set(environ) - set(kept):
        if name != "ITERATIONS":
            with pytest.raises(tg.ConfigError):
                tg.Hyperparameters.from_env(kept | {name: "1"})


def test_every_setting_word_is_distinctive_or_listed_as_common():
    words = {w for n in tg.setting_names(legacy=True) for w in tg.name_words(n)}
    assert tg.COMMON_WORDS <= words, tg.COMMON_WORDS - words
    for name in tg.setting_names():  # every setting can be caught by the word rule (a setting with only common words by difflib)
        assert tg.name_words(name) & tg.distinctive_words() or name in ("DATA_PATH", "RUN_ID", "MODEL_DIM")


def test_the_docs_state_the_rule_with_its_word_lists():
    import readme_settings
    docs = (readme_settings.REPO / "docs" / "SETTINGS.md").read_text()
    rule = docs[docs.index("## Which environment variables stop a run"):]
    assert "docs/SETTINGS.md" in (readme_settings.REPO / "README.md").read_text()
    for word in tg.COMMON_WORDS | tg.FOREIGN_PREFIXES | set(tg.ALIASES):
        assert f"`{word}`" in rule, word


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
    ({"MAX_WALLCLOCK": "5"}, "error: unknown setting MAX_WALLCLOCK: did you mean MAX_WALLCLOCK_SECONDS?"),
    ({"iterations": "5"}, "error: iterations is not read: settings are upper case, use ITERATIONS"),
    ({"NUM_HEADS": "0"}, "error: NUM_HEADS=0: expected a positive number"),
    ({"SEED": "1e30"}, "expected 0 <= seed < 2**63"),
    ({"MAX_WALLCLOCK_SECONDS": "-1"}, "error: MAX_WALLCLOCK_SECONDS=-1.0: expected a number >= 0 (0 = no cap)"),
])
def test_the_script_refuses_bad_settings_in_one_line(run, settings, text):
    result = run(RUN_ID="bad", **settings)
    assert_one_line_error(result, text)
    assert not (run.cwd / "logs").exists()


@pytest.mark.parametrize("content", [b"not a model\n", b"", "shard"])
def test_a_tokenizer_that_is_not_sentencepiece_stops_naming_the_file(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    if content == "shard":
        tg.write_shard(path, [1, 2, 3] * 100)
    else:
        path.write_bytes(content)
    with pytest.raises(tg.DataError, match=f"^{re.escape(str(path))}: not a SentencePiece model"):
        tg.build_byte_tables(str(path), 384)


def test_the_script_refuses_a_tokenizer_that_is_not_sentencepiece(run, tiny_corpus):
    shard = sorted(tiny_corpus[0].glob("fineweb_val_*.bin"))[0]
    result = run(RUN_ID="tok", TOKENIZER_PATH=str(shard))
    assert_one_line_error(result, f"error: {shard}: not a SentencePiece model")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_setting_with_default_and_comment_and_starts_nothing(run, flag):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, str(tg.__file__), flag], cwd=run.cwd, capture_output=True, text=True,
                            env={"PATH": "/bin", "LR": "1", "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    for f in dataclasses.fields(tg.Hyperparameters):
        default = int(f.default) if isinstance(f.default, bool) else f.default
        assert any(line.startswith(f"  {f.name.upper()}={default} ") or line == f"  {f.name.upper()}={default}" for line in lines), f.name
    assert any(line.startswith("  MAX_WALLCLOCK_SECONDS=600.0 ") and line.endswith("# training-time cap; 0 = none") for line in lines)
    assert "model shape:" in lines
    assert list(run.cwd.iterdir()) == []  # no logs/, no run


def test_any_other_argument_stops_in_one_line(run):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, str(tg.__file__), "--iterations=5"], cwd=run.cwd, capture_output=True,
                            text=True, env={"PATH": "/bin", "OMP_NUM_THREADS": "1"}, timeout=120)
    assert_one_line_error(result, "error: unexpected argument '--iterations=5': train_gpt.py takes its settings from environment variables only")
    assert list(run.cwd.iterdir()) == []


NAMESPACES = """APPTAINER AWS AZ AZURE AZUREML BUILDKIT BUILDKITE CARGO CI CLOUDSDK COMPOSE CONDA CUBLAS CUDA CUDNN DOCKER
FI GCE GIT GITHUB GITLAB GOOGLE HF HUGGINGFACE HYDRA I JAX JPY JUPYTER KMP KUBERNETES LC LD LSB MAMBA MKL MLFLOW MPI
MV2 NCCL NV NVIDIA NVSHMEM NVTE OMP OMPI OPENBLAS PBS PIP PMI PMIX PYENV PYTORCH RUNNER SAGEMAKER SGE SINGULARITY
SLURM SM SSH TF TOKENIZERS TORCH TORCHDYNAMO TORCHELASTIC TORCHINDUCTOR TRANSFORMERS TRITON UCX VSCODE WANDB XDG
XLA""".split()


def test_other_programs_namespaces_pass_even_with_a_settings_word():
    assert set(NAMESPACES) == tg.FOREIGN_PREFIXES
    for prefix in NAMESPACES + ["PYTHON", "PYTHONX"]:
        name = f"{prefix}_TRAIN_LR_SEED"
        assert tg.setting_problem(name) is None, name
        if not prefix.startswith("PYTHON"):  # the namespace is the whole first word
            assert tg.setting_problem(f"X{name}") is not None and tg.setting_problem(f"{prefix}Q_TRAIN_LR_SEED") is not None, name
