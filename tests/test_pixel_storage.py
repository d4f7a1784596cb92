"""distill.image_dtype: a distilled set's images stored as float32 (default) or 8-bit pixels."""

import json
import logging

import pytest
import torch

from conftest import run_ddkit
from ddkit.config import to_dict
from ddkit.data.base import DatasetConfig, load_dataset
from ddkit.distilled import DistilledSet, quantise, to_uint8
from ddkit.evaluate import evaluate
from ddkit.evaluate.protocol import ProtocolConfig
from ddkit.evaluate.runner import teacher_logits
from ddkit.labels import relabel
from ddkit.pipeline import DistillConfig, distill, distill_hash
from ddkit.teacher import TeacherConfig, train_teacher
from ddkit.training import TrainConfig

DCFG = DatasetConfig(name="synthetic")
# a recover method (the pipeline's soft labels), RDED and CV-DD (label their images themselves, in fit)
CASES = {"sre2l": ({"iterations": 3}, True), "rded": ({"mipc": 12, "num_crop": 3, "factor": 2}, False),
         "cvdd": ({"iterations": 2, "committee_size": 1, "stats": "conv", "init": "real"}, False)}


@pytest.fixture(scope="module")
def data():
    return load_dataset(DCFG)


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    cfg = TeacherConfig(model="convnet", model_options={"depth": 2, "width": 8, "norm": "batchnorm"},
                        train=TrainConfig(epochs=2, batch_size=32, lr=0.05))
    return train_teacher(data, cfg, tmp_path_factory.mktemp("t") / "teacher")


@pytest.fixture(scope="module")
def sets(data, teacher, tmp_path_factory):
    """Each case distilled with float32 and with uint8 images, same seed."""
    root = tmp_path_factory.mktemp("sets")
    out = {}
    for method, (options, soft) in CASES.items():
        for dtype in ("float32", "uint8"):
            cfg = DistillConfig(method=method, ipc=2, seed=1, options=options, soft_labels=soft, image_dtype=dtype)
            distill(data, cfg, DCFG, root / f"{method}-{dtype}", teacher)
            out[method, dtype] = DistilledSet.load(root / f"{method}-{dtype}")
    return out


@pytest.mark.parametrize("method", list(CASES))
def test_uint8_set_is_the_float_set_rounded_and_a_quarter_of_the_bytes(sets, method):
    floats, bytes_ = sets[method, "float32"], sets[method, "uint8"]
    assert floats.images.dtype == torch.float32 and bytes_.images.dtype == torch.uint8
    assert torch.equal(bytes_.images, to_uint8(floats.images))
    n, c, h, w = bytes_.images.shape
    m = bytes_.manifest
    assert m["bytes"]["images"] == n * c * h * w == floats.manifest["bytes"]["images"] // 4
    assert m["config"]["distill"]["image_dtype"] == "uint8"
    assert m["images"] == {"dtype": "uint8", "pixel_range": [0, 255],
                           "quantised": {"from": "float32", "pixel_range": floats.manifest["images"]["pixel_range"],
                                         "clipped_pixels": 0}}
    assert "quantised" not in floats.manifest["images"]
    assert m["config_hash"] != floats.manifest["config_hash"]  # another set: a run does not reuse the float one


@pytest.mark.parametrize("method", list(CASES))
def test_stored_soft_labels_describe_the_stored_8_bit_images(sets, teacher, data, method):
    """The pipeline (sre2l's soft_labels), RDED and CV-DD (in fit) label the images once rounded, not the float
    ones."""
    from ddkit.methods.cvdd import committee_logits

    def labels(images):
        if method == "cvdd":  # its committee (here the teacher alone) with batch-specific BatchNorm statistics
            weights = sets[method, "uint8"].manifest["meta"]["soft_labels"]["weights"]
            return committee_logits([teacher], images, weights, data.mean, data.std, "cpu", bn="batch", seed=1)
        return teacher_logits(teacher, images, data.mean, data.std, "cpu")

    stored = sets[method, "uint8"]
    assert torch.allclose(stored.soft_labels, labels(stored.images), atol=1e-5)
    from_floats = labels(sets[method, "float32"].images)
    assert not torch.allclose(stored.soft_labels, from_floats, atol=1e-5)  # the order matters at this precision


def test_uint8_set_evaluates_and_relabels(sets, teacher, data, tmp_path):
    stored = sets["sre2l", "uint8"]
    protocol = ProtocolConfig(student="tiny_convnet", random_baseline=False, full_reference=False,
                              train=TrainConfig(epochs=2, batch_size=8))
    report = evaluate(stored, protocol, [0], data=data)
    acc = report["results"]["distilled"]["mean"]
    assert 0.0 <= acc <= 1.0
    # a store of per-epoch labels of the 8-bit images, replayed at evaluation
    store = relabel(stored, teacher, 2, seed=0, out=tmp_path / "fkd")
    fkd = ProtocolConfig(student="tiny_convnet", label_mode="fkd", loss="kl", fkd_store=str(tmp_path / "fkd"),
                         random_baseline=False, full_reference=False, train=TrainConfig(epochs=2, batch_size=8))
    acc = evaluate(stored, fkd, [0], data=data, teacher=teacher, fkd_store=store)["results"]["distilled"]["mean"]
    assert 0.0 <= acc <= 1.0


