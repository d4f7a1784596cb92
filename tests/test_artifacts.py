import dataclasses
import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import ddkit
from ddkit.artifacts import SCHEMA_VERSION, atomic_dir, build_lock
from ddkit.config import from_dict
from ddkit.data import make_synthetic
from ddkit.data.base import DatasetConfig
from ddkit.distilled import DistilledSet
from ddkit.errors import ConfigError, DDKitError
from ddkit.methods import METHODS, FitContext
from ddkit.pipeline import DistillConfig, RunConfig, distill


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


def test_distill_passes_its_seed_to_the_method(tiny, tmp_path):
    """``distill`` built the method's FitContext with its own seed: one forced to 0 made the seed-0 set
    for every --seed while the manifest recorded the seed asked for."""
    zero, one = _random_set(tiny, tmp_path, seed=0), _random_set(tiny, tmp_path, seed=1)
    fit = METHODS.get("random")(METHODS.get("random").Config()).fit(tiny, [], FitContext(ipc=3, seed=1)).synthetic_
    assert not torch.equal(zero.images, one.images)
    assert torch.equal(one.images, fit.images) and one.manifest["seed"] == 1


def test_ipc_larger_than_smallest_class(tiny, tmp_path):
    with pytest.raises(DDKitError, match=r"ipc 25 is larger than the smallest class \('class0' has 24 training "
                                         r"images\); use an ipc of 24 or less \(--ipc, or ipc / ipcs in a config\)$"):
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
    assert "soft_labels" not in blob  # this set has none
    ds.soft_labels = torch.randn(len(ds), 4).half()  # a set with soft labels exports them in the same order
    with_soft = torch.load(ds.export(tmp_path / "soft.pt", "pt"), weights_only=True)
    order = torch.argsort(ds.labels, stable=True)
    assert (torch.equal(with_soft["soft_labels"], ds.soft_labels[order])
            and torch.equal(with_soft["labels"], ds.labels[order]))
    for record in (blob, json.loads((folder / "classes.json").read_text())):  # exports say what made them
        assert record["schema_version"] == 1 and record["seed"] == ds.manifest["seed"]
        assert record["versions"]["ddkit"] == ddkit.__version__ and record["ipc"] == ds.ipc
        assert record["source_config_hash"] == ds.manifest["config_hash"]
    assert ((blob["kind"], json.loads((folder / "classes.json").read_text())["kind"])
            == ("pt-export", "imagefolder-export"))
    # an export passed where the set is meant says what it is and names the set (it read "manifest not found")
    for export, what in ((pt, "a pt export"), (folder, "an imagefolder export")):
        with pytest.raises(DDKitError, match=rf"^'{export}' is {what} of a distilled set, not the set \(.*\); pass the "
                                             rf"set's folder \({ds.path}\)$"):
            ddkit.load(export)
    ranked = ds.export(tmp_path / "rank", "ddranking")  # the CLI's third format, from the library too
    assert torch.load(ranked / "labels.pt", weights_only=True).tolist() == blob["labels"].tolist()
    with pytest.raises(DDKitError, match=r"^unknown export format 'png'; use imagefolder, pt or ddranking$"):
        ds.export(tmp_path / "x", "png")
    with pytest.raises(DDKitError, match=r"^normalize must be True or False, got 'yes'$"):
        ddkit.load(ds.path, normalize="yes")


def test_float_set_records_its_true_pixel_range_and_png_export_says_what_it_clips(tiny, tmp_path, caplog):
    """Pixel-optimising methods (DC, DM, MTT, ...) leave float pixels outside the data's 0..1: the manifest
    records the range the set holds, pt keeps it exactly, and PNG (8-bit) clips it, saying how much."""
    from ddkit.describe import describe
    from ddkit.distilled import DistilledSet
    from ddkit.methods.base import SyntheticSet

    labels = torch.arange(4).repeat_interleave(2)
    images = torch.linspace(-0.5, 1.5, 8 * 16 * 16).view(8, 1, 16, 16)  # a quarter below 0, a quarter above 1
    ds = DistilledSet.build(SyntheticSet(images, labels), tiny, method="dm", method_config={}, ipc=2, seed=0,
                            config={}, dataset_config={"name": "synthetic"})
    ds.save(tmp_path / "set")
    man = json.loads((tmp_path / "set/manifest.json").read_text())
    assert man["images"] == {"dtype": "float32", "pixel_range": [-0.5, 1.5]}
    assert "float pixels in [-0.5, 1.5] (beyond the data's 0..1)" in describe(tmp_path / "set")
    with caplog.at_level("WARNING", logger="ddkit.distilled"):
        folder = DistilledSet.load(tmp_path / "set").export(tmp_path / "png", "imagefolder")
    record = json.loads((folder / "classes.json").read_text())
    assert record["pixel_range"] == [-0.5, 1.5] and record["clipped_pixels"] == pytest.approx(0.5, abs=1e-3)
    assert record["source_dtype"] == "float32"  # the range's units: float pixels, not PNG's 0..255
    assert "50.00% of the set's pixels lie outside [0, 1] and are clipped" in caplog.text
    first = torch.from_numpy(__import__("numpy").array(Image.open(folder / "000_class0/00000.png")))
    assert torch.equal(first, (images[0, 0].clamp(0, 1) * 255).round().to(torch.uint8))
    blob = torch.load(ds.export(tmp_path / "set.pt", "pt"), weights_only=True)
    assert torch.equal(blob["images"], images) and blob["pixel_range"] == [-0.5, 1.5]  # exact, nothing clipped
    assert "pixels in [-0.5, 1.5] (beyond the data's 0..1)" in describe(tmp_path / "set.pt")
    caplog.clear()
    with caplog.at_level("WARNING", logger="ddkit.distilled"):  # a set within 0..1 clips nothing and says nothing
        inside = DistilledSet.build(SyntheticSet(images.clamp(0, 1), labels), tiny, method="dm", method_config={},
                                    ipc=2, seed=0, config={}, dataset_config={"name": "synthetic"})
        inside.save(tmp_path / "inside")
        assert json.loads((inside.export(tmp_path / "png2", "imagefolder")
                           / "classes.json").read_text())["clipped_pixels"] == 0.0
    assert inside.manifest["images"]["pixel_range"] == [0.0, 1.0] and caplog.text == ""


def test_failed_torch_save_is_a_one_line_error(tiny, tmp_path, monkeypatch):
    """torch.save reports a failed write (a full disk, a folder it may not write) as a RuntimeError,
    which the CLI would show as a traceback; it becomes a DDKitError naming the file, and nothing is left.
    A full disk used to read "unexpected pos 64 vs 0": with under 1 MiB free it says so."""
    ds = _random_set(tiny, tmp_path)

    def torch_fails(obj, f):
        f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:747] . unexpected pos 64 vs 0\nmore")

    monkeypatch.setattr(torch, "save", torch_fails)
    with pytest.raises(DDKitError, match=r"cannot write .*set.pt': could not write \(\[enforce fail .* vs 0\); check "):
        ds.export(tmp_path / "out" / "set.pt", "pt")
    assert list((tmp_path / "out").iterdir()) == []
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**30, 2**30 - 4096, 4096))
    with pytest.raises(DDKitError, match=r"cannot write .*set.pt': No space left on device; free space on that disk"):
        ds.export(tmp_path / "out" / "set.pt", "pt")
    assert list((tmp_path / "out").iterdir()) == []


