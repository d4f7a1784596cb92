"""`ddkit cache`: list the cache by kind and size, prune whole entries no process uses, show a decoded entry.

Every test runs with its own ``$DDKIT_CACHE`` (conftest's ``_isolated_cache``): ``tmp_path / "cache"``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from pathlib import Path

import pytest

import ddkit
from ddkit import artifacts
from ddkit.cache import cache_entries, prune_cache
from ddkit.cli import main
from ddkit.data import load_dataset
from ddkit.errors import ConfigError, DDKitError
from test_data_cache import dead_pid, write_folder

DAY = 86400


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def age(path: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t), follow_symlinks=False)


@pytest.fixture
def tree(tmp_path):
    """A fake cache: two statistics entries (one 10 days old), an expert buffer with its lock file, a killed
    build's leftover (this host, a dead process), a live build's leftover and an interrupted build's work, and a
    cached accuracy file; a symlink in an entry to a large file outside (counted as the link, not followed)."""
    root = Path(os.environ["DDKIT_CACHE"])
    write(root / "statistics" / "a" / "stats.safetensors", 100)
    write(root / "statistics" / "a" / "manifest.json", 50)
    write(root / "statistics" / "a" / "sub" / "deep.bin", 25)
    write(tmp_path / "big", 10_000)
    (root / "statistics" / "a" / "link").symlink_to(tmp_path / "big")
    age(root / "statistics" / "a", 10)
    write(root / "statistics" / "b" / "stats.safetensors", 7)
    write(root / "experts" / "e" / "expert_000.safetensors", 1000)
    write(root / "experts" / ".e.lock", 0)
    origin = artifacts._origin()
    dead = write(root / "experts" / f".e.tmp-{origin}-{dead_pid()}-0123abcd" / "expert_000.safetensors", 30).parent
    live = write(root / "experts" / f".f.tmp-{origin}-{os.getpid()}-0123abcd" / "x", 3).parent
    partial = write(root / "experts" / ".g.partial-abc-def-norm" / "expert_000.safetensors", 40).parent
    write(root / "random-baseline" / "k.json", 13)
    age(root / "random-baseline" / "k.json", 3)
    link = os.lstat(root / "statistics" / "a" / "link").st_size
    return {"root": root, "link": link, "dead": dead, "live": live, "partial": partial}


def test_list_counts_and_sizes_exactly(tree, capsys):
    code, out, _ = run(["cache", "--json"], capsys)
    assert code == 0
    got = json.loads(out)
    assert got["root"] == str(tree["root"]) and "entries" not in got
    zero = {"leftovers": 0, "leftover_bytes": 0, "partial": 0, "partial_bytes": 0}
    assert got["kinds"] == {
        "experts": {"entries": 1, "bytes": 1000, "leftovers": 2, "leftover_bytes": 33, "partial": 1,
                    "partial_bytes": 40},
        "random-baseline": {"entries": 1, "bytes": 13, **zero},
        "statistics": {"entries": 2, "bytes": 175 + tree["link"] + 7, **zero},
    }
    code, out, _ = run(["cache", "list", "--entries", "--json"], capsys)
    entries = {(e["kind"], e["name"]): e for e in json.loads(out)["entries"]}
    assert sorted(entries) == sorted([("experts", "e"), ("experts", tree["dead"].name), ("experts", tree["live"].name),
                                      ("experts", ".g.partial-abc-def-norm"), ("random-baseline", "k.json"),
                                      ("statistics", "a"), ("statistics", "b")])  # no lock file
    assert entries["experts", tree["dead"].name]["state"] == "leftover"
    assert entries["experts", tree["dead"].name]["of"] == "e"
    assert entries["experts", ".g.partial-abc-def-norm"]["state"] == "partial"

    code, out, _ = run(["cache", "-l"], capsys)
    lines = out.splitlines()
    assert lines[0] == f"cache {tree['root']}"
    assert re.fullmatch(r"experts +1 +1 kB +3 \(73 B\)", lines[2])
    assert re.fullmatch(r"random-baseline +1 +13 B +-", lines[3])
    assert any(line.startswith(f"experts/{tree['dead'].name}  30 B  ") and
               line.endswith("(leftover of a killed build of e)") for line in lines)
    assert any(line.startswith("random-baseline/k.json  13 B  ") for line in lines)


def test_an_empty_or_missing_cache_lists_nothing(capsys):
    code, out, _ = run(["cache"], capsys)
    assert code == 0 and out == f"cache {os.environ['DDKIT_CACHE']}: empty\n"


def test_a_bare_prune_is_refused(tree, capsys):
    code, out, err = run(["cache", "prune"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: `ddkit cache prune` needs a selection: --kind KIND, --older-than DAYS, --stale or "
                          "--all")
    code, _, err = run(["cache", "prune", "--kind", "statistic"], capsys)  # a typo: refused, not nothing pruned
    assert code == 2 and "unknown cache kind 'statistic'; did you mean 'statistics'?" in err
    assert prune_cache(kinds=["imagefolder"]).removed == []  # a kind of ddkit's with no folder yet: nothing to do
    assert (tree["root"] / "statistics" / "a").is_dir()
    with pytest.raises(ConfigError, match="older-than"):
        prune_cache(older_than=-1)


def test_prune_by_kind_keeps_what_is_in_use(tree, capsys):
    root = tree["root"]
    before = {(e.kind, e.name) for e in cache_entries()}
    code, out, _ = run(["cache", "prune", "--kind", "experts", "--dry-run"], capsys)
    assert code == 0 and {(e.kind, e.name) for e in cache_entries()} == before  # nothing removed
    assert out.splitlines()[-1] == "would remove 3 item(s), 1.07 kB"

    fd = os.open(root / "experts" / ".e.lock", os.O_RDWR)  # a process building (or looking up) e
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, out, _ = run(["cache", "prune", "--kind", "experts", "--json"], capsys)
    finally:
        os.close(fd)
    got = json.loads(out)
    assert code == 0 and not got["dry_run"]
    assert sorted(e["name"] for e in got["removed"]) == sorted([tree["dead"].name, ".g.partial-abc-def-norm"])
    assert got["freed_bytes"] == 70
    assert {e["name"]: e["why"] for e in got["skipped"]} == {
        "e": "in use: a process is building or reading it",
        tree["live"].name: f"its build (process {os.getpid()}) still runs"}
    assert (root / "experts" / "e").is_dir() and tree["live"].is_dir()
    assert not tree["dead"].exists() and not tree["partial"].exists()
    assert {(e.kind, e.name) for e in cache_entries()} == before - {("experts", tree["dead"].name),
                                                                     ("experts", ".g.partial-abc-def-norm")}

    code, out, _ = run(["cache", "prune", "--kind", "experts"], capsys)  # no longer held: it goes, with its lock
    assert out.splitlines()[0] == "removed experts/e  1 kB"
    assert out.splitlines()[-1] == "removed 1 item(s), 1 kB freed"
    assert not (root / "experts" / "e").exists() and not (root / "experts" / ".e.lock").exists()
    assert sorted(p.name for p in (root / "experts").iterdir()) == [tree["live"].name]  # nothing else left
    assert (root / "statistics" / "a").is_dir() and (root / "random-baseline" / "k.json").is_file()


def test_prune_keeps_an_entry_whose_lock_file_a_builder_made_again_before_the_lock(tree, monkeypatch):
    """Prune opened an entry's lock file and locked it without checking that it was still the file there: where a
    builder removed it (remove_unused_lock) and made a new one in between, prune held a lock on an orphan while the
    builder held the new file, and removed the entry under it. Prune now locks the file there, as build_lock does."""
    root = tree["root"]
    lock, held, real = root / "experts" / ".e.lock", [], fcntl.flock

    def flock(fd, op):  # between prune's open and its lock: the lock file made again, and held by a builder
        if not held:
            lock.unlink()
            held.append(os.open(lock, os.O_RDWR | os.O_CREAT))
            real(held[0], fcntl.LOCK_EX)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    try:
        result = prune_cache(["experts"])
    finally:
        os.close(held[0])
    assert [(e.name, why) for e, why in result.skipped if e.name == "e"] == [
        ("e", "in use: a process is building or reading it")]
    assert (root / "experts" / "e" / "expert_000.safetensors").is_file() and lock.is_file()


def test_prune_by_age_and_all(tree, capsys):
    root = tree["root"]
    result = prune_cache(older_than=2)  # the 10-day and 3-day-old entries
    assert sorted((e.kind, e.name) for e in result.removed) == [("random-baseline", "k.json"), ("statistics", "a")]
    assert result.freed == 13 + 175 + tree["link"]
    assert not (root / "statistics" / "a").exists() and (root / "statistics" / "b").is_dir()
    assert (tmp := root.parent / "big").is_file() and tmp.stat().st_size == 10_000  # the link's target stays
    assert not list((root / "statistics").glob(".*"))  # removed whole: nothing of it left behind
    assert prune_cache(kinds=["statistics"], older_than=5).removed == []
    code, out, _ = run(["cache", "prune", "--all"], capsys)
    assert code == 0
    assert [(e.kind, e.name, e.state) for e in cache_entries()] == [("experts", tree["live"].name, "leftover")]


def test_a_real_decoded_entry_lists_shows_and_prunes(tmp_path, capsys):
    write_folder(tmp_path / "d")
    load_dataset("imagefolder", path=str(tmp_path / "d"), image_size=8)
    (entry,) = [e for e in cache_entries() if e.kind == "imagefolder"]
    files = [p for p in entry.path.rglob("*") if p.is_file()]
    assert entry.bytes == sum(p.stat().st_size for p in files) > 0
    assert entry.details == {"root": str((tmp_path / "d").resolve()), "image_size": 8}
    code, out, _ = run(["cache", "-l"], capsys)
    assert f"imagefolder/{entry.name}  " in out and out.rstrip().endswith(
        f"root {(tmp_path / 'd').resolve()}, image_size 8")

    code, out, _ = run(["show", str(entry.path)], capsys)
    assert code == 0
    assert out.startswith(f"decoded-image cache of imagefolder {(tmp_path / 'd').resolve()} (splits train/test, 3 "
                          "classes, image_size 8): train [18, 3, 8, 8], test [9, 3, 8, 8] uint8, 5.4 kB, decoded in ")
    assert "`ddkit cache` lists the cache" in out
    with pytest.raises(DDKitError, match=r"'imagefolder-decoded' record, which ddkit.load does not read; .*"
                                         r"`ddkit cache` lists the cache"):
        ddkit.load(entry.path)
    os.chmod(entry.path / "train_images.npy", 0o644)
    with open(entry.path / "train_images.npy", "r+b") as f:
        f.truncate(200)
    code, _, err = run(["show", str(entry.path)], capsys)
    assert code == 2 and "is damaged" in err and "ddkit cache prune --kind imagefolder" in err

    code, out, _ = run(["cache", "prune", "--kind", "imagefolder"], capsys)
    assert code == 0 and out.startswith(f"removed imagefolder/{entry.name}  ")
    assert list(entry.path.parent.iterdir()) == []  # the entry and its lock file


def test_an_entry_with_a_manifest_nested_too_deep_lists_and_shows_as_damaged(tmp_path, capsys):
    """`ddkit cache -l` and `ddkit show ENTRY` went out with a RecursionError traceback on an entry whose
    manifest.json nests arrays 100000 deep: the listing leaves its details out, show refuses it in one line."""
    write_folder(tmp_path / "d")
    load_dataset("imagefolder", path=str(tmp_path / "d"), image_size=8)
    (entry,) = [e for e in cache_entries() if e.kind == "imagefolder"]
    (entry.path / "manifest.json").chmod(0o644)
    (entry.path / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    assert [e.details for e in cache_entries() if e.kind == "imagefolder"] == [{"root": None, "image_size": None}]
    code, out, err = run(["cache", "-l"], capsys)
    assert code == 0 and f"imagefolder/{entry.name}  " in out and err == ""
    code, out, err = run(["show", str(entry.path)], capsys)
    assert (code, out) == (2, "") and err == (f"error: ddkit record {str(entry.path / 'manifest.json')!r} is corrupt "
                                              "(RecursionError); re-create it\n")


def test_entries_an_older_ddkit_made_are_marked_shown_so_and_pruned_alone(tmp_path, capsys):
    """Cache keys hash the entry's schema (imagefolder: DECODED_SCHEMA in the slot; statistics: SCHEMA; expert
    buffers: the normalisation in the name), so an entry of an older ddkit is never found or replaced again. `cache
    -l` listed it like a live one, `show` called a healthy old decoded entry damaged, and only --older-than set it
    apart from the live ones."""
    import shutil

    write_folder(tmp_path / "d")
    load_dataset("imagefolder", path=str(tmp_path / "d"), image_size=8)
    (live,) = [e for e in cache_entries() if e.kind == "imagefolder"]
    old = live.path.with_name("0123456789abcdef-fedcba9876543210")  # schema 1's slot: another name
    shutil.copytree(live.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = manifest["settings"]["schema"] = 1
    del manifest["host"]  # schema 1 recorded no host
    (old / "manifest.json").chmod(0o644)
    (old / "manifest.json").write_text(json.dumps(manifest))
    root = Path(os.environ["DDKIT_CACHE"])
    for name, schema in (("s-old", 1), ("s-new", 2), ("s-untold", None)):
        record = {"schema_version": 1, "kind": "statistics", "teacher": "t", "data": "d"}
        write(root / "statistics" / name / "manifest.json", 0).write_text(
            json.dumps(record if schema is None else {**record, "statistics_schema": schema}))
    experts = {"a0c4c65b57963ce7-c1453d574a14ef5e": "named without its normalisation",  # before the norm part
               # before the thread count and device part
               "a0c4c65b57963ce7-c1453d574a14ef5e-44972221": "named without its thread count and device",
               "a0c4c65b57963ce7-c1453d574a14ef5e-44972221-r2": "named without its thread count and device",
               "a0c4c65b57963ce7-c1453d574a14ef5e-44972221-0d5c9a4e": "", "mine": ""}
    for name in experts:
        write(root / "experts" / name / "manifest.json", 0).write_text(
            json.dumps({"schema_version": 1, "kind": "expert-buffer"}))
    # an interrupted build's work by an older ddkit's name is never resumed (QA 21c F3); by a current name it is
    partials = {".a0c4c65b57963ce7-c1453d574a14ef5e-44972221.partial-x": "named without its thread count and device",
                ".a0c4c65b57963ce7-c1453d574a14ef5e-44972221-0d5c9a4e.partial-x": ""}
    for name in partials:
        write(root / "experts" / name / "expert_000.safetensors", 0)

    # accuracies keyed without the thread count and device (schema 1) are never found again
    accuracies = {"random-baseline/r-old.json": (1, "schema 1"), "random-baseline/r-new.json": (2, ""),
                  "full-reference/f-old.json": (1, "schema 1"), "full-reference/f-bad.json": ("x", ""),
                  "distilled-student/d-new.json": (2, "")}
    for name, (schema, _) in accuracies.items():
        write(root / name, 0).write_text(json.dumps({"schema_version": schema, "kind": "random-baseline-cache"}))
    assert {e.name: e.stale for e in cache_entries()} == {
        live.name: "", old.name: "schema 1", "s-old": "schema 1", "s-new": "", "s-untold": "", **experts, **partials,
        **{name.split("/")[1]: stale for name, (_, stale) in accuracies.items()}}
    code, out, _ = run(["cache", "-l"], capsys)
    lines = {line.split()[0]: line for line in out.splitlines() if "/" in line.split()[0]}
    old_partial, new_partial = partials
    assert lines[f"experts/{old_partial}"].endswith("(interrupted build of a0c4c65b57963ce7-c1453d574a14ef5e-44972221,"
                                                     " by an older ddkit: named without its thread count and device;"
                                                     " never resumed)")
    assert lines[f"experts/{new_partial}"].endswith("-0d5c9a4e, resumable)")
    marked = "  (made by an older ddkit: schema 1)"
    assert lines[f"imagefolder/{old.name}"].endswith(f"image_size 8{marked}")
    assert lines[f"imagefolder/{live.name}"].endswith("image_size 8")
    assert lines["statistics/s-old"].endswith(marked) and "older" not in lines["statistics/s-new"]
    assert out.splitlines()[-1] == ("entries made by an older ddkit are never read again: `ddkit cache prune "
                                    "--stale` removes them")
    code, out, _ = run(["cache", "-l", "--json"], capsys)
    assert {e["name"]: e["stale"] for e in json.loads(out)["entries"]}[old.name] == "schema 1"

    code, out, err = run(["show", str(old)], capsys)
    assert (code, out) == (2, "") and err == (
        f"error: the decoded-image cache {str(old)!r} was made by an older ddkit (schema 1), which this one never "
        "reads (it decodes the images into a new entry); prune it (`ddkit cache prune --stale`, or rm -r)\n")
    assert run(["show", str(live.path), "-q"], capsys)[:2] == (0, "")

    code, out, _ = run(["cache", "prune", "--stale", "--kind", "imagefolder", "--dry-run"], capsys)
    assert out.splitlines()[0].startswith(f"would remove imagefolder/{old.name}  ") and old.exists()
    code, out, _ = run(["cache", "prune", "--stale"], capsys)
    assert code == 0 and out.splitlines()[-1].startswith("removed 8 item(s)")
    assert sorted(e.name for e in cache_entries()) == sorted(
        [live.name, "s-new", "s-untold", "a0c4c65b57963ce7-c1453d574a14ef5e-44972221-0d5c9a4e", "mine", "r-new.json",
         "f-bad.json", "d-new.json", new_partial])
    assert load_dataset("imagefolder", path=str(tmp_path / "d"), image_size=8).train is not None  # live one kept


@pytest.fixture(scope="module")
def module_cache():
    """The cache a module-scoped fixture computes in (set up before the per-test ``_isolated_cache``)."""
    return artifacts.cache_dir()


def test_fixtures_of_every_scope_use_a_fresh_cache_of_the_session(module_cache, tmp_path):
    """Module- and session-scoped fixtures (test_bench's full_run, test_report's run_dir...) evaluated in the
    shell's $DDKIT_CACHE or ~/.cache/ddkit: tests wrote into the user's cache, and a second session read the
    first's students back instead of training them."""
    from conftest import SESSION_CACHE, SHELL_CACHE

    home = Path.home() / ".cache"
    assert module_cache == SESSION_CACHE and SESSION_CACHE.is_dir()
    assert not module_cache.is_relative_to(home) and str(module_cache) != SHELL_CACHE
    assert artifacts.cache_dir() == tmp_path / "cache"  # each test still has its own
