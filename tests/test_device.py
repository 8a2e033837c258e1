"""Devices and precisions: a job given a GPU never quietly runs on the CPU, precisions are applied where they
can be and recorded as used, old configs and checkpoints get the new names, new keys rerun nothing."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from snakemake.utils import validate
from test_finetune import SEQ_LEN, tiny_tied_llama, token_stream, validation_loss

from ffmerge import device
from ffmerge.finetune import LAST_CHECKPOINT, CheckpointError, FinetuneConfig, causal_lm_loss, finetune, lm_batches
from ffmerge.report.tables import device_cell, device_text
from ffmerge.workflow import jobs
from ffmerge.workflow.preflight import ConfigError, check_renamed_keys
from ffmerge.workflow.settings import LATER_DEFAULTS, params_view, setting

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "config.schema.yaml"


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as a GPU job with a broken CUDA would see it: torch.cuda.is_available() is false."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(device._granted, "count", 0)
    monkeypatch.setitem(device._granted, "source", "")
    for key in (*device.SLURM_GPU_ENV, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# ----------------------------------------------------------------------------------------------------------------
# Which device: granted GPUs are used or refused, never replaced by the CPU
# ----------------------------------------------------------------------------------------------------------------


def test_auto_without_a_granted_gpu_is_the_cpu_and_cpu_is_always_honoured(no_gpu):
    assert device.resolve_device("auto") == torch.device("cpu")
    device.grant_gpus({"gpu": 1})
    assert device.resolve_device("cpu") == torch.device("cpu")  # on purpose: allowed even with a GPU granted


def test_a_job_granted_a_gpu_that_torch_cannot_use_fails_naming_the_cpu_only_build(no_gpu):
    no_gpu.setattr(torch.version, "cuda", None)
    assert device.grant_gpus({"gpu": 1, "mem_mb": 1000}) == 1
    with pytest.raises(device.DeviceError) as error:
        device.resolve_device("auto")
    message = str(error.value)
    assert "given 1 GPU(s) (resources gpu=1)" in message and "CPU-only build" in message
    assert "download.pytorch.org/whl" in message and "set device: cpu" in message


def test_hidden_gpus_and_driver_failures_are_told_apart(no_gpu):
    no_gpu.setattr(torch.version, "cuda", "12.8")
    device.grant_gpus({}, environ={"SLURM_GPUS_ON_NODE": "2"})
    no_gpu.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(device.DeviceError) as error:
        device.resolve_device("auto")
    assert "given 2 GPU(s) (SLURM_GPUS_ON_NODE=2)" in str(error.value)
    assert "CUDA_VISIBLE_DEVICES is ''" in str(error.value)

    no_gpu.delenv("CUDA_VISIBLE_DEVICES")

    def failing_init():
        raise RuntimeError("Found no NVIDIA driver on your system")

    no_gpu.setattr(torch.cuda, "init", failing_init)
    with pytest.raises(device.DeviceError) as error:
        device.resolve_device("cuda")
    assert "Found no NVIDIA driver" in str(error.value) and "driver may be older" in str(error.value)
    assert "device: auto or cpu" in str(error.value)


def test_gpus_are_granted_by_the_rule_resource_or_by_slurm(no_gpu):
    assert device.grant_gpus({"gpu": 0, "mem_mb": 100}, environ={}) == 0
    assert device.grant_gpus({}, environ={"SLURM_JOB_GPUS": "0,3"}) == 2
    assert device.granted_gpus() == (2, "SLURM_JOB_GPUS=0,3")
    assert device.grant_gpus({"gpu": 1}, environ={"SLURM_JOB_GPUS": "0,3"}) == 1  # the rule's request first
    assert device.grant_gpus({}, environ={"SLURM_GPUS_ON_NODE": "0"}) == 0
    # the index lists: GPU 0 is one GPU
    assert device.grant_gpus({}, environ={"SLURM_STEP_GPUS": "0"}) == 1
    assert device.granted_gpus() == (1, "SLURM_STEP_GPUS=0")


def test_every_job_script_grants_its_rules_gpu_resource(no_gpu, tmp_path, restore_logging):
    """snakemake_job is what every workflow script enters: a GPU rule's job then refuses a CPU fallback."""
    smk = SimpleNamespace(threads=1, log=[str(tmp_path / "job.log")], resources=SimpleNamespace())
    smk.resources.items = lambda: [("gpu", 1), ("mem_mb", 2000)]
    with jobs.snakemake_job(smk):
        assert device.granted_gpus()[0] == 1
        with pytest.raises(device.DeviceError):
            device.resolve_device("auto")


# ----------------------------------------------------------------------------------------------------------------
# Which precision
# ----------------------------------------------------------------------------------------------------------------


def test_precisions_apply_on_cuda_only_and_bf16_needs_a_gpu_that_has_it(monkeypatch):
    said = []
    assert device.effective_precision(torch.device("cpu"), "bf16", said.append) == "fp32"
    assert said == ["precision bf16 applies on CUDA only; computing in fp32 on cpu"]
    assert device.effective_precision(torch.device("cpu"), "fp32") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        device.effective_precision(torch.device("cpu"), "fp8")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _=None: "Tesla V100-SXM2-32GB")
    cuda = torch.device("cuda")
    assert device.effective_precision(cuda, "fp16") == "fp16"
    with pytest.raises(device.DeviceError, match="Tesla V100-SXM2-32GB has no bfloat16 support; use precision fp16"):
        device.effective_precision(cuda, "bf16")
    assert device.device_record(cuda, "fp16") == {"type": "cuda", "name": "Tesla V100-SXM2-32GB", "precision": "fp16"}


