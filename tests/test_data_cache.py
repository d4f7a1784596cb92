"""imagefolder's decoded-image cache: a second load maps what the first decoded, every bit alike.

Every test runs with its own ``$DDKIT_CACHE`` (conftest's ``_isolated_cache``), so the entries live in
``tmp_path / "cache" / "imagefolder"``.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddkit.data import load_dataset, sources
from ddkit.errors import ConfigError


def write_folder(root: Path, train: int = 6, test: int = 3) -> None:
    """Three classes of 9x9 files in several modes (grayscale, palette, RGBA with a transparent pixel, RGB)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(3):
            folder = root / split / f"k{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                rgb = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
                kind = (i + c) % 4
                if kind == 0:
                    im = Image.fromarray(rgb[..., 0])
                elif kind == 1:
                    im = Image.fromarray(rgb).convert("P")
                elif kind == 2:
                    alpha = np.full((9, 9, 1), 255, np.uint8)
                    alpha[0, 0] = 0
                    im = Image.fromarray(np.concatenate([rgb, alpha], 2))
                else:
                    im = Image.fromarray(rgb)
                im.save(folder / f"{i:03d}.png")


def entries() -> list[Path]:
    folder = Path(os.environ["DDKIT_CACHE"]) / "imagefolder"
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def assert_same(a, b) -> None:
    """Every bit of two bundles alike: images, labels, classes, mean/std, conversions, source."""
    for split in ("train", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert x.images.dtype == y.images.dtype and torch.equal(x.images, y.images)
        assert x.labels.dtype == y.labels.dtype and torch.equal(x.labels, y.labels)
    assert (a.classes, a.mean, a.std, a.conversions, a.source) == (b.classes, b.mean, b.std, b.conversions, b.source)
    assert a.describe() == b.describe()


@pytest.fixture
def no_decoding(monkeypatch):
    """Make decoding a file fail the test."""
    def refuse(path, size):
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(sources, "_read_image", refuse)


def mapped_files(t: torch.Tensor) -> set[str]:
    """The files mapped where ``t``'s memory lies (/proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    found = set()
    for line in maps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if lo <= t.data_ptr() < hi and len(parts) == 6:
            found.add(parts[5])
    return found


def test_second_load_maps_the_cache_and_decodes_nothing(tmp_path, monkeypatch, caplog):
    write_folder(tmp_path / "d")
    path = str(tmp_path / "d")
    with caplog.at_level(logging.INFO, logger="ddkit.data.sources"):
        plain = load_dataset("imagefolder", path=path, decode_cache=False)
    plain_lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert entries() == []  # off: nothing written
    assert plain.conversions["train"]["transparent"] > 0  # the record and the warning are worth checking

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddkit.data.sources"):
        built = load_dataset("imagefolder", path=path)
    (entry,) = entries()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    cached = [line for line in lines if line[1].startswith("decoded images cached in ")]
    assert len(cached) == 1 and str(entry) in cached[0][1] and "MB" in cached[0][1]
    assert [line for line in lines if line not in cached] == plain_lines  # the same conversion lines as ever
    assert_same(built, plain)
    assert mapped_files(built.train.images) == {str(entry / "train_images.npy")}  # the builder maps it too

    monkeypatch.setattr(sources, "_read_image", lambda p, s: pytest.fail(f"{p} was decoded"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddkit.data.sources"):
        hit = load_dataset("imagefolder", path=path)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("INFO", f"decoded images from the cache {entry} (0.00678 MB)")
    assert lines[1:] == plain_lines  # the conversions are logged (and warned of) as when they were decoded
    assert_same(hit, plain)
    assert mapped_files(hit.train.images) == {str(entry / "train_images.npy")}
    assert mapped_files(hit.test.images) == {str(entry / "test_images.npy")}
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["schema_version"] == sources.DECODED_SCHEMA and manifest["kind"] == "imagefolder-decoded"
    assert manifest["bytes"] == 18 * 3 * 81 + 9 * 3 * 81 + 27 * 8

    # copy-on-write: a write into the images changes this process's copy, never the file
    hit.train.images[0] = 0
    assert torch.equal(load_dataset("imagefolder", path=path).train.images, plain.train.images)


def test_a_changed_added_or_removed_file_decodes_again(tmp_path, monkeypatch):
    write_folder(tmp_path)
    first = load_dataset("imagefolder", path=str(tmp_path))
    (old,) = entries()
    calls = []
    real = sources._decode_imagefolder
    monkeypatch.setattr(sources, "_decode_imagefolder", lambda *a: calls.append(1) or real(*a))

    touched = tmp_path / "train" / "k1" / "002.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # same bytes, another mtime
    again = load_dataset("imagefolder", path=str(tmp_path))
    assert len(calls) == 1 and entries() != [old] and len(entries()) == 1  # the stale entry went
    assert_same(again, first)

    Image.fromarray(np.full((9, 9, 3), 7, np.uint8)).save(tmp_path / "train" / "k2" / "100.png")
    added = load_dataset("imagefolder", path=str(tmp_path))
    assert len(calls) == 2 and len(added.train) == len(first.train) + 1 and len(entries()) == 1
    assert added.train.images[-1].unique().tolist() == [7]

    (tmp_path / "train" / "k2" / "100.png").unlink()
    removed = load_dataset("imagefolder", path=str(tmp_path))
    assert len(calls) == 3 and len(entries()) == 1
    assert_same(removed, first)

    # other settings are another entry, beside this one; loading either again decodes nothing
    small = load_dataset("imagefolder", path=str(tmp_path), image_size=5, train_per_class=2, subset_seed=4)
    assert len(calls) == 4 and len(entries()) == 2
    assert_same(load_dataset("imagefolder", path=str(tmp_path), image_size=5, train_per_class=2, subset_seed=4), small)
    assert_same(load_dataset("imagefolder", path=str(tmp_path)), first)
    assert len(calls) == 4


def test_the_key_stats_the_files_and_reads_none(tmp_path, monkeypatch):
    write_folder(tmp_path)
    cfg = sources.DatasetConfig(name="imagefolder", path=str(tmp_path))
    classes = ["k0", "k1", "k2"]
    listing = {s: sources._split_files(cfg, tmp_path / s, classes) for s in ("train", "test")}
    want = sources._decoded_key(cfg, tmp_path, classes, listing)

    def refuse(*args, **kw):
        raise AssertionError(f"opened {args[0]}")

    with monkeypatch.context() as m:
        for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
            m.setattr(module, name, refuse)
        assert sources._decoded_key(cfg, tmp_path, classes, listing) == want
    for kw in ({"image_size": 9}, {"train_per_class": 6}, {"test_per_class": 3}, {"subset_seed": 1},
               {"classes": ["k2", "k1", "k0"]}):
        other = sources.DatasetConfig(name="imagefolder", path=str(tmp_path), **kw)
        assert sources._decoded_key(other, tmp_path, other.classes or classes, listing)[:2] != want[:2], kw
    moved = tmp_path / "elsewhere"
    os.rename(tmp_path / "test", moved)  # the other split's folder name, with the same files
    cfg_moved = sources.DatasetConfig(name="imagefolder", path=str(tmp_path), test_split="elsewhere")
    listing_moved = {"train": listing["train"], "test": sources._split_files(cfg_moved, moved, classes)}
    assert sources._decoded_key(cfg_moved, tmp_path, classes, listing_moved)[:2] != want[:2]


def test_the_switch_turns_it_off_and_other_sources_refuse_it(tmp_path, monkeypatch):
    write_folder(tmp_path)
    calls = []
    real = sources._decode_imagefolder
    monkeypatch.setattr(sources, "_decode_imagefolder", lambda *a: calls.append(1) or real(*a))
    for _ in range(2):
        load_dataset("imagefolder", path=str(tmp_path), decode_cache=False)
    assert len(calls) == 2 and not (tmp_path / "cache").exists()
    torch.save({"train_images": torch.zeros(4, 1, 2, 2), "train_labels": torch.tensor([0, 1, 0, 1]),
                "test_images": torch.zeros(2, 1, 2, 2), "test_labels": torch.tensor([0, 1])}, tmp_path / "t.pt")
    for name, path in (("tensors", tmp_path / "t.pt"), ("cifar10", tmp_path), ("fashion-mnist", tmp_path),
                       ("synthetic", None)):
        with pytest.raises(ConfigError, match=rf"^dataset.decode_cache applies only to 'imagefolder' \('{name}'"):
            load_dataset(name, path=path and str(path), decode_cache=False)


@pytest.mark.parametrize("damage", ["truncated", "manifest", "missing"])
def test_a_damaged_entry_is_decoded_again(tmp_path, damage, caplog):
    write_folder(tmp_path / "d")
    plain = load_dataset("imagefolder", path=str(tmp_path / "d"), decode_cache=False)
    load_dataset("imagefolder", path=str(tmp_path / "d"))  # builds the entry (and maps it while it lives)
    (entry,) = entries()
    if damage == "truncated":
        raw = (entry / "train_images.npy").read_bytes()
        (entry / "train_images.npy").chmod(0o644)
        (entry / "train_images.npy").write_bytes(raw[:-10])
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{")
    else:
        (entry / "test_labels.npy").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddkit.data.sources"):
        again = load_dataset("imagefolder", path=str(tmp_path / "d"))
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the decoded-image cache ")]
    assert len(warned) == 1 and warned[0].startswith(f"the decoded-image cache {entry} is damaged (")
    assert warned[0].endswith("); removing it and decoding the images again") and "\n" not in warned[0]
    assert any(r.getMessage().startswith(f"decoded images cached in {entry} ") for r in caplog.records)
    assert_same(again, plain)
    assert entries() == [entry] and (entry / "test_labels.npy").exists()


def test_an_unwritable_cache_decodes_in_memory(tmp_path, monkeypatch, caplog):
    write_folder(tmp_path / "d")
    plain = load_dataset("imagefolder", path=str(tmp_path / "d"), decode_cache=False)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "file"))
    with caplog.at_level(logging.WARNING, logger="ddkit.data.sources"):
        got = load_dataset("imagefolder", path=str(tmp_path / "d"))
    assert_same(got, plain)
    assert any(r.getMessage().startswith("cannot create the decoded-image cache") for r in caplog.records)

    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "_write_synced", lambda path, data: (_ for _ in ()).throw(OSError(28, "No space")))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddkit.data.sources"):
        got = load_dataset("imagefolder", path=str(tmp_path / "d"))
    assert_same(got, plain)
    assert any(r.getMessage().startswith("cannot write the decoded-image cache") for r in caplog.records)
    assert entries() == [] and not [p for p in (tmp_path / "cache" / "imagefolder").iterdir()
                                    if p.name.startswith(".") and not p.name.endswith(".lock")]


def test_two_loads_at_once_decode_once(tmp_path, monkeypatch):
    from conftest import twice_at_once

    write_folder(tmp_path)
    calls, results = twice_at_once(monkeypatch, sources, "_decode_imagefolder",
                                   lambda: load_dataset("imagefolder", path=str(tmp_path)))
    assert len(calls) == 1 and len(results) == 2
    assert_same(results[0], results[1])


RANK_SCRIPT = """
import json, sys, threading
from ddkit import distributed as ddist
from ddkit.data import load_dataset, sources
info = ddist.init_from_env("cpu")
real, decoded, lock = sources._read_image, [], threading.Lock()
def counting(path, size):
    with lock:
        decoded.append(str(path))
    return real(path, size)
sources._read_image = counting
data = load_dataset("imagefolder", path=sys.argv[1])
ddist.barrier()
with open(f"rank{info.rank}.json", "w") as f:
    json.dump({"decoded": len(decoded), "fingerprint": data.fingerprint, "mean": data.mean, "std": data.std,
               "conversions": data.conversions}, f)
ddist.shutdown()
"""


def test_torchrun_ranks_decode_once_and_map_the_same_entry(tmp_path):
    write_folder(tmp_path / "d")
    plain = load_dataset("imagefolder", path=str(tmp_path / "d"), decode_cache=False)
    (tmp_path / "rank_load.py").write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDKIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "rank_load.py", str(tmp_path / "d")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(r["decoded"] for r in ranks) == [0, 27]  # exactly one rank decoded every file
    for r in ranks:
        assert (r["fingerprint"], tuple(r["mean"]), tuple(r["std"]), r["conversions"]) == (
            plain.fingerprint, plain.mean, plain.std, plain.conversions)
    assert len(entries()) == 1
