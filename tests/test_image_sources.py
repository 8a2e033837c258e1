"""Image data that real users have: the ILSVRC2012 validation folder with its ground truth, Parquet exports (local
and over the hub's file system), streamed hub datasets, hub failures, the model's own image processor and the
fine-tuning augmentation. Everything runs on tiny synthetic data written in the real formats."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from ffmerge.data import image_sources
from ffmerge.data import images as images_module
from ffmerge.data.images import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    ImageSplit,
    load_image_split,
    prepare_image_splits,
    read_image_record,
    seeded_order,
)
from ffmerge.sources import SourceError
from ffmerge.tasks.image_classification import ImageClassificationTask, image_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # sorted, as LOC_synset_mapping.txt lists them
N_VAL = 12


def grey_level(k: int) -> int:
    """Image k (0..20) of a fixture is uniformly this grey, far enough from its neighbours to survive JPEG."""
    assert 0 <= k <= 20
    return 8 + 12 * k


def identify(pixels: torch.Tensor) -> list[int]:
    """Which fixture image each stored image is (nearest grey level of its centre pixel)."""
    centre = pixels[:, 0, pixels.shape[2] // 2, pixels.shape[3] // 2].to(torch.int64)
    return [round((int(v) - 8) / 12) for v in centre]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships it (gzipped)."""
    import gzip

    header = b"\0\0\x08" + bytes([array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def write_jpeg(path: Path, value: int, size: tuple[int, int] = (24, 20)) -> None:
    Image.new("RGB", size, (value, value, value)).save(path, format="JPEG", quality=95)


def ilsvrc_layout(root: Path, labels: list[int], ground_truth: str = "csv") -> dict:
    """A flat ILSVRC2012 validation folder (image k+1 labelled WNIDS[labels[k]]), its ground truth and synsets."""
    val = root / "val"
    val.mkdir(parents=True)
    for k in range(len(labels)):
        write_jpeg(val / f"ILSVRC2012_val_{k + 1:08d}.JPEG", grey_level(k))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w}\n" for w in WNIDS))
    if ground_truth == "csv":
        rows = [f"ILSVRC2012_val_{k + 1:08d},{WNIDS[y]} 1 2 3 4 {WNIDS[y]} 5 6 7 8\n" for k, y in enumerate(labels)]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(rows[::-1]))
    return {"kind": "ilsvrc_val", "path": str(val)}


VAL_LABELS = [(3 * k + 1) % len(WNIDS) for k in range(N_VAL)]


# --------------------------------------------------------------------------------------------
# ILSVRC2012 validation folder
# --------------------------------------------------------------------------------------------


def test_flat_ilsvrc_val_folder_is_labelled_by_loc_solution_in_synset_order(tmp_path):
    source = ilsvrc_layout(tmp_path / "imagenet", VAL_LABELS)  # ground truth and synsets found in the parent folder
    record = prepare_image_splits(source, tmp_path / "d", {"calib": 4, "test": 8}, seed=0, image_size=16)

    assert record["classes"] == WNIDS
    seen = []
    for split in ("calib", "test"):
        pixels, labels = load_image_split(tmp_path / "d", split)
        images = identify(pixels)
        assert labels.tolist() == [VAL_LABELS[k] for k in images]
        seen += images
    assert sorted(seen) == list(range(N_VAL))  # disjoint, and the whole folder
    assert record["sources"]["validation"]["labels"].keys() == {"LOC_val_solution.csv"}


def _write_meta_mat(path: Path, devkit_order: list[str]) -> None:
    """The devkit's data/meta.mat layout: a 'synsets' struct array; leaves (num_children 0) carry ILSVRC2012_IDs
    1..n in the devkit's own order, here deliberately not the sorted one; one inner node follows."""
    from scipy.io import savemat

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    synsets = np.zeros((len(devkit_order) + 1,), dtype=[(f, object) for f in fields])
    for i, wnid in enumerate(devkit_order):
        synsets[i] = (i + 1, wnid, wnid, "", 0, np.zeros(0), 0, 10)
    synsets[-1] = (len(devkit_order) + 1, "n00001740", "entity", "", 2, np.array([1, 2]), 5, 0)
    savemat(str(path), {"synsets": synsets})


def test_devkit_ground_truth_goes_through_meta_mat_to_sorted_synset_indices(tmp_path):
    """ILSVRC2012_IDs are the devkit's order, not the models' class indices: reading them as indices would
    mislabel every image; through meta.mat they give the same labels as LOC_val_solution.csv."""
    root = tmp_path / "imagenet"
    source = ilsvrc_layout(root, VAL_LABELS, ground_truth="devkit")
    (root / "LOC_synset_mapping.txt").unlink()  # the class order then comes from meta.mat alone
    devkit_order = [WNIDS[2], WNIDS[0], WNIDS[3], WNIDS[1]]
    _write_meta_mat(root / "meta.mat", devkit_order)
    ids = [devkit_order.index(WNIDS[y]) + 1 for y in VAL_LABELS]
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
    assert ids != [y + 1 for y in VAL_LABELS]  # the fixture tells the two orders apart

    record = prepare_image_splits(source, tmp_path / "d", {"test": N_VAL}, seed=1, image_size=16)

    pixels, labels = load_image_split(tmp_path / "d", "test")
    assert labels.tolist() == [VAL_LABELS[k] for k in identify(pixels)]
    assert record["classes"] == WNIDS


