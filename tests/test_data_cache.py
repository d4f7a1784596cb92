"""imagefolder's decoded-image cache: a second load maps what the first decoded, every bit alike.

Every test runs with its own ``$DDKIT_CACHE`` (conftest's ``_isolated_cache``), so the entries live in
``tmp_path / "cache" / "imagefolder"``.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
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
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


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


@pytest.mark.parametrize("damage", ["truncated", "manifest", "missing", "a list", "too deep", "a long number",
                                    "nan mean", "zero std", "conversions", "a changed byte", "no fingerprint"])
def test_a_damaged_entry_is_decoded_again(tmp_path, damage, caplog):
    """As the README says, a damaged entry is decoded again with a warning. A manifest that was a JSON list
    (AttributeError), nested too deep (RecursionError) or long numbers crashed the load with a traceback;
    a NaN mean or a zero std was trusted, so distill wrote a set its own loader refuses. A changed byte (disk or NFS
    damage, the size kept) was mapped as the data: other pixels, another fingerprint, for every later load; the
    entry records the data's fingerprint now (an entry of an older ddkit, which records none, is decoded again)."""
    write_folder(tmp_path / "d")
    plain = load_dataset("imagefolder", path=str(tmp_path / "d"), decode_cache=False)
    load_dataset("imagefolder", path=str(tmp_path / "d"))  # builds the entry (and maps it while it lives)
    (entry,) = entries()
    if damage in ("truncated", "a changed byte"):
        raw = bytearray((entry / "train_images.npy").read_bytes())
        raw[-1] ^= 0xFF
        (entry / "train_images.npy").chmod(0o644)
        (entry / "train_images.npy").write_bytes(raw[:-10] if damage == "truncated" else raw)
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{")
    elif damage != "missing":
        manifest = json.loads((entry / "manifest.json").read_text())
        (entry / "manifest.json").chmod(0o644)
        text = {"a list": "[]", "too deep": "[" * 100000 + "]" * 100000,
                "a long number": json.dumps(manifest).replace('"files_read": {"train": ',
                                                              '"files_read": {"train": ' + "9" * 5000 + ", \"x\": "),
                "nan mean": json.dumps({**manifest, "mean": [float("nan")] * len(manifest["mean"])}),
                "zero std": json.dumps({**manifest, "std": [0.0] * len(manifest["std"])}),
                "conversions": json.dumps({**manifest, "conversions": {"train": [1]}}),
                "no fingerprint": json.dumps({k: v for k, v in manifest.items() if k != "fingerprint"})}[damage]
        (entry / "manifest.json").write_text(text)
    else:
        (entry / "test_labels.npy").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddkit.data.sources"):
        again = load_dataset("imagefolder", path=str(tmp_path / "d"))
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the decoded-image cache ")]
    assert len(warned) == 1 and warned[0].startswith(f"the decoded-image cache {entry} is damaged (")
    assert warned[0].endswith("); removing it and decoding the images again") and "\n" not in warned[0]
    if damage in ("a changed byte", "no fingerprint"):
        assert warned[0] == f"the decoded-image cache {entry} is damaged (" + {
            "a changed byte": f"its images and labels have fingerprint {_changed_fingerprint(plain)}, not the "
                              f"{plain.fingerprint} it was written with",
            "no fingerprint": "its manifest.json records no fingerprint of the images",
        }[damage] + "); removing it and decoding the images again"
    assert any(r.getMessage().startswith(f"decoded images cached in {entry} ") for r in caplog.records)
    assert_same(again, plain)
    assert entries() == [entry] and (entry / "test_labels.npy").exists()


def _changed_fingerprint(data) -> str:
    """The fingerprint of ``data`` with the last byte of its train images flipped."""
    train = data.train.images.clone()
    train.view(-1)[-1] ^= 0xFF
    return dataclasses.replace(data, train=dataclasses.replace(data.train, images=train)).fingerprint


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


def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only: by its mode, or (as root, whom modes do not stop) by failing as a read-only
    mount would every call that creates or writes there."""
    if os.geteuid() != 0:
        folder.chmod(0o555)  # pytest's removal of tmp_path makes it writable again
        return

    def there(path) -> bool:
        return Path(path) == folder or Path(path).parent == folder

    def erofs(path):
        return OSError(errno.EROFS, "Read-only file system", str(path))

    real_open, real_mkdir, real_access = os.open, os.mkdir, os.access

    def fake_open(path, flags, *args, **kw):
        if there(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise erofs(path)
        return real_open(path, flags, *args, **kw)

    def fake_mkdir(path, *args, **kw):
        if there(path):
            raise erofs(path)
        return real_mkdir(path, *args, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if there(path) and mode & os.W_OK
                        else real_access(path, mode, **kw))


@pytest.mark.parametrize("before", ["nothing", "an entry"])
def test_a_read_only_cache_maps_its_entry_or_decodes_in_memory(tmp_path, monkeypatch, caplog, before):
    """A read-only DDKIT_CACHE, or a filled one mounted read-only, crashed every load in build_lock."""
    write_folder(tmp_path / "d")
    path = str(tmp_path / "d")
    plain = load_dataset("imagefolder", path=path, decode_cache=False)
    folder = tmp_path / "cache" / "imagefolder"
    folder.mkdir(parents=True)
    if before == "an entry":
        load_dataset("imagefolder", path=path)
        (entry,) = entries()
    there = sorted(folder.iterdir())
    read_only(monkeypatch, folder)
    calls = []
    real = sources._decode_imagefolder
    monkeypatch.setattr(sources, "_decode_imagefolder", lambda *a: calls.append(1) or real(*a))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddkit.data.sources"):
        got = load_dataset("imagefolder", path=path)
    assert_same(got, plain)
    warned = [r.getMessage() for r in caplog.records if "decoded-image cache" in r.getMessage()]
    if before == "an entry":
        assert calls == [] and warned == []
        assert mapped_files(got.train.images) == {str(entry / "train_images.npy")}
    else:
        assert calls == [1] and len(warned) == 1
        assert warned[0].startswith(f"cannot write the decoded-image cache {folder} (")
        assert warned[0].endswith("; decoding every file (set DDKIT_CACHE to a writable folder, or "
                                  "dataset.decode_cache=false)")
    assert sorted(folder.iterdir()) == there


def test_a_shared_cache_with_another_users_lock_file_maps_the_entry(tmp_path, monkeypatch):
    """The lock file of another user (0644, not writable here) is used read-only: flock needs no write access."""
    write_folder(tmp_path / "d")
    plain = load_dataset("imagefolder", path=str(tmp_path / "d"))
    (entry,) = entries()
    lock = entry.with_name(f".{entry.name}.lock")
    flags = []
    real_open = os.open

    def not_mine(path, flag, *args, **kw):
        if Path(path) == lock:
            flags.append(flag)
            if flag & (os.O_RDWR | os.O_WRONLY):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flag, *args, **kw)

    monkeypatch.setattr(os, "open", not_mine)
    monkeypatch.setattr(sources, "_read_image", lambda p, s: pytest.fail(f"{p} was decoded"))
    assert_same(load_dataset("imagefolder", path=str(tmp_path / "d")), plain)
    assert len(flags) == 2 and flags[-1] == os.O_RDONLY and lock.exists()


def dead_pid() -> int:
    """The id of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_what_killed_decodes_left_of_earlier_states_goes(tmp_path):
    """A decode killed while writing left its hidden temporary folder for good once the files changed (another
    key): each load sweeps the slot's leftovers of dead processes, and lock files no one holds of gone entries."""
    from ddkit import artifacts

    write_folder(tmp_path / "d")
    load_dataset("imagefolder", path=str(tmp_path / "d"))
    (entry,) = entries()
    slot = entry.name.split("-")[0]
    folder = entry.parent
    gone = folder / f"{slot}-{'0' * 16}"  # an earlier state's entry, and what writing it left
    dead, origin = dead_pid(), artifacts._origin()
    left = [folder / f".{gone.name}.tmp-{origin}-{dead}-0123abcd",
            folder / f".{gone.name}.old-{origin}-{dead}-4567cdef"]
    keep = [folder / f".{gone.name}.tmp-{origin}-{os.getpid()}-89abcdef",  # a live decode's
            folder / f".{gone.name}.tmp-otherhost-{dead}-0123abcd",  # another machine's
            folder / f".{'f' * 16}-{'0' * 16}.tmp-{origin}-{dead}-0123abcd"]  # another slot's
    for path in left + keep:
        path.mkdir()
        (path / "train_images.npy").write_bytes(b"half")
    stale = folder / f".{gone.name}.lock"
    stale.write_bytes(b"")
    (tmp_path / "d" / "train" / "k0" / "000.png").touch()  # the files change: another key of the same slot
    load_dataset("imagefolder", path=str(tmp_path / "d"))
    (new,) = entries()
    assert new != entry and new.name.startswith(f"{slot}-")
    assert not any(p.exists() for p in left) and all(p.exists() for p in keep)
    assert not stale.exists() and not entry.with_name(f".{entry.name}.lock").exists()
    assert new.with_name(f".{new.name}.lock").exists()


@pytest.mark.parametrize("room", [-1, 0])
def test_an_entry_the_disk_has_no_room_for_is_not_written(tmp_path, monkeypatch, caplog, room):
    """Writing filled the disk to the last byte before it gave up, on every load: the free space is checked
    first, leaving a tenth of the entry and at least 1 GiB free."""
    import shutil

    write_folder(tmp_path / "d")
    plain = load_dataset("imagefolder", path=str(tmp_path / "d"), decode_cache=False)
    size = plain.train.images.numel() + plain.test.images.numel() + 8 * (len(plain.train) + len(plain.test))
    need = size + 2**30
    seen = []

    def usage(path):
        seen.append(Path(path))
        return shutil._ntuple_diskusage(10 * need, 9 * need, need + room)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddkit.data.sources"):
        got = load_dataset("imagefolder", path=str(tmp_path / "d"))
    assert_same(got, plain)
    assert seen == [tmp_path / "cache" / "imagefolder"]
    warned = [r.getMessage() for r in caplog.records if "decoded-image cache" in r.getMessage()]
    if room < 0:
        assert entries() == [] and len(warned) == 1
        assert warned[0].startswith("not writing the decoded-image cache ")
        assert f"it needs {sources._size_text(need)} (with {sources._size_text(2**30)} left free) and " \
               f"{sources._size_text(need - 1)} is free;" in warned[0] and "dataset.decode_cache=false" in warned[0]
    else:
        assert len(entries()) == 1 and warned == []


def test_a_file_replaced_with_the_same_size_and_mtime_decodes_again(tmp_path, monkeypatch):
    """cp -p / rsync -a / tar -x of a new version keep size and mtime: the inode and ctime tell it apart."""
    write_folder(tmp_path / "d")
    first = load_dataset("imagefolder", path=str(tmp_path / "d"))
    a, b = tmp_path / "d" / "train" / "k0" / "000.png", tmp_path / "d" / "train" / "k0" / "004.png"
    assert a.stat().st_size == b.stat().st_size  # both grayscale 9x9: the same size
    new = tmp_path / "new.png"
    new.write_bytes(b.read_bytes())
    os.utime(new, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    os.replace(new, a)  # a's name, size and mtime, b's pixels
    got = load_dataset("imagefolder", path=str(tmp_path / "d"))
    assert torch.equal(got.train.images[0], first.train.images[4])
    assert not torch.equal(got.train.images[0], first.train.images[0])
    assert_same(got, load_dataset("imagefolder", path=str(tmp_path / "d"), decode_cache=False))


def test_another_hosts_entry_of_an_earlier_state_stays_a_day(tmp_path, monkeypatch):
    """Nodes sharing one cache folder whose files differ removed each other's entries (which the other may map,
    and re-decoded in turn): only this host's earlier-state entries go, and another host's once a day old."""
    write_folder(tmp_path / "d")
    load_dataset("imagefolder", path=str(tmp_path / "d"))
    (mine,) = entries()
    manifest = json.loads((mine / "manifest.json").read_text())
    assert manifest["host"] == sources.socket.gethostname()
    theirs = mine.with_name(mine.name.split("-")[0] + "-" + "0" * 16)
    theirs.mkdir()
    (theirs / "manifest.json").write_text(json.dumps({**manifest, "host": "othernode"}))
    old = mine.with_name(mine.name.split("-")[0] + "-" + "1" * 16)
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({**manifest, "host": "othernode"}))
    day = sources.FOREIGN_ENTRY_AGE + 60
    os.utime(old, (os.stat(old).st_atime - day, os.stat(old).st_mtime - day))
    (tmp_path / "d" / "train" / "k0" / "000.png").touch()  # this host's files change
    load_dataset("imagefolder", path=str(tmp_path / "d"))
    (new,) = set(entries()) - {theirs}
    assert sorted(entries()) == sorted([new, theirs])  # mine (this host's) and the day-old one went


def test_the_switch_is_no_data_difference_to_distill(tmp_path):
    """distill refused a dataset_cfg that differed from the loaded data's only in decode_cache (same pixels)."""
    from ddkit.data import DatasetConfig
    from ddkit.pipeline import DistillConfig, distill

    write_folder(tmp_path / "d")
    data = load_dataset(DatasetConfig(name="imagefolder", path=str(tmp_path / "d"), decode_cache=False))
    given = DatasetConfig(name="imagefolder", path=str(tmp_path / "d"))
    made = distill(data, DistillConfig(method="random", ipc=1), given)
    assert len(made.images) == 3
    with pytest.raises(ConfigError, match=r"^dataset_cfg does not describe the data it is given \(image_size 5 vs "
                                          r"None, as loaded\)"):
        distill(data, DistillConfig(method="random", ipc=1),
                DatasetConfig(name="imagefolder", path=str(tmp_path / "d"), image_size=5, decode_cache=False))
