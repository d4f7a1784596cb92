"""Dataset sources: tiny generated fixtures for every format, their errors, and the search order."""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import os
import pickle
import re
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddkit.data import DATASETS, DatasetConfig, load_dataset
from ddkit.data.sources import FASHION_MNIST_CLASSES
from ddkit.errors import ConfigError, DataError, DDKitError

# ------------------------------------------------------------------------------------------------
# fixture writers


def idx_images(images: np.ndarray) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">iiii", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0,
                     train_classes: int = 10) -> dict:
    """Four IDX files with random 28x28 images; labels cycle 0..9 (training labels 0..train_classes-1). Returns the
    arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % (train_classes if prefix == "train" else 10)
        for kind, blob in (("images-idx3", idx_images(images)), ("labels-idx1", idx_labels(labels))):
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)
        data[prefix] = (images, labels)
    return data


CIFAR10_NAMES = [f"c{i}" for i in range(10)]


def cifar10_pickles(n: int = 6, seed: int = 0, train_classes: int = 10) -> tuple[dict[str, bytes], dict[str, tuple]]:
    """Pickled batches shaped like the official cifar-10-batches-py (bytes keys, numpy data); the labels, shuffled,
    cycle through the 10 classes (those of the training batches through 0..train_classes-1)."""
    rng = np.random.default_rng(seed)
    blobs, arrays = {}, {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        classes = 10 if name == "test_batch" else train_classes
        labels = [int(v) for v in rng.permutation((np.arange(n) + k * n) % classes)]
        blobs[name] = pickle.dumps({b"batch_label": name.encode(), b"data": data, b"labels": labels})
        arrays[name] = (data, labels)
    blobs["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_NAMES]})
    return blobs, arrays


def write_tar(path: Path, folder: str, blobs: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_imagefolder(root: Path, classes: dict[str, int], size: int = 8, mode: str = "RGB", seed: int = 0) -> dict:
    """root/{train,test}/<class>/<i>.png; returns {(split, class): [arrays in file order]}."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    out = {}
    for split in ("train", "test"):
        for name, count in classes.items():
            arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
            for i, a in enumerate(arrays):
                write_png(root / split / name / f"{i:03d}.png", a)
            out[(split, name)] = arrays
    return out


# ------------------------------------------------------------------------------------------------
# registry / config


def test_all_sources_registered():
    for name in ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "tensors"):
        assert name in DATASETS


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "tensors"])
def test_options_rejected(name, tmp_path):
    with pytest.raises(ConfigError, match="bogus"):
        load_dataset(DatasetConfig(name=name, path=str(tmp_path), options={"bogus": 1}))


def test_image_size_rejected_for_fixed_sources(tmp_path):
    write_idx_folder(tmp_path / "fm")
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("fashion-mnist", path=str(tmp_path / "fm"), image_size=32)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST / MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_roundtrip(tmp_path, gz):
    data = write_idx_folder(tmp_path / "fm", gz=gz)
    b = load_dataset("fashion-mnist", path=str(tmp_path / "fm"))
    assert b.train.images.shape == (20, 1, 28, 28) and b.train.images.dtype == torch.uint8
    assert b.test.images.shape == (10, 1, 28, 28)
    assert torch.equal(b.train.images[:, 0], torch.from_numpy(data["train"][0]))
    assert torch.equal(b.test.images[:, 0], torch.from_numpy(data["t10k"][0]))
    assert b.train.labels.tolist() == (np.arange(20) % 10).tolist()
    assert b.classes == FASHION_MNIST_CLASSES and b.classes[9] == "Ankle boot"
    assert b.mean == (0.2861,) and b.std == (0.3530,)
    assert b.source == str(tmp_path / "fm")


def test_mnist_classes_and_norm(tmp_path):
    write_idx_folder(tmp_path / "m")
    b = load_dataset("mnist", path=str(tmp_path / "m"))
    assert b.classes == [str(d) for d in range(10)]
    assert b.mean == (0.1307,) and b.std == (0.3081,)


def test_missing_folder_lists_searched_places(tmp_path, monkeypatch):
    monkeypatch.setenv("DDKIT_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist")
    msg = str(err.value)
    assert str(tmp_path / "data" / "fashion-mnist") in msg
    assert "/usr/share/datasets/fashion-mnist" in msg
    assert "DDKIT_DATA" in msg and "dataset-fashion-mnist" in msg
    assert "\n" not in msg


def test_search_order_ddkit_data_then_explicit_path(tmp_path, monkeypatch):
    env_data = write_idx_folder(tmp_path / "data" / "fashion-mnist", seed=1)
    own = write_idx_folder(tmp_path / "own", n_train=30, seed=2)
    monkeypatch.setenv("DDKIT_DATA", str(tmp_path / "data"))
    b = load_dataset("fashion-mnist")
    assert b.source == str(tmp_path / "data" / "fashion-mnist")
    assert torch.equal(b.train.images[:, 0], torch.from_numpy(env_data["train"][0]))
    b = load_dataset("fashion-mnist", path=str(tmp_path / "own"))  # explicit path wins
    assert b.source == str(tmp_path / "own") and len(b.train) == 30
    assert torch.equal(b.train.images[:, 0], torch.from_numpy(own["train"][0]))


def test_train_per_class_subset(tmp_path):
    write_idx_folder(tmp_path / "fm", n_train=50)
    b = load_dataset("fashion-mnist", path=str(tmp_path / "fm"), train_per_class=3, test_per_class=1)
    assert b.train.class_counts(10).tolist() == [3] * 10
    assert b.test.class_counts(10).tolist() == [1] * 10


def test_idx_truncated(tmp_path):
    write_idx_folder(tmp_path / "fm")
    path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    blob = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(blob[:1000]))
    with pytest.raises(DataError, match=r"truncated \(expected 15696 bytes, found 1000\); re-download"):
        load_dataset("fashion-mnist", path=str(tmp_path / "fm"))


def test_idx_huge_declared_count_is_truncation(tmp_path):
    """IDX sizes are unsigned: a header declaring 2^31 images was read as -2147483648 and told as a wrong
    image size ("holds -2147483648 images of 28x28 pixels, expected 28x28")."""
    write_idx_folder(tmp_path / "fm")
    path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    blob = bytearray(gzip.decompress(path.read_bytes()))
    blob[4:8] = struct.pack(">I", 2**31)
    path.write_bytes(gzip.compress(bytes(blob)))
    with pytest.raises(DataError, match=rf"truncated \(expected {16 + 2**31 * 784} bytes, found 15696\); re-download"):
        load_dataset("fashion-mnist", path=str(tmp_path / "fm"))


def test_idx_bad_magic(tmp_path):
    write_idx_folder(tmp_path / "fm")
    path = tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz"
    blob = bytearray(gzip.decompress(path.read_bytes()))
    blob[:4] = struct.pack(">i", 2051)  # images magic in a labels file
    path.write_bytes(gzip.compress(bytes(blob)))
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        load_dataset("fashion-mnist", path=str(tmp_path / "fm"))


@pytest.mark.parametrize("damage", ["cut", "garbage", "flipped"])
def test_idx_corrupt_gzip(tmp_path, damage):
    write_idx_folder(tmp_path / "fm")
    path = tmp_path / "fm" / "train-labels-idx1-ubyte.gz"
    raw = path.read_bytes()
    if damage == "cut":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = b"this is not gzip at all"
    else:
        raw = raw[:12] + bytes(b ^ 0xFF for b in raw[12:-8]) + raw[-8:]
    path.write_bytes(raw)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz") as err:
        load_dataset("fashion-mnist", path=str(tmp_path / "fm"))
    assert "re-download" in str(err.value)


def test_idx_label_count_mismatch(tmp_path):
    write_idx_folder(tmp_path / "fm")
    (tmp_path / "fm" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_labels(np.zeros(19))))
    with pytest.raises(DataError, match="19 labels but .* 20 images"):
        load_dataset("fashion-mnist", path=str(tmp_path / "fm"))


def test_idx_folder_with_some_files_gunzipped_loads(tmp_path):
    """Three .gz files and one plain one used to fail with "lacks t10k-labels-idx1-ubyte.gz" though it is there."""
    write_idx_folder(tmp_path / "gz")
    write_idx_folder(tmp_path / "mixed")
    want = load_dataset("fashion-mnist", path=str(tmp_path / "gz"))
    gzipped = tmp_path / "mixed" / "t10k-labels-idx1-ubyte.gz"
    gzipped.with_suffix("").write_bytes(gzip.decompress(gzipped.read_bytes()))
    gzipped.unlink()
    got = load_dataset("fashion-mnist", path=str(tmp_path / "mixed"))
    assert torch.equal(got.test.labels, want.test.labels) and torch.equal(got.train.images, want.train.images)
    gzipped.with_suffix("").unlink()
    with pytest.raises(DataError, match="lacks"):
        load_dataset("fashion-mnist", path=str(tmp_path / "mixed"))


def test_idx_label_out_of_range(tmp_path):
    write_idx_folder(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_labels(np.full(10, 12))))
    with pytest.raises(DataError, match="label 12"):
        load_dataset("fashion-mnist", path=str(tmp_path / "fm"))