def test_ilsvrc_train_folders_feed_the_train_pool(tmp_path):
    source = ilsvrc_layout(tmp_path / "imagenet", VAL_LABELS)
    train = tmp_path / "imagenet" / "train"
    for label, wnid in enumerate(WNIDS):
        (train / wnid).mkdir(parents=True)
        for i in range(2):
            write_jpeg(train / wnid / f"{wnid}_{i}.JPEG", grey_level(N_VAL + 2 * label + i))
    source["train_path"] = str(train)

    prepare_image_splits(source, tmp_path / "d", {"test": 6, "valid": 2, "train": 5}, seed=0, image_size=16)

    found = []
    for split in ("valid", "train"):
        pixels, labels = load_image_split(tmp_path / "d", split)
        assert labels.tolist() == [(k - N_VAL) // 2 for k in identify(pixels)]
        found += identify(pixels)
    assert found == [N_VAL + i for i in seeded_order(8, 0, "train")[:7]]


@pytest.mark.parametrize(
    "break_it, expected",
    [
        ("no_labels", ["no ground truth", "labels: LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt"]),
        ("missing_image", ["labels 12 images but", "holds 11", "incomplete copy", "ILSVRC2012_img_val.tar"]),
        ("extra_image", ["have no label in", "ILSVRC2012_val_00000013.JPEG"]),
        ("devkit_without_meta", ["ILSVRC2012_IDs", "devkit_meta:", "meta.mat", "LOC_val_solution.csv instead"]),
        ("no_synsets", ["needs the list of the 1000 synsets", "synsets:", "LOC_synset_mapping.txt", "devkit_meta"]),
        ("no_train_path", ["pool 'train'", "train_path:", "one folder per synset", "pools: {valid: validation"]),
        ("class_folders", ["holds no ILSVRC2012_val_NNNNNNNN.JPEG", "class folders are kind imagefolder"]),
    ],
)
def test_ilsvrc_layout_failures_name_the_problem_and_the_fix(tmp_path, break_it, expected):
    root = tmp_path / "imagenet"
    source = ilsvrc_layout(root, VAL_LABELS)
    splits = {"test": 4}
    if break_it == "no_labels":
        (root / "LOC_val_solution.csv").unlink()
    elif break_it == "missing_image":
        (root / "val" / "ILSVRC2012_val_00000005.JPEG").unlink()
    elif break_it == "extra_image":
        write_jpeg(root / "val" / "ILSVRC2012_val_00000013.JPEG", 0)
    elif break_it == "devkit_without_meta":
        (root / "LOC_val_solution.csv").unlink()
        (root / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n" * N_VAL)
    elif break_it == "no_synsets":
        (root / "LOC_synset_mapping.txt").unlink()  # the 12-image solution names 4 synsets, not all 1000
    elif break_it == "no_train_path":
        splits = {"test": 4, "train": 2}
    elif break_it == "class_folders":
        for path in (root / "val").iterdir():
            path.unlink()
        (root / "val" / WNIDS[0]).mkdir()
    with pytest.raises(SourceError) as error:
        prepare_image_splits(source, tmp_path / "d", splits, seed=0, image_size=16)
    for text in expected:
        assert text in str(error.value), (text, str(error.value))
    assert not (tmp_path / "d").exists()


def test_a_flat_validation_folder_read_as_imagefolder_points_to_ilsvrc_val(tmp_path):
    """Before, this layout failed with "pool 'validation' has only 0 left"."""
    ilsvrc_layout(tmp_path / "imagenet", VAL_LABELS)
    source = {"kind": "imagefolder", "path": str(tmp_path / "imagenet"), "pools": {"test": "val"}}
    with pytest.raises(SourceError) as error:
        prepare_image_splits(source, tmp_path / "d", {"test": 4}, seed=0, image_size=16)
    for text in ("named like the ILSVRC2012 validation set", "not in class folders", "{kind: ilsvrc_val", "labels:"):
        assert text in str(error.value)


def test_imagefolder_tree_labels_by_sorted_class_folder(tmp_path):
    root = tmp_path / "tree"
    for pool in ("train", "val"):
        for label, wnid in enumerate(WNIDS[::-1]):  # created out of order; classes are sorted names
            (root / pool / wnid).mkdir(parents=True)
            write_jpeg(root / pool / wnid / "a.JPEG", grey_level(4 * (pool == "val") + label))
    source = {"kind": "imagefolder", "path": str(root), "pools": {"test": "val", "train": "train"}}
    record = prepare_image_splits(source, tmp_path / "d", {"test": 4, "train": 4}, seed=0, image_size=16)

    assert record["classes"] == WNIDS
    pixels, labels = load_image_split(tmp_path / "d", "test")
    assert labels.tolist() == [WNIDS.index(WNIDS[::-1][k - 4]) for k in identify(pixels)]


# --------------------------------------------------------------------------------------------
# Parquet: the hub export's layout, read lazily
# --------------------------------------------------------------------------------------------

HF_METADATA = {
    b"huggingface": json.dumps(
        {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": WNIDS, "_type": "ClassLabel"}}}}
    ).encode()
}


def encoded_jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), (value, value, value)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def parquet_table(first: int, n: int, decodable: set[int] | None = None, metadata: dict | None = HF_METADATA):
    """Rows first..first+n-1 in the hub export's schema; a row outside ``decodable`` holds bytes that are no image."""
    images = [
        {"bytes": encoded_jpeg(grey_level(i)) if decodable is None or i in decodable else b"no image", "path": None}
        for i in range(first, first + n)
    ]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {"image": pa.array(images, type=struct), "label": pa.array([i % 4 for i in range(first, first + n)])}
    )
    return table.replace_schema_metadata(metadata) if metadata else table


def test_parquet_export_reads_footers_then_only_the_row_groups_and_rows_chosen(tmp_path, monkeypatch):
    """Two files of 10 rows in row groups of 3: the pool's length comes from the footers, only the row groups
    holding chosen rows are read, and only the chosen rows are decoded (every other row holds bytes that are no
    image, so decoding one would fail)."""
    chosen = seeded_order(20, 5, "validation")[:7]  # what {test: 4, calib: 3} take, in SPLIT_ORDER
    folder = tmp_path / "export" / "default" / "validation"
    folder.mkdir(parents=True)
    for number in range(2):
        table = parquet_table(10 * number, 10, decodable=set(chosen))
        pq.write_table(table, folder / f"{number:04d}.parquet", row_group_size=3)
    reads = []
    real_read = pq.ParquetFile.read_row_group

    def recording_read(self, i, *args, **kwargs):
        reads.append(i)
        return real_read(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", recording_read)
    monkeypatch.setattr(images_module, "SHARD_SIZE", 3)  # staged in storage order over several shards, then reordered
    source = {"kind": "parquet", "path": str(tmp_path / "export")}
    record = prepare_image_splits(source, tmp_path / "d", {"calib": 3, "test": 4}, seed=5, image_size=16)
    assert record["splits"]["test"]["shards"] == ["test-00000.safetensors", "test-00001.safetensors"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if p.name.startswith(".")) == []  # no staging left

    groups = {(i // 10, (i % 10) // 3) for i in chosen}  # (file, row group) of every chosen row
    assert len(reads) == len(groups) < 8  # 8 row groups in all
    assert record["classes"] == WNIDS
    assert [f["rows"] for f in record["sources"]["validation"]["files"]] == [10, 10]
    stored = {s: load_image_split(tmp_path / "d", s) for s in ("calib", "test")}
    assert identify(stored["test"][0]) + identify(stored["calib"][0]) == chosen  # in the seeded order
    assert stored["test"][1].tolist() == [i % 4 for i in chosen[:4]]


def test_decoding_threads_do_not_change_a_byte(tmp_path, monkeypatch):
    """Images are decoded by one thread per torch thread; the files and the augmented batches must not depend on
    how many there are (nor on the order in which threads finish)."""
    folder = tmp_path / "export" / "validation"
    folder.mkdir(parents=True)
    pq.write_table(parquet_table(0, 20), folder / "0000.parquet", row_group_size=3)
    root = square_folder(tmp_path / "images")
    monkeypatch.setattr(images_module, "SHARD_SIZE", 4)
    outputs = []
    for threads in (1, 3):
        torch.set_num_threads(threads)  # the one_torch_thread fixture restores the caller's setting
        parquet_dir, folder_dir = tmp_path / f"p{threads}", tmp_path / f"f{threads}"
        prepare_image_splits({"kind": "parquet", "path": str(tmp_path / "export")}, parquet_dir, {"test": 13}, 0, 16)
        source = {"kind": "imagefolder", "path": str(root), "augment": {"enabled": True}}
        prepare_image_splits(source, folder_dir, {"train": 8}, 0, 16)
        split = ImageSplit(folder_dir, "train")
        batch = split.augmented(range(8), read_image_record(folder_dir)["augment"], seed=3, step=9)
        files = {p.name: p.read_bytes() for d in (parquet_dir, folder_dir) for p in sorted(d.glob("*.safetensors"))}
        outputs.append((files, batch))
    assert outputs[0][0] == outputs[1][0] and len(outputs[0][0]) == 4 + 2
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_parquet_without_class_names_counts_classes_from_label_statistics(tmp_path, monkeypatch):
    folder = tmp_path / "export" / "validation"
    folder.mkdir(parents=True)
    pq.write_table(parquet_table(0, 8, metadata=None), folder / "0000.parquet", row_group_size=4)
    record = prepare_image_splits(
        {"kind": "parquet", "path": str(tmp_path / "export")}, tmp_path / "d", {"test": 8}, 0, 16
    )
    assert record["classes"] == ["0", "1", "2", "3"]
    # the count comes from the label column's statistics in the footers, not from reading the rows
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda *args, **kwargs: pytest.fail("read a row group"))
    pool = image_sources.ParquetPool("validation", [str(folder / "0000.parquet")], "image", "label")
    assert pool.count_classes() == 4 and len(pool) == 8


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("partial", ["partial-validation", "is partial", "first 5 GB", "{kind: ilsvrc_val"]),
        ("other_split", ["no Parquet files for pool 'validation'", "folders there: train", "pools: {split: folder}"]),
        ("no_folder", ["does not exist", "{kind: parquet, path: DIR}", "hf download"]),
    ],
)
def test_parquet_layout_failures_name_the_fix(tmp_path, layout, expected):
    root = tmp_path / "export"
    if layout != "no_folder":
        folder = root / "default" / ("partial-validation" if layout == "partial" else "train")
        folder.mkdir(parents=True)
        pq.write_table(parquet_table(0, 4), folder / "0000.parquet")
    with pytest.raises(SourceError) as error:
        prepare_image_splits({"kind": "parquet", "path": str(root)}, tmp_path / "d", {"test": 2}, 0, 16)
    for text in expected:
        assert text in str(error.value), (text, str(error.value))


# --------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------


@pytest.fixture
def hub_export(monkeypatch):
    """The hub's Parquet export of a dataset, served by fsspec's memory file system in place of hf://, and a
    datasets.load_dataset_builder that resolves to those files (recording how it was called)."""
    import fsspec

    datasets = pytest.importorskip("datasets")
    fs = fsspec.filesystem("memory")
    base = "/datasets/ILSVRC/imagenet-1k@0123abcd/default"
    urls = {}
    for pool, first, n in (("validation", 0, 6), ("train", 6, 8)):
        buffer = io.BytesIO()
        pq.write_table(parquet_table(first, n), buffer, row_group_size=4)
        fs.pipe(f"{base}/{pool}/0000.parquet", buffer.getvalue())
        urls[pool] = [f"memory://{base}/{pool}/0000.parquet"]
    calls = []

    def load_dataset_builder(*args, **kwargs):
        calls.append((args, kwargs))
        return SimpleNamespace(name="parquet", config=SimpleNamespace(data_files=dict(urls)), info=SimpleNamespace())

    monkeypatch.setattr(datasets, "load_dataset_builder", load_dataset_builder)
    yield SimpleNamespace(urls=urls, calls=calls)
    fs.rm(base, recursive=True)


def test_hub_parquet_export_is_read_over_the_hubs_file_system(tmp_path, hub_export):
    source = {"kind": "hub", "path": "ILSVRC/imagenet-1k", "name": "default", "revision": "refs/convert/parquet"}
    splits = {"calib": 1, "test": 3, "valid": 2, "train": 4}
    record = prepare_image_splits(source, tmp_path / "d", splits, seed=0, image_size=16)

    assert hub_export.calls == [(("ILSVRC/imagenet-1k",), {"revision": "refs/convert/parquet", "data_dir": "default"})]
    assert record["sources"]["validation"]["files"] == [{"file": hub_export.urls["validation"][0], "rows": 6}]
    assert record["sources"]["train"]["revision"] == "refs/convert/parquet"
    found = {s: load_image_split(tmp_path / "d", s) for s in splits}
    assert identify(found["test"][0]) + identify(found["calib"][0]) == seeded_order(6, 0, "validation")[:4]
    assert identify(found["valid"][0]) + identify(found["train"][0]) == [6 + i for i in seeded_order(8, 0, "train")[:6]]
    assert found["train"][1].tolist() == [k % 4 for k in identify(found["train"][0])]


def test_a_hub_file_that_cannot_be_read_is_explained_with_the_fix(tmp_path, hub_export):
    hub_export.urls["validation"] = ["memory:///datasets/ILSVRC/imagenet-1k@0123abcd/default/validation/gone.parquet"]
    source = {"kind": "hub", "path": "ILSVRC/imagenet-1k", "revision": "refs/convert/parquet"}
    with pytest.raises(SourceError) as error:
        prepare_image_splits(source, tmp_path / "d", {"test": 2}, seed=0, image_size=16)
    for text in ("gone.parquet", "FileNotFoundError", "hf auth login", "{kind: parquet, path: DIR}"):
        assert text in str(error.value), text


def test_a_partial_hub_export_is_refused(tmp_path, hub_export):
    hub_export.urls["validation"] = [
        u.replace("/validation/", "/partial-validation/") for u in hub_export.urls["validation"]
    ]
    source = {"kind": "hub", "path": "ILSVRC/imagenet-1k", "revision": "refs/convert/parquet"}
    with pytest.raises(SourceError, match=r"partial-validation.*is partial .*first 5 GB"):
        prepare_image_splits(source, tmp_path / "d", {"test": 2}, seed=0, image_size=16)


def _hub_failure(monkeypatch, exc: Exception) -> None:
    datasets = pytest.importorskip("datasets")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # else every failure is "offline"
        monkeypatch.delenv(name, raising=False)

    def load_dataset_builder(*args, **kwargs):
        raise exc

    monkeypatch.setattr(datasets, "load_dataset_builder", load_dataset_builder)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset_builder)