_UNDER_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from ddkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _ddkit_under_fsize(limit: int, *args: str, cwd: Path):
    """``ddkit ARGS`` in a process that may write no file larger than ``limit`` bytes (RLIMIT_FSIZE: each
    larger write fails with EFBIG, as a full disk fails with ENOSPC)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(ddkit.__file__).parents[1])}
    return subprocess.run([sys.executable, "-c", _UNDER_FSIZE, str(limit), *args, "-q"], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_tensor_and_checkpoint_write_failures_are_one_line(tmp_path):
    """A write that fails in safetensors (a full disk, a file-size limit) raised SafetensorError, not an
    OSError: a traceback and exit 1. torch's checkpoint named the hidden resume file and said "unexpected pos
    128 vs 0". Now: one line naming --out and the cause, exit 2, nothing partial left."""
    proc = _ddkit_under_fsize(2000, "distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2",
                              "--out", "d", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        "error: cannot write 'd': File too large; a limit on file size (ulimit -f) or a quota stops this file; raise "
        "the limit or choose another --out\n"), proc.stderr
    proc = _ddkit_under_fsize(100, "teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1",
                              "--out", "t", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot write 't': File too large; a limit"), \
        proc.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []
    # a write cut short at the limit, which torch reports as "unexpected pos 1408 vs 1302", without an errno
    assert _ddkit_under_fsize(10**6, "distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2",
                              "--out", "d", cwd=tmp_path).returncode == 0
    proc = _ddkit_under_fsize(1500, "export", "d", "--format", "pt", "--out", "x.pt", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot write 'x.pt': File too large; a limit"), \
        proc.stderr
    # the DD-Ranking exporter saved with torch.save by path: torch's traceback, exit 1
    proc = _ddkit_under_fsize(1500, "export", "d", "--format", "ddranking", "--out", "r", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot write 'r': File too large; a limit"), \
        proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["d"]


def test_save_tensors_failure_names_the_output(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    import ddkit.artifacts as artifacts

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)  # artifacts imports it where it writes
    (tmp_path / ".out.partial").mkdir()
    with pytest.raises(DDKitError) as info:
        artifacts.save_tensors(tmp_path / ".out.partial" / "x.safetensors", {"a": torch.zeros(2)})
    assert str(info.value) == (f"cannot write {str(tmp_path / 'out')!r}: No space left on device; free space on that "
                               "disk or choose another --out")
    assert list((tmp_path / ".out.partial").iterdir()) == []


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
        DistilledSet.load(path)
    with pytest.raises(DDKitError, match=r"lacks 'model.name' .*re-create the teacher artifact"):
        ddkit.load(path)  # loaded as the teacher its manifest says it is
    man["kind"] = "expert-buffer"
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DDKitError, match=r"is a 'expert-buffer' record, which ddkit.load does not read; "
                                         r"ddkit.methods.trajectory.load_experts\(path\) reads it$"):
        ddkit.load(path)
    man["kind"] = "thing"
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DDKitError, match=r"is a 'thing' record, which ddkit.load does not know; ddkit.load reads "
                                         r"distilled sets, run folders, teachers, FKD stores and evaluation reports$"):
        ddkit.load(path)
    man["kind"] = "distilled-set"
    (path / "manifest.json").write_text(json.dumps(man))
    (path / "images.safetensors").write_bytes(b"garbage")
    with pytest.raises(DDKitError, match="is corrupt"):
        ddkit.load(path)


@pytest.mark.parametrize("path", [5, None, b"runs/set", ["runs/set"]])
def test_load_refuses_a_path_that_is_no_str_or_path(path):
    """ddkit.load(5) said "expected str, bytes or os.PathLike object, not int" (a TypeError from pathlib)."""
    with pytest.raises(DDKitError) as err:
        ddkit.load(path)
    msg = str(err.value)
    assert msg.startswith("the distilled-set path must be a folder path (str or Path), got "
                          f"{type(path).__name__} {path!r}")
    assert "pass the folder of a distilled-set artifact" in msg and "\n" not in msg
    from ddkit.teacher import Teacher

    with pytest.raises(DDKitError, match=r"^the teacher path must be a folder path \(str or Path\), got int 3;"):
        Teacher.load(3)


def test_damaged_distilled_manifest_is_a_one_line_error(tiny, tmp_path, capsys):
    """A manifest without (or with a mistyped) dataset classes, mean, std, method or ipc used to load and
    then crash `ddkit export` / `ddkit evaluate` with a KeyError or TypeError."""
    from ddkit.cli import main

    path = _random_set(tiny, tmp_path).path
    good = json.loads((path / "manifest.json").read_text())
    damages = [(lambda m: m["dataset"].pop("classes"), "dataset.classes"),
               (lambda m: m["dataset"].update(classes="class0"), "dataset.classes"),
               (lambda m: m["dataset"].pop("mean"), "dataset.mean"), (lambda m: m["dataset"].pop("std"), "dataset.std"),
               (lambda m: m.pop("method"), "method.name"), (lambda m: m.pop("ipc"), "ipc"),
               (lambda m: m.update(ipc="3"), "ipc")]
    for damage, key in damages:
        broken = json.loads(json.dumps(good))
        damage(broken)
        (path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(DDKitError,
                           match=f"lacks '{key}' .*the manifest is damaged: re-create the distilled-set artifact"):
            ddkit.load(path)
        assert main(["export", str(path), "--format", "pt", "--out", str(tmp_path / "set.pt")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"lacks '{key}'" in err and len(err.strip().splitlines()) == 1
    (path / "manifest.json").write_text(json.dumps({**good, "ipc": None}))  # the full method's sets have no IPC
    assert ddkit.load(path).ipc is None


def test_load_takes_the_manifest_path_for_its_folder(tiny, tmp_path):
    """`read_manifest` maps `.../manifest.json` to its folder; the loader must read the tensors from there."""
    ds = _random_set(tiny, tmp_path)
    loaded = ddkit.load(ds.path / "manifest.json")
    assert loaded.path == ds.path and torch.equal(loaded.images, ds.images) and torch.equal(loaded.labels, ds.labels)


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_old(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "manifest.json").write_text(json.dumps({"kind": "thing"}))
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final, kind="thing") as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (final / "old.txt").read_text() == "old"
    with atomic_dir(final, kind="thing") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_through_a_symlink_replaces_what_it_points_to(tmp_path):
    """An output path that is a symbolic link (to a folder or a file) is written where the link points: the link
    stays and names the new output, and nothing hidden is left beside either."""
    from ddkit.artifacts import write_text

    target, links = tmp_path / "target", tmp_path / "links"
    target.mkdir()
    links.mkdir()
    (target / "manifest.json").write_text(json.dumps({"kind": "thing"}))
    (target / "old.txt").write_text("old")
    (links / "out").symlink_to(target)
    with atomic_dir(links / "out", kind="thing") as tmp:
        (tmp / "new.txt").write_text("new")
    assert (links / "out").is_symlink() and sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in links.iterdir()) == ["out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["links", "target"]
    (tmp_path / "file.txt").write_text("old")
    (links / "file").symlink_to(tmp_path / "file.txt")
    write_text(links / "file", "new")
    assert (links / "file").is_symlink() and (tmp_path / "file.txt").read_text() == "new"
    assert sorted(p.name for p in links.iterdir()) == ["file", "out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "links", "target"]


def test_atomic_dir_never_replaces_what_is_not_a_ddkit_output(tiny, tmp_path):
    """--out pointing at a user's folder, a file, or another kind of ddkit output is refused (nothing
    deleted, nothing left behind); an empty folder or an output of the same kind is replaced."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(DDKitError, match="exists and is not a ddkit output"), atomic_dir(precious):
        pass
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(DDKitError, match="is a file, not a folder"), atomic_dir(afile):
        pass
    with pytest.raises(DDKitError,
                       match=rf"^output '{afile}/x' lies inside '{afile}', which is a file; give another path$"), \
            atomic_dir(afile / "x"):  # it said "cannot create the output folder ... (File exists)"
        pass
    ds = _random_set(tiny, tmp_path)
    with pytest.raises(DDKitError, match="holds a ddkit 'distilled-set' output, where an 'imagefolder-export'"):
        ds.export(ds.path, "imagefolder")
    with pytest.raises(DDKitError, match="is a folder; --format pt writes one file"):
        ds.export(precious, "pt")
    with pytest.raises(DDKitError, match="exists and is not a readable ddkit pt export; choose another --out"):
        ds.export(afile, "pt")
    assert ds.export(tmp_path / "set.pt", "pt") == ds.export(tmp_path / "set.pt", "pt")  # its own export is replaced
    assert (precious / "notes.txt").read_text() == "mine" and afile.read_text() == "mine"
    assert ddkit.load(ds.path).ipc == ds.ipc  # the source set survived
    (tmp_path / "empty").mkdir()
    ds.save(tmp_path / "empty")
    ds.save(tmp_path / "empty")  # a distilled set over a distilled set: fine
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # files are written with the umask's mode like open() would, not mkstemp's private 0600
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "empty" / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "empty" / "images.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def _unhashed(path: Path) -> Path:
    """The artifact at ``path`` as ddkit wrote it before manifests recorded their files' sha256: its files
    can be edited by hand, as the tests of the loaders' value checks do."""
    man = json.loads((path / "manifest.json").read_text())
    del man["files_sha256"]
    (path / "manifest.json").write_text(json.dumps(man))
    return path


def test_load_rejects_tampered_labels_and_soft_labels(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    ds = distill(tiny, DistillConfig(method="random", ipc=2, soft_labels=False), DatasetConfig(name="synthetic"),
                 tmp_path / "r")
    path = _unhashed(ds.path)
    t = load_file(str(path / "images.safetensors"))
    save_file({"images": t["images"], "labels": t["labels"] + 10}, str(path / "images.safetensors"))
    with pytest.raises(DDKitError, match="labels outside 0..3"):
        ddkit.load(path)
    assert t["images"].dtype == torch.uint8  # random keeps the real images' bytes
    images = t["images"].float() / 255
    for bad, msg in [(t["images"].flatten(1), "images of shape \\[8, 256\\], expected \\[N, 1, 16, 16\\]"),
                     (t["images"][:, :, :8], "images of shape \\[8, 1, 8, 16\\]"),
                     (images, "float32 images but the manifest says uint8")]:
        save_file({"images": bad.contiguous(), "labels": t["labels"]}, str(path / "images.safetensors"))
        with pytest.raises(DDKitError, match=msg):
            ddkit.load(path)
    man = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**man, "images": {**man["images"], "dtype": "float32"},
                                                   "bytes": {**man["bytes"], "images": 4 * images.numel()}}))
    assert len(ddkit.load(path)) == 8  # float32 pixels, as the manifest now says, load
    save_file({"images": torch.where(images == images.max(), float("nan"), images), "labels": t["labels"]},
              str(path / "images.safetensors"))
    with pytest.raises(DDKitError, match="NaN or infinite pixels"):
        ddkit.load(path)
    (path / "manifest.json").write_text(json.dumps(man))
    save_file(t, str(path / "images.safetensors"))
    man = json.loads((path / "manifest.json").read_text())
    man["files"]["soft_labels"] = "soft_labels.safetensors"
    (path / "manifest.json").write_text(json.dumps(man))
    n = len(t["labels"])
    for bad, msg in [({"logits": torch.zeros(2 * n, 4)},
                      "have shape \\[16, 4\\] but the set has 8 images of 4 classes"),
                     ({"logits": torch.zeros(n, 5)}, "shape \\[8, 5\\]"),
                     ({"other": torch.zeros(n, 4)}, "no 'logits' tensor"),
                     ({"logits": torch.full((n, 4), float("nan"))}, "NaN or infinite")]:
        save_file(bad, str(path / "soft_labels.safetensors"))
        with pytest.raises(DDKitError, match=msg):
            ddkit.load(path)
    for damage, key in ((lambda m: m.pop("files"), "files.images"),
                        (lambda m: m["files"].update(images=None), "files.images"),
                        (lambda m: m.pop("dataset_config"), "dataset_config")):
        broken = json.loads(json.dumps(man))
        damage(broken)
        (path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(DDKitError,
                           match=f"lacks '{key}' .*the manifest is damaged: re-create the distilled-set artifact"):
            ddkit.load(path)
    (path / "manifest.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(DDKitError, match="is not a JSON object; re-create the distilled-set artifact"):
        ddkit.load(path)


_OTHER = "or undo another option that makes the updates larger (a network's lr, a loss weight)"  # dc's lr_net=1e30


@pytest.mark.parametrize("options, fix", [
    ({"lr_img": 100.0, "lr_lr": 1e-5},
     "lower distill.options.lr_img (now 100), " + _OTHER),  # DC, DM, MTT: the images' lr
    ({"lr": 0.25, "iterations": 3}, "lower distill.options.lr (now 0.25), " + _OTHER),  # SRe2L, EDC, CV-DD, ...
    # a method without such a field (a selection method, too): no image learning rate is presumed
    ({}, "check the method (for optimising methods: lower the learning rate of its images in distill.options, or undo "
         "another option that makes the updates larger)"),
])
def test_non_finite_pixels_name_the_option_of_the_images_learning_rate(tiny, options, fix):
    """The error said "lower its learning rate" without naming which setting that is."""
    from ddkit.distilled import DistilledSet
    from ddkit.methods.base import SyntheticSet

    images = torch.full((4, *tiny.image_shape), float("nan"))
    with pytest.raises(DDKitError) as err:
        DistilledSet.build(SyntheticSet(images, torch.arange(4)), tiny, method="m",
                           method_config=options, ipc=1, seed=0, config={}, dataset_config={})
    diverged = " (its images diverged)" if options else ""
    assert str(err.value) == f"method 'm' produced non-finite pixels{diverged}; {fix}"


def test_pixels_far_outside_0_1_are_warned_about(tiny, caplog):
    """dm with a huge lr_img and momentum ended with pixels of +-5e5 and exit 0, without a word; a set
    that far outside the data's range is now warned about, with the option to lower. A few units out
    (a pixel-optimising method's usual set) is not."""
    from ddkit.distilled import DistilledSet
    from ddkit.methods.base import SyntheticSet

    def build(images):
        with caplog.at_level("WARNING", logger="ddkit"):
            caplog.clear()
            DistilledSet.build(SyntheticSet(images, torch.arange(4)), tiny, method="dm", method_config={"lr_img": 1e4},
                               ipc=1, seed=0, config={}, dataset_config={})
        return caplog.text

    images = torch.rand(4, *tiny.image_shape) * 6 - 3
    assert build(images) == ""
    images[1, 0, 0, 0] = -5e5
    warned = build(images)
    assert f"method 'dm' produced pixels from -5e+05 to {float(images.max()):.3g}, " in warned
    assert ("far outside the data's 0..1 (its images likely diverged); lower distill.options.lr_img "
            "(now 10000)" in warned)


@pytest.mark.parametrize("labels, message", [
    # a class the data lacks, each bin 1: the count check passed it; the message named the shape, which was fine
    (torch.tensor([0, 1, 2, 3, 4]), r"produced 1 label\(s\) outside the class indices 0..3, the first 4 \(image 4\)"),
    (torch.tensor([0, 1, 2, -1, 9]), r"produced 2 label\(s\) outside the class indices 0..3, the first -1 \(image 3\)"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0]), r"produced labels of shape \(5,\) .* for 5 images, expected \[N\] class "
                                              r"indices in 0..3"),
    (torch.tensor([0, 1, 2, 3]), r"produced labels of shape \(4,\) .* for 5 images, expected \[N\] class indices "
                                 r"in 0..3"),  # one label short
])
def test_labels_outside_the_classes_are_refused_before_the_set_is_saved(tiny, labels, message):
    """A label >= K passed (every bin of the longer bincount held ipc images), the set was saved, and
    loading it then failed with "re-create the distilled set", which makes the same set again."""
    from ddkit.distilled import DistilledSet
    from ddkit.methods.base import SyntheticSet

    images = torch.rand(5, *tiny.image_shape)
    for ipc in (1, None):  # None: method full, which had no label check at all
        with pytest.raises(DDKitError, match=rf"^method 'm' {message}; this is a bug in the method$"):
            DistilledSet.build(SyntheticSet(images, labels), tiny, method="m", method_config={}, ipc=ipc, seed=0,
                               config={}, dataset_config={})


def test_pixel_checks_skip_integer_sets_and_read_float_sets_a_bounded_chunk_at_a_time(tiny, tmp_path, monkeypatch):
    """build checked finiteness on a float32 copy of the whole set (11x a uint8 set's bytes: about 2 TB for
    method full on ImageNet), load on the whole float tensor, and the PNG export made a 4-byte mask of
    every pixel and an 8-bit copy of the set. Integer pixels are finite by type and not scanned; float
    pixels are scanned a chunk of images at a time (:data:`CHECK_BYTES`), and export converts one image
    at a time; a NaN or an infinity in the last chunk is refused with the same message as before."""
    import ddkit.distilled as distilled_mod
    from ddkit.artifacts import save_tensors
    from ddkit.distilled import IMAGES, DistilledSet
    from ddkit.methods.base import SyntheticSet

    monkeypatch.setattr(distilled_mod, "CHECK_BYTES", 3 * 4 * 16 * 16)  # three float32 1x16x16 images a chunk
    scanned, isfinite = [], torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: scanned.append(tuple(t.shape)) or isfinite(t))
    converted, to_uint8 = [], distilled_mod.to_uint8
    monkeypatch.setattr(distilled_mod, "to_uint8", lambda x: converted.append(tuple(x.shape)) or to_uint8(x))
    labels = torch.arange(4).repeat_interleave(2)

    def build(images):
        return DistilledSet.build(SyntheticSet(images, labels), tiny, method="dm", method_config={}, ipc=2, seed=0,
                                  config={}, dataset_config={"name": "synthetic"})

    build((torch.rand(8, 1, 16, 16) * 255).to(torch.uint8))
    assert scanned == []  # no float copy scanned (it was all [8, 1, 16, 16] of it)
    chunks = [(3, 1, 16, 16), (3, 1, 16, 16), (2, 1, 16, 16)]
    images = torch.rand(8, 1, 16, 16) * 1.4 - 0.2
    build(images).save(tmp_path / "set")
    assert scanned == chunks * 2  # build's check, and save's (a set edited since its build is refused)
    scanned.clear()
    ds = DistilledSet.load(tmp_path / "set")
    assert scanned == chunks
    converted.clear()  # the preview's, a class at a time
    record = json.loads((ds.export(tmp_path / "png", "imagefolder") / "classes.json").read_text())
    assert converted == [(1, 16, 16)] * 8  # one image at a time
    assert record["clipped_pixels"] == float(((images < 0) | (images > 1)).float().mean())  # the old formula's value
    diverged = ("method 'dm' produced non-finite pixels; check the method (for optimising methods: lower the learning "
                "rate of its images in distill.options, or undo another option that makes the updates larger)")
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = images.clone()
        broken[7, 0, 15, 15] = bad  # in the last chunk
        with pytest.raises(DDKitError) as err:
            build(broken)
        assert str(err.value) == diverged
        save_tensors(tmp_path / "set" / IMAGES, {"images": broken, "labels": labels})
        with pytest.raises(DDKitError) as err:
            DistilledSet.load(tmp_path / "set")
        assert str(err.value) == (f"{tmp_path / 'set' / IMAGES} holds NaN or infinite pixels; re-create the "
                                  "distilled set")
    with pytest.raises(DDKitError) as err:  # finite as float64 but not as float32: refused for its dtype (a set holds
        build(images.double().index_fill(0, torch.tensor([7]), 1e300))  # float32), before any pixel is read
    assert str(err.value) == ("method 'dm' produced float64 images; a set holds uint8 0..255 or float32 0..1 pixels: "
                              "convert them with .float() in the method")


def test_preview_grid_is_bounded_whatever_the_sets_size(tmp_path, monkeypatch):
    """The grid of a 1000-class 224 px set was 226k px tall, made from GBs of float copies: it shows
    the first 100 classes, images shrunk to 128 px one row at a time (no full-size copy of more than a
    row); small images are still enlarged to ~56 px."""
    import ddkit.distilled as distilled_mod
    from ddkit.distilled import save_grid

    converted, to_uint8 = [], distilled_mod.to_uint8
    monkeypatch.setattr(distilled_mod, "to_uint8", lambda x: converted.append(len(x)) or to_uint8(x))
    classes = [f"c{i}" for i in range(99)] + ["class100", "class101"]  # the names left out widen no margin
    save_grid(torch.rand(202, 1, 136, 136), torch.arange(101).repeat(2), classes, tmp_path / "big.png", per_class=3)
    assert converted == [2] * 100  # each shown class's images, a row at a time
    monkeypatch.undo()
    save_grid(torch.rand(101, 1, 136, 136), torch.arange(101), classes, tmp_path / "big.png")
    big = Image.open(tmp_path / "big.png")  # one image per class: one column; the truncation in a caption line
    assert big.height == 16 + 100 * (128 + 2) + 2 and big.width - (8 + 6 * len("class100")) == 1 * (128 + 2) + 2
    save_grid(torch.rand(3, 1, 28, 28), torch.arange(3), ["a", "b", "c"], tmp_path / "small.png")
    assert Image.open(tmp_path / "small.png").height == 3 * (56 + 2) + 2


def _cell(grid: Image.Image, margin: int, top: int, side: int, row: int, col: int) -> tuple:
    """The pixel at the middle of the grid cell (row, col) of ``side`` px cells (2 px padding)."""
    return grid.getpixel((margin + 2 + col * (side + 2) + side // 2, top + 2 + row * (side + 2) + side // 2))


def test_preview_grid_draws_sets_of_any_channel_count(tiny, tmp_path, caplog):
    """A set of 5 or more channels crashed DistilledSet.save in PIL at its preview (after the whole synthesis,
    nothing saved); 2 and 4 channels became PIL's LA/RGBA, whose 2nd/4th channel the RGB conversion dropped."""
    from ddkit.distilled import save_grid

    for c, want in ((2, (26, 51, 0)), (4, (26, 51, 76)), (5, (26, 51, 76))):
        images = torch.arange(1, c + 1).float().div(10).view(1, c, 1, 1).expand(4, c, 16, 16)  # channel k: (k+1)/10
        with caplog.at_level(logging.INFO, logger="ddkit.distilled"):
            save_grid(images, torch.arange(4), ["a", "b", "c", "d"], tmp_path / f"c{c}.png")
        note = "channels 0 and 1 of 2 drawn as red and green" if c == 2 else f"channels 0-2 of {c} drawn as RGB"
        assert f"the preview grid shows {note}" in caplog.text
        grid = Image.open(tmp_path / f"c{c}.png")  # the note in a caption line (16 px) above 16 px images x4
        assert grid.height == 16 + 4 * (64 + 2) + 2 and _cell(grid, 14, 16, 64, 3, 0) == want
    data = make_synthetic(num_classes=3, channels=5, image_size=8, train_per_class=4, test_per_class=2)
    ds = distill(data, DistillConfig(method="random", ipc=2), DatasetConfig(name="synthetic"), tmp_path / "c5")
    assert ds.images.shape[1] == 5 and (tmp_path / "c5" / "preview.png").is_file()
    assert DistilledSet.load(tmp_path / "c5").images.equal(ds.images)


def test_preview_grid_stretches_sets_mostly_outside_0_1(tmp_path, caplog):
    """ZCA-whitened MTT sets (65 % of pixels outside 0..1) were clipped to black and white in their preview;
    sets with few such pixels keep their preview byte for byte."""
    from ddkit.distilled import save_grid

    images = torch.tensor([-5.0, -1.0, 3.0, 7.0]).view(4, 1, 1, 1).expand(4, 1, 16, 16)  # mean 1, std 4.47
    with caplog.at_level(logging.INFO, logger="ddkit.distilled"):
        save_grid(images, torch.arange(4), ["a", "b", "c", "d"], tmp_path / "zca.png")
    assert "the preview grid shows pixels from -5 to 7 drawn black to white (100 % lie outside 0..1)" in caplog.text
    grid = Image.open(tmp_path / "zca.png")  # clipped: 0, 0, 255, 255
    assert [_cell(grid, 14, 16, 64, row, 0) for row in range(4)] == [(v, v, v) for v in (0, 85, 170, 255)]
    slight = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    slight[0, 0, 0, :5] = torch.tensor([-0.2, -0.1, 1.1, 1.2, 1.3])  # 0.07 % outside: drawn clipped, as before
    save_grid(slight, torch.arange(5).repeat(2), list("abcde"), tmp_path / "slight.png")
    save_grid(slight.clamp(0, 1), torch.arange(5).repeat(2), list("abcde"), tmp_path / "clamped.png")
    assert (tmp_path / "slight.png").read_bytes() == (tmp_path / "clamped.png").read_bytes()


def test_preview_grid_columns_filler_and_truncation(tmp_path, caplog):
    """Rows were padded to 10 columns with black cells, which pass for black images, and IPC > 10 or more than
    100 classes were cut without a mark in the picture; non-square images were enlarged past max_side (by the
    width alone), large sets made grids of 17M px (24 MB)."""
    from ddkit.distilled import GRID_MAX_PIXELS, save_grid

    caplog.set_level(logging.INFO, logger="ddkit.distilled")
    save_grid(torch.zeros(3, 1, 16, 16), torch.tensor([0, 0, 1]), ["a", "b"], tmp_path / "uneven.png")
    grid = Image.open(tmp_path / "uneven.png")  # 2 columns (the fullest class), no caption: nothing left out
    assert grid.size == (14 + 2 * 66 + 2, 2 * 66 + 2) and "preview grid shows" not in caplog.text
    assert _cell(grid, 14, 0, 64, 1, 0) == (0, 0, 0)  # class b's black image ...
    filler = {grid.getpixel((14 + 2 + 66 + x, 66 + 2 + y)) for x in range(64) for y in range(64)}
    assert filler == {(153, 153, 153), (230, 230, 230)}  # ... and a hatched grey cell beside it
    save_grid(torch.rand(12, 1, 16, 16), torch.arange(3).repeat(4), ["a", "b", "c"], tmp_path / "cut.png", per_class=3)
    assert "the preview grid shows first 3 of 4 images per class" in caplog.text
    assert Image.open(tmp_path / "cut.png").size == (14 + 3 * 66 + 2, 16 + 3 * 66 + 2)
    save_grid(torch.rand(6, 1, 160, 20), torch.arange(3).repeat(2), ["a", "b", "c"], tmp_path / "tall.png")
    assert Image.open(tmp_path / "tall.png").size == (14 + 2 * (16 + 2) + 2, 3 * (128 + 2) + 2)  # 128x16, not 512x64
    x = (torch.rand(1000, 1, 64, 64) * 255).to(torch.uint8)  # 100 classes x 10 at 64 px: 66 px cells were 4.4M px
    save_grid(x, torch.arange(100).repeat(10), [f"c{i}" for i in range(100)], tmp_path / "many.png")
    many = Image.open(tmp_path / "many.png")
    assert many.size == (26 + 10 * 63 + 2, 100 * 63 + 2) and (many.width - 26) * many.height <= GRID_MAX_PIXELS


def test_preview_grid_writes_class_names_that_are_not_ascii(tmp_path):
    """Pillow's default font drew every non-ASCII character of a class name (an ImageFolder's folders, a tensors
    file's classes) as a box: "Größe" read "Gr□□e". Accented Latin, Greek and Cyrillic are drawn (matplotlib's DejaVu
    Sans); a character that font lacks is written as its escape, not as a box."""
    import matplotlib
    from PIL import ImageDraw, ImageFont

    from ddkit.distilled import GRID_FONT_SIZE, grid_text, save_grid

    images, labels = torch.zeros(2, 1, 8, 8), torch.arange(2)
    save_grid(images, labels, ["Größe", "猫 (cat)"], tmp_path / "names.png")
    save_grid(images, labels, ["Größe", "\\u732b (cat)"], tmp_path / "escaped.png")
    assert (tmp_path / "names.png").read_bytes() == (tmp_path / "escaped.png").read_bytes()
    assert grid_text("Ωμέγα Кошка\x1b猫") == "Ωμέγα Кошка\\x1b\\u732b"  # a terminal escape written out too
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), GRID_FONT_SIZE)
    grid = Image.open(tmp_path / "names.png")
    margin, row_h = grid.width - (56 + 2 + 2), (grid.height - 2) // 2  # one column of 56 px cells, 2 rows
    label = Image.new("RGB", (margin, row_h), "white")  # the first row's name, as DejaVu Sans draws it
    ImageDraw.Draw(label).text((4, 2 + row_h // 2 - 6), "Größe", fill=(0, 0, 0), font=font)
    assert grid.crop((0, 0, margin, row_h)).tobytes() == label.tobytes()

    def drawn(text: str) -> bytes:
        im = Image.new("L", (16, 14), 255)
        ImageDraw.Draw(im).text((2, 0), text, fill=0, font=font)
        return im.tobytes()

    box = drawn("猫")  # a character the font lacks: its missing-glyph box
    assert len({drawn("ö"), drawn("ß"), drawn("o"), drawn("s"), box}) == 5  # the accents drawn, not boxes


def test_preview_grid_refuses_a_per_class_below_one(tiny, tmp_path):
    """save_grid(per_class=0) raised torchvision's ZeroDivisionError, -1 a torch overflow."""
    ds = _random_set(tiny, tmp_path)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DDKitError) as err:
            ds.save_grid(tmp_path / "g.png", per_class=bad)
        assert str(err.value) == f"per_class must be an integer >= 1 (the images shown per class), got {bad!r}"
    assert not (tmp_path / "g.png").exists()


def test_imagefolder_export_refuses_channels_png_cannot_hold(tmp_path):
    """A 4-channel set's export wrote its 4th channel as PNG transparency (2 channels: grey + alpha), which the
    imagefolder loader drops; pt keeps every channel."""
    for c in (2, 4):
        data = make_synthetic(num_classes=2, channels=c, image_size=8, train_per_class=3, test_per_class=1)
        ds = distill(data, DistillConfig(method="random", ipc=2), DatasetConfig(name="synthetic"), tmp_path / f"s{c}")
        with pytest.raises(DDKitError) as err:
            ds.export(tmp_path / f"png{c}", "imagefolder")
        assert str(err.value) == (f"the set's images have {c} channels and --format imagefolder writes PNG files of "
                                  "1 (grey) or 3 (RGB); use --format pt, which keeps every channel")
        assert not (tmp_path / f"png{c}").exists()
        assert torch.load(ds.export(tmp_path / f"s{c}.pt", "pt"), weights_only=True)["images"].shape[1] == c


def test_full_method_is_whole_training_set(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"^distill.ipc 3 does not apply to method 'full', which keeps every training "
                                          r"image; remove ipc \(or set ipc: null\)$"):
        from_dict(RunConfig, {"distill": {"method": "full", "ipc": 3}})  # a YAML ipc, as --ipc in the CLI
    assert DistillConfig(method="full", ipc=None).ipc is None
    ds = distill(tiny, DistillConfig(method="full"), DatasetConfig(name="synthetic"), tmp_path / "full")
    assert torch.equal(ds.images, tiny.train.images) and ds.ipc is None
    from ddkit.describe import describe

    assert describe(ds.path).startswith("distilled set: full ipc=all on synthetic")  # it said "ipc=None"


def test_build_lock_lets_one_builder_in_at_a_time(tmp_path):
    """A second holder of the same entry's lock waits until the first leaves; another entry does not."""
    import threading
    import time

    entry = tmp_path / "cache" / "abc"
    events = []
    first_in = threading.Event()

    waits = {}

    def first():
        with build_lock(entry) as lock:
            waits["first"] = lock.seconds
            events.append("first in")
            first_in.set()
            time.sleep(0.5)
            events.append("first out")

    def second():
        first_in.wait()
        with build_lock(entry) as lock:
            waits["second"] = lock.seconds
            events.append("second in")

    def other():
        first_in.wait()
        with build_lock(tmp_path / "cache" / "xyz") as lock:
            waits["other"] = lock.seconds
            events.append("other in")

    threads = [threading.Thread(target=f) for f in (first, second, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert events.index("second in") > events.index("first out")
    assert events.index("other in") < events.index("first out")  # a different entry is not blocked
    assert (tmp_path / "cache" / ".abc.lock").is_file() and not entry.exists()
    # what each waited, which synthesis timings leave out: only the second waited, about the first's 0.5 s
    assert waits["first"] < 0.1 and waits["other"] < 0.1 and 0.3 < waits["second"] < 5



def test_a_lock_file_removed_under_its_lock_still_keeps_builders_apart(tmp_path):
    """remove_unused_lock(s) (a bench removing its evaluations' lock files when done) unlinks a lock file while it
    holds it. A process that waited on that file entered on it once it was released, while a newcomer made and
    locked a new file at the same path: two builders of one entry at once. It now locks the file there instead."""
    import fcntl
    import threading
    import time

    from ddkit.artifacts import remove_unused_locks

    entry, lock = tmp_path / "cache" / "abc", tmp_path / "cache" / ".abc.lock"
    with build_lock(entry):
        pass
    held = os.open(lock, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # a remover holding the lock
    inside, seen = [], []

    def build(name):
        with build_lock(entry):
            seen.append((name, list(inside)))
            inside.append(name)
            time.sleep(0.4)
            inside.remove(name)

    threads = [threading.Thread(target=build, args=(name,)) for name in ("waiter", "newcomer")]
    threads[0].start()
    time.sleep(0.3)  # the waiter waits on the file the remover holds
    lock.unlink()
    os.close(held)
    threads[1].start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(seen) == [("newcomer", []), ("waiter", [])]  # one after the other (in either order)
    held = os.open(lock, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    assert remove_unused_locks(lock.parent) == 0 and lock.is_file()  # one that a process holds stays
    os.close(held)
    assert remove_unused_locks(lock.parent) == 1 and list(lock.parent.iterdir()) == []


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_build_lock_where_the_lock_file_cannot_be_written(tmp_path, monkeypatch, caplog, code):
    """Another user's lock file in a shared cache, or a read-only cache, made build_lock raise: the existing
    lock file is used read-only (it still keeps a second builder out); without one the block runs unlocked."""
    import fcntl
    import threading
    import time

    entry = tmp_path / "cache" / "abc"
    lock = tmp_path / "cache" / ".abc.lock"
    with build_lock(entry):
        pass
    real_open, flags = os.open, []

    def refuse(path, flag, *args, **kw):
        if Path(path) == lock and flag & (os.O_CREAT | os.O_RDWR | os.O_WRONLY):
            raise OSError(code, os.strerror(code), str(path))
        flags.append(flag)
        return real_open(path, flag, *args, **kw)

    monkeypatch.setattr(os, "open", refuse)
    held = real_open(lock, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another process building it
    events = []

    def build():
        with build_lock(entry):
            events.append("in")

    thread = threading.Thread(target=build)
    thread.start()
    time.sleep(0.3)
    assert events == [] and flags == [os.O_RDONLY]  # waiting on the read-only lock file
    events.append("released")
    os.close(held)
    thread.join(timeout=10)
    assert events == ["released", "in"]

    lock.unlink()
    with caplog.at_level(logging.DEBUG, logger="ddkit.artifacts"), build_lock(entry):
        events.append("unlocked")
    assert events[-1] == "unlocked" and not lock.exists()
    assert any(r.getMessage().startswith(f"cannot create the lock file {lock} (") for r in caplog.records)


def test_run_reports_a_stage_record_that_is_not_a_json_object(tmp_path, capsys):
    """`ddkit run` reads each finished stage's record with .get to decide on reuse: a JSON list there
    (a damaged or hand-edited file) used to crash it with an AttributeError traceback."""
    from ddkit.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {name: synthetic}\nteacher: null\ndistill: {method: random, ipc: 1}\n"
                   "evaluate: {label_modes: [hard], seeds: [0], overrides: {student: tiny_convnet, "
                   "full_reference: false, random_baseline: false, train: {epochs: 1, batch_size: 8}}}\n"
                   f"out: {tmp_path / 'run'}\n")
    assert main(["run", str(cfg), "-q"]) == 0
    capsys.readouterr()
    # a damaged evaluation is made again; a set folder whose manifest is damaged is not replaced unasked
    record = tmp_path / "run" / "eval-hard.json"
    kept = json.loads(record.read_text())
    record.write_text("[]")
    assert main(["run", str(cfg), "-q"]) == 0
    assert json.loads(record.read_text())["results"] == kept["results"]
    record = tmp_path / "run" / "distilled/manifest.json"
    record.write_text("[]")
    assert main(["run", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: output {str(record.parent)!r} exists and is not a ddkit output (its "
                   "manifest.json is damaged or not ddkit's); choose another --out or remove it\n")


def test_load_refuses_damaged_values_it_used_to_accept(tiny, tmp_path, capsys):
    """Float or bool labels (truncated to classes by ``.long()``), integer soft-label logits, a zero or
    missing per-channel std (every normalised pixel inf), and a schema_version that is no number were
    loaded without a word; each is now a one-line error naming the problem and the fix."""
    from safetensors.torch import load_file, save_file

    from ddkit.cli import main

    path = _unhashed(distill(tiny, DistillConfig(method="random", ipc=2), DatasetConfig(name="synthetic"),
                             tmp_path / "r").path)
    t = load_file(str(path / "images.safetensors"))
    for bad, dtype in ((t["labels"].float() + 0.4, "float32"), (t["labels"] > 1, "bool"),
                       (t["labels"][:, None], "int64")):
        save_file({"images": t["images"], "labels": bad}, str(path / "images.safetensors"))
        with pytest.raises(DDKitError, match=f"holds {dtype} labels of shape .*not one class index .*re-create"):
            ddkit.load(path)
    save_file({"images": t["images"].int(), "labels": t["labels"]}, str(path / "images.safetensors"))
    with pytest.raises(DDKitError, match="holds int32 images, not uint8 or floating-point pixels"):
        ddkit.load(path)
    save_file(t, str(path / "images.safetensors"))
    good = json.loads((path / "manifest.json").read_text())
    for key, value, need in (("std", [0.0], "positive number"), ("std", [-0.3], "positive number"),
                             ("std", [0.3, 0.3], "positive number"), ("mean", [float("nan")], "finite number"),
                             ("mean", ["0.5"], "finite number")):
        broken = json.loads(json.dumps(good))
        broken["dataset"][key] = value
        (path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(DDKitError, match=rf"holds dataset.{key} .*not one {need} per image channel \(1\); the "
                                             "manifest is damaged"):
            ddkit.load(path)
    for version in (None, "1", True, 0):
        (path / "manifest.json").write_text(json.dumps({**good, "schema_version": version}))
        with pytest.raises(DDKitError, match=f"holds schema_version {version!r}, not a version number; the manifest is "
                                             "damaged: re-create the distilled-set artifact"):
            ddkit.load(path)
    (path / "manifest.json").write_text(
        json.dumps({**good, "files": {**good["files"], "soft_labels": "soft.safetensors"},
                    "bytes": {**good["bytes"], "labels": good["bytes"]["labels"] + 4 * 4 * len(t["labels"])}}))
    save_file({"logits": torch.zeros(len(t["labels"]), 4, dtype=torch.int32)}, str(path / "soft.safetensors"))
    with pytest.raises(DDKitError, match="hold int32 values, not floating-point logits; re-create the distilled set"):
        ddkit.load(path)
    assert main(["show", "-q", str(path)]) == 2  # show loads the artifact, not only its manifest
    assert "not floating-point logits" in capsys.readouterr().err
    save_file({"logits": torch.zeros(len(t["labels"]), 4)}, str(path / "soft.safetensors"))
    assert ddkit.load(path).soft_labels.shape == (len(t["labels"]), 4) and main(["show", "-q", str(path)]) == 0


def test_show_refuses_an_artifact_with_missing_files(tiny, tmp_path, capsys):
    """`show -q` is documented as "exit 0 if the record reads"; a set whose tensor file was deleted
    printed its summary and exited 0, though nothing could load it."""
    from ddkit.cli import main

    path = _random_set(tiny, tmp_path).path
    assert main(["show", "-q", str(path)]) == 0
    (path / "images.safetensors").unlink()
    for args in (["show", "-q", str(path)], ["show", str(path / "manifest.json")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: distilled images ") and "not found; the artifact is incomplete" in err
        assert len(err.strip().splitlines()) == 1
    assert main(["show", "--json", str(path)]) == 0  # the raw record still prints, to see what is there
    assert json.loads(capsys.readouterr().out)["kind"] == "distilled-set"


def _killed_writer(final: Path, *kinds: str) -> list[Path]:
    """Temporary names beside ``final`` that a process made and left when it died without cleanup (as
    under SIGKILL): a child process creates them and exits at once."""
    import subprocess
    import sys

    script = ("import os, sys; from pathlib import Path; from ddkit.artifacts import temp_path\n"
              "final = Path(sys.argv[1])\n"
              "for what in sys.argv[2:]:\n"
              "    p = temp_path(final, what.split(':')[0])\n"
              "    (p.mkdir() or (p / 'half.bin').write_bytes(b'x')) if what.endswith(':dir') else "
              "p.write_bytes(b'half')\n    print(p)\n"
              "os._exit(9)\n")
    done = subprocess.run([sys.executable, "-c", script, str(final), *kinds], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    left = [Path(line) for line in done.stdout.split()]
    assert len(left) == len(kinds) and all(p.exists() for p in left)
    return left


@pytest.mark.parametrize("writer", ["write_json", "save_tensors", "atomic_torch_save", "atomic_dir"])
def test_writers_sweep_what_a_killed_writer_left(tmp_path, writer):
    """A writer killed between creating its temporary file (or folder) and renaming it left the hidden
    temporary behind for good; the next write of the same output removes it, and only it."""
    from ddkit import artifacts

    final = tmp_path / ("out" if writer == "atomic_dir" else "out.bin")
    left = _killed_writer(final, "tmp", "tmp:dir", "old:dir")
    live = artifacts.temp_path(final)  # this process's own, e.g. another thread's write in progress
    live.write_bytes(b"mine")
    elsewhere = left[0].with_name(left[0].name.replace(artifacts._origin(), "otherhost"))
    elsewhere.write_bytes(b"a writer on another machine sharing the folder")
    keep = [live, elsewhere, tmp_path / f".{final.name}.lock", tmp_path / ".other.bin.tmp-x-1-0123abcd"]
    for p in keep[2:]:
        p.write_bytes(b"")
    if writer == "write_json":
        artifacts.write_json(final, {"a": 1})
    elif writer == "save_tensors":
        artifacts.save_tensors(final, {"a": torch.ones(2)})
    elif writer == "atomic_torch_save":
        artifacts.atomic_torch_save({"a": torch.ones(2)}, final)
    else:
        with artifacts.atomic_dir(final) as tmp:
            (tmp / "x.json").write_text("{}")
    assert not any(p.exists() for p in left), "a dead writer's temporary was left"
    assert all(p.exists() for p in keep), "a live writer's, another machine's or an unrelated file was removed"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [final.name]


def test_damaged_distilled_manifest_fields_are_one_line_errors(tiny, tmp_path):
    """An images entry that is not a mapping, and class names that are not names, crashed every loader
    (show, export, evaluate, run); soft labels without a 'logits' tensor got a garbled message."""
    import shutil

    from safetensors.torch import load_file, save_file

    ds = distill(tiny, DistillConfig(method="random", ipc=2, soft_labels=False), DatasetConfig(name="synthetic"),
                 tmp_path / "r")
    good = json.loads((ds.path / "manifest.json").read_text())
    for name, change, message in [
        ("images", {"images": "x"},
         r"holds images 'x', not a mapping of their dtype and shape; the manifest is damaged"),
        ("classes", {"dataset": {**good["dataset"], "classes": [1, 2, 3, 4]}},
         r"holds dataset.classes \[1, 2, 3, 4\], not a list of class names; the manifest is damaged: re-create"),
    ]:
        bad = tmp_path / name
        shutil.copytree(ds.path, bad)
        (bad / "manifest.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(DDKitError, match=message):
            ddkit.load(bad)
    soft = tmp_path / "soft"
    shutil.copytree(ds.path, soft)
    save_file({"x": torch.zeros(8, 4)}, str(soft / "soft_labels.safetensors"))
    (soft / "manifest.json").write_text(
        json.dumps({**good, "files": {**good["files"], "soft_labels": "soft_labels.safetensors"}}))
    with pytest.raises(DDKitError,
                       match=r"'soft_labels.safetensors' in .* hold no 'logits' tensor but the set has 8 images "
                             r"of 4 classes; re-create the distilled set \(method .*\)"):
        ddkit.load(soft)
    # labels that disagree with the manifest's class counts loaded, and showed and exported
    relabelled = tmp_path / "relabelled"
    shutil.copytree(ds.path, relabelled)
    t = load_file(str(ds.path / "images.safetensors"))
    save_file({"images": t["images"], "labels": torch.zeros_like(t["labels"])}, str(relabelled / "images.safetensors"))
    with pytest.raises(DDKitError, match=r"holds \[8, 0, 0, 0\] images per class but the manifest says \[2, 2, 2, 2\]; "
                                         r"re-create the distilled set"):
        ddkit.load(relabelled)
    # an ipc that disagrees with the images: evaluation drew a random baseline of that many per class
    wrong_ipc = tmp_path / "wrong-ipc"
    shutil.copytree(ds.path, wrong_ipc)
    (wrong_ipc / "manifest.json").write_text(json.dumps({**good, "ipc": 5}))
    with pytest.raises(DDKitError,
                       match=r"^'.*wrong-ipc/manifest.json' says ipc 5 but the set holds \[2, 2, 2, 2\] images "
                             r"per class; the manifest is damaged: re-create the distilled set$"):
        ddkit.load(wrong_ipc)


def test_records_name_other_artifacts_absolutely(tiny, tmp_path, monkeypatch):
    """A set loaded by a relative path was recorded relative (export source, FKD store, evaluation) and
    went stale once the record was read from another folder."""
    from ddkit.labels import relabel

    _random_set(tiny, tmp_path)
    monkeypatch.chdir(tmp_path)
    ds = ddkit.load("r3-0")
    blob = torch.load(ds.export("set.pt", "pt"), weights_only=True)
    assert blob["config"]["source"] == str(tmp_path / "r3-0")
    bare = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 4))  # a bare module: no folder to record
    store = relabel(ds, bare, epochs=1)
    assert store.manifest["distilled"]["path"] == str(tmp_path / "r3-0") and store.manifest["teacher"]["path"] is None


def test_load_reads_every_stages_artifact_by_its_kind(tiny, tmp_path):
    """ddkit.load took only distilled sets ("'runs/t' is a 'teacher' artifact, not a 'distilled-set'"),
    also for a `ddkit run` folder whose manifest names its set; evaluation reports had no loader and
    format_table wanted a list; a grid of a set needed the internal distilled.save_grid."""
    from ddkit.evaluate import evaluate, format_table, resolve_protocol
    from ddkit.labels import SoftLabelStore, relabel
    from ddkit.pipeline import run
    from ddkit.teacher import Teacher, TeacherConfig, train_teacher

    teacher = train_teacher(tiny, TeacherConfig(model="tiny_mlp", train={"epochs": 1}), tmp_path / "t")
    ds = _random_set(tiny, tmp_path)
    relabel(ds, teacher, 1, out=tmp_path / "fkd")
    loaded = ddkit.load(tmp_path / "t")
    assert isinstance(loaded, Teacher) and loaded.fingerprint == teacher.fingerprint
    store = ddkit.load(tmp_path / "fkd" / "manifest.json")
    assert isinstance(store, SoftLabelStore) and store.path == tmp_path / "fkd"
    protocol = resolve_protocol("dc-protocol", {"student": "tiny_mlp", "full_reference": False,
                                                "random_baseline": False, "train": {"epochs": 1}})
    report = evaluate(ds, protocol, [0], out=tmp_path / "eval.json")
    assert ddkit.load(tmp_path / "eval.json") == json.loads((tmp_path / "eval.json").read_text())
    assert format_table(report) == format_table([report])
    with pytest.raises(DDKitError, match=r"^normalize applies to distilled sets, but .* is a 'teacher'; leave "
                                         r"normalize out$"):
        ddkit.load(tmp_path / "t", normalize=True)

    cfg = RunConfig(dataset=DatasetConfig(name="synthetic"), teacher=None, out=str(tmp_path / "run"),
                    distill=DistillConfig(method="random", ipc=2), device="cpu",
                    evaluate={"overrides": {"student": "tiny_mlp", "full_reference": False, "random_baseline": False,
                                            "train": {"epochs": 1}}, "seeds": [0]})
    run(cfg)
    from_run = ddkit.load(tmp_path / "run", normalize=True)
    made = DistilledSet.load(tmp_path / "run" / "distilled", normalize=True)
    assert from_run.path == made.path and torch.equal(from_run[0][0], made[0][0]) and from_run.normalize
    sets = ddkit.load(tmp_path / "run" / "report")  # the run's report folder: its eval.json, every evaluation
    assert sets["kind"] == "evaluation-set" and ddkit.load(tmp_path / "run" / "report" / "eval.json") == sets
    assert format_table(sets) == format_table(sets["evaluations"])
    (tmp_path / "run" / "manifest.json").unlink()  # a run killed before its last stage
    with pytest.raises(DDKitError, match=r"is an unfinished `ddkit run` folder .*ddkit.load\('.*distilled'\)$"):
        ddkit.load(tmp_path / "run")

    ds.save_grid(tmp_path / "grid.png", per_class=2)
    with Image.open(tmp_path / "grid.png") as grid, Image.open(ds.path / "preview.png") as preview:
        # 2 of the set's 3 images per class, said in a caption line (16 px) above the grid
        assert grid.format == "PNG" and grid.height == preview.height + 16 and grid.width < preview.width
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # written atomically


def test_the_stages_are_reexported_lazily_from_ddkit():
    """dir(ddkit) and help(ddkit) showed only load: the stage functions and configs are there now, imported
    on first use, so `import ddkit` still imports neither torch nor any ddkit module."""
    import subprocess
    import sys

    code = ("import sys, ddkit; print(sorted(m for m in sys.modules if m.startswith(('ddkit', 'torch'))));"
            "print(callable(ddkit.evaluate), ddkit.distill.__module__, ddkit.TeacherConfig.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["['ddkit']", "True ddkit.pipeline TeacherConfig"]
    from ddkit.evaluate import evaluate
    from ddkit.labels import relabel
    from ddkit.pipeline import distill
    from ddkit.teacher import train_teacher

    assert (ddkit.distill, ddkit.relabel, ddkit.train_teacher) == (distill, relabel, train_teacher)
    assert ddkit.evaluate.evaluate is evaluate and ddkit.evaluate.__call__.__doc__
    for name in ddkit.__all__:
        assert getattr(ddkit, name) is not None and name in dir(ddkit)
    assert {"train_teacher", "distill", "relabel", "evaluate", "load_dataset", "DatasetConfig", "DistillConfig",
            "ProtocolConfig", "TeacherConfig", "RelabelSpec", "save_tensors"} <= set(ddkit.__all__)
    with pytest.raises(AttributeError, match="module 'ddkit' has no attribute 'distil'"):
        ddkit.distil  # noqa: B018


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_manifest_file_names_stay_inside_the_artifact(tiny, tmp_path, capsys):
    """The loader joined whatever name files.images / files.soft_labels held onto the folder: an absolute
    path, '../x' or a link inside the folder to a file outside loaded that file as the set (and `show -q`
    passed it), so a folder someone sends could read any safetensors file here. Each is now one line."""
    from ddkit.cli import main

    path = _random_set(tiny, tmp_path).path
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((path / "images.safetensors").read_bytes())  # keys that fit: it loaded as the set
    good = json.loads((path / "manifest.json").read_text())
    man = str(path / "manifest.json")
    for field, name in (("images", str(outside)), ("images", "../outside.safetensors"), ("images", ".."),
                        ("images", "sub/images.safetensors"), ("images", ""),
                        ("soft_labels", str(outside)), ("soft_labels", "../outside.safetensors")):
        (path / "manifest.json").write_text(json.dumps({**good, "files": {**good["files"], field: name}}))
        before = _listing(tmp_path)
        message = (f"{man!r} names {name!r} as files.{field}, which leads outside the artifact's folder; the "
                   "manifest is damaged: re-create the distilled-set artifact")
        with pytest.raises(DDKitError) as raised:
            ddkit.load(path)
        assert str(raised.value) == message
        assert main(["show", "-q", str(path)]) == 2 and capsys.readouterr().err == f"error: {message}\n"
        assert _listing(tmp_path) == before
    (path / "manifest.json").write_text(json.dumps(good))
    real = (path / "images.safetensors").read_bytes()
    (path / "images.safetensors").unlink()
    (path / "images.safetensors").symlink_to(outside)  # a link in the folder to a file outside it
    with pytest.raises(DDKitError) as raised:
        ddkit.load(path)
    assert str(raised.value) == (f"{man!r} names 'images.safetensors' as files.images, which leads outside the "
                                 "artifact's folder; the manifest is damaged: re-create the distilled-set artifact")
    (path / "images.safetensors").unlink()
    (path / "real.safetensors").write_bytes(real)
    (path / "images.safetensors").symlink_to("real.safetensors")  # a link that stays inside loads
    assert len(ddkit.load(path)) == 12
    link = tmp_path / "link"
    link.symlink_to(path, target_is_directory=True)  # the artifact folder itself a link: loads as before
    assert len(ddkit.load(link)) == 12 and main(["show", "-q", str(link)]) == 0


def test_damaged_json_and_a_folder_for_a_file_are_one_line_errors(tiny, tmp_path, capsys):
    """A manifest of arrays nested 100000 deep (RecursionError) or a 5000-digit number (ValueError: past
    Python's int-digit limit) went out as a traceback; a folder where the images file should be was
    'not found'."""
    from ddkit.artifacts import read_json
    from ddkit.cli import main

    path = _random_set(tiny, tmp_path).path
    good = (path / "manifest.json").read_text()
    man = str(path / "manifest.json")
    for text, error in (("[" * 100000 + "]" * 100000, "RecursionError"),
                        (good[:-2] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}", "RecursionError"),
                        (good.replace('"ipc": 3', '"ipc": ' + "9" * 5000), "ValueError")):
        (path / "manifest.json").write_text(text)
        with pytest.raises(DDKitError) as raised:
            ddkit.load(path)
        assert str(raised.value) == f"distilled-set manifest {man!r} is corrupt ({error}); re-create it"
        assert main(["show", "-q", str(path)]) == 2
        assert capsys.readouterr().err == f"error: ddkit record {man!r} is corrupt ({error}); re-create it\n"
        with pytest.raises(DDKitError, match=rf"^cell .* is corrupt \({error}\); re-create it$"):
            read_json(path / "manifest.json", "cell")
    (path / "manifest.json").write_text(good)
    (path / "images.safetensors").unlink()
    (path / "images.safetensors").mkdir()
    with pytest.raises(DDKitError) as raised:
        ddkit.load(path)
    assert str(raised.value) == (f"distilled images {str(path / 'images.safetensors')!r} is a folder, not a file; "
                                 "the artifact is damaged, re-create it")


def test_damaged_soft_label_records_in_a_set_manifest_are_one_line_errors(tiny, tmp_path, capsys):
    """`meta`, a committee's `meta.soft_labels` and `config.distill.soft_labels_bn` were read only by
    `evaluate` (to label the random subset alike), which crashed with AttributeError, KeyError or ValueError,
    or blamed the protocol's teacher_bn; loading the set (and `ddkit show -q`) refuses them, naming the
    manifest and the field. RDED's description (a str) and a whole committee record load."""
    from ddkit.cli import main

    path = _random_set(tiny, tmp_path).path
    good = json.loads((path / "manifest.json").read_text())
    where, fix = f"'{path / 'manifest.json'}'", "; the manifest is damaged: re-create the distilled set"
    member = {"path": "/t1", "weights_sha": "ab12"}
    committee = {"kind": "committee", "weights": [0.25, 0.75], "teacher_bn": "batch", "teacher_bn_batch": None,
                 "teachers": [{"path": None, "weights_sha": "cd34"}, member]}
    damages = [
        ({"meta": "x"}, "holds meta 'x', not a mapping of the method's records"),
        ({"meta": {"soft_labels": {"kind": "committee", "weights": "ab"}}},
         "holds meta.soft_labels.weights 'ab', not a list of the committee's votes (finite numbers)"),
        ({"meta": {"soft_labels": {"kind": "committee"}}},
         "lacks meta.soft_labels.weights, a list of the committee's votes (finite numbers)"),
        ({"meta": {"soft_labels": {**committee, "weights": [0.5, True]}}},
         "holds meta.soft_labels.weights [0.5, True], not a list of the committee's votes (finite numbers)"),
        ({"meta": {"soft_labels": {**committee, "teachers": [None, {"path": "/etc"}]}}},
         "holds meta.soft_labels.teachers [None, {'path': '/etc'}], not 2 records of a teacher's path and "
         "weights_sha, one per vote"),
        ({"meta": {"soft_labels": {**committee, "teachers": [member]}}},
         "holds meta.soft_labels.teachers [{'path': '/t1', 'weights_sha': 'ab12'}], not 2 records of a teacher's "
         "path and weights_sha, one per vote"),
        ({"meta": {"soft_labels": {**committee, "teacher_bn": "bogus"}}},
         ": meta.soft_labels.teacher_bn must be 'running' or 'batch', got 'bogus'"),
        ({"meta": {"soft_labels": {k: v for k, v in committee.items() if k != "teachers"}},
          "method": {**good["method"], "config": {"extra_teachers": "/t1"}}},
         "holds method.config.extra_teachers '/t1', not a list of teacher folders"),
        ({"config": {**good["config"], "distill": {**good["config"]["distill"], "soft_labels_bn": "bogus"}}},
         ": config.distill.soft_labels_bn must be 'running' or 'batch', got 'bogus'"),
        ({"config": {**good["config"], "distill": {**good["config"]["distill"], "soft_labels_bn_batch": 0}}},
         ": config.distill.soft_labels_bn_batch must be a number of images >= 1 (or null: the whole batch), got 0"),
        ({"config": {**good["config"], "distill": ["x" * 300]}},
         f"holds config.distill ['{'x' * 195}..., not a mapping of settings"),
        ({"config": 3}, "holds config 3, not a mapping of settings"),
    ]
    for change, problem in damages:
        (path / "manifest.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(DDKitError) as err:
            ddkit.load(path)
        assert str(err.value) == f"{where}{' ' if problem[0] != ':' else ''}{problem}{fix}"
        assert main(["show", "-q", str(path)]) == 2
        assert capsys.readouterr().err == f"error: {err.value}\n"
    for fine in ["the teacher's logits on each crop (RDED)", committee, {"kind": "other", "weights": "x"}]:
        (path / "manifest.json").write_text(json.dumps({**good, "meta": {"soft_labels": fine}}))
        assert ddkit.load(path).manifest["meta"]["soft_labels"] == fine


def test_a_set_whose_mean_and_std_normalise_pixels_to_infinity_is_refused(tiny, tmp_path):
    """A finite but absurd dataset.mean (1e308) passed the manifest check, and `load(normalize=True)` gave -inf
    pixels; the mean and std must map pixels 0 and 1 to finite float32 values."""
    path = _random_set(tiny, tmp_path).path
    good = json.loads((path / "manifest.json").read_text())
    channels = len(good["dataset"]["mean"])
    for key, values in [("mean", [1e308] * channels), ("mean", [1e39] * channels), ("std", [1e-50] * channels)]:
        (path / "manifest.json").write_text(json.dumps({**good, "dataset": {**good["dataset"], key: values}}))
        held = {"mean": good["dataset"]["mean"], "std": good["dataset"]["std"], key: values}
        with pytest.raises(DDKitError) as err:
            ddkit.load(path, normalize=True)
        assert str(err.value) == (f"'{path / 'manifest.json'}' holds dataset.mean {held['mean']!r} and dataset.std "
                                  f"{held['std']!r}, which normalise pixels 0..1 to non-finite values; the manifest is "
                                  "damaged: re-create the distilled-set artifact")
    (path / "manifest.json").write_text(json.dumps(good))
    assert torch.isfinite(ddkit.load(path, normalize=True)[0][0]).all()


def test_a_tensor_file_swapped_for_another_is_refused_and_not_reused(tiny, tmp_path, capsys, caplog):
    """Sets, FKD stores and expert buffers recorded no hash of their tensor files: another set's images (another
    seed's subset) or another buffer's expert copied in loaded, `show -q` passed them and a `ddkit run` reused
    and evaluated them. Manifests record each file's sha256 (not part of any identity); a file that does not
    match is a one-line error, and a run makes the set again. Artifacts from before the field load unchecked."""
    import hashlib
    import shutil

    from ddkit.cli import main
    from ddkit.labels import SoftLabelStore, relabel
    from ddkit.labels.fkd import store_identity
    from ddkit.methods.trajectory import ExpertConfig, load_experts, train_experts
    from ddkit.pipeline import run

    a, b = _random_set(tiny, tmp_path, ipc=2, seed=0), _random_set(tiny, tmp_path, ipc=2, seed=1)
    sums = json.loads((a.path / "manifest.json").read_text())["files_sha256"]
    assert sums == {"images.safetensors": hashlib.sha256((a.path / "images.safetensors").read_bytes()).hexdigest()}
    assert a.manifest["files_sha256"] == sums and "files_sha256" not in a.manifest["config"]
    shutil.copy(b.path / "images.safetensors", a.path / "images.safetensors")
    swapped = f"distilled images {str(a.path / 'images.safetensors')!r} does not match its manifest (sha256); " \
              "re-create the distilled set"
    with pytest.raises(DDKitError) as exc:
        ddkit.load(a.path)
    assert str(exc.value) == swapped
    assert main(["show", "-q", str(a.path)]) == 2 and capsys.readouterr().err == f"error: {swapped}\n"
    assert len(ddkit.load(_unhashed(a.path))) == 8  # written before manifests held the sums: not checked

    teacher = ddkit.train_teacher(tiny, ddkit.TeacherConfig(model="tiny_mlp", train={"epochs": 1}), tmp_path / "t")
    one = relabel(b, teacher, 2, seed=0, out=tmp_path / "k1")
    other = relabel(b, teacher, 2, seed=1, out=tmp_path / "k2")
    assert set(one.manifest["files_sha256"]) == {"fkd_labels.safetensors"}
    unsaved = relabel(b, teacher, 2, seed=0)  # the identity of a store in memory is the one it has once saved
    assert store_identity(unsaved) == store_identity(one) == store_identity(tmp_path / "k1")
    shutil.copy(tmp_path / "k2" / "fkd_labels.safetensors", tmp_path / "k1" / "fkd_labels.safetensors")
    with pytest.raises(DDKitError) as exc:
        SoftLabelStore.load(tmp_path / "k1")
    assert str(exc.value) == (f"FKD soft labels {str(tmp_path / 'k1' / 'fkd_labels.safetensors')!r} does not match "
                              "its manifest (sha256); re-create the store with `ddkit relabel`")
    assert other.manifest["files_sha256"] != one.manifest["files_sha256"]

    recipe = ExpertConfig(model="tiny_convnet", num_experts=1, epochs=1, batch_size=32)
    train_experts(tiny, recipe, tmp_path / "e1")
    train_experts(tiny, dataclasses.replace(recipe, seed=1), tmp_path / "e2")
    shutil.copy(tmp_path / "e2" / "expert_000.safetensors", tmp_path / "e1" / "expert_000.safetensors")
    mixed = (f"expert trajectory {str(tmp_path / 'e1' / 'expert_000.safetensors')!r} does not match its manifest "
             "(sha256); re-create the buffer")
    with pytest.raises(DDKitError) as exc:
        load_experts(tmp_path / "e1")
    assert str(exc.value) == mixed
    assert main(["show", "-q", str(tmp_path / "e1")]) == 2 and capsys.readouterr().err == f"error: {mixed}\n"

    cfg = RunConfig(dataset=DatasetConfig(name="synthetic"), teacher=None, out=str(tmp_path / "run"),
                    distill=DistillConfig(method="random", ipc=2), device="cpu",
                    evaluate={"overrides": {"student": "tiny_mlp", "full_reference": False, "random_baseline": False,
                                            "train": {"epochs": 1}}, "seeds": [0]})
    run(cfg)
    ddir = tmp_path / "run" / "distilled"
    whole = (ddir / "images.safetensors").read_bytes()
    shutil.copy(b.path / "images.safetensors", ddir / "images.safetensors")  # the seed-1 subset, same shapes
    with caplog.at_level("WARNING"):
        summary = run(cfg)
    assert "distilled" not in summary["reused"] and (ddir / "images.safetensors").read_bytes() == whole
    assert f"distilled images {str(ddir / 'images.safetensors')!r} does not match its manifest (sha256); " \
           "distilling again" in caplog.text


def test_an_evaluation_whose_mean_is_not_its_seeds_is_refused_and_evaluated_again(tmp_path, capsys, caplog):
    """An evaluation report whose mean was edited (per_seed left as it was) was reused by `ddkit run` and shown
    by `ddkit show` ("99.00 ± 0.00"); one with mean NaN was shown as "nan". ddkit.load, show and show --json
    refuse it in one line; a run evaluates again."""
    from ddkit.cli import main
    from ddkit.pipeline import run

    cfg = RunConfig(dataset=DatasetConfig(name="synthetic"), teacher=None, out=str(tmp_path / "run"),
                    distill=DistillConfig(method="random", ipc=2), device="cpu",
                    evaluate={"overrides": {"student": "tiny_mlp", "full_reference": False, "random_baseline": False,
                                            "train": {"epochs": 1}}, "seeds": [0, 1]})
    (good,) = run(cfg)["evaluations"]
    path = tmp_path / "run" / "eval-hard.json"
    per_seed, original = good["results"]["distilled"]["per_seed"], path.read_text()
    for field, value, problem in (
            ("mean", 0.99, f"mean 0.99, not the mean of its per_seed {per_seed} "
                           f"({good['results']['distilled']['mean']!r})"),
            ("std", float("nan"), f"std nan, not the population std of its per_seed {per_seed} "
                                  f"({good['results']['distilled']['std']!r})"),
            ("per_seed", [0.5, 1.5], "per_seed [0.5, 1.5], not accuracies in [0, 1]")):
        edited = json.loads(original)
        edited["results"]["distilled"][field] = value
        path.write_text(json.dumps(edited))
        refused = (f"evaluation report {str(path)!r} holds results.distilled {problem}; the report is damaged: delete "
                   "it and evaluate again")
        with pytest.raises(DDKitError) as exc:
            ddkit.load(path)
        assert str(exc.value) == refused
        for show in (["show", str(path)], ["show", "--json", str(path)]):
            assert main(show) == 2 and capsys.readouterr().err == f"error: {refused}\n"
    caplog.clear()
    with caplog.at_level("WARNING"):
        summary = run(cfg)
    assert "eval-hard.json" not in summary["reused"] and summary["evaluations"][0]["results"] == good["results"]
    assert (f"evaluation report {str(path)!r} holds results.distilled per_seed [0.5, 1.5], not accuracies in [0, 1]; "
            "evaluating again") in caplog.text
    assert ddkit.load(path)["results"] == good["results"] and main(["show", "-q", str(path)]) == 0
    record = tmp_path / "run" / "manifest.json"  # the run's record lists its evaluations: `show run` prints them
    edited = json.loads(record.read_text())
    edited["evaluations"][0]["results"]["distilled"]["mean"] = 0.99
    record.write_text(json.dumps(edited))
    assert main(["show", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        f"error: evaluation report '{record}: evaluations[0]' holds results.distilled mean 0.99, not the mean of its "
        f"per_seed {per_seed} ({good['results']['distilled']['mean']!r}); the report is damaged: run `ddkit run` with "
        "its config again to rewrite it\n")


@pytest.mark.parametrize("race", ["moved_away", "put_back"])
def test_atomic_dir_survives_a_writer_finishing_at_the_same_time(tmp_path, monkeypatch, race):
    """atomic_dir checked for the output, moved it aside and renamed its folder in, as three steps: another
    writer finishing in between made the loser fail ('No such file or directory', or ENOTEMPTY) with its
    finished output left hidden. Each rename is now tried again, and nothing hidden is left."""
    import ddkit.artifacts as artifacts

    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"kind": "x"}))
    real, done = os.replace, []

    def other_writer_first(src, dst):
        if done:
            pass
        elif race == "moved_away" and Path(src) == final:
            done.append(src)
            real(final, tmp_path / "elsewhere")  # the other writer moved the output aside first
        elif race == "put_back" and Path(dst) == final:
            done.append(src)
            final.mkdir()
            (final / "manifest.json").write_text(json.dumps({"kind": "x", "by": "other"}))  # and put its own there
        return real(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", other_writer_first)
    with atomic_dir(final) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"kind": "x", "by": "me"}))
    assert done and json.loads((final / "manifest.json").read_text()) == {"kind": "x", "by": "me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(["elsewhere"] if race == "moved_away"
                                                                          else [])])


def test_manifests_record_torchvisions_version_without_importing_it():
    """Every manifest records torchvision's version, and reading it imported torchvision: seconds, a third of a
    no-op rerun of a run or bench. It is read from torchvision's version.py, the same string as its __version__."""
    import subprocess
    import sys

    import torchvision

    code = ("import sys; from ddkit.artifacts import versions; "
            "print(versions()['torchvision'], 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(ddkit.__file__).parents[1])}).stdout.split()
    assert out == [torchvision.__version__, "False"]


def test_non_finite_soft_labels_are_refused_before_anything_is_written(tiny, bn_teacher, tmp_path):
    """distill --soft-labels with a teacher whose logits overflow wrote a set (exit 0) that every loader then
    refused; DATM's learned and TESLA's expert labels went through the same unchecked build."""
    import copy

    from ddkit.methods.base import SyntheticSet

    teacher = copy.deepcopy(bn_teacher)
    last = [m for m in teacher.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight[0] = 3e38  # finite weights, logits beyond float32
    out = tmp_path / "r_inf"
    with pytest.raises(DDKitError) as err:
        distill(tiny, DistillConfig(method="random", ipc=2, soft_labels=True), DatasetConfig(name="synthetic"),
                out=out, teacher=teacher)
    assert str(err.value) == ("the teacher's soft labels of the 'random' set hold NaN or infinite logits for 8 of 8 "
                              "images (image 0 first): the teacher's logits overflow on these images; check the "
                              "teacher (diverged training? huge weights?) and the images (diverged?); nothing was "
                              "saved")
    assert list(tmp_path.iterdir()) == []

    soft = torch.zeros(4, tiny.num_classes)
    soft[2, 1] = float("nan")
    with pytest.raises(DDKitError, match=r"^the soft labels method 'datm' made hold NaN or infinite logits for 1 of 4 "
                                         r"images \(image 2 first\): its labels diverged, or its teacher's logits "
                                         r"overflow on its images; check the teacher and lower the learning rates in "
                                         r"distill.options; nothing was saved$"):
        DistilledSet.build(SyntheticSet(torch.rand(4, *tiny.image_shape), torch.arange(4), soft_labels=soft), tiny,
                           method="datm", method_config={}, ipc=1, seed=0, config={}, dataset_config={})
    ds = DistilledSet.build(SyntheticSet(torch.rand(4, *tiny.image_shape), torch.arange(4),
                                         soft_labels=torch.zeros(4, tiny.num_classes)), tiny, method="datm",
                            method_config={}, ipc=1, seed=0, config={}, dataset_config={})
    ds.soft_labels = soft  # changed after build: save refuses it too
    with pytest.raises(DDKitError, match=r"^the set's soft labels hold NaN or infinite logits for 1 of 4 images"):
        ds.save(tmp_path / "s")
    assert list(tmp_path.iterdir()) == []