def test_autocast_runs_matmuls_in_the_precision_and_fp32_changes_nothing():
    a = torch.randn(8, 8)
    with device.autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with device.autocast(torch.device("cpu"), "fp32"):
        assert (a @ a).dtype == torch.float32


def test_tables_print_the_device_and_where_training_differs_from_testing():
    cpu = {"type": "cpu", "name": None, "precision": "fp32"}
    gpu = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "precision": "bf16"}
    assert device_text(cpu) == "cpu fp32" and device_text(None) == ""
    assert device_cell({"device": cpu, "finetune": {"device": cpu}}) == "cpu fp32"
    assert device_cell({"device": {**gpu, "precision": "fp32"}, "finetune": {"device": gpu}}) == (
        "cuda (NVIDIA H100 80GB HBM3) bf16 train; cuda (NVIDIA H100 80GB HBM3) fp32 test"
    )
    assert device_cell({"metric": "ppl"}) == ""  # written before devices were recorded


# ----------------------------------------------------------------------------------------------------------------
# Training: precision on a CPU is fp32, old checkpoints resume, the linear decay can end early
# ----------------------------------------------------------------------------------------------------------------


def _train(tmp_path: Path, model: torch.nn.Module | None = None, **changes) -> tuple[torch.nn.Module, FinetuneConfig]:
    model = model or tiny_tied_llama()
    settings = dict(lr=3e-3, max_steps=4, batch_size=2, eval_every=2, checkpoint_every=2, seed=0, device="cpu")
    config = FinetuneConfig(**(settings | changes))
    finetune(
        model,
        loss_fn=causal_lm_loss,
        get_batch=lm_batches(token_stream(4000, 1), batch_size=2, seq_len=SEQ_LEN, seed=0),
        evaluate=validation_loss,
        config=config,
        work_dir=tmp_path,
    )
    return model, config


def test_half_precision_on_a_cpu_trains_exactly_as_fp32(tmp_path):
    a, _ = _train(tmp_path / "fp32")
    b, _ = _train(tmp_path / "bf16", precision="bf16")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_a_checkpoint_of_the_fp16_flag_resumes_under_its_precision_name(tmp_path):
    _, config = _train(tmp_path, max_steps=2)
    path = tmp_path / LAST_CHECKPOINT
    state = torch.load(path, weights_only=True)
    saved = state["config"]
    del saved["precision"]
    saved["fp16"] = False  # as the releases before precision wrote it
    torch.save(state, path)
    _train(tmp_path, max_steps=4)  # resumes: fp16 False is precision fp32
    assert torch.load(path, weights_only=True)["step"] == 4

    state = torch.load(path, weights_only=True)
    state["config"].pop("precision")
    state["config"]["fp16"] = True
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="precision"):
        _train(tmp_path, max_steps=6)


def test_linear_decay_reaches_min_lr_at_decay_steps_and_stays():
    from ffmerge.finetune import _make_scheduler, make_optimizer

    model = torch.nn.Linear(2, 2)
    config = FinetuneConfig(lr=1e-3, schedule="linear", min_lr=1e-5, max_steps=10, decay_steps=4, device="cpu")
    scheduler = _make_scheduler(make_optimizer(model, config), config)
    lrs = []
    for _ in range(8):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(1e-3 - 2 * (1e-3 - 1e-5) / 4)
    assert lrs[4:] == pytest.approx([1e-5] * 4)
    with pytest.raises(ValueError, match="decay_steps"):
        FinetuneConfig(decay_steps=0)


def test_gradient_checkpointing_trains_like_plain_backpropagation(tmp_path):
    plain, _ = _train(tmp_path / "plain")
    model = tiny_tied_llama()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _train(tmp_path / "checkpointed", model)
    assert model.model.gradient_checkpointing
    for (name, x), (_, y) in zip(plain.state_dict().items(), model.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Config: the old key is named with its replacement; new keys at their default rerun nothing
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_the_fp16_key_of_older_configs_names_precision(default_config):
    config = copy.deepcopy(default_config)
    config["tasks"]["vision"]["finetune"]["fp16"] = True
    with pytest.raises(ConfigError) as error:
        check_renamed_keys(config)
    assert "tasks.vision.finetune.fp16 is no longer a setting: write finetune.precision: fp16" in str(error.value)
    check_renamed_keys(default_config)


def test_later_keys_have_the_schemas_defaults_and_are_left_out_of_params_only_there(default_config):
    config = copy.deepcopy(default_config)
    validate(config, str(SCHEMA))
    for name, task in config["tasks"].items():
        for block, defaults in LATER_DEFAULTS.items():
            assert {key: task[block][key] for key in defaults} == defaults, (name, block)  # the schema's defaults
            view = params_view(block, task[block])
            assert not set(view) & set(defaults) and set(view) == set(task[block]) - set(defaults)
            assert {key: setting({block: view}, block, key) for key in defaults} == defaults  # read back the same
    task = config["tasks"]["lm"]
    task["evaluation"]["precision"] = "bf16"
    assert params_view("evaluation", task["evaluation"])["precision"] == "bf16"
    assert setting({"evaluation": params_view("evaluation", task["evaluation"])}, "evaluation", "precision") == "bf16"
    assert params_view("experiments", task["experiments"]) == task["experiments"]  # blocks without later keys
    with pytest.raises(KeyError, match="finetune.lr"):
        setting({"finetune": {}}, "finetune", "lr")