def _gated() -> Exception:
    from datasets.exceptions import DatasetNotFoundError

    # datasets' own wording (load.py) for a gated dataset without a token
    return DatasetNotFoundError("Dataset 'ILSVRC/imagenet-1k' is a gated dataset on the Hub. You must be authenticated")


def _no_revision() -> Exception:
    from datasets.exceptions import DatasetNotFoundError

    return DatasetNotFoundError(
        "Revision 'refs/convert/parquet' doesn't exist for dataset 'ILSVRC/imagenet-1k' on the Hub."
    )


@pytest.mark.parametrize(
    "failure, expected",
    [
        (
            lambda: RuntimeError("Dataset scripts are no longer supported, but found imagenet-1k.py"),
            ["loading script (imagenet-1k.py)", "datasets >= 4", "revision: refs/convert/parquet", "{kind: ilsvrc_val"],
        ),
        (
            _gated,
            ["is gated", "Accept its terms", "huggingface.co/datasets/ILSVRC/imagenet-1k", "hf auth login", "HF_TOKEN"],
        ),
        (
            lambda: ConnectionError("Couldn't reach 'ILSVRC/imagenet-1k' on the Hub (ConnectError)"),
            ["looks offline", "HF_HUB_OFFLINE", "{kind: parquet, path: DIR}", "{kind: imagefolder"],
        ),
        (_no_revision, ["no such revision", "refs/convert/parquet", "{kind: ilsvrc_val"]),
    ],
    ids=["loading-script", "gated", "offline", "no-parquet-branch"],
)
def test_hub_failures_name_the_problem_and_the_fix(tmp_path, monkeypatch, failure, expected):
    _hub_failure(monkeypatch, failure())
    source = {"kind": "hub", "path": "ILSVRC/imagenet-1k"}
    with pytest.raises(SourceError) as error:
        prepare_image_splits(source, tmp_path / "d", {"test": 2}, seed=0, image_size=16)
    for text in expected:
        assert text in str(error.value), (text, str(error.value))