def test_pixels_outside_0_1_are_clipped_and_counted(data, tmp_path, caplog):
    """DM leaves 0..1: uint8 clips those pixels (as a PNG of the set would), with a warning and their count."""
    floats = distill(data, DistillConfig(method="dm", ipc=2, options={"iterations": 3}), DCFG)
    assert floats.images.min() < 0 or floats.images.max() > 1
    with caplog.at_level(logging.WARNING, logger="ddkit.distilled"):
        distill(data, DistillConfig(method="dm", ipc=2, options={"iterations": 3}, image_dtype="uint8"), DCFG,
                tmp_path / "dm")
    stored = DistilledSet.load(tmp_path / "dm")
    assert torch.equal(stored.images, to_uint8(floats.images))
    levels = (floats.images * 255).round()
    clipped = int(((levels < 0) | (levels > 255)).sum())
    assert clipped > 0 and stored.manifest["images"]["quantised"]["clipped_pixels"] == clipped
    assert f"{clipped} of {floats.images.numel()} pixels" in caplog.text and "float32" in caplog.text
    manifest = json.loads((tmp_path / "dm" / "manifest.json").read_text())
    assert manifest["images"]["quantised"]["pixel_range"] == floats.manifest["images"]["pixel_range"]


def test_quantise_counts_only_pixels_rounding_leaves_outside_0_255():
    x = torch.tensor([-0.001, -0.01, 0.0, 0.5, 1.0, 1.0001, 1.01, 2.0]).view(1, 1, 2, 4)
    out, clipped = quantise(x)
    assert out.dtype == torch.uint8 and torch.equal(out, to_uint8(x))
    assert out.flatten().tolist() == [0, 0, 0, 128, 255, 255, 255, 255]
    assert clipped == 3  # -0.01, 1.01 and 2.0; a hair outside 0..1 rounds to 0 or 255 anyway
    same, none = quantise(out)
    assert same is out and none == 0


def test_quantise_works_a_chunk_at_a_time(monkeypatch):
    """No float temporary of the whole set: it rounds a few images at a time, to the same bytes."""
    from ddkit import distilled

    x = torch.rand(10, 3, 8, 8) * 1.2 - 0.1
    seen = []
    chunks = distilled.pixel_chunks
    monkeypatch.setattr(distilled, "CHECK_BYTES", 3 * 8 * 8 * 4 * 3)  # three images per chunk
    monkeypatch.setattr(distilled, "pixel_chunks", lambda t: (seen.append(len(c)) or c for c in chunks(t)))
    out, clipped = quantise(x)
    assert seen == [3, 3, 3, 1]
    levels = (x * 255).round()
    assert torch.equal(out, to_uint8(x)) and clipped == int(((levels < 0) | (levels > 255)).sum())


def test_default_keeps_the_set_and_its_key(data):
    cfg = DistillConfig(method="sre2l", ipc=2)
    assert cfg.image_dtype == "float32" and "image_dtype" not in to_dict(cfg, identity=True)
    assert distill_hash(DistillConfig(method="sre2l", ipc=2, image_dtype="float32"), data, None) == \
        distill_hash(cfg, data, None)
    assert distill_hash(DistillConfig(method="sre2l", ipc=2, image_dtype="uint8"), data, None) != \
        distill_hash(cfg, data, None)
    # sets of real pixels are uint8 already and stay as they were
    plain = distill(data, DistillConfig(method="random", ipc=2), DCFG)
    rounded = distill(data, DistillConfig(method="random", ipc=2, image_dtype="uint8"), DCFG)
    assert torch.equal(plain.images, rounded.images) and "quantised" not in rounded.manifest["images"]


def test_an_unknown_image_dtype_is_refused():
    from ddkit.errors import ConfigError

    with pytest.raises(ConfigError, match="image_dtype"):
        DistillConfig(image_dtype="float16")


def test_cli_distill_image_dtype_and_show(tmp_path):
    from ddkit.describe import describe

    run_ddkit(tmp_path, "distill", "--dataset", "synthetic", "--method", "dm", "--ipc", "1", "--image-dtype", "uint8",
              "--set", "distill.options.iterations=2", "--out", "s")
    ds = DistilledSet.load(tmp_path / "s")
    assert ds.images.dtype == torch.uint8 and ds.manifest["config"]["distill"]["image_dtype"] == "uint8"
    text = describe(tmp_path / "s")
    assert "uint8 pixels rounded from float32 in [" in text and "clipped" in text