def test_explicit_path_never_falls_back(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv("DDKIT_DATA", str(tmp_path / "data"))  # valid data that must NOT be used
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="lacks train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", path=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion-mnist", path=str(tmp_path / "typo"))
    # the data root given for the dataset's own folder: the fix names the folder inside it
    with pytest.raises(DataError,
                       match=rf"lacks train-images-idx3-ubyte.*; did you mean '{tmp_path}/data/fashion-mnist'\?$"):
        load_dataset("fashion-mnist", path=str(tmp_path / "data"))
    with pytest.raises(DataError, match=r"; put the files there$"):
        load_dataset("fashion-mnist", path=str(tmp_path / "empty"))


def test_classes_pin_must_match(tmp_path):
    write_idx_folder(tmp_path / "m")
    with pytest.raises(DataError, match="does not match"):
        load_dataset("mnist", path=str(tmp_path / "m"), classes=[str(d) for d in reversed(range(10))])
    b = load_dataset("mnist", path=str(tmp_path / "m"), classes=[str(d) for d in range(10)])
    assert b.num_classes == 10


# ------------------------------------------------------------------------------------------------
# CIFAR


def _check_cifar10(b, arrays):
    train = [arrays[f"data_batch_{i}"] for i in range(1, 6)]
    assert b.train.images.shape == (30, 3, 32, 32) and b.train.images.dtype == torch.uint8
    expected = np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32)
    assert torch.equal(b.train.images, torch.from_numpy(expected))
    assert b.train.labels.tolist() == sum((lab for _, lab in train), [])
    test_data, test_labels = arrays["test_batch"]
    assert torch.equal(b.test.images, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    assert b.test.labels.tolist() == test_labels
    assert b.classes == CIFAR10_NAMES
    assert b.mean == (0.4914, 0.4822, 0.4465) and b.std == (0.2470, 0.2435, 0.2616)


@pytest.mark.parametrize("layout", ["archive-file", "archive-folder", "extracted-parent", "extracted-folder"])
def test_cifar10_layouts(tmp_path, layout):
    blobs, arrays = cifar10_pickles()
    folder = tmp_path / "c10"
    folder.mkdir()
    if layout.startswith("archive"):
        write_tar(folder / "cifar-10-python.tar.gz", "cifar-10-batches-py", blobs)
        path = folder / "cifar-10-python.tar.gz" if layout == "archive-file" else folder
    else:
        (folder / "cifar-10-batches-py").mkdir()
        for name, blob in blobs.items():
            (folder / "cifar-10-batches-py" / name).write_bytes(blob)
        path = folder if layout == "extracted-parent" else folder / "cifar-10-batches-py"
    _check_cifar10(load_dataset("cifar10", path=str(path)), arrays)


def test_cifar10_via_ddkit_data(tmp_path, monkeypatch):
    blobs, arrays = cifar10_pickles()
    (tmp_path / "cifar10").mkdir()
    write_tar(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "cifar-10-batches-py", blobs)
    monkeypatch.setenv("DDKIT_DATA", str(tmp_path))
    _check_cifar10(load_dataset("cifar10"), arrays)


def test_cifar100_archive(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"fine{i:02d}" for i in range(100)]
    train = rng.integers(0, 256, (103, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    train_labels = [99, 0, 5, *range(100)]  # every class has training images
    blobs = {
        "train": pickle.dumps({b"data": train, b"fine_labels": train_labels, b"coarse_labels": [0] * 103}),
        "test": pickle.dumps({b"data": test, b"fine_labels": [7, 8, 9], b"coarse_labels": [0] * 3}),
        "meta": pickle.dumps({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []}),
    }
    write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", blobs)
    b = load_dataset("cifar100", path=str(tmp_path / "cifar-100-python.tar.gz"))
    assert torch.equal(b.train.images, torch.from_numpy(train.reshape(-1, 3, 32, 32)))
    assert b.train.labels.tolist() == train_labels and b.test.labels.tolist() == [7, 8, 9]
    assert b.classes == names
    assert b.mean == (0.5071, 0.4865, 0.4409) and b.std == (0.2673, 0.2564, 0.2762)


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    blobs, _ = cifar10_pickles()
    blobs["data_batch_3"] = pickle.dumps({b"data": _Evil(marker), b"labels": [0]})
    write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", blobs)
    with pytest.raises(DataError, match="data_batch_3.*(posix|os|nt)\\.system"):
        load_dataset("cifar10", path=str(tmp_path / "cifar-10-python.tar.gz"))
    assert not marker.exists()


def test_safe_unpickle_accepts_numpy1_names_and_rejects_junk():
    from ddkit.data.sources import safe_unpickle

    a = np.arange(12, dtype=np.uint8).reshape(2, 6)
    legacy = pickle.dumps({b"data": a}, protocol=3).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in legacy  # as in the official (numpy 1.x era) files
    assert np.array_equal(safe_unpickle(legacy, "x")[b"data"], a)
    assert np.array_equal(safe_unpickle(pickle.dumps({b"data": a}, protocol=5), "x")[b"data"], a)
    with pytest.raises(DataError, match="subprocess.Popen"):
        safe_unpickle(pickle.dumps({b"data": __import__("subprocess").Popen}), "x")
    with pytest.raises(DataError, match="x is corrupt"):
        safe_unpickle(b"\x80\x04junk", "x")


def test_cifar_symlink_member_is_refused(tmp_path):
    blobs, _ = cifar10_pickles()
    del blobs["test_batch"]
    write_tar(tmp_path / "a.tar.gz", "cifar-10-batches-py", blobs)
    with tarfile.open(tmp_path / "a.tar.gz", "r:gz") as src, tarfile.open(tmp_path / "b.tar.gz", "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        link = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        dst.addfile(link)
    with pytest.raises(DataError, match="not a regular file"):
        load_dataset("cifar10", path=str(tmp_path / "b.tar.gz"))


def test_cifar_truncated_archive(tmp_path):
    blobs, _ = cifar10_pickles()
    write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", blobs)
    raw = (tmp_path / "cifar-10-python.tar.gz").read_bytes()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("cifar10", path=str(tmp_path / "cifar-10-python.tar.gz"))


def test_cifar_archive_missing_member(tmp_path):
    blobs, _ = cifar10_pickles()
    del blobs["data_batch_4"]
    write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", blobs)
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/data_batch_4"):
        load_dataset("cifar10", path=str(tmp_path))


def test_cifar_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("DDKIT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"not found \(searched .*cifar10.*DDKIT_DATA"):
        load_dataset("cifar10")


# ------------------------------------------------------------------------------------------------
# ImageFolder


def test_imagefolder_roundtrip_and_stats(tmp_path):
    arrays = write_imagefolder(tmp_path, {"dog": 3, "cat": 2})
    b = load_dataset("imagefolder", path=str(tmp_path))
    assert b.classes == ["cat", "dog"]  # sorted folder names
    assert b.train.images.shape == (5, 3, 8, 8) and b.test.images.shape == (5, 3, 8, 8)
    assert b.train.labels.tolist() == [0, 0, 1, 1, 1]
    expected = np.stack(arrays[("train", "cat")] + arrays[("train", "dog")]).transpose(0, 3, 1, 2)
    assert torch.equal(b.train.images, torch.from_numpy(expected))
    x = expected.astype(np.float64) / 255
    assert b.mean == pytest.approx(tuple(x.mean(axis=(0, 2, 3))), abs=1e-9)
    assert b.std == pytest.approx(tuple(x.std(axis=(0, 2, 3))), abs=1e-9)
    assert b.source == str(tmp_path)


def test_imagefolder_skips_hidden_subfolders(tmp_path):
    """Copies in hidden folders inside a class (Jupyter's .ipynb_checkpoints) are not images of the class."""
    write_imagefolder(tmp_path, {"dog": 3, "cat": 2})
    write_png(tmp_path / "train" / "dog" / ".ipynb_checkpoints" / "000-checkpoint.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "train" / "dog" / "more" / "extra.png", np.zeros((8, 8, 3), np.uint8))  # a visible one counts
    b = load_dataset("imagefolder", path=str(tmp_path))
    assert b.train.class_counts(2).tolist() == [2, 4]


def test_imagefolder_explicit_class_order(tmp_path):
    write_imagefolder(tmp_path, {"a": 1, "b": 2, "c": 3})
    b = load_dataset("imagefolder", path=str(tmp_path), classes=["c", "a", "b"])
    assert b.classes == ["c", "a", "b"]
    assert b.train.labels.tolist() == [0, 0, 0, 1, 2, 2]


def test_imagefolder_classes_must_cover_folders(tmp_path):
    write_imagefolder(tmp_path, {"a": 1, "b": 1, "c": 1})
    with pytest.raises(DataError, match=r"class folders \['c'\] not in dataset.classes"):
        load_dataset("imagefolder", path=str(tmp_path), classes=["a", "b"])
    with pytest.raises(DataError, match=r"lists \['z'\]"):
        load_dataset("imagefolder", path=str(tmp_path), classes=["a", "b", "c", "z"])


def test_imagefolder_refuses_testing_on_the_train_split(tmp_path):
    """test_split naming the train folder used to load, and every accuracy was measured on training images."""
    write_imagefolder(tmp_path, {"a": 1, "b": 1})
    for split in ("train", "./train"):
        with pytest.raises(ConfigError, match="both name .*train.*held-out"):
            load_dataset("imagefolder", path=str(tmp_path), test_split=split)
    assert load_dataset("imagefolder", path=str(tmp_path), test_split="test").test.labels.tolist() == [0, 1]


def test_imagefolder_mismatched_class_sets(tmp_path):
    write_imagefolder(tmp_path, {"a": 1, "b": 1})
    write_png(tmp_path / "train" / "extra" / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"only in train: \['extra'\], only in test: \[\]"):
        load_dataset("imagefolder", path=str(tmp_path))


def test_imagefolder_grayscale_and_resize(tmp_path):
    write_imagefolder(tmp_path, {"a": 2, "b": 2}, size=10, mode="L")
    b = load_dataset("imagefolder", path=str(tmp_path))
    assert b.image_shape == (1, 10, 10) and len(b.mean) == 1
    b = load_dataset("imagefolder", path=str(tmp_path), image_size=6)
    assert b.image_shape == (1, 6, 6)
    # one RGB file turns the whole set RGB (gray images replicated over channels)
    rgb = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    write_png(tmp_path / "test" / "a" / "rgb.png", rgb)
    b = load_dataset("imagefolder", path=str(tmp_path))
    assert b.image_shape == (3, 10, 10)
    assert torch.equal(b.train.images[:, 0], b.train.images[:, 2])


def test_imagefolder_conversions_are_logged_once_per_split_and_recorded(tmp_path, caplog):
    """Mixed grayscale/RGB/RGBA/palette files were converted without a word, transparency lost silently."""
    import logging

    from PIL import Image

    write_imagefolder(tmp_path, {"a": 2, "b": 2}, size=4)
    plain = load_dataset("imagefolder", path=str(tmp_path))
    assert "conversions" not in plain.describe() and plain.conversions == {}
    rgb = np.full((4, 4, 3), 200, np.uint8)
    opaque, clear = np.full((4, 4, 4), 255, np.uint8), np.full((4, 4, 4), 255, np.uint8)
    opaque[..., :3], clear[..., :3], clear[0, 0, 3] = 10, 20, 0
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(tmp_path / "train" / "a" / "gray.png")  # L
    Image.fromarray(opaque).save(tmp_path / "train" / "a" / "opaque.png")  # RGBA, every pixel opaque
    Image.fromarray(clear).save(tmp_path / "train" / "b" / "clear.png")  # RGBA with a transparent pixel
    Image.fromarray(rgb).convert("P").save(tmp_path / "train" / "b" / "palette.png")  # P
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(tmp_path / "test" / "b" / "gray.png")
    with caplog.at_level(logging.INFO, logger="ddkit.data.sources"):
        b = load_dataset("imagefolder", path=str(tmp_path))
    assert b.conversions == {"train": {"grayscale_to_rgb": 1, "palette_to_rgb": 1, "alpha_dropped": 2,
                                       "transparent": 1},
                             "test": {"grayscale_to_rgb": 1}}
    assert b.describe()["conversions"] == b.conversions
    assert b.fingerprint == b.describe()["fingerprint"] and b.image_shape == (3, 4, 4)
    assert b.train.images[2].unique().tolist() == [7]  # a/gray.png (after 000, 001.png): its value in every channel
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("imagefolder ")]
    assert lines == [
        ("WARNING", f"imagefolder {tmp_path / 'train'} (8 images): grayscale repeated to RGB: 1, palette expanded to "
                    "RGB: 1, alpha dropped: 2 (1 with transparent pixels, which now show the colour stored under them; "
                    "flatten them onto a background first to choose it)"),
        ("INFO", f"imagefolder {tmp_path / 'test'} (5 images): grayscale repeated to RGB: 1"),
    ]
    # a subset keeps the record; the record is no part of the fingerprint (which covers the pixels)
    assert load_dataset("imagefolder", path=str(tmp_path), train_per_class=1).conversions == b.conversions
    assert dataclasses.replace(b, conversions={}).fingerprint == b.fingerprint


def test_imagefolder_palette_with_transparency_loads_without_a_warning(tmp_path, recwarn):
    """PIL warns (UserWarning) converting a palette image whose transparency is a byte string to RGB."""
    from PIL import Image

    write_imagefolder(tmp_path, {"a": 1, "b": 1}, size=4)
    p = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).convert("P")
    p.save(tmp_path / "test" / "a" / "t.png", transparency=bytes([0, 0] + [255] * 254))
    with Image.open(tmp_path / "test" / "a" / "t.png") as im:
        assert im.info["transparency"] == bytes([0, 0] + [255] * 254)
    b = load_dataset("imagefolder", path=str(tmp_path))
    assert b.conversions == {"test": {"palette_to_rgb": 1, "alpha_dropped": 1, "transparent": 1}}
    assert [str(w.message) for w in recwarn] == []


def test_imagefolder_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    write_imagefolder(tmp_path, {"a": 2, "b": 2}, size=4, mode="L")
    wide = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    for split in ("train", "test"):
        for c in ("a", "b"):
            for f in (tmp_path / split / c).iterdir():
                Image.fromarray(wide).save(f)  # mode I;16
    assert Image.open(next((tmp_path / "train" / "a").iterdir())).mode.startswith("I")
    b = load_dataset("imagefolder", path=str(tmp_path))
    assert b.image_shape == (1, 4, 4)
    assert b.train.images[0, 0, 0].tolist() == [0, 1, 128, 255]


def test_imagefolder_inconsistent_sizes(tmp_path):
    write_imagefolder(tmp_path, {"a": 2, "b": 2}, size=8)
    write_png(tmp_path / "train" / "b" / "big.png", np.zeros((12, 9, 3), np.uint8))
    with pytest.raises(DataError, match=r"big.png is 9x12 .* set dataset.image_size"):
        load_dataset("imagefolder", path=str(tmp_path))
    b = load_dataset("imagefolder", path=str(tmp_path), image_size=8)
    assert b.image_shape == (3, 8, 8) and len(b.train) == 5


def test_imagefolder_corrupt_image(tmp_path):
    write_imagefolder(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "test" / "b" / "broken.JPG").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="cannot read image .*broken.JPG"):
        load_dataset("imagefolder", path=str(tmp_path))


def test_imagefolder_empty_class_and_missing_path(tmp_path):
    write_imagefolder(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "test" / "b" / "000.png").unlink()
    (tmp_path / "test" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", path=str(tmp_path))
    assert str(err.value) == (f"class folder {tmp_path / 'test' / 'b'} has no images (.bmp, .jpeg, .jpg, .png, .webp); "
                              "add images, or remove the class folder 'b' from both splits (train/ and test/)")
    with pytest.raises(DataError, match=r"from both splits \(train/ and test/\) and from dataset.classes$"):
        load_dataset("imagefolder", path=str(tmp_path), classes=["a", "b"])
    with pytest.raises(ConfigError, match="set dataset.path"):
        load_dataset("imagefolder")


def test_imagefolder_custom_splits(tmp_path):
    write_imagefolder(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "test").rename(tmp_path / "val")
    with pytest.raises(DataError, match="test_split"):
        load_dataset("imagefolder", path=str(tmp_path))
    b = load_dataset("imagefolder", path=str(tmp_path), test_split="val")
    assert len(b.test) == 2


# ------------------------------------------------------------------------------------------------
# tensors


def _tensors(seed: int = 0, float_images: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tr = torch.randint(0, 256, (6, 3, 5, 5), generator=gen, dtype=torch.uint8)
    te = torch.randint(0, 256, (3, 3, 5, 5), generator=gen, dtype=torch.uint8)
    if float_images:
        tr, te = tr.float() / 255, te.float() / 255
    return {"train_images": tr, "train_labels": torch.tensor([0, 1, 2, 0, 1, 2]),
            "test_images": te, "test_labels": torch.tensor([2, 1, 0])}


def test_tensors_safetensors_roundtrip(tmp_path):
    from safetensors.torch import save_file

    t = _tensors()
    save_file(t, tmp_path / "d.safetensors", metadata={"classes": '["x", "y", "z"]'})
    b = load_dataset("tensors", path=str(tmp_path / "d.safetensors"))
    assert torch.equal(b.train.images, t["train_images"]) and torch.equal(b.test.images, t["test_images"])
    assert b.train.labels.tolist() == [0, 1, 2, 0, 1, 2] and b.classes == ["x", "y", "z"]
    x = t["train_images"].double() / 255
    assert b.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert b.std == pytest.approx(x.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-9)


@pytest.mark.parametrize(("classes", "error"), [("[" * 100000 + "]" * 100000, "RecursionError"),
                                                ("9" * 5000, "ValueError"), ('["x", "y"', "JSONDecodeError")])
def test_tensors_classes_that_json_cannot_read_are_one_line_errors(tmp_path, classes, error):
    """Class names nested 100000 deep (RecursionError) or a 5000-digit number (ValueError, past Python's
    int-digit limit) in the metadata went out as a traceback; only a JSONDecodeError was caught."""
    from safetensors.torch import save_file

    from ddkit.errors import DataError

    save_file(_tensors(), tmp_path / "d.safetensors", metadata={"classes": classes})
    with pytest.raises(DataError) as raised:
        load_dataset("tensors", path=str(tmp_path / "d.safetensors"))
    assert str(raised.value) == (f"{tmp_path / 'd.safetensors'}: metadata 'classes' is not valid JSON ({error}); "
                                 "store json.dumps(list_of_names)")


def test_tensors_pt_with_classes_and_norm(tmp_path):
    t = _tensors(float_images=True)
    t["mean"], t["std"] = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4, 0.5, 0.6])
    torch.save({**t, "classes": ["p", "q", "r"]}, tmp_path / "d.pt")
    b = load_dataset("tensors", path=str(tmp_path / "d.pt"))
    assert b.train.images.dtype == torch.float32 and torch.equal(b.train.images, t["train_images"])
    assert b.classes == ["p", "q", "r"]
    assert b.mean == pytest.approx((0.1, 0.2, 0.3)) and b.std == pytest.approx((0.4, 0.5, 0.6))


def test_tensors_default_class_names(tmp_path):
    torch.save(_tensors(), tmp_path / "d.pt")
    assert load_dataset("tensors", path=str(tmp_path / "d.pt")).classes == ["0", "1", "2"]


def test_tensors_missing_keys(tmp_path):
    from safetensors.torch import save_file

    t = _tensors()
    del t["test_labels"]
    save_file(t, tmp_path / "d.safetensors")
    with pytest.raises(DataError, match=r"lacks \['test_labels'\].*train_images.*test_labels"):
        load_dataset("tensors", path=str(tmp_path / "d.safetensors"))


def test_tensors_wrong_rank_and_range(tmp_path):
    t = _tensors()
    t["train_images"] = t["train_images"][:, 0]
    torch.save(t, tmp_path / "rank.pt")
    with pytest.raises(DataError, match=r"train_images has shape \(6, 5, 5\)"):
        load_dataset("tensors", path=str(tmp_path / "rank.pt"))
    t = _tensors(float_images=True)
    t["test_images"] = t["test_images"] * 255
    torch.save(t, tmp_path / "range.pt")
    with pytest.raises(DataError,
                       match=r"test_images must lie in \[0, 1\], found \[0, 25.*\]; divide by 255 or store uint8$"):
        load_dataset("tensors", path=str(tmp_path / "range.pt"))
    # a distilled set's optimised pixels (a pt export of dm) were told to divide by 255
    t["test_images"] = t["test_images"] / 255 * 2.5 - 0.75
    torch.save(t, tmp_path / "range.pt")
    with pytest.raises(DataError,
                       match=r"test_images must lie in \[0, 1\], found \[-0.75, .*\]; clamp them to \[0, 1\]$"):
        load_dataset("tensors", path=str(tmp_path / "range.pt"))


def test_tensors_label_rows_are_told_to_argmax_a_column_to_flatten(tmp_path):
    t = _tensors()
    torch.save({**t, "train_labels": torch.nn.functional.one_hot(t["train_labels"])}, tmp_path / "l.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "l.pt"))
    assert str(err.value) == (f"{tmp_path / 'l.pt'}: train_labels has shape (6, 3), expected [N] class indices; store "
                              "train_labels.argmax(1) for one-hot or score rows")
    torch.save({**t, "test_labels": t["test_labels"][:, None]}, tmp_path / "l.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "l.pt"))
    assert str(err.value) == f"{tmp_path / 'l.pt'}: test_labels has shape (3, 1), expected [N]; flatten it"
    torch.save({**t, "test_labels": t["test_labels"][None, :]}, tmp_path / "l.pt")  # one row of labels: not argmax
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "l.pt"))
    assert str(err.value) == f"{tmp_path / 'l.pt'}: test_labels has shape (1, 3), expected [N]; flatten it"


def test_tensors_channels_last_is_refused_but_ambiguous_shapes_load(tmp_path):
    """[N, H, W, C] images were read as H channels of width C and crashed later in pooling."""
    t = _tensors()
    for c in (3, 1):
        nhwc = torch.zeros(6, 12, 12, c, dtype=torch.uint8)
        torch.save({**t, "train_images": nhwc, "test_images": nhwc[:3]}, tmp_path / "nhwc.pt")
        with pytest.raises(DataError) as err:
            load_dataset("tensors", path=str(tmp_path / "nhwc.pt"))
        assert str(err.value) == (f"{tmp_path / 'nhwc.pt'}: train_images has shape (6, 12, 12, {c}), which looks like "
                                  "[N, H, W, C] (channels last) but is read as [N, C, H, W]; save "
                                  "images.permute(0, 3, 1, 2) instead")
    # 1-4 in two places could be either layout: read as [N, C, H, W] as documented (8-channel 4x4 maps too)
    for shape in ((4, 6, 4), (3, 8, 3), (1, 9, 1), (4, 4, 4), (8, 4, 4), (16, 3, 3)):
        x = torch.randint(0, 256, (6, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        torch.save({**t, "train_images": x, "test_images": x[:3]}, tmp_path / "ok.pt")
        assert load_dataset("tensors", path=str(tmp_path / "ok.pt")).image_shape == shape


def test_tensors_std_too_small_to_normalise_is_refused(tmp_path):
    """A stored std of 1e-30 used to pass (only std > 0 was asked): the teacher then diverged, and its error
    said to lower the lr."""
    t = _tensors(float_images=True)
    path = tmp_path / "s.pt"
    for std in (1e-30, 0.0):
        torch.save({**t, "mean": torch.tensor([0.1, 0.2, 0.3]), "std": torch.tensor([0.4, std, 0.6])}, path)
        with pytest.raises(DataError, match=r"s.pt: std must be at least 1e-06 \(of pixels in 0..1; below it "
                                            r"normalised pixels blow up\), found \[0.4.*\]; store the training "
                                            r"images' mean and std, or neither mean nor std \(then they are "
                                            r"computed\)$"):
            load_dataset("tensors", path=str(path))
    torch.save({**t, "mean": torch.tensor([0.1, 0.2, 0.3]), "std": torch.tensor([0.4, 1e-5, 0.6])}, path)
    assert load_dataset("tensors", path=str(path)).std[1] == pytest.approx(1e-5)


def test_tensors_bad_norm_and_classes(tmp_path):
    t = _tensors(float_images=True)
    for key, bad in (("mean", [float("nan"), 0.2, 0.3]), ("std", [0.4, float("inf"), 0.6])):
        torch.save({**t, "mean": torch.tensor([0.1, 0.2, 0.3]), "std": torch.tensor([0.4, 0.5, 0.6]),
                    key: torch.tensor(bad)}, tmp_path / "n.pt")
        with pytest.raises(DataError, match=rf"{key} must hold finite numbers"):
            load_dataset("tensors", path=str(tmp_path / "n.pt"))
    # a test label past the training classes: a class without training images, named
    torch.save({**t, "test_labels": torch.tensor([2, 1, 4])}, tmp_path / "c.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "c.pt"))
    assert str(err.value) == (f"{tmp_path / 'c.pt'}: train_labels hold {{0, 1, 2}} and test_labels also "
                              "{4}, but without 'classes' the labels must be 0..K-1, each with training images; drop "
                              "the test images whose labels no training image has")
    torch.save({**t, "classes": ["x", "y", "z", "w"]}, tmp_path / "w.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "w.pt"))
    assert str(err.value) == (f"{tmp_path / 'w.pt'}: class 'w' has no training images; check the labels "
                              "(train_labels, test_labels), or drop each such class from 'classes'")
    torch.save({**t, "train_images": t["train_images"][:, :0], "test_images": t["test_images"][:, :0]},
               tmp_path / "z.pt")
    with pytest.raises(DataError, match=r"images have shape \[0, 5, 5\] \(C, H, W\)"):
        load_dataset("tensors", path=str(tmp_path / "z.pt"))
    torch.save({**t, "train_images": t["train_images"][:, :, :0], "test_images": t["test_images"][:, :, :0]},
               tmp_path / "h.pt")
    with pytest.raises(DataError, match=r"images have shape \[3, 0, 5\] \(C, H, W\).*C, H and W >= 1"):
        load_dataset("tensors", path=str(tmp_path / "h.pt"))


def test_tensors_stray_label_is_named_briefly_not_expanded(tmp_path):
    """A stray label (2**40) used to build a class name for every index up to it (hanging and eating
    memory); 500 made an error listing 497 class names. Both now name the labels found; without
    'classes' there is no 'classes' to drop names from, so the fix is remapping the labels."""
    t = _tensors()
    remap = ("but without 'classes' the labels must be 0..K-1, each with training images; remap the labels to 0..K-1 "
             "(torch.unique(labels, return_inverse=True)[1] over the train and test labels together)")
    for stray in (500, 2**40):
        torch.save({**t, "train_labels": torch.tensor([0, 1, 2, 0, 1, stray])}, tmp_path / "s.pt")
        with pytest.raises(DataError) as err:
            load_dataset("tensors", path=str(tmp_path / "s.pt"))
        assert str(err.value) == f"{tmp_path / 's.pt'}: train_labels hold {{0, 1, 2, {stray}}}, {remap}"
    torch.save({**t, "train_labels": torch.tensor([3, 7, 3, 7, 3, 7]), "test_labels": torch.tensor([3, 7, 3])},
               tmp_path / "s.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "s.pt"))
    assert str(err.value) == f"{tmp_path / 's.pt'}: train_labels hold {{3, 7}}, {remap}"
    t12 = {k: v.repeat(2, *[1] * (v.dim() - 1)) if k.startswith("train") else v for k, v in t.items()}
    torch.save({**t12, "train_labels": torch.arange(12) * 3}, tmp_path / "s.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "s.pt"))
    drop_then = remap.replace("; remap", "; drop the test images whose labels no training image has, then remap")
    assert str(err.value) == (f"{tmp_path / 's.pt'}: train_labels hold {{0, 3, 6, 9, 12, ..., 33}} (12 values) and "
                              f"test_labels also {{1, 2}}, {drop_then}")
    names = [f"c{i}" for i in range(20)]
    torch.save({**t, "classes": names}, tmp_path / "n.pt")
    with pytest.raises(DataError, match=r"classes \['c3', 'c4', 'c5', 'c6', 'c7', \.\.\.\] \(17 in all\) have no"):
        load_dataset("tensors", path=str(tmp_path / "n.pt"))


class Payload:
    """A custom class: weights_only loading must refuse to rebuild it."""

    def __init__(self) -> None:
        self.value = 1


def test_tensors_pt_uses_weights_only(tmp_path):
    torch.save({**_tensors(), "extra": Payload()}, tmp_path / "d.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "d.pt"))
    assert str(err.value) == (f"{tmp_path / 'd.pt'} holds objects that safe (weights_only) loading "
                              f"refuses (unsupported global {__name__}.Payload); save only a dict of tensors plus an "
                              "optional list of class names")


def test_tensors_pt_of_numpy_arrays_is_told_to_save_tensors(tmp_path):
    """torch's refusal of numpy arrays came through with its terminal escape codes (bold) and no fix."""
    torch.save({k: v.numpy() for k, v in _tensors().items()}, tmp_path / "np.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "np.pt"))
    assert "\x1b" not in str(err.value)
    head = f"{tmp_path / 'np.pt'} holds objects that safe (weights_only) loading refuses (unsupported global numpy."
    assert str(err.value).startswith(head)  # numpy.core or numpy._core, by numpy version
    assert str(err.value).endswith("._reconstruct); numpy arrays are not tensors: save torch.from_numpy(a)")


def test_one_line_strips_terminal_escape_codes():
    from ddkit.data.sources import _one_line

    exc = RuntimeError("Weights only load failed, \x1b[1mdo those steps only if you trust it\x1b[0m. \n\t(1) more")
    assert _one_line(exc) == "Weights only load failed, do those steps only if you trust it."


def test_tensors_bad_file(tmp_path):
    (tmp_path / "d.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a valid safetensors file"):
        load_dataset("tensors", path=str(tmp_path / "d.safetensors"))
    (tmp_path / "d.pt").write_bytes(b"garbage")  # was told as objects that weights_only loading refuses
    with pytest.raises(DataError, match=r"d.pt is not a readable torch file \(neither a torch.save archive nor a "
                                        r"pickle\); re-create it with torch.save$"):
        load_dataset("tensors", path=str(tmp_path / "d.pt"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("tensors", path=str(tmp_path / "nope.pt"))


# ------------------------------------------------------------------------------------------------
# real data


@pytest.mark.slow
def test_real_fashion_mnist(caplog):
    root = os.environ.get("DDKIT_DATA")
    if not root or not (Path(root) / "fashion-mnist").is_dir():
        pytest.skip("set DDKIT_DATA to a folder with fashion-mnist/ to run")
    with caplog.at_level(logging.WARNING, logger="ddkit.data.sources"):
        b = load_dataset("fashion-mnist")
        sub = load_dataset("fashion-mnist", train_per_class=5)
    assert caplog.records == []  # the published files pass the check of their statistics, and their subsets
    # recorded artifacts and caches are keyed by it: it must never change
    assert b.fingerprint == "1e4051f3afc1aa62" and sub.fingerprint == "e4bdf67653ed50b3"
    assert len(b.train) == 60000 and len(b.test) == 10000
    assert b.image_shape == (1, 28, 28)
    assert b.train.class_counts(10).tolist() == [6000] * 10
    assert b.test.class_counts(10).tolist() == [1000] * 10
    assert int(b.train.labels[0]) == 9 and b.classes[9] == "Ankle boot"
    mean, std = (b.train.images.double() / 255).mean().item(), (b.train.images.double() / 255).std().item()
    assert mean == pytest.approx(b.mean[0], abs=1e-4) and std == pytest.approx(b.std[0], abs=1e-4)


def test_synthetic_refuses_settings_it_cannot_honour():
    """The generated dataset has no files, splits or resizing: such settings are refused, not recorded as
    if applied, and its own options are checked before generating."""
    assert load_dataset("synthetic", options={"num_classes": 3, "image_size": 5}).train.images.shape[1:] == (1, 5, 5)
    for kw in ({"image_size": 8}, {"path": "/tmp/x"}, {"train_split": "foo"}):
        with pytest.raises(ConfigError, match="'synthetic' is generated, so dataset.path, image_size and train_split"):
            load_dataset(DatasetConfig(name="synthetic", **kw))
    for key, bad in (("num_classes", 0), ("num_classes", 1.5), ("image_size", 0), ("channels", 0), ("seed", -1)):
        with pytest.raises(ConfigError, match=rf"dataset.options.{key} must be an integer >= \d, got {bad}"):
            load_dataset("synthetic", options={key: bad})
    with pytest.raises(ConfigError, match=r"dataset.options.noise must be a number in \[0, 3.403e\+38\] \(float32's "
                                          r"range, in which the images are drawn\), got 'abc'"):
        load_dataset("synthetic", options={"noise": "abc"})
    with pytest.raises(DataError,
                       match=r"dataset.classes \['a', 'b', 'c', 'd'\] does not match the classes of 'synthetic'"):
        load_dataset(DatasetConfig(name="synthetic", classes=["a", "b", "c", "d"]))
    assert load_dataset(DatasetConfig(name="synthetic", classes=[f"class{c}" for c in range(4)])).num_classes == 4


def _blobs(cfg: DatasetConfig):
    """A plugin's source (as the QA's myplug.blobs): 3 generated classes of 1x12x12 images, reading
    ``num_classes`` and nothing else."""
    from ddkit.data import DataBundle, ImageSet

    n = int(cfg.options.get("num_classes", 3))
    labels = torch.arange(n).repeat_interleave(4)
    images = torch.rand(len(labels), 1, 12, 12, generator=torch.Generator().manual_seed(0))
    return DataBundle("blobs", ImageSet(images, labels), ImageSet(images, labels), [f"c{i}" for i in range(n)],
                      (0.5,), (0.25,))


@pytest.fixture
def plugin_sources(monkeypatch):
    """``blobs`` registered as a plugin registers it (declaring nothing) and ``blobs_declared`` declaring
    its options and that it reads none of the file settings; both gone after the test."""
    for name in ("blobs", "blobs_declared"):
        monkeypatch.delitem(DATASETS._entries, name, raising=False)
        monkeypatch.delitem(DATASETS.declared, name, raising=False)
    DATASETS.register("blobs")(_blobs)
    DATASETS.add("blobs_declared", _blobs, options={"num_classes": 3, "seed": 0}, settings=())
    yield
    for name in ("blobs", "blobs_declared"):
        DATASETS._entries.pop(name)
        DATASETS.declared.pop(name)


def test_a_plugin_source_gets_the_generic_checks(plugin_sources, caplog):
    """A source registered by a plugin ignored dataset.classes (the class order), image_size, path, the split
    names and misspelt options: the checks lived in each built-in source. load_dataset now makes them for all."""
    import logging

    for name in ("blobs", "blobs_declared"):
        with pytest.raises(DataError, match=r"^dataset.classes \['c2', 'c1', 'c0'\] does not match the classes of "
                           rf"'{name}' \['c0', 'c1', 'c2'\]; remove dataset.classes or list exactly these names"):
            load_dataset(DatasetConfig(name=name, classes=["c2", "c1", "c0"]))
        assert load_dataset(DatasetConfig(name=name, classes=["c0", "c1", "c2"])).classes == ["c0", "c1", "c2"]
        data = load_dataset(name, options={"num_classes": 4}, train_per_class=2)
        assert data.train.class_counts(4).tolist() == [2] * 4
    # the size it loaded tells that it did not resize, declared or not
    with pytest.raises(ConfigError, match="^dataset.image_size 32 does not apply to 'blobs', which loaded 12x12 "
                                          "images; remove it$"):
        load_dataset(DatasetConfig(name="blobs", image_size=32))
    # declared: what it does not read is refused, a misspelt option with did-you-mean
    for kw, words in (({"image_size": 32}, "dataset.image_size; remove it"),
                      ({"path": "/nonexistent", "test_split": "val"}, "dataset.path, dataset.test_split; remove them")):
        with pytest.raises(ConfigError, match=rf"^dataset 'blobs_declared' does not read {words} \(it reads none of "
                                              r"dataset.path, image_size, train_split, test_split\)$"):
            load_dataset(DatasetConfig(name="blobs_declared", **kw))
    with pytest.raises(ConfigError, match=r"^unknown dataset.options \['num_clases'\] for 'blobs_declared'; did you "
                                          r"mean 'num_classes'\? valid: \['num_classes', 'seed'\]$"):
        load_dataset("blobs_declared", options={"num_clases": 5})
    # declared nothing: it may read them, so they are loaded as before, with a warning (once) that names them
    with caplog.at_level(logging.WARNING, logger="ddkit.data.base"):
        for _ in range(2):
            assert load_dataset("blobs", path="/nonexistent", options={"num_clases": 5}).num_classes == 3
    warned = [r.getMessage() for r in caplog.records if "dataset.path" in r.getMessage()]
    assert warned == ["dataset 'blobs' does not declare what it reads, so dataset.path and dataset.options "
                      "['num_clases'] could not be checked (a source that ignores them loads other data than asked); "
                      "its author can declare them: DATASETS.register('blobs', options=[...], settings=[...])"]
    with pytest.raises(DDKitError, match="give settings as a list of"):
        DATASETS.register("blobs_bad", settings=["size"])


def test_built_in_sources_declare_what_they_read():
    assert {name: DATASETS.declared[name] for name in DATASETS} == {
        **{name: (frozenset(), frozenset({"path"})) for name in ("cifar10", "cifar100", "fashion-mnist", "mnist",
                                                                  "tensors")},
        "imagefolder": (frozenset(), frozenset({"path", "image_size", "train_split", "test_split"})),
        "synthetic": (frozenset({"num_classes", "channels", "image_size", "train_per_class", "test_per_class", "seed",
                                 "noise"}), frozenset()),
    }


# ------------------------------------------------------------------------------------------------
# hints and refusals found by the data-source audit of 2026-12-06


def test_idx_hints_name_the_folder_ddkit_data_must_hold(tmp_path, monkeypatch):
    """The hint said "set DDKIT_DATA / dataset.path to a folder with the four IDX files", which is what a
    user with DDKIT_DATA=.../fashion-mnist had done; DDKIT_DATA must hold fashion-mnist/."""
    monkeypatch.setenv("DDKIT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"set DDKIT_DATA \(files in \$DDKIT_DATA/fashion-mnist/\) or dataset.path to a "
                                        "folder with the four IDX files"):
        load_dataset("fashion-mnist")


def test_idx_folder_mixing_gzip_and_plain_loads_from_ddkit_data(tmp_path, monkeypatch):
    """The mixed-files fallback ran only for an explicit dataset.path: the same folder under DDKIT_DATA
    was "not found", though every file is there."""
    write_idx_folder(tmp_path / "gz")
    mixed = tmp_path / "data" / "fashion-mnist"
    write_idx_folder(mixed)
    gzipped = mixed / "t10k-images-idx3-ubyte.gz"
    gzipped.with_suffix("").write_bytes(gzip.decompress(gzipped.read_bytes()))
    gzipped.unlink()
    monkeypatch.setenv("DDKIT_DATA", str(tmp_path / "data"))
    got, want = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", path=str(tmp_path / "gz"))
    assert torch.equal(got.test.images, want.test.images) and got.source == str(mixed)


def test_idx_path_errors_name_what_is_wrong_with_the_folder(tmp_path):
    """A file given as the folder, and a folder lacking one plain file, were told to hold all four .gz files."""
    write_idx_folder(tmp_path / "fm", gz=False)
    with pytest.raises(DataError, match=r"dataset.path .*train-images-idx3-ubyte is a file, not a folder; point "
                                        "dataset.path at the folder holding"):
        load_dataset("fashion-mnist", path=str(tmp_path / "fm" / "train-images-idx3-ubyte"))
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"fm lacks t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\); put the "
                                        "files there$"):
        load_dataset("fashion-mnist", path=str(tmp_path / "fm"))


def test_tensors_source_names_a_folder_as_one(tmp_path):
    with pytest.raises(DataError, match="tensors file .* is a folder, not a file; set dataset.path to a .safetensors"):
        load_dataset("tensors", path=str(tmp_path))


def test_a_dataset_of_one_class_is_refused(tmp_path):
    """One class: every prediction is right, so teachers and students reported a meaningless 100%."""
    write_imagefolder(tmp_path, {"only": 3}, mode="L")
    with pytest.raises(DataError, match=r"dataset 'imagefolder' \(.*\) has 1 class \['only'\]; classification needs at "
                                        "least 2"):
        load_dataset("imagefolder", path=str(tmp_path))


def test_a_large_image_is_read_with_one_warning_per_load(tmp_path, recwarn, caplog):
    """PIL warns (several stderr lines per image, beside ddkit's one-line error) of images between its pixel
    limit and twice that; ddkit reads them like any other, or names the file in one line when it is damaged.
    They were read without a word (a 140 KB PNG of 144 Mpx took 14 s and 180 MB); one warning per load now
    names the largest and counts the others."""
    write_imagefolder(tmp_path, {"a": 2, "b": 2}, mode="L")
    rng = np.random.default_rng(0)
    write_png(tmp_path / "train" / "a" / "000.png", rng.integers(0, 256, (10, 10), dtype=np.uint8))
    write_png(tmp_path / "test" / "b" / "001.png", rng.integers(0, 256, (9, 9), dtype=np.uint8))
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 70  # a 9x9 or 10x10 image is then "large" (below twice the limit), 8x8 is not
        with caplog.at_level("WARNING", logger="ddkit"):
            b = load_dataset("imagefolder", path=str(tmp_path), image_size=8)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert b.train.images.shape == (4, 1, 8, 8)
    assert not [w for w in recwarn.list if issubclass(w.category, Image.DecompressionBombWarning)]
    big = tmp_path / "train" / "a" / "000.png"
    assert [r.getMessage() for r in caplog.records] == [
        f"imagefolder: {big} is 10x10 = 100 pixels ({big.stat().st_size} B on disk), over PIL's decompression-bomb "
        "limit of 70 pixels (1 other file too); decoded anyway, which takes memory and time of its full size: shrink "
        "or remove such files if they are not meant to be there"]


def test_split_names_and_sizes_are_checked_with_one_prefix(tmp_path):
    """An empty split name was read as the root folder ("only in train: ['test', 'train']"); range errors
    read "dataset: dataset.image_size"."""
    from ddkit.config import from_dict

    for split in ("", ".", "./", ".."):
        with pytest.raises(ConfigError,
                           match=f"train_split must be the name of a folder in dataset.path, got {split!r}"):
            DatasetConfig(name="imagefolder", path=str(tmp_path), train_split=split)
    with pytest.raises(ConfigError, match="^dataset.image_size must be >= 1, got 0$"):
        from_dict(DatasetConfig, {"name": "imagefolder", "image_size": 0}, "dataset")



def test_image_size_beyond_any_decodable_set_is_refused_before_decoding(tmp_path, monkeypatch):
    """image_size=100000 (a typo) decoded each 8x8 PNG into 30 GB and ended in a MemoryError traceback."""
    import ddkit.data.sources as sources
    from ddkit.config import from_dict

    write_imagefolder(tmp_path, {"a": 2, "b": 2}, size=8)
    monkeypatch.setattr(sources, "_read_images", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ConfigError, match=r"^dataset.image_size must be at most 4096 \(a decoded 3-channel image of "
                                          r"that size is 48 MiB\), got 100000; resize to a smaller square$"):
        load_dataset("imagefolder", path=str(tmp_path), image_size=100000)
    assert from_dict(DatasetConfig, {"name": "imagefolder", "image_size": 4096}, "dataset").image_size == 4096


def test_class_folders_differing_in_unicode_form_show_apart(tmp_path):
    import unicodedata

    write_imagefolder(tmp_path, {"a": 1, "caf\u00e9": 1}, mode="L")
    nfc = tmp_path / "test" / "caf\u00e9"
    nfc.rename(tmp_path / "test" / unicodedata.normalize("NFD", "caf\u00e9"))
    with pytest.raises(DataError, match=r"only in train: \['caf\\xe9'\], only in test: \['cafe\\u0301'\]"):
        load_dataset("imagefolder", path=str(tmp_path))


def test_tensors_splits_of_other_channels_or_size_name_what_differs(tmp_path):
    """Test images of other channels than the train images were told to 'use one image size'."""
    for name, test_images, fix in [("channels", _tensors()["test_images"][:, :1], "the same number of channels"),
                                   ("size", _tensors()["test_images"][:, :, :4, :4], "the same image size")]:
        torch.save({**_tensors(), "test_images": test_images}, tmp_path / f"{name}.pt")
        with pytest.raises(DataError, match=rf"test images \(.*\) differ from train images \(3, 5, 5\); give both "
                                            rf"splits {fix}$"):
            load_dataset("tensors", path=str(tmp_path / f"{name}.pt"))


def test_imageset_refuses_integer_images_other_than_uint8():
    """int64 0..255 images were taken as float pixels (255x too bright), without a word."""
    from ddkit.data import ImageSet

    with pytest.raises(DataError, match=r"^images have dtype torch.int64; give uint8 0..255 or float 0..1 images "
                                        r"\(images.to\(torch.uint8\) for integer pixels\)$"):
        ImageSet(torch.randint(0, 256, (2, 1, 4, 4)), torch.tensor([0, 1]))
    ok = ImageSet(torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8), torch.tensor([0, 1]))
    assert ok.float_images().max() <= 1.0
    half = ImageSet(torch.full((2, 1, 4, 4), 0.5, dtype=torch.float16), torch.tensor([0, 1]))
    assert half.images.dtype == torch.float32 and float(half.float_images().max()) == 0.5


def test_fingerprint_follows_in_place_edits_and_new_splits(monkeypatch):
    """The fingerprint was computed once per bundle: after an in-place edit of its labels or a new ImageSet the
    random-baseline / full-reference caches and the data checks kept seeing the old data."""
    from ddkit.data.base import DataBundle, ImageSet

    def fresh(b: DataBundle) -> str:  # a new bundle over the same tensors: nothing remembered
        return dataclasses.replace(b).fingerprint

    b = load_dataset("synthetic", train_per_class=3, test_per_class=2)
    before = b.fingerprint
    assert before == fresh(b) == load_dataset("synthetic", train_per_class=3, test_per_class=2).fingerprint
    b.train.labels.zero_()  # in place (a label-noise study)
    edited = b.fingerprint
    assert edited != before and edited == fresh(b)
    b.test.images[0, 0, 0, 0] += 1  # in place, the test split's pixels
    assert b.fingerprint not in (before, edited) and b.fingerprint == fresh(b)
    other = load_dataset("synthetic", train_per_class=3, test_per_class=2, subset_seed=1)
    b.train = ImageSet(other.train.images, other.train.labels)  # a new split assigned
    assert b.fingerprint == fresh(b) != edited
    b.classes[0] = "renamed"
    assert b.fingerprint == fresh(b)
    assert pickle.loads(pickle.dumps(b)).fingerprint == b.fingerprint  # the memo's weak references are not pickled
    hashed = []
    real = DataBundle._hash_data
    monkeypatch.setattr(DataBundle, "_hash_data", lambda self: hashed.append(1) or real(self))
    fp = b.fingerprint
    assert b.fingerprint == b.fingerprint == fp and hashed == []  # unchanged data: remembered, not hashed again


def test_data_and_sets_in_inference_tensors_are_fingerprinted():
    """Tensors made under torch.inference_mode keep no version counter: reading it raised, so such a bundle could
    no longer be used by any stage. They are hashed every time instead, to the same value as normal tensors."""
    from ddkit.data.base import ImageSet
    from ddkit.distilled import DistilledSet
    from ddkit.labels.fkd import distilled_fingerprint, set_fingerprint

    b = load_dataset("synthetic", train_per_class=3, test_per_class=2)
    want = b.fingerprint
    with torch.inference_mode():
        b.train = ImageSet(b.train.images.clone(), b.train.labels.clone())
    assert b.train.images.is_inference() and b.fingerprint == want
    s = DistilledSet(b.train.images[:4], b.train.labels[:4], {}, None, None)
    assert distilled_fingerprint(s) == set_fingerprint(b.train.images[:4].clone(), b.train.labels[:4].clone())


@pytest.mark.parametrize(("mean", "std", "words"), [
    ((0.5,), (0.0,), r"std must be at least 1e-06 \(of pixels in 0..1; below it normalised pixels blow up\), found "
                     r"\[0.0\]; return the per-channel mean and std of its training images in 0..1"),
    ((float("nan"),), (0.25,), r"mean must hold finite numbers, found \[nan\]; return the per-channel mean and std"),
    ((125.0,), (60.0,), r"mean \[125.0\] and std \[60.0\] are not of pixels in 0..1 \(whose mean and std are at "
                        r"most 1; 0..255-scale values train to chance\); divide them by 255"),
    ((0.5,), (60.0,), r"mean \[0.5\] and std \[60.0\] are not of pixels in 0..1"),
])
def test_a_plugin_source_with_a_normalisation_no_training_can_use_is_refused(monkeypatch, mean, std, words):
    """std 0 from a user's source was accepted (QA 18c #20): every stage then diverged with advice to lower its lr;
    0..255-scale statistics trained to chance without a word. The tensors source's check now covers every source."""
    from ddkit.data import DataBundle

    def source(cfg):
        data = _blobs(cfg)
        return DataBundle("zstd", data.train, data.test, data.classes, mean, std)

    monkeypatch.setitem(DATASETS._entries, "zstd", source)
    with pytest.raises(DataError, match=rf"^dataset source 'zstd' \(test_data\..*source\): {words}"):
        load_dataset("zstd")
    for mean, std in (((0.0,), (1.0,)), ((1.0,), (1e-6,))):  # no scaling; the bounds themselves
        monkeypatch.setitem(DATASETS._entries, "zstd", lambda cfg, mean=mean, std=std: DataBundle(
            "zstd", _blobs(cfg).train, _blobs(cfg).test, ["c0", "c1", "c2"], mean, std))
        assert load_dataset("zstd").std == std


def test_a_plugin_sources_mean_and_std_as_tensors_or_arrays_are_taken_as_floats(monkeypatch):
    """QA 19a F1: a source's mean/std as a NumPy array passed the check, then distill failed with a float64-vs-float32
    RuntimeError; a tensor's (``images.mean(dim=(0, 2, 3))``) was refused as not holding finite numbers. Both are taken
    as a tuple of Python floats; a single number or strings are refused in one line."""
    import numpy as np

    from ddkit.data import DataBundle
    from ddkit.pipeline import DistillConfig, distill

    def source_of(mean, std):
        return lambda cfg: DataBundle("zms", _blobs(cfg).train, _blobs(cfg).test, ["c0", "c1", "c2"], mean, std)

    loaded = []
    for mean, std in ((np.array([0.5]), np.array([0.25])), (torch.tensor([0.5]), torch.tensor([0.25])),
                      ([np.float32(0.5)], (torch.tensor(0.25),)), ([0.5], [0.25])):
        monkeypatch.setitem(DATASETS._entries, "zms", source_of(mean, std))
        loaded.append(load_dataset("zms"))
        assert loaded[-1].mean == (0.5,) and loaded[-1].std == (0.25,)
        assert all(type(v) is float for v in (*loaded[-1].mean, *loaded[-1].std))
    ds = distill(loaded[0], DistillConfig(method="dm", ipc=1, options={"model": "tiny_convnet", "iterations": 1,
                                                                  "batch_real": 4}))
    assert ds.images.shape == (3, 1, 12, 12)  # the NumPy array's statistics
    monkeypatch.setitem(DATASETS._entries, "zms", source_of((0, ), (1, )))  # Python ints stay as they are
    assert load_dataset("zms").mean == (0,) and type(load_dataset("zms").mean[0]) is int
    monkeypatch.setitem(DATASETS._entries, "zms", source_of(0.5, (0.25,)))
    with pytest.raises(DataError) as err:
        load_dataset("zms")
    assert str(err.value) == ("dataset 'zms': mean must be a sequence of one number per channel (1), found float 0.5; "
                              "give a tuple of floats")
    monkeypatch.setitem(DATASETS._entries, "zms", source_of(("0.5",), (0.25,)))
    with pytest.raises(DataError, match=r"^dataset source 'zms' \(.*\): mean must hold numbers \(Python floats\), "
                                        r"found \['0.5'\]; return the per-channel mean"):
        load_dataset("zms")


def test_a_plugin_source_returning_no_databundle_is_refused(monkeypatch):
    """A loader returning a tuple gave `AttributeError: 'tuple' object has no attribute 'classes'` (QA 18c #3)."""
    x, y = torch.rand(10, 1, 8, 8), torch.arange(10) % 2
    monkeypatch.setitem(DATASETS._entries, "badsrc", lambda cfg: (x, y, x, y))
    with pytest.raises(DDKitError) as err:
        load_dataset("badsrc")
    assert re.fullmatch(r"dataset source 'badsrc' \(test_data\..*<lambda>\) returned a tuple; a "
                        r"loader returns a ddkit.data.DataBundle\(name, train=ImageSet\(images, labels\), "
                        r"test=ImageSet\(...\), classes, mean, std\) \(README, Models\)", str(err.value)), \
        str(err.value)


def test_mnist_and_fashion_mnist_files_named_as_the_other_are_refused(tmp_path):
    """`--dataset mnist` on the Fashion-MNIST files loaded them as digits (same names, shapes and sizes) and recorded
    MNIST's classes and normalisation; the reverse too (QA 18d F8). The published files' first labels tell them
    apart: one named as the other is refused; other IDX data of the same shape still loads."""
    # the first labels (train, test) of the published files
    heads = {"mnist": ([5, 0, 4, 1, 9, 2, 1, 3, 1, 4], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]),
             "fashion-mnist": ([9, 0, 0, 3, 0, 2, 7, 2, 5, 5], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])}

    def write(folder: Path, train_head: list[int], test_head: list[int]) -> None:
        folder.mkdir()
        for prefix, n, head in (("train", 60000, train_head), ("t10k", 10000, test_head)):
            labels = np.arange(n) % 10
            labels[:10] = head
            (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_images(np.zeros((n, 28, 28), np.uint8)))
            (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_labels(labels))

    for name, other in (("mnist", "fashion-mnist"), ("fashion-mnist", "mnist")):
        folder = tmp_path / other
        write(folder, *heads[other])
        with pytest.raises(DataError, match=f"^{folder} holds {other}'s files \\(their labels are {other}'s\\), not "
                                            f"{name}'s; use --dataset {other}, or point dataset.path at the {name} "
                                            "files$"):
            load_dataset(name, path=str(folder))
        assert load_dataset(other, path=str(folder)).name == other
    write(tmp_path / "own", list(range(10)), list(range(10)))
    assert load_dataset("mnist", path=str(tmp_path / "own")).classes[0] == "0"


# ------------------------------------------------------------------------------------------------
# edge cases of the sources (QA22a)


def test_imagefolder_follows_symlinked_subfolders_once(tmp_path, caplog):
    """A symlinked subfolder of a class folder was skipped without a word (rglob does not follow it), while
    symlinked class folders and files were followed; a link loop is searched once, with a warning."""
    write_imagefolder(tmp_path / "d", {"a": 2, "b": 2})
    extra = write_imagefolder(tmp_path / "extra", {"x": 3}, seed=1)
    (tmp_path / "d" / "train" / "a" / "more").symlink_to(tmp_path / "extra" / "train" / "x")
    (tmp_path / "d" / "train" / "a" / "loop").symlink_to(tmp_path / "d" / "train" / "a")
    with caplog.at_level(logging.WARNING, logger="ddkit.data.sources"):
        b = load_dataset("imagefolder", path=str(tmp_path / "d"), decode_cache=False)
    assert b.train.class_counts(2).tolist() == [5, 2]
    a = tmp_path / "d" / "train" / "a"
    assert torch.equal(b.train.images[2:5], torch.from_numpy(np.stack(extra[("train", "x")]).transpose(0, 3, 1, 2)))
    assert [r.getMessage() for r in caplog.records] == [
        f"imagefolder: skipping {a / 'loop'}, a link to a folder searched already (a link loop, or two links to one "
        "folder)"]


@pytest.mark.parametrize("decode_cache", [True, False])
def test_imagefolder_broken_link_is_an_unreadable_image(tmp_path, decode_cache):
    """A dangling link named like an image was left out silently; it is as unreadable as a damaged file."""
    write_imagefolder(tmp_path / "d", {"a": 2, "b": 2})
    link = tmp_path / "d" / "train" / "a" / "9.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", path=str(tmp_path / "d"), decode_cache=decode_cache)
    assert str(err.value) == f"cannot read image {link} (No such file or directory); replace or delete the file"


def test_imagefolder_logs_files_skipped_for_their_suffix(tmp_path, caplog):
    """Files of other formats (.tif, .gif, ...) were left out without a count, even with -v."""
    write_imagefolder(tmp_path, {"a": 2, "b": 2})
    for name in ("a/x.tif", "a/y.TIF", "b/z.gif", "b/sub/README", "b/.hidden.tif"):
        path = tmp_path / "train" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="ddkit.data.sources"):
        b = load_dataset("imagefolder", path=str(tmp_path), decode_cache=False)
    assert len(b.train) == 4
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"imagefolder {tmp_path / 'train'}: skipped 4 files that are not .bmp/.jpeg/.jpg/.png/.webp "
                       "images (no suffix: 1, .gif: 1, .tif: 2)"]  # one line, for the split that has them


def _fixed_bundle(classes: list[str]):
    from ddkit.data import DataBundle, ImageSet

    g = torch.Generator().manual_seed(0)
    tr = ImageSet(torch.randint(0, 256, (4, 1, 4, 4), generator=g, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
    te = ImageSet(torch.randint(0, 256, (3, 1, 4, 4), generator=g, dtype=torch.uint8), torch.tensor([0, 1, 2]))
    return DataBundle("x", tr, te, classes, (0.5,), (0.25,))


def test_class_names_with_a_newline_are_refused_and_fingerprints_stay(tmp_path):
    """Class lists ['a\\nb', 'c', 'd'] and ['a', 'b\\nc', 'd'] had one fingerprint (names joined by newlines). Such
    names are refused instead, so the fingerprint of every other class list stays what artifacts recorded."""
    assert _fixed_bundle(["a", "b", "c"]).fingerprint == "44a8470d5fbcf7ff"
    assert _fixed_bundle(["T-shirt/top", "ü ñ", "tab\u00a0nbsp"]).fingerprint == "2f5715995bb305eb"
    with pytest.raises(DataError) as err:
        _fixed_bundle(["a\nb", "c", "d"])
    assert str(err.value) == "dataset 'x': class name 'a\\nb' holds the control character '\\n'; rename the class"
    with pytest.raises(DataError, match=r"class name 'b\\tc' holds the control character '\\t'"):
        _fixed_bundle(["a", "b\tc", "d"])
    t = _tensors()
    torch.save({**t, "classes": ["a", "b\nc", "d"]}, tmp_path / "nl.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "nl.pt"))
    assert str(err.value) == (f"{tmp_path / 'nl.pt'}: class name 'b\\nc' in 'classes' holds the control character "
                              "'\\n'; rename it")


def test_class_names_that_are_not_utf8_are_refused_in_one_line(tmp_path, capsys):
    """A class folder named in another encoding (read with surrogate escapes) crashed with a UnicodeEncodeError
    traceback, exit 1, after writing the decode cache; the same from a tensors file's 'classes'."""
    from ddkit.cli import main

    write_imagefolder(tmp_path / "d", {"a": 2, "b": 2})
    for split in ("train", "test"):
        os.rename(os.fsencode(tmp_path / "d" / split / "a"), os.fsencode(tmp_path / "d" / split) + b"/\xffa")
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", path=str(tmp_path / "d"))
    assert str(err.value) == f"class folder name b'\\xffa' in {tmp_path / 'd' / 'train'} is not valid UTF-8; rename it"
    assert not list((Path(os.environ["DDKIT_CACHE"]) / "imagefolder").glob("[!.]*"))  # refused before decoding
    code = main(["distill", "--method", "random", "--ipc", "1", "--dataset", "imagefolder", "--data-path",
                 str(tmp_path / "d"), "--out", str(tmp_path / "out"), "-q"])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.count("\n") == 1 and "is not valid UTF-8; rename it" in err_text
    assert not (tmp_path / "out").exists()
    torch.save({**_tensors(), "classes": ["\udcff", "b", "c"]}, tmp_path / "sur.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "sur.pt"))
    assert str(err.value) == f"{tmp_path / 'sur.pt'}: class name b'\\xff' in 'classes' is not valid UTF-8; rename it"


def test_tensors_uint8_images_of_only_0_and_1_are_refused(tmp_path):
    """Float 0..1 images cast with .byte() (or masks) loaded silently as near-black images of 0 and 1/255."""
    t = _tensors()
    g = torch.Generator().manual_seed(1)
    t["train_images"] = (torch.rand(t["train_images"].shape, generator=g) > 0.5).to(torch.uint8)
    torch.save(t, tmp_path / "bin.pt")
    with pytest.raises(DataError) as err:
        load_dataset("tensors", path=str(tmp_path / "bin.pt"))
    assert str(err.value) == (f"{tmp_path / 'bin.pt'}: uint8 train_images hold only 0s and 1s (of 0..255), which read "
                              "as black pixels; store them as float 0..1 or multiply them by 255")
    t["train_images"] = t["train_images"] * 2  # dark, but 0 and 2: real (if odd) pixels load
    torch.save(t, tmp_path / "dark.pt")
    assert int(load_dataset("tensors", path=str(tmp_path / "dark.pt")).train.images.max()) == 2
    t = _tensors()
    t["test_images"] = (t["test_images"] > 127).to(torch.uint8)  # a dark test split alone is no sign of it
    torch.save(t, tmp_path / "dark_test.pt")
    assert int(load_dataset("tensors", path=str(tmp_path / "dark_test.pt")).test.images.max()) == 1


def test_idx_files_that_are_not_the_dataset_are_warned_of_once(tmp_path, caplog):
    """Own IDX data loaded as fashion-mnist got its class names and published mean/std without a word."""
    write_idx_folder(tmp_path / "noise", n_train=200)
    write_idx_folder(tmp_path / "small")  # the tests' 20 images: too few to judge, no warning
    with caplog.at_level(logging.WARNING, logger="ddkit.data.sources"):
        load_dataset("fashion-mnist", path=str(tmp_path / "small"))
        assert caplog.records == []
        for _ in range(2):  # once per process (evaluation loads the data again per student)
            b = load_dataset("fashion-mnist", path=str(tmp_path / "noise"), train_per_class=2)
    assert len(b.train) == 20 and b.mean == (0.2861,)
    assert [r.getMessage() for r in caplog.records] == [
        f"fashion-mnist: the training images in {tmp_path / 'noise'} have pixel mean 0.498 and std 0.290, but "
        "fashion-mnist's have 0.2861 and 0.353: these are not fashion-mnist's files, yet they get its class names "
        "and mean/std; load other IDX data as a tensors file (ddkit.data.save_tensors) or an imagefolder, which "
        "compute both and take the class names"]


def test_ipc_above_a_train_per_class_subset_names_it(tmp_path):
    """The message said the class has 2 training images (of thousands) and never named dataset.train_per_class."""
    from ddkit.methods.base import check_ipc

    write_idx_folder(tmp_path / "fm")  # 2 training images per class
    with pytest.raises(DataError) as err:
        check_ipc(load_dataset("fashion-mnist", path=str(tmp_path / "fm"), train_per_class=1), 2)
    assert str(err.value) == ("ipc 2 is larger than the smallest class ('T-shirt/top' has 1 training images after "
                              "dataset.train_per_class=1); raise dataset.train_per_class or use an ipc of 1 or less "
                              "(--ipc, or ipc / ipcs in a config)")
    for per_class in (None, 5):  # the data, not the subset, limits it
        with pytest.raises(DataError) as err:
            check_ipc(load_dataset("fashion-mnist", path=str(tmp_path / "fm"), train_per_class=per_class), 3)
        assert str(err.value) == ("ipc 3 is larger than the smallest class ('T-shirt/top' has 2 training images); "
                                  "use an ipc of 2 or less (--ipc, or ipc / ipcs in a config)")


def test_imagefolder_layout_mistakes_get_a_fix_that_works(tmp_path, capsys):
    """Class folders of images right under the root (torchvision's layout) and a root one level too deep (a split
    folder) were told to "set dataset.train_split", which cannot fix either (QA 22a F11)."""
    from ddkit.cli import main

    write_imagefolder(tmp_path / "base", {"a": 2, "b": 2})
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", path=str(tmp_path / "base" / "train"))
    assert str(err.value) == (f"imagefolder root {tmp_path / 'base' / 'train'} is the train/ split folder itself, not "
                              f"the folder holding the splits; point dataset.path at {tmp_path / 'base'} (the folder "
                              "holding train/)")
    with pytest.raises(DataError, match=rf"is the test/ split folder itself, .*; point dataset.path at "
                                        rf"{re.escape(str(tmp_path / 'base'))} \(the folder holding train/\)$"):
        load_dataset("imagefolder", path=str(tmp_path / "base" / "test"))
    # the CLI names its flag; no output folder
    code = main(["teacher", "--dataset", "imagefolder", "--data-path", str(tmp_path / "base" / "train"), "--model",
                 "tiny_convnet", "--epochs", "1", "--out", str(tmp_path / "t"), "-q"])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.count("\n") == 1 and not (tmp_path / "t").exists()
    assert err_text.endswith(f"; point --data-path at {tmp_path / 'base'} (the folder holding train/)\n"), err_text
    # custom split names are named as given
    os.rename(tmp_path / "base" / "train", tmp_path / "base" / "tr")
    with pytest.raises(DataError, match=r"is the tr/ split folder itself, .*\(the folder holding tr/\)$"):
        load_dataset("imagefolder", path=str(tmp_path / "base" / "tr"), train_split="tr")
    os.rename(tmp_path / "base" / "tr", tmp_path / "base" / "train")
    # torchvision's layout: root/<class>/<image>, no split folders
    (tmp_path / "flat").mkdir()
    for name in ("a", "b"):
        shutil.copytree(tmp_path / "base" / "train" / name, tmp_path / "flat" / name)
    (tmp_path / "flat" / ".ipynb_checkpoints").mkdir()  # hidden: no class
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", path=str(tmp_path / "flat"))
    flat = tmp_path / "flat"
    assert str(err.value) == (f"imagefolder root {flat} has class folders of images (a, b) but no train/ and test/ "
                              "split folders; ddkit needs root/train/<class>/ and root/test/<class>/ (a held-out test "
                              f"split): move the class folders into {flat / 'train'} and put held-out images of each "
                              f"class in {flat / 'test'}/<class>/")
    # following the fix loads the data
    (flat / "train").mkdir()
    for name in ("a", "b"):
        os.rename(flat / name, flat / "train" / name)
    with pytest.raises(DataError, match=r"^imagefolder has no test split folder .*; create it or set "
                                        r"dataset.test_split$"):
        load_dataset("imagefolder", path=str(flat))  # no class folders of images left at the root: as before
    shutil.copytree(tmp_path / "base" / "test", flat / "test")
    assert load_dataset("imagefolder", path=str(flat)).fingerprint == load_dataset(
        "imagefolder", path=str(tmp_path / "base")).fingerprint
    # one split folder there, the class folders beside it: only the missing one is named
    shutil.rmtree(flat / "test")
    shutil.copytree(tmp_path / "base" / "test" / "a", flat / "a")
    with pytest.raises(DataError, match=rf"^imagefolder root {re.escape(str(flat))} has class folders of images \(a\) "
                                        r"but no test/ split folder; ddkit needs"):
        load_dataset("imagefolder", path=str(flat))


def test_every_source_refuses_a_class_without_training_images(tmp_path, capsys):
    """IDX and CIFAR data with classes that have no training images loaded, so `ddkit teacher` trained on them and
    only distillation refused them; a tensors file was refused at load (QA 22a F12). Now load_dataset refuses them for
    every source, with the one message check_ipc also gives for data built by hand."""
    from ddkit.cli import main
    from ddkit.data import DataBundle, ImageSet
    from ddkit.methods.base import check_ipc

    fix = "give every class training images, or drop each such class (and its test images) from the data"
    write_idx_folder(tmp_path / "fm", train_classes=5)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", path=str(tmp_path / "fm"), train_per_class=1)
    assert str(err.value) == (f"dataset 'fashion-mnist' ({tmp_path / 'fm'}): classes {FASHION_MNIST_CLASSES[5:]} have "
                              f"no training images; {fix}")
    write_idx_folder(tmp_path / "fm9", train_classes=9)
    with pytest.raises(DataError, match=r"^dataset 'mnist' \(.*fm9\): class '9' has no training images; give"):
        load_dataset("mnist", path=str(tmp_path / "fm9"))
    # the data of every class loads, also as a subset
    write_idx_folder(tmp_path / "ok")
    subset = load_dataset("fashion-mnist", path=str(tmp_path / "ok"), train_per_class=1)
    assert subset.train.class_counts(10).tolist() == [1] * 10
    blobs, _ = cifar10_pickles(train_classes=4)
    write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", blobs)
    with pytest.raises(DataError, match=r"^dataset 'cifar10' \(.*cifar-10-python.tar.gz\): classes \['c4', 'c5', "
                                        r"'c6', 'c7', 'c8', \.\.\.\] \(6 in all\) have no training images; give"):
        load_dataset("cifar10", path=str(tmp_path / "cifar-10-python.tar.gz"))

    def gappy(cfg: DatasetConfig) -> DataBundle:
        images = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
        return DataBundle("gappy", ImageSet(images, torch.tensor([0, 0, 2, 2])),
                          ImageSet(images, torch.tensor([0, 1, 2, 1])), ["x", "y", "z"], (0.5,), (0.25,))

    DATASETS.add("gappy", gappy, options=(), settings=())
    try:
        with pytest.raises(DataError) as err:
            load_dataset("gappy")
        assert str(err.value) == f"dataset 'gappy': class 'y' has no training images; {fix}"
    finally:
        DATASETS._entries.pop("gappy")
        DATASETS.declared.pop("gappy")
    with pytest.raises(DataError) as err:  # built by hand, never loaded
        check_ipc(gappy(DatasetConfig(name="gappy")), 1)
    assert str(err.value) == f"dataset 'gappy': class 'y' has no training images; {fix}"
    # the teacher command refuses it before training: one line, exit 2, no output folder
    code = main(["teacher", "--dataset", "fashion-mnist", "--data-path", str(tmp_path / "fm"), "--model",
                 "tiny_convnet", "--epochs", "1", "--out", str(tmp_path / "t"), "-q"])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.count("\n") == 1 and not (tmp_path / "t").exists()
    assert err_text == (f"error: dataset 'fashion-mnist' ({tmp_path / 'fm'}): classes {FASHION_MNIST_CLASSES[5:]} have "
                        f"no training images; {fix}\n")