def _local_imagefolder_dataset(root: Path, card: bool) -> None:
    for label, name in enumerate(("cat", "dog")):
        (root / "validation" / name).mkdir(parents=True)
        for i in range(3):
            write_jpeg(root / "validation" / name / f"{i}.jpg", grey_level(3 * label + i))
    if card:
        (root / "README.md").write_text(
            "---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: label\n    dtype:\n"
            "      class_label:\n        names:\n          '0': cat\n          '1': dog\n  splits:\n"
            "  - name: validation\n    num_bytes: 1000\n    num_examples: 6\n---\n"
        )


def test_non_parquet_hub_data_is_streamed_once_when_the_card_counts_the_rows(tmp_path):
    pytest.importorskip("datasets")
    _local_imagefolder_dataset(tmp_path / "ds", card=True)
    record = prepare_image_splits({"kind": "hub", "path": str(tmp_path / "ds")}, tmp_path / "d", {"test": 4}, 2, 16)

    pixels, labels = load_image_split(tmp_path / "d", "test")
    assert record["classes"] == ["cat", "dog"] and record["sources"]["validation"]["rows"] == 6
    assert labels.tolist() == [k // 3 for k in identify(pixels)]
    assert identify(pixels) == seeded_order(6, 2, "validation")[:4]  # the stream's rows, in the seeded order


def test_streamed_hub_data_without_a_row_count_names_the_fix(tmp_path):
    pytest.importorskip("datasets")
    _local_imagefolder_dataset(tmp_path / "ds", card=False)
    with pytest.raises(SourceError) as error:
        prepare_image_splits({"kind": "hub", "path": str(tmp_path / "ds")}, tmp_path / "d", {"test": 4}, 2, 16)
    for text in ("can only be streamed", "no row count", "revision: refs/convert/parquet"):
        assert text in str(error.value)


# --------------------------------------------------------------------------------------------
# The model's image processor, and the Fashion-MNIST path unchanged
# --------------------------------------------------------------------------------------------


def tiny_vit_folder(folder: Path, processor_size: int = 32) -> Path:
    """A random 2-layer ViT (hidden 32, 32 px, patch 8) with a saved ViTImageProcessor (224 -> 32 px squash)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    config.num_labels = len(WNIDS)
    ViTForImageClassification(config).save_pretrained(folder)
    size = {"height": processor_size, "width": processor_size}
    ViTImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def noise_folder(root: Path) -> Path:
    """Class folders of random RGB images of 40 x 24 px (not square, so a squash and a crop differ)."""
    rng = np.random.default_rng(0)
    for pool in ("train", "validation"):
        for wnid in WNIDS:
            (root / pool / wnid).mkdir(parents=True)
            for i in range(2):
                array = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / pool / wnid / f"{i}.png")
    return root


def vision_cfg(data: dict, image_size: int, **overrides) -> dict:
    return {
        "type": "image_classification",
        "data": data,
        "splits": {"calib": 2, "test": 6, "valid": 2, "train": 6},
        "seed": 0,
        "image_size": image_size,
        "features": {"tokens": 34, "batch_size": 2, "dtype": "float32", "feature": "auto"},
        "selection": {"batch_size": 4},
        "evaluation": {"batch_size": 4},
        "finetune": {"batch_size": 4},
    } | overrides


def _sources_of(pixels: torch.Tensor, root: Path, pool: str, transform) -> list[Path]:
    """The source file each stored image was made from by ``transform`` (each must match exactly one)."""
    files = sorted((root / pool).rglob("*.png"))
    made = {path: transform(Image.open(path)) for path in files}
    found = []
    for image in pixels.numpy():
        matches = [path for path, array in made.items() if np.array_equal(array, image)]
        assert len(matches) == 1
        found += matches
    return found


def test_the_models_own_image_processor_makes_the_stored_images(tmp_path):
    model = tiny_vit_folder(tmp_path / "vit")
    root = noise_folder(tmp_path / "images")
    task = ImageClassificationTask(vision_cfg({"kind": "imagefolder", "path": str(root)}, 32))
    record = task.prepare_data(model, tmp_path / "d")

    def squash(image):  # ViTImageProcessor: RGB, bilinear resize straight to 32 x 32, no crop
        return np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)

    pixels, labels = load_image_split(tmp_path / "d", "test")
    sources = _sources_of(pixels, root, "validation", squash)
    assert labels.tolist() == [WNIDS.index(path.parent.name) for path in sources]
    assert record["transform"] == {
        "kind": "image_processor",
        "class": "ViTImageProcessorPil",
        "folder": "image_processor",
    }
    assert (tmp_path / "d" / "image_processor" / "preprocessor_config.json").is_file()
    assert record["normalization"]["mean"] == [0.5, 0.5, 0.5]
    batch = next(task.calibration_batches(tmp_path / "d"))["pixel_values"]
    calib = load_image_split(tmp_path / "d", "calib")[0][:2].float()
    assert torch.allclose(batch, calib / 255 / 0.5 - 1)
    from transformers import ViTForImageClassification

    vit = ViTForImageClassification.from_pretrained(model)
    assert task.score(vit, tmp_path / "d", "test", "evaluation", torch.device("cpu")) >= 0.0  # inputs fit the model

    builtin = ImageClassificationTask(
        vision_cfg({"kind": "imagefolder", "path": str(root), "image_processor": "builtin"}, 32)
    )
    builtin.prepare_data(model, tmp_path / "b")
    assert read_image_record(tmp_path / "b")["transform"]["kind"] == "resize_crop"
    assert not torch.equal(load_image_split(tmp_path / "b", "test")[0], pixels)


def test_a_processor_that_does_not_make_image_size_names_both_fixes(tmp_path):
    model = tiny_vit_folder(tmp_path / "vit", processor_size=32)
    root = noise_folder(tmp_path / "images")
    task = ImageClassificationTask(vision_cfg({"kind": "imagefolder", "path": str(root)}, 16))
    with pytest.raises(SourceError) as error:
        task.prepare_data(model, tmp_path / "d")
    for text in ("shape (3, 32, 32)", "image_size is 16", "image_processor: builtin"):
        assert text in str(error.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(SourceError, match="image_processor is 'model' but .* does not exist"):
        prepare_image_splits(
            {"kind": "imagefolder", "path": str(root), "image_processor": "model"},
            tmp_path / "e",
            {"test": 2},
            0,
            16,
            model_dir=bare,
        )


# Pixels of the default offline config's vision data (Debian's Fashion-MNIST, image_size 56, seed 0), as the
# implementation before the model's image processor and the new sources (git fbf0a77) stored them.
FASHION_DEFAULT_SPLITS = {"calib": 350, "valid": 300, "test": 600, "train": 3000}
FASHION_DEFAULT_SHA256 = {
    "calib": "5d7db1c8c6f66516262eaabdf29f35ac03d9bf70c146cdaa3bdca35a2c9c3c83",
    "valid": "d34a22b5e929ddd9937266c33b95f84023647f69616333020bdddb0ff47aede1",
    "test": "2a8bf2e0d0957ee1a78780ac479f59c99974fc5abf97a5ecccd41b4182a5c8fc",
    "train": "6605206fe58e9cae1858f1caca81a0f571a2ea5bc39e2c3b9b90921c52922036",
}


@pytest.mark.skipif(
    not all((FASHION_MNIST_DIR / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair),
    reason="needs Debian's dataset-fashion-mnist",
)
def test_fashion_mnist_pixels_of_the_default_config_are_unchanged(tmp_path):
    """A model without an image processor (the DINOv2 converted from ONNX) keeps the built-in resize: the stored
    pixels and labels are bit-identical to those of the previous implementation."""
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, patch_size=14)
    ).save_pretrained(tmp_path / "dinov2")
    record = prepare_image_splits(
        {"kind": "fashion_mnist"}, tmp_path / "d", FASHION_DEFAULT_SPLITS, 0, 56, model_dir=tmp_path / "dinov2"
    )
    assert record["transform"] == {"kind": "resize_crop", "image_size": 56, "crop_fraction": 1.0}
    for split, expected in FASHION_DEFAULT_SHA256.items():
        pixels, labels = load_image_split(tmp_path / "d", split)
        assert hashlib.sha256(pixels.numpy().tobytes() + labels.numpy().tobytes()).hexdigest() == expected, split


def test_builtin_resize_is_a_bicubic_resize_of_the_whole_fashion_image(tmp_path):
    """The same, independently of the pinned hashes: each stored image is PIL's bicubic resize of its source."""
    rng = np.random.default_rng(1)
    for pool, n in (("train", 8), ("test", 6)):
        image_file, label_file = FASHION_MNIST_FILES[pool]
        write_idx(tmp_path / image_file, rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / label_file, np.arange(n) % 10)
    source = {"kind": "fashion_mnist", "path": str(tmp_path)}
    prepare_image_splits(source, tmp_path / "d", {"test": 6}, seed=0, image_size=16)

    from ffmerge.data.image_sources import read_idx

    originals = read_idx(tmp_path / FASHION_MNIST_FILES["test"][0])
    expected = [
        np.asarray(Image.fromarray(a).convert("RGB").resize((16, 16), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        for a in originals
    ]
    pixels, _ = load_image_split(tmp_path / "d", "test")
    order = seeded_order(6, 0, "test")
    assert all(np.array_equal(pixels[j].numpy(), expected[i]) for j, i in enumerate(order))


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def square_folder(root: Path, side: int = 40) -> Path:
    """Random RGB images, every pixel distinct enough to locate a crop."""
    rng = np.random.default_rng(3)
    for pool in ("train", "validation"):
        for wnid in WNIDS[:2]:
            (root / pool / wnid).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                    root / pool / wnid / f"{i}.png"
                )
    return root


def augmented_data(tmp_path: Path, augment: dict, size: int = 20) -> tuple[Path, Path]:
    root = square_folder(tmp_path / "images")
    source = {"kind": "imagefolder", "path": str(root), "crop_fraction": 1.0, "augment": {"enabled": True, **augment}}
    normalization = {"mean": [0.5] * 3, "std": [0.5] * 3}
    splits = {"test": 4, "valid": 2, "train": 6}
    prepare_image_splits(
        source, tmp_path / "d", splits, seed=0, image_size=size, extra={"normalization": normalization}
    )
    return root, tmp_path / "d"


def test_augmented_train_split_keeps_the_source_files_and_is_pure_in_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "SHARD_SIZE", 4)  # the 6 encoded train images span two shards
    root, data = augmented_data(tmp_path, {})
    record = read_image_record(data)
    split = ImageSplit(data, "train")

    assert record["splits"]["train"]["format"] == "encoded" and "format" not in record["splits"]["valid"]
    assert len(record["splits"]["train"]["shards"]) == 2
    files = {path.read_bytes(): path for path in (root / "train").rglob("*.png")}
    stored = [split.encoded(i) for i in range(len(split))]
    assert all(data_ in files for data_ in stored) and len(set(stored)) == 6
    assert [WNIDS.index(files[d].parent.name) for d in stored] == split.labels.tolist()
    # read for evaluation (e.g. by the linear probe), an encoded split goes through the recorded transform
    whole = [np.asarray(Image.open(files[d]).convert("RGB").resize((20, 20), Image.Resampling.BICUBIC)) for d in stored]
    assert np.array_equal(split.images(0, 6).numpy(), np.stack(whole).transpose(0, 3, 1, 2))

    get_batch = image_batches(split, record, batch_size=4, seed=7)
    fresh = image_batches(ImageSplit(data, "train"), record, batch_size=4, seed=7)
    other_seed = image_batches(split, record, batch_size=4, seed=8)
    for step in (0, 5, 2):
        assert torch.equal(get_batch(step)["pixel_values"], fresh(step)["pixel_values"])
    assert get_batch(0)["pixel_values"].shape == (4, 3, 20, 20)
    assert not torch.equal(get_batch(1)["pixel_values"], other_seed(1)["pixel_values"])
    settings = record["augment"]
    assert not torch.equal(
        split.augmented([0], settings, seed=7, step=0), split.augmented([0], settings, seed=7, step=1)
    )


def test_random_resized_crop_cuts_the_whole_source_image(tmp_path):
    """scale 1/4 and ratio 1 on 40 px images: a 20 x 20 box at a random place, resized to 20 px (an exact copy),
    so every augmented image is some 20 x 20 window of its source, mirrored or not, at varying places."""
    root, data = augmented_data(tmp_path, {"scale": [0.25, 0.25], "ratio": [1.0, 1.0]})
    split = ImageSplit(data, "train")
    sources = [np.asarray(Image.open(io.BytesIO(split.encoded(i)))) for i in range(len(split))]
    places, flips = set(), set()
    for step in range(6):
        crops = split.augmented(range(6), read_image_record(data)["augment"], seed=0, step=step).numpy()
        for i, crop in enumerate(crops.transpose(0, 2, 3, 1)):
            windows = [
                (top, left, mirrored)
                for top in range(21)
                for left in range(21)
                for mirrored in (False, True)
                if np.array_equal(crop, sources[i][top : top + 20, left : left + 20][:, :: -1 if mirrored else 1])
            ]
            assert len(windows) == 1
            places.add(windows[0][:2])
            flips.add(windows[0][2])
    assert len(places) > 10 and flips == {False, True}


def test_full_area_crops_without_flip_are_the_resized_image(tmp_path):
    root, data = augmented_data(tmp_path, {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "flip": False}, size=16)
    split = ImageSplit(data, "train")
    out = split.augmented([3, 0], read_image_record(data)["augment"], seed=0, step=11).numpy()
    for row, index in enumerate([3, 0]):
        image = Image.open(io.BytesIO(split.encoded(index))).convert("RGB")
        assert np.array_equal(
            out[row], np.asarray(image.resize((16, 16), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
        )


def test_augmentation_is_off_by_default_and_checked(tmp_path):
    root = square_folder(tmp_path / "images")
    source = {"kind": "imagefolder", "path": str(root)}
    record = prepare_image_splits(source, tmp_path / "d", {"test": 2, "train": 4}, seed=0, image_size=16)
    assert "augment" not in record and "format" not in record["splits"]["train"]
    with pytest.raises(ValueError, match="data.augment.enabled when prepare_data runs"):
        ImageSplit(tmp_path / "d", "train").augmented(
            [0], {"scale": [0.5, 1], "ratio": [1, 1], "flip": True}, seed=0, step=0
        )
    with pytest.raises(SourceError, match=r"data.augment.scale must be \[low, high\]"):
        prepare_image_splits(
            source | {"augment": {"enabled": True, "scale": [0.5, 0.2]}}, tmp_path / "e", {"train": 2}, 0, 16
        )


# --------------------------------------------------------------------------------------------
# Config: schema, paper config, preflight
# --------------------------------------------------------------------------------------------


def _paper_vision_task() -> tuple[str, dict]:
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    validate(config, str(REPO / "schemas" / "config.schema.yaml"))
    return next((name, task) for name, task in config["tasks"].items() if task["type"] == "image_classification")


def test_paper_config_reads_imagenet_from_the_ilsvrc_release_and_preflight_only_warns_without_it(tmp_path, monkeypatch):
    from ffmerge.workflow.preflight import ConfigError, image_data_warnings

    monkeypatch.chdir(tmp_path)  # no data/imagenet here
    name, task = _paper_vision_task()
    assert task["data"]["kind"] == "ilsvrc_val" and task["data"]["train_path"]
    warnings = image_data_warnings(name, task)
    assert any("data/imagenet/val does not exist" in w and "{kind: ilsvrc_val" in w for w in warnings)
    assert any(".labels: data/imagenet/LOC_val_solution.csv does not exist" in w for w in warnings)
    assert any(".train_path: data/imagenet/train does not exist" in w for w in warnings)

    ilsvrc_layout(tmp_path / "data" / "imagenet", VAL_LABELS)
    (tmp_path / "data" / "imagenet" / "train").mkdir()
    assert image_data_warnings(name, task) == []

    task["data"]["augment"] = {"enabled": True, "scale": [0.9, 0.1]}
    with pytest.raises(ConfigError, match=rf"tasks\.{name}\.data\.augment\.scale"):
        image_data_warnings(name, task)


def test_schema_accepts_the_new_image_options_and_fills_augment_defaults():
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    _, task = next((n, t) for n, t in config["tasks"].items() if t["type"] == "image_classification")
    task["data"] = {"kind": "parquet", "path": "x", "image_processor": "builtin", "augment": {"enabled": True}}
    validate(config, str(REPO / "schemas" / "config.schema.yaml"))
    assert task["data"]["augment"] == {"enabled": True, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip": True}
    assert "image_processor" not in config["tasks"][next(iter(config["tasks"]))]["model"]  # no default leaks
    task["data"]["image_processor"] = "processor"
    with pytest.raises(Exception, match="processor"):
        validate(config, str(REPO / "schemas" / "config.schema.yaml"))


def test_image_sources_module_lists_every_kind_the_schema_allows():
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    kinds = set(schema["$defs"]["source"]["properties"]["kind"]["enum"])
    assert set(image_sources.VALID_KINDS) <= kinds
