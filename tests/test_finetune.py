"""Tests for ffmerge.finetune: ties survive training, exact resume after SIGKILL, loud failure on a
corrupt checkpoint, and best-by-validation weight selection.

The resume test's killed and resumed fine-tunes run in subprocesses (``_worker`` below), so the
kill is a real SIGKILL and the resume starts from nothing but the files on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ffmerge.finetune import (
    BEST_CHECKPOINT,
    HISTORY_FILE,
    LAST_CHECKPOINT,
    CheckpointError,
    FinetuneConfig,
    FinetuneResult,
    causal_lm_loss,
    finetune,
    lm_batches,
    make_optimizer,
)

SHARED_PROJS = ("gate_proj", "up_proj", "down_proj")
SEQ_LEN = 16

# 12 updates of 2 micro-batches, warmup + inverse-sqrt decay, dropout on: every piece of state that
# a resume could forget (optimizer moments, schedule position, RNG) changes the outcome.
RESUME_CONFIG = FinetuneConfig(
    lr=3e-3, warmup_steps=3, max_steps=12, grad_accum=2, eval_every=2, checkpoint_every=4, seed=0, device="cpu"
)
KILL_AT_BATCH = 13  # second micro-batch of update 7: last.pt is at step 4, best.pt already at step 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny_tied_llama() -> LlamaForCausalLM:
    """A 4-layer Llama whose layers 1..3 share layer 1's FF modules, as after merging k=3 layers."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=4,
        intermediate_size=64,
        vocab_size=100,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,  # makes the trajectory depend on the torch RNG
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    source = model.model.layers[1].mlp
    for layer in model.model.layers[2:]:
        for name in SHARED_PROJS:
            setattr(layer.mlp, name, getattr(source, name))
    return model


def token_stream(n: int, seed: int) -> torch.Tensor:
    """A learnable stream (next token = previous + 7 mod 100, 10% noise), so validation loss falls."""
    generator = torch.Generator().manual_seed(seed)
    ids = (torch.arange(n) * 7) % 100
    noise = torch.rand(n, generator=generator) < 0.1
    return torch.where(noise, torch.randint(100, (n,), generator=generator), ids)


def validation_loss(model: torch.nn.Module) -> float:
    return causal_lm_loss(model, lm_batches(token_stream(400, seed=1), seq_len=SEQ_LEN, batch_size=8, seed=1)(0)).item()


def train_batches():
    return lm_batches(token_stream(2000, seed=0), seq_len=SEQ_LEN, batch_size=4, seed=0)


def _resume_test_run(work_dir: str, kill_at_batch: int | None) -> tuple[torch.nn.Module, dict, list[str]]:
    """One fine-tune of the resume test; SIGKILLs its own process when it reaches ``kill_at_batch``."""
    model = tiny_tied_llama()
    batches = train_batches()

    def get_batch(index: int) -> dict[str, torch.Tensor]:
        if index == kill_at_batch:
            os.kill(os.getpid(), signal.SIGKILL)
        return batches(index)

    lines: list[str] = []
    result = finetune(
        model,
        loss_fn=causal_lm_loss,
        get_batch=get_batch,
        evaluate=validation_loss,
        config=RESUME_CONFIG,
        work_dir=work_dir,
        log=lines.append,
    )
    return model, asdict(result), lines


def _worker(work_dir: str, out: str, kill_at_batch: int | None) -> None:
    """Entry point of the resume test's subprocesses: fine-tune, then dump state, result and log."""
    torch.set_num_threads(1)
    model, result, lines = _resume_test_run(work_dir, kill_at_batch)
    torch.save({"model": model.state_dict(), "result": result, "log": lines}, out)


