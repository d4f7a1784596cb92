import json

import pytest
import torch
from PIL import Image

import ddkit
from ddkit.artifacts import SCHEMA_VERSION, atomic_dir, build_lock
from ddkit.data.base import DatasetConfig
from ddkit.errors import DDKitError
from ddkit.methods import METHODS, FitContext
from ddkit.pipeline import DistillConfig, distill


def _random_set(tiny, tmp_path, ipc=3, seed=0):
    cfg = DistillConfig(method="random", ipc=ipc, seed=seed)
    return distill(tiny, cfg, DatasetConfig(name="synthetic"), tmp_path / f"r{ipc}-{seed}")


def test_random_is_stratified_deterministic_and_seeded(tiny):
    fit = lambda seed: METHODS.get("random")(METHODS.get("random").Config()).fit(tiny, [], FitContext(ipc=5, seed=seed))
    a, b, c = fit(0).synthetic_, fit(0).synthetic_, fit(1).synthetic_
    assert torch.bincount(a.labels, minlength=4).tolist() == [5, 5, 5, 5]
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    # every chosen image is a real training image of the labelled class
    for img, y in zip(a.images, a.labels):
        matches = (tiny.train.images == img).flatten(1).all(1).nonzero().flatten()
        assert len(matches) >= 1 and tiny.train.labels[matches[0]] == y


def test_ipc_larger_than_smallest_class(tiny, tmp_path):
    with pytest.raises(DDKitError, match=r"ipc 25 is larger than the smallest class \('class0' has 24 training images\); use --ipc 24"):
        _random_set(tiny, tmp_path, ipc=25)
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind


def test_distilled_roundtrip_and_manifest(tiny, tmp_path):
    ds = _random_set(tiny, tmp_path)
    path = tmp_path / "r3-0"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["images.safetensors", "manifest.json", "preview.png"]
    man = json.loads((path / "manifest.json").read_text())
    assert man["schema_version"] == SCHEMA_VERSION and man["kind"] == "distilled-set"
    assert man["dataset"]["fingerprint"] == tiny.fingerprint
    assert man["dataset"]["classes"] == tiny.classes
    assert man["ipc"] == 3 and man["num_images"] == 12 and man["seed"] == 0
    assert man["bytes"] == {"images": 12 * 16 * 16, "labels": 12 * 8}
    assert man["versions"]["ddkit"] == ddkit.__version__ and man["versions"]["torch"] == torch.__version__
    assert man["run"] == {"torch_threads": torch.get_num_threads(), "world_size": 1}
    loaded = ddkit.load(path)
    assert len(loaded) == 12 and torch.equal(loaded.images, ds.images) and torch.equal(loaded.labels, ds.labels)
    x, y = loaded[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and x.min() >= 0.0 and x.max() <= 1.0
    assert y == int(ds.labels[0])
    grid = Image.open(path / "preview.png")
    assert grid.size[0] > 10 * 16 and grid.size[1] > 4 * 16  # 10 columns, 4 class rows (upscaled)
    # a torch DataLoader works on it
    batch = next(iter(torch.utils.data.DataLoader(loaded, batch_size=4)))
    assert batch[0].shape == (4, 1, 16, 16)


def test_same_seed_same_bytes(tiny, tmp_path):
    _random_set(tiny, tmp_path / "a")
    _random_set(tiny, tmp_path / "b")
    for name in ("images.safetensors", "preview.png"):
        assert (tmp_path / "a/r3-0" / name).read_bytes() == (tmp_path / "b/r3-0" / name).read_bytes()
    ma = json.loads((tmp_path / "a/r3-0/manifest.json").read_text())
    mb = json.loads((tmp_path / "b/r3-0/manifest.json").read_text())
    assert ma == mb


def test_export_imagefolder_and_pt(tiny, tmp_path):
    ds = _random_set(tiny, tmp_path)
    folder = ds.export(tmp_path / "png", "imagefolder")
    dirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert dirs == ["000_class0", "001_class1", "002_class2", "003_class3"]
    first = sorted((folder / "001_class1").iterdir())[0]
    arr = torch.from_numpy(__import__("numpy").array(Image.open(first)))
    assert torch.equal(arr, ds.images[ds.labels == 1][0, 0])  # exact uint8 pixels
    pt = ds.export(tmp_path / "set.pt", "pt")
    blob = torch.load(pt, weights_only=True)
    assert blob["images"].shape == (12, 1, 16, 16) and blob["classes"] == tiny.classes
    assert blob["labels"].tolist() == sorted(blob["labels"].tolist())  # class-major


def test_load_errors(tiny, tmp_path):
    with pytest.raises(DDKitError, match="not found"):
        ddkit.load(tmp_path / "missing")
    _random_set(tiny, tmp_path)
    path = tmp_path / "r3-0"
    man = json.loads((path / "manifest.json").read_text())
    man["schema_version"] = SCHEMA_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DDKitError, match="newer than this ddkit understands"):
        ddkit.load(path)
    man["schema_version"] = SCHEMA_VERSION
    man["kind"] = "teacher"
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DDKitError, match="is a 'teacher' artifact, not a 'distilled-set'"):
        ddkit.load(path)
    man["kind"] = "distilled-set"
    (path / "manifest.json").write_text(json.dumps(man))
    (path / "images.safetensors").write_bytes(b"garbage")
    with pytest.raises(DDKitError, match="is corrupt"):
        ddkit.load(path)


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_old(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (final / "old.txt").read_text() == "old"
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_full_method_is_whole_training_set(tiny, tmp_path):
    ds = distill(tiny, DistillConfig(method="full"), DatasetConfig(name="synthetic"), tmp_path / "full")
    assert torch.equal(ds.images, tiny.train.images) and ds.ipc is None


def test_build_lock_lets_one_builder_in_at_a_time(tmp_path):
    """A second holder of the same entry's lock waits until the first leaves; another entry does not."""
    import threading
    import time

    entry = tmp_path / "cache" / "abc"
    events = []
    first_in = threading.Event()

    def first():
        with build_lock(entry):
            events.append("first in")
            first_in.set()
            time.sleep(0.5)
            events.append("first out")

    def second():
        first_in.wait()
        with build_lock(entry):
            events.append("second in")

    def other():
        first_in.wait()
        with build_lock(tmp_path / "cache" / "xyz"):
            events.append("other in")

    threads = [threading.Thread(target=f) for f in (first, second, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert events.index("second in") > events.index("first out")
    assert events.index("other in") < events.index("first out")  # a different entry is not blocked
    assert (tmp_path / "cache" / ".abc.lock").is_file() and not entry.exists()