def _run_worker(work_dir: Path, out: Path, kill_at_batch: int | None = None) -> subprocess.CompletedProcess:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_finetune as t; "
        f"t._worker({str(work_dir)!r}, {str(out)!r}, {kill_at_batch!r})"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _assert_same_tensors(a: object, b: object, where: str = "") -> None:
    """Exact, recursive equality of nested checkpoint contents (dicts, lists, tuples, tensors)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_ties_survive_finetuning(tmp_path: Path) -> None:
    model = tiny_tied_llama()
    n_params = model.num_parameters()
    before = _snapshot(model)
    config = FinetuneConfig(lr=3e-3, max_steps=4, eval_every=2, checkpoint_every=2, device="cpu")

    result = finetune(
        model,
        loss_fn=causal_lm_loss,
        get_batch=train_batches(),
        evaluate=validation_loss,
        config=config,
        work_dir=tmp_path,
    )

    layers = model.model.layers
    for layer in layers[2:]:
        for name in SHARED_PROJS:
            assert getattr(layer.mlp, name) is getattr(layers[1].mlp, name)
    assert layers[0].mlp.gate_proj is not layers[1].mlp.gate_proj
    assert model.num_parameters() == n_params
    assert result.best_step > 0, "validation loss should improve on this learnable stream"
    shared = "model.layers.1.mlp.gate_proj.weight"
    assert not torch.equal(model.state_dict()[shared], before[shared])
    # AdamW saw each shared Parameter once, and the checkpoint stores the tied tensor once.
    last = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert len(last["optimizer"]["state"]) == len(list(model.parameters()))
    assert last["model"][shared].data_ptr() == last["model"]["model.layers.3.mlp.gate_proj.weight"].data_ptr()


def test_resume_after_sigkill_is_exact(tmp_path: Path) -> None:
    killed = _run_worker(tmp_path / "killed", tmp_path / "unused.pt", kill_at_batch=KILL_AT_BATCH)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert torch.load(tmp_path / "killed" / LAST_CHECKPOINT, weights_only=True)["step"] == 4
    assert torch.load(tmp_path / "killed" / BEST_CHECKPOINT, weights_only=True)["step"] == 6

    resumed = _run_worker(tmp_path / "killed", tmp_path / "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert b["result"]["resumed_from"] == 4 and "resumed from step 4" in b["log"]
    assert any(line.startswith(f"{BEST_CHECKPOINT} holds step 6") for line in b["log"])

    # The uninterrupted reference runs in this process (saving an interpreter start); the one_torch_thread fixture
    # gives it the subprocesses' thread count, so any difference comes from the resume.
    model, result, _ = _resume_test_run(str(tmp_path / "straight"), None)
    assert result["resumed_from"] is None
    assert result["best_step"] > 4, "the comparison must cover weights trained after the resume"
    assert result == {**b["result"], "resumed_from": None}
    _assert_same_tensors(model.state_dict(), b["model"])
    last_a = torch.load(tmp_path / "straight" / LAST_CHECKPOINT, weights_only=True)
    last_b = torch.load(tmp_path / "killed" / LAST_CHECKPOINT, weights_only=True)
    assert last_a["step"] == last_b["step"] == 12
    for part in ("model", "optimizer", "scheduler", "rng"):
        _assert_same_tensors(last_a[part], last_b[part], part)
    initial = tiny_tied_llama().model.layers[1].mlp.up_proj.weight
    assert not torch.equal(model.model.layers[1].mlp.up_proj.weight, initial)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_fails_loudly(tmp_path: Path, damage: str) -> None:
    config = FinetuneConfig(lr=1e-3, max_steps=2, eval_every=2, checkpoint_every=2, device="cpu")
    run = dict(
        loss_fn=causal_lm_loss, get_batch=train_batches(), evaluate=validation_loss, config=config, work_dir=tmp_path
    )
    last = tmp_path / LAST_CHECKPOINT
    if damage == "garbage":
        last.write_bytes(b"this is not a checkpoint")
    else:
        finetune(tiny_tied_llama(), **run)
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    damaged = last.read_bytes()

    with pytest.raises(CheckpointError, match=r"last\.pt.*corrupt.*Delete .*last\.pt to restart fine-tuning"):
        finetune(tiny_tied_llama(), **run)
    assert last.read_bytes() == damaged, "the damaged checkpoint must not be overwritten"


PLANTED = [5.0, 3.0, 7.0, 1.0, 2.0, 6.0]  # metrics at steps 0..5


@pytest.mark.parametrize(
    ("metrics", "higher_is_better", "best_step"),
    [(PLANTED, False, 3), (PLANTED, True, 2), ([1.0, 2.0, 1.0, 3.0], False, 0)],  # a tie keeps the earlier step
)
def test_best_weights_are_returned(
    tmp_path: Path, metrics: list[float], higher_is_better: bool, best_step: int
) -> None:
    model = tiny_tied_llama()
    snapshots: list[dict[str, torch.Tensor]] = []

    def planted_evaluate(m: torch.nn.Module) -> float:
        snapshots.append(_snapshot(m))
        return metrics[len(snapshots) - 1]

    config = FinetuneConfig(
        lr=3e-3,
        max_steps=len(metrics) - 1,
        eval_every=1,
        checkpoint_every=2,
        higher_is_better=higher_is_better,
        device="cpu",
    )
    result = finetune(
        model,
        loss_fn=causal_lm_loss,
        get_batch=train_batches(),
        evaluate=planted_evaluate,
        config=config,
        work_dir=tmp_path,
    )

    assert (result.best_step, result.best_metric) == (best_step, metrics[best_step])
    assert [entry["metric"] for entry in result.history] == metrics
    _assert_same_tensors(_snapshot(model), snapshots[best_step])
    assert any(not torch.equal(v, snapshots[-1][k]) for k, v in _snapshot(model).items()), (
        "must not be the last weights"
    )
    assert model.model.layers[3].mlp.down_proj is model.model.layers[1].mlp.down_proj


def test_patience_stops_early(tmp_path: Path) -> None:
    metrics = iter([5.0, 3.0, 4.0, 4.0, 0.0])
    batches = train_batches()
    requested: list[int] = []

    def get_batch(index: int) -> dict[str, torch.Tensor]:
        requested.append(index)
        return batches(index)

    config = FinetuneConfig(
        lr=1e-3, max_steps=10, grad_accum=2, eval_every=1, checkpoint_every=5, patience=2, device="cpu"
    )
    result = finetune(
        tiny_tied_llama(),
        loss_fn=causal_lm_loss,
        get_batch=get_batch,
        evaluate=lambda m: next(metrics),
        config=config,
        work_dir=tmp_path,
    )
    assert (result.steps_done, result.best_step) == (3, 1)
    assert requested == [0, 1, 2, 3, 4, 5], "update u reads micro-batches (u-1)*grad_accum + k"
    assert torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)["step"] == 3


def test_without_a_final_state_only_the_checkpoints_before_the_end_are_written(tmp_path: Path) -> None:
    """save_final_state=False (the workflow's default: the state is deleted right after the model is saved)
    skips the resume state at the last step; the checkpoints before it stay, and the weights are the same."""
    models, lasts = {}, {}
    for final in (True, False):
        models[final] = tiny_tied_llama()
        finetune(
            models[final],
            loss_fn=causal_lm_loss,
            get_batch=train_batches(),
            evaluate=validation_loss,
            config=replace(RESUME_CONFIG, max_steps=10, save_final_state=final),
            work_dir=tmp_path / str(final),
        )
        lasts[final] = torch.load(tmp_path / str(final) / LAST_CHECKPOINT, weights_only=True)["step"]
    assert lasts == {True: 10, False: 8}  # checkpoint_every=4: steps 4 and 8, then the end (10) only if asked
    _assert_same_tensors(_snapshot(models[False]), _snapshot(models[True]))


def test_zero_steps_only_evaluates(tmp_path: Path) -> None:
    model = tiny_tied_llama()
    before = _snapshot(model)
    result = finetune(
        model,
        loss_fn=causal_lm_loss,
        get_batch=train_batches(),
        evaluate=lambda m: 4.25,
        config=FinetuneConfig(max_steps=0, device="cpu"),
        work_dir=tmp_path,
    )
    assert (result.best_metric, result.best_step, result.steps_done) == (4.25, 0, 0)
    assert (tmp_path / HISTORY_FILE).exists() and not (tmp_path / LAST_CHECKPOINT).exists()
    _assert_same_tensors(_snapshot(model), before)


def test_lm_batches_depend_only_on_step() -> None:
    stream = token_stream(500, seed=0)
    get_batch = lm_batches(stream, seq_len=SEQ_LEN, batch_size=3, seed=5)
    later_first = get_batch(9)["input_ids"]
    get_batch(0)
    assert torch.equal(get_batch(9)["input_ids"], later_first)
    assert later_first.shape == (3, SEQ_LEN)
    assert not torch.equal(get_batch(8)["input_ids"], later_first)
    assert not torch.equal(lm_batches(stream, seq_len=SEQ_LEN, batch_size=3, seed=6)(9)["input_ids"], later_first)
    start = int((later_first[0, 0] == stream).nonzero()[0])  # windows are contiguous slices of the stream
    assert any(torch.equal(stream[s : s + SEQ_LEN], later_first[0]) for s in range(start, len(stream) - SEQ_LEN + 1))


def test_resume_with_other_hyperparameters_is_refused_but_a_longer_budget_is_fine(tmp_path: Path) -> None:
    base = FinetuneConfig(lr=1e-3, max_steps=2, eval_every=2, checkpoint_every=2, device="cpu")
    run = dict(loss_fn=causal_lm_loss, get_batch=train_batches(), evaluate=validation_loss, work_dir=tmp_path)
    finetune(tiny_tied_llama(), config=base, **run)
    before = (tmp_path / LAST_CHECKPOINT).read_bytes()
    with pytest.raises(CheckpointError, match=r"other hyper-parameters.*'lr': \(0\.001, 0\.002\).*delete"):
        finetune(tiny_tied_llama(), config=FinetuneConfig(**{**asdict(base), "lr": 2e-3}), **run)
    assert (tmp_path / LAST_CHECKPOINT).read_bytes() == before, "a refused resume must not touch the checkpoint"
    lines: list[str] = []
    result = finetune(
        tiny_tied_llama(), config=FinetuneConfig(**{**asdict(base), "max_steps": 4}), log=lines.append, **run
    )
    assert result.resumed_from == 2 and result.steps_done == 4
    assert any("resumed from step 2" in line for line in lines)


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep_state"])
def test_run_finetune_deletes_the_resume_state_once_the_model_is_saved_unless_kept(tmp_path, monkeypatch, keep):
    """The work folder (last.pt with AdamW moments: 1.6 GB for SmolLM2) goes once the finished model is saved."""
    import yaml
    from snakemake.utils import validate

    from ffmerge.workflow import pipeline

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "config.yaml").read_text())
    config["tasks"]["lm"]["finetune"]["keep_state"] = keep
    validate(config, str(repo / "schemas" / "config.schema.yaml"))  # fills the defaults, as the Snakefile does
    cfg = config["tasks"]["lm"]
    work, out = tmp_path / "work", tmp_path / "finetuned"
    events: list[str] = []

    class Task:
        auto_class = "AutoModelForCausalLM"
        higher_is_better = False
        budget_unit = "tokens"

        def training(self, data_dir, device):
            return causal_lm_loss, lambda step: {}

        def examples_per_step(self):
            return 128

    def fake_finetune(model, *, work_dir, config, **kwargs):
        assert config.max_steps == cfg["finetune"]["max_steps"]
        Path(work_dir).mkdir(parents=True)
        (Path(work_dir) / LAST_CHECKPOINT).write_bytes(b"resume state")
        return FinetuneResult(best_metric=1.0, best_step=0, steps_done=10, resumed_from=None, history=[])

    def fake_save(model, out_dir, extra=None):
        assert (work / LAST_CHECKPOINT).is_file(), "the resume state went before the model was saved"
        events.append("saved")

    monkeypatch.setattr(pipeline, "get_task", lambda cfg: Task())
    monkeypatch.setattr(pipeline, "load_model", lambda *args, **kwargs: torch.nn.Linear(2, 2))
    monkeypatch.setattr(pipeline, "finetune", fake_finetune)
    monkeypatch.setattr(pipeline, "save_compressed", fake_save)
    pipeline.run_finetune(cfg, tmp_path / "model", tmp_path / "data", work, out, "cpu")
    assert events == ["saved"]
    assert (work / LAST_CHECKPOINT).is_file() is keep


def test_fused_adamw_updates_like_torchs_per_tensor_loop() -> None:
    # make_optimizer takes the fused kernel for speed; the update must be AdamW's with our lr and weight decay,
    # differing from torch's reference loop by rounding only
    config = replace(RESUME_CONFIG, weight_decay=0.1)
    models = [tiny_tied_llama(), tiny_tied_llama()]
    optimizers = [
        make_optimizer(models[0], config),
        torch.optim.AdamW(models[1].parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=False),
    ]
    assert optimizers[0].param_groups[0]["fused"] is True
    batches = train_batches()
    for step in range(3):
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same dropout masks for both
            causal_lm_loss(model, batches(step)).backward()
            optimizer.step()
    start, fused, loop = _snapshot(tiny_tied_llama()), _snapshot(models[0]), _snapshot(models[1])
    for key in fused:
        moved = (loop[key] - start[key]).abs().max().item()
        assert moved > 1e-4, key  # every tensor really trained (lr 3e-3 over three updates)
        torch.testing.assert_close(fused[key], loop[key], rtol=0, atol=1e-6, msg=key)


def test_loader_workers_prefetch_the_same_micro_batches_in_order() -> None:
    from ffmerge.finetune import MicroBatches

    get_batch = lm_batches(token_stream(4000, 1), batch_size=2, seq_len=SEQ_LEN, seed=0)
    with MicroBatches(get_batch, start=5, stop=11, workers=2) as batches:
        for i in range(5, 11):
            assert torch.equal(batches(i)["input_ids"], get_batch(i)["input_ids"]), i
    with MicroBatches(get_batch, start=0, stop=4, workers=1) as batches, pytest.raises(RuntimeError, match="order"):
        batches(1)  # a skipped micro-batch would silently shift the data: refused


def test_training_with_loader_workers_is_training_without_them(tmp_path: Path) -> None:
    """Workers change where batches are made, not which: same weights, and a resume may change their number."""
    models = {}
    for workers in (0, 2):
        model = tiny_tied_llama()
        finetune(
            model,
            loss_fn=causal_lm_loss,
            get_batch=lm_batches(token_stream(4000, 1), batch_size=2, seq_len=SEQ_LEN, seed=0),
            evaluate=validation_loss,
            config=replace(RESUME_CONFIG, max_steps=6, loader_workers=workers),
            work_dir=tmp_path / str(workers),
        )
        models[workers] = model
    _assert_same_tensors(models[0].state_dict(), models[2].state_dict())
    finetune(
        models[2],
        loss_fn=causal_lm_loss,
        get_batch=lm_batches(token_stream(4000, 1), batch_size=2, seq_len=SEQ_LEN, seed=0),
        evaluate=validation_loss,
        config=replace(RESUME_CONFIG, max_steps=8, loader_workers=1),
        work_dir=tmp_path / "2",
    )
