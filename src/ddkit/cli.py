"""``ddkit`` command line: thin subcommands over the library.

Every command builds one config (YAML file, then flags, then ``--set key.sub=value``), validates it
strictly and calls a library function. User errors print ``error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddkit import __version__
from ddkit.errors import DDKitError, printable

log = logging.getLogger("ddkit")

# the protocol presets whose label mode is teacher (`evaluate --teacher`'s help; written out, as building the
# parser imports no torch: tests/test_cli.py checks it against ddkit.evaluate.PROTOCOLS)
TEACHER_PRESETS = ("cvdd", "edc", "soft-kl")


class Progress:
    """tqdm bars for training loops; one bar per label, only on the main rank."""

    def __init__(self, enabled: bool = True) -> None:
        from ddkit import distributed as ddist

        self.enabled = enabled and ddist.current().is_main
        self.bar = None
        self.label = None

    def __call__(self, label: str, done: int, total: int, record: dict | None = None, unit: str = "ep") -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if label != self.label or self.bar is None:
            self.close()
            # into a log file (no terminal), an update every 30 s instead of every 0.1 s
            self.bar = tqdm(total=total, desc=label, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.1 if sys.stderr.isatty() else 30.0)
            self.label = label
        self.bar.update(done - self.bar.n)
        if record and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}")
        if done >= total:
            self.close()

    def stage(self, name: str):
        """A callback for one stage; a ``distill`` stage counts iterations and names its one-off passes.
        None when the bars are off (``-q``, ranks other than 0): a synthesis loop then never reads its
        losses from the device for a bar that is not shown."""
        if not self.enabled:
            return None
        if name.split()[0] != "distill":
            return lambda done, total, record: self(name, done, total, record)
        from ddkit.methods.common import progress_view

        def synthesis(done: int, total: int, record: dict) -> None:
            label, unit = progress_view(name, record)
            self(label, done, total, record, unit)

        return synthesis

    def students(self):
        """The callback of ``evaluate`` (and ``run``'s evaluations): one bar per student, named by each
        report's ``record["stage"]``; None when the bars are off."""
        if not self.enabled:
            return None
        return lambda done, total, record: self(record["stage"], done, total, record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.label = None


def _base(args, section: str) -> dict[str, Any]:
    """The --config file of a one-stage command (``ddkit <section>``); a record ddkit wrote is refused in one line."""
    from ddkit.config import load_yaml, refuse_record

    if not getattr(args, "config", None):
        return {}
    data = load_yaml(args.config)
    refuse_record(data, section=section)
    return data


def _section(data: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    """``data[key]`` as a mapping the CLI's flags can fill in (made when absent or empty)."""
    from ddkit.errors import ConfigError

    value = data.get(key)
    if value is None:
        value = data[key] = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where + '.' if where else ''}{key}: expected a mapping of settings, got {value!r}")
    return value


def _refuse_flag_and_set(given: dict[str, tuple[str, Any]], sets: list[str]) -> None:
    """Refuse in one line a flag whose value a ``--set`` of the same command replaces or drops (``--set`` is applied
    last, over the flags: the flag's value, even an invalid one, went unread). ``given``: config key (dotted) ->
    (the flag, its value). A ``--set`` that leaves the key at the flag's value (another key of its section merged in,
    the same value) is taken."""
    from ddkit.config import apply_overrides

    if not given or not sets:
        return
    probe: dict[str, Any] = {}
    for key, (_, value) in given.items():  # the flags' values where the command puts them
        *parents, leaf = key.split(".")
        node = probe
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    apply_overrides(probe, sets)  # as the command applies them over the flags
    for key, (flag, value) in given.items():
        node: Any = probe
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node != value or type(node) is not type(value):
            item = next((i for i in sets if key == (k := i.split("=", 1)[0].strip()) or key.startswith(k + ".")), key)
            shown = "" if value is True else f" {value}"
            raise DDKitError(f"{flag}{shown} and --set {item} both give {key}; give it once (a --set is applied over "
                             "the flags)")


_MISSING = object()


def _apply_common(data: dict[str, Any], args) -> dict[str, Any]:
    """The dataset flags, then ``--set`` (last, over every flag); call it after the command's own flags."""
    from ddkit.config import apply_overrides

    ds = _section(data, "dataset")
    if getattr(args, "dataset", None) is not None:
        ds["name"] = args.dataset
    if getattr(args, "data_path", None) is not None:
        ds["path"] = args.data_path
    return apply_overrides(data, list(getattr(args, "set", None) or []))


def _stage_config(args, section: str, cls: type, flags: dict[str, str]) -> tuple[Any, Any]:
    """A one-stage command's dataset config and ``section`` config (of type ``cls``; the command is
    ``ddkit <section>``): the YAML (--config), then the command's ``flags`` (flag -> key in the
    section, dotted for nested ones), then the dataset flags and --set. A flag left out (None, or a
    switch not given) keeps the YAML's value; a section the command does not read is refused."""
    from ddkit.config import from_dict
    from ddkit.data.base import DatasetConfig

    data = _base(args, section)
    own = _section(data, section)
    given = {f"dataset.{key}": (f"--{name.replace('_', '-')}", getattr(args, name))
             for name, key in (("dataset", "name"), ("data_path", "path")) if getattr(args, name, None) is not None}
    for flag, key in flags.items():
        value = getattr(args, flag, None)
        if value is None or value is False:
            continue
        given[f"{section}.{key}"] = (f"--{flag.replace('_', '-')}", value)
        *parents, leaf = key.split(".")
        target, where = own, section
        for parent in parents:
            target, where = _section(target, parent, where), f"{where}.{parent}"
        target[leaf] = value
    _refuse_flag_and_set(given, list(getattr(args, "set", None) or []))
    data = _apply_common(data, args)
    unknown = set(data) - {"dataset", section}
    if unknown:
        raise DDKitError(f"unknown config section(s) {sorted(unknown)} for `ddkit {section}`; use dataset "
                         f"and {section}")
    return from_dict(DatasetConfig, data.get("dataset"), "dataset"), from_dict(cls, data.get(section), section)


def _device(args):
    from ddkit import distributed as ddist

    info = ddist.init_from_env(args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu"))
    return ddist.resolve_device(args.device, info)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _seeds(text: str) -> list[int]:
    from ddkit.config import SEED_LIMIT

    try:
        seeds = [int(s) for s in text.split(",")]  # an empty item ("0,,1") is a typo, not a separator
    except ValueError:
        raise DDKitError(f"--seeds must be comma-separated integers like 0,1,2, got {text!r}") from None
    bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
    if bad:
        raise DDKitError(f"--seeds must lie in [0, 2^32), got {bad[0]}")
    return seeds


def _print(*a) -> None:
    from ddkit import distributed as ddist

    if ddist.current().is_main:
        print(*(printable(str(x), keep="\n") for x in a))  # names read from artifacts: no terminal escapes


# --- commands ---------------------------------------------------------------------------------


def cmd_teacher(args) -> int:
    from ddkit.data.base import load_dataset
    from ddkit.teacher import TeacherConfig, train_teacher

    if args.checkpoint is not None:
        given = [f"--{k}" for k in ("epochs", "precision", "seed") if getattr(args, k, None) is not None]
        if given:
            raise DDKitError(f"{', '.join(given)} set how a teacher trains, but --checkpoint imports a trained one; "
                             "drop them (or drop --checkpoint to train)")
    dcfg, cfg = _stage_config(args, "teacher", TeacherConfig,
                              {"model": "model", "seed": "seed", "checkpoint": "checkpoint",
                               "epochs": "train.epochs", "precision": "train.precision"})
    device = _device(args)
    bundle = load_dataset(dcfg)
    progress = Progress(not args.quiet)
    teacher = train_teacher(bundle, cfg, args.out, device, progress=progress.stage("teacher"))
    progress.close()
    _print(f"teacher {cfg.model} on {bundle.name}: test accuracy {100 * teacher.test_accuracy:.2f}% -> {args.out}")
    return 0


def cmd_distill(args) -> int:
    from ddkit.config import to_dict
    from ddkit.data.base import load_dataset
    from ddkit.distilled import ipc_text
    from ddkit.methods import METHODS
    from ddkit.pipeline import DistillConfig, distill, load_teacher_for, reads_teacher, recorded_distill

    # the flag's default is None: only a typed --ipc gets here
    if args.ipc is not None and args.method in METHODS and not METHODS.get(args.method).uses_ipc:
        what = "keeps every training image" if args.method == "full" else "makes no ipc images per class"
        raise DDKitError(f"--ipc {args.ipc} does not apply to method {args.method!r}, which {what}; drop --ipc (or "
                         "pick another method)")
    # method full from a config file: DistillConfig refuses an ipc other than the default
    dcfg, cfg = _stage_config(args, "distill", DistillConfig, {"method": "method", "ipc": "ipc", "seed": "seed",
                                                               "soft_labels": "soft_labels",
                                                               "image_dtype": "image_dtype"})
    device = _device(args)
    bundle = load_dataset(dcfg)
    teacher = load_teacher_for(args.teacher, bundle, device)
    if args.teacher and not reads_teacher(cfg):  # as evaluate's label mode hard: said, not refused (once it loaded)
        log.warning("method %r reads no teacher: --teacher is not used (--soft-labels stores its logits on the images)",
                    cfg.method)
    progress = Progress(not args.quiet)
    ds = distill(bundle, cfg, dcfg, args.out, teacher, device, progress.stage(f"distill {cfg.method}"),
                 run_config={"dataset": to_dict(dcfg.absolute()), "distill": recorded_distill(cfg)})
    progress.close()
    _print(f"{cfg.method} ipc={ipc_text(ds.ipc)}: {len(ds)} images, {ds.image_bytes:,} image bytes, "
           f"{ds.label_bytes:,} label bytes -> {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from ddkit.config import apply_overrides, from_dict
    from ddkit.data.base import DatasetConfig, load_dataset
    from ddkit.distilled import DistilledSet, set_folder
    from ddkit.evaluate import evaluate, format_table, resolve_protocol
    from ddkit.pipeline import load_teacher_for

    distilled = DistilledSet.load(set_folder(args.distilled))  # a run folder: its set
    overrides: dict[str, Any] = {}
    given = {key: (flag, value) for key, flag, value in (("label_mode", "--label-mode", args.label_mode),
                                                          ("train.epochs", "--epochs", args.epochs),
                                                          ("train.precision", "--precision", args.precision))
             if value is not None}
    if args.label_mode:
        overrides["label_mode"] = args.label_mode
    if args.epochs is not None:
        _section(overrides, "train")["epochs"] = args.epochs
    if args.precision is not None:
        _section(overrides, "train")["precision"] = args.precision
    _refuse_flag_and_set(given, list(args.set or []))
    apply_overrides(overrides, list(args.set or []))  # last, over the flags
    protocol = resolve_protocol(args.protocol, overrides, where="")  # keys as --set names them
    if protocol.label_mode == "hard" and args.teacher:
        log.warning("label mode hard trains on the set's own labels: --teacher is not used")
    if protocol.label_mode == "fkd" and not protocol.fkd_store:  # before the data and teacher load
        raise DDKitError("label mode fkd replays a `ddkit relabel` store; pass --set fkd_store=DIR")
    if protocol.label_mode != "fkd" and protocol.fkd_store:
        log.warning("label mode %s replays no FKD store: fkd_store is not used (--label-mode fkd replays it)",
                    protocol.label_mode)
    dcfg_data = dict(distilled.manifest["dataset_config"])
    if args.data_path is not None:
        if dcfg_data.get("name") == "synthetic":
            raise DDKitError("the set was distilled from the generated dataset 'synthetic', which has no files; "
                             "drop --data-path")
        dcfg_data["path"] = args.data_path
    device = _device(args)
    try:
        bundle = load_dataset(from_dict(DatasetConfig, dcfg_data, "dataset"))
        teacher = load_teacher_for(args.teacher, bundle, device)
    except DDKitError as exc:
        # the set fixes every dataset setting but the path: a fix naming another cannot be followed
        problem, _, fix = str(exc).rpartition("; ")
        if problem and re.search(r"dataset\.(?!path\b)\w+", fix):
            raise type(exc)(f"{problem}; the set records its dataset settings: point --data-path at the data it was "
                            "made from (and --teacher at a teacher trained on it)") from None
        raise
    # inside the set's folder, however it was named (`set/manifest.json` too)
    out = args.out or str(Path(distilled.path) / f"eval-{protocol.label_mode}-{protocol.hash}.json")
    progress = Progress(not args.quiet)
    report = evaluate(distilled, protocol, _seeds(args.seeds), data=bundle, teacher=teacher, device=device,
                      cache_dir=args.cache_dir, out=out, progress=progress.students())
    progress.close()
    _print(format_table([report]))
    _print(f"label bytes {report['bytes']['labels']:,} + image bytes {report['bytes']['images']:,}; report -> {out}")
    return 0


def cmd_run(args) -> int:
    from ddkit.config import apply_overrides, from_dict, load_yaml
    from ddkit.pipeline import RunConfig

    data = load_yaml(args.config)
    _refuse_other_schema(data, args.config, "run")
    if args.out is not None:  # --out "" is the current folder, refused as such (not the config's out)
        data["out"] = args.out
    if args.device != "auto":
        data["device"] = args.device
    _refuse_flag_and_set(_top_flags(args), list(args.set or []))
    apply_overrides(data, list(args.set or []))  # last, over the flags
    cfg = from_dict(RunConfig, data)
    return _run_and_print(cfg, args.quiet)


def _top_flags(args) -> dict[str, tuple[str, Any]]:
    """The config keys ``ddkit run`` and ``ddkit bench`` take from flags (--out, --device), with the flag and value."""
    return {key: (f"--{key}", value) for key, value in (("out", args.out), ("device", args.device))
            if value is not None and not (key == "device" and value == "auto")}


def _refuse_other_schema(data: Any, path: str, command: str) -> None:
    """Refuse in one line a config file of the other command (`ddkit run` / `ddkit bench`), which would
    otherwise list every top-level key as unknown, with a did-you-mean between the two schemas: when
    every key its config does not know is one of the other's, and more of them than its own."""
    import dataclasses

    from ddkit.bench import BenchConfig
    from ddkit.pipeline import RunConfig

    if not isinstance(data, dict):
        return
    own, other_command = (RunConfig, "bench") if command == "run" else (BenchConfig, "run")
    fields = {c: {f.name for f in dataclasses.fields(c)} for c in (RunConfig, BenchConfig)}
    mine, theirs = fields[own], fields[BenchConfig if own is RunConfig else RunConfig]
    keys = {k for k in data if isinstance(k, str)}
    unknown = keys - mine
    if unknown and unknown <= theirs and len(unknown) > len(keys & (mine - theirs)):
        raise DDKitError(f"{path!r} looks like a `ddkit {other_command}` config (keys {', '.join(sorted(unknown))}); "
                         f"run it with `ddkit {other_command} {shlex.quote(path)}`")


def _run_and_print(cfg, quiet: bool) -> int:
    from ddkit import distributed as ddist
    from ddkit.evaluate import format_table
    from ddkit.pipeline import run

    ddist.init_from_env("cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and _cuda()) else "cpu")
    progress = Progress(not quiet)
    summary = run(cfg, progress_factory=progress.stage, eval_progress=progress.students())
    progress.close()
    if summary.get("teacher_accuracy") is not None:
        _print(f"teacher test accuracy: {100 * summary['teacher_accuracy']:.2f}%")
    if summary["reused"]:
        _print(f"reused: {', '.join(summary['reused'])}")
    _print(format_table(summary["evaluations"]))
    _print(f"report: {Path(cfg.out) / 'report' / 'summary.md'}")
    return 0


def cmd_demo(args) -> int:
    from ddkit.pipeline import demo_config

    cfg = demo_config(out=args.out, data_path=args.data_path, device=args.device, precision=args.precision)
    _print("ddkit demo: teacher -> DM IPC 10 -> evaluation (hard and teacher-soft labels) on Fashion-MNIST")
    return _run_and_print(cfg, args.quiet)


def cmd_list(args) -> int:
    import ddkit.data
    import ddkit.methods  # noqa: F401
    from ddkit.data import DATASETS
    from ddkit.evaluate import PROTOCOLS
    from ddkit.methods import METHODS
    from ddkit.models import MODELS

    registries = {"models": MODELS, "methods": METHODS, "datasets": DATASETS, "protocols": PROTOCOLS}
    names = registries[args.what].list(args.pattern)
    if not names and args.what == "models" and args.pattern:  # a name of a family's grammar (convnet3-p3)
        from ddkit.models.registry import resolve_model

        with contextlib.suppress(DDKitError):
            _, options = resolve_model(args.pattern)
            names = [f"{args.pattern}  (options {options})"]
    if not names:
        hint = (" (ConvNets also read any name of the grammar convnet[d<N>][-w<W>][-p<P>][-bn|-in|-ln|-nonorm]"
                "[-avgpool|-maxpool|-nopool])" if args.what == "models" else "")
        raise DDKitError(f"no {args.what} match {args.pattern!r}; try `ddkit list {args.what}`{hint}")
    if args.long:  # each with the summary of its docstring (a method's cites its paper)
        from ddkit.describe import doc_summary

        width = max(len(n) for n in names)
        names = [f"{n.ljust(width)}  {_description(registries[args.what].get(n), doc_summary)}".rstrip()
                 if n in registries[args.what] else n for n in names]
    print("\n".join(names))
    return 0


def _description(entry: Any, doc_summary) -> str:
    """``list -l``'s description of a registered entry: its docstring's summary; a preset (a model family's factory
    with options bound, ``convnet3-w32``, ``tv_resnet18``) adds the options it binds, which tell it from the others."""
    import functools
    import inspect

    text = doc_summary(entry)
    if isinstance(entry, functools.partial):
        bound = inspect.signature(entry.func).bind_partial(*entry.args, **entry.keywords).arguments
        text += f" Preset: {', '.join(f'{k}={v!r}' for k, v in bound.items())}."
    return text


def cmd_show(args) -> int:
    from ddkit.config import to_dict
    from ddkit.describe import describe, describe_method, method_record, read_record

    # a file or folder first, then a protocol, then a method; a name both protocol and method (edc, cvdd) shows
    # the protocol, as before methods could be shown, and says how to see the method: `show method:edc`. A bare
    # registered name wins over a file of that name in the current folder (as --protocol reads it: ./NAME is the
    # file); a folder, or a path with a separator or a suffix, is a path
    target, is_path = args.target, Path(args.target).exists()
    if Path(target).is_file() and not Path(target).suffix:
        from ddkit.evaluate import PROTOCOLS
        from ddkit.evaluate.protocol import is_protocol_file
        from ddkit.methods import METHODS

        is_path = is_protocol_file(target) or (target not in PROTOCOLS and target not in METHODS)
    if not is_path:  # importing every method (and torch) takes a while: only for a name
        from ddkit.evaluate import PROTOCOLS
        from ddkit.evaluate.protocol import preset
        from ddkit.methods import METHODS
    method = target.removeprefix("method:") if not is_path and target.startswith("method:") else None
    if not is_path and target in PROTOCOLS:
        text = json.dumps(to_dict(preset(target)), indent=2)
        if target in METHODS and not args.quiet:
            print(f"note: {target!r} is also a method; `ddkit show method:{target}` shows its options",
                  file=sys.stderr)
    elif method is not None or (not is_path and target in METHODS):
        key = method if method is not None else target
        METHODS.get(key)  # an unknown method:NAME: did-you-mean
        text = json.dumps(method_record(key), indent=2) if args.json else describe_method(key)
    elif not is_path and not re.search(r"[/\\.]", target) and (close := _closest_name(target)) is not None:
        # `show ecd`, `show dmm`; a path's typo is left to describe()
        kind, name = close
        names = "folder or protocol" if kind == "protocol" else "folder, protocol or method"
        raise DDKitError(f"{target!r} not found (no file, {names} of that name); did you mean the {kind} "
                         f"{name!r}?")
    elif args.json:
        record, where = read_record(args.target)
        if (found := _not_finite(record)) is not None:  # json.dumps would print NaN, which JSON readers refuse
            raise DDKitError(f"{str(where)!r} holds {found[0]} = {found[1]}, a number JSON cannot hold; the record "
                             "is damaged, re-create it")
        text = json.dumps(record, indent=2)
    else:
        text = describe(args.target)
    if not args.quiet:
        print(printable(text, keep="\n"))  # names read from the artifact: no terminal escapes
    return 0


def _not_finite(value: Any, key: str = "") -> tuple[str, float] | None:
    """The first NaN or infinite number in a JSON record, as (dotted key, value), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key or "the record", value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if (found := _not_finite(v, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}" if key else k)):
            return found
    return None


def cmd_cache(args) -> int:
    import datetime

    from ddkit.artifacts import cache_dir
    from ddkit.cache import cache_entries, cache_summary, prune_cache, size_text

    if args.action == "prune":
        result = prune_cache(args.kind, args.older_than, args.all, args.dry_run, stale=args.stale)
        if args.json:
            print(json.dumps({"dry_run": result.dry_run, "removed": [e.to_dict() for e in result.removed],
                              "skipped": [{**e.to_dict(), "why": why} for e, why in result.skipped],
                              "freed_bytes": result.freed}, indent=2))
            return 0
        verb = "would remove" if result.dry_run else "removed"
        for e in result.removed:
            print(f"{verb} {e.kind}/{printable(e.name)}  {size_text(e.bytes)}{_cache_state(e)}")
        for e, why in result.skipped:
            print(f"kept {e.kind}/{printable(e.name)}: {printable(why)}")
        print(f"{verb} {len(result.removed)} item(s), {size_text(result.freed)}"
              f"{' freed' if not result.dry_run else ''}")
        return 0
    entries = cache_entries()
    kinds = cache_summary(entries)
    if args.json:
        record: dict[str, Any] = {"root": str(cache_dir()), "kinds": kinds}
        if args.entries:
            record["entries"] = [e.to_dict() for e in entries]
        print(json.dumps(record, indent=2))
        return 0
    print(f"cache {cache_dir()}" + ("" if kinds else ": empty"))
    if kinds:
        width = max(len("kind"), *(len(k) for k in kinds))
        print(f"{'kind'.ljust(width)}  {'entries':>7}  {'size':>9}  leftovers of killed or interrupted builds")
        total = {key: sum(r[key] for r in kinds.values()) for key in next(iter(kinds.values()))}
        for kind, row in [*kinds.items(), ("total", total)]:
            left = row["leftovers"] + row["partial"]
            extra = f"{left} ({size_text(row['leftover_bytes'] + row['partial_bytes'])})" if left else "-"
            print(f"{kind.ljust(width)}  {row['entries']:>7}  {size_text(row['bytes']):>9}  {extra}")
    if args.entries:
        for e in entries:
            when = datetime.datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M")
            print(f"{e.kind}/{printable(e.name)}  {size_text(e.bytes)}  {when}{_cache_state(e)}")
        if any(e.stale for e in entries):
            print("entries made by an older ddkit are never read again: `ddkit cache prune --stale` removes them")
    return 0


def _cache_state(e) -> str:
    """What the listing adds to an entry's line: an imagefolder's root and image_size; what a build left; that an
    older ddkit made it."""
    if e.state == "leftover":
        return f"  (leftover of a killed build of {e.of})"
    if e.state == "partial":
        return (f"  (interrupted build of {e.of}, by an older ddkit: {e.stale}; never resumed)" if e.stale
                else f"  (interrupted build of {e.of}, resumable)")
    text = f"  root {e.details.get('root')}, image_size {e.details.get('image_size')}" if e.details else ""
    return text + (f"  (made by an older ddkit: {e.stale})" if e.stale else "")


def _closest_name(name: str) -> tuple[str, str] | None:
    """("protocol" or "method", the registered name ``name`` is most likely a typo of), or None; the protocol
    when both are as close (``ecd``: the protocol ``edc``, which ``show edc`` shows)."""
    import difflib

    from ddkit.evaluate import PROTOCOLS
    from ddkit.methods import METHODS

    found = [(difflib.SequenceMatcher(None, name.lower(), close.lower()).ratio(), -rank, kind, close)
             for rank, (kind, registry) in enumerate((("protocol", PROTOCOLS), ("method", METHODS)))
             if (close := registry.suggest(name)) is not None]
    return max(found)[2:] if found else None


def cmd_export(args) -> int:
    from ddkit.distilled import DistilledSet, set_folder

    ds = DistilledSet.load(set_folder(args.distilled))  # a run folder: its set
    out = ds.export(args.out, args.format)
    if not args.quiet:
        print(f"exported {len(ds)} images as {args.format} -> {out}")
    return 0


class BenchBars:
    """The bench's progress view: a bar over cells and one inside the current stage (tqdm, stderr)."""

    def __init__(self, enabled: bool, desc: str = "bench cells") -> None:
        self._cells = self._stage = None
        if enabled:
            from tqdm.auto import tqdm

            self._cells = tqdm(desc=desc, unit="cell", dynamic_ncols=True, file=sys.stderr, position=0)
            self._stage = tqdm(desc="stage", dynamic_ncols=True, file=sys.stderr, position=1, leave=False)

    def cell(self, done: int, total: int, row: dict) -> None:
        if self._cells is not None:
            self._cells.total = total
            self._cells.set_postfix_str(f"{row['cell']}{' (reused)' if row.get('reused') else ''}")
            if row.get("reused"):  # a finished cell costs no time: start the rate (and ETA) after it
                self._cells.reset(total)
                self._cells.n = self._cells.initial = self._cells.last_print_n = done
                self._cells.refresh()
            else:
                self._cells.update(done - self._cells.n)

    @property
    def enabled(self) -> bool:
        return self._cells is not None

    def stage(self, done: int, total: int, record: dict) -> None:
        """``run_bench``'s ``stage_progress``: ``record["stage"]`` names the stage."""
        bar, what = self._stage, record["stage"]
        if bar is not None:
            if bar.desc != what or done < bar.n:
                bar.reset(total=total)
                bar.set_description_str(what, refresh=False)
            bar.update(done - bar.n)

    def close(self) -> None:
        for bar in (self._stage, self._cells):
            if bar is not None:
                bar.close()


def cmd_bench(args) -> int:
    from ddkit import distributed as ddist
    from ddkit.bench import format_bench_table, load_bench_config, run_bench
    from ddkit.config import load_yaml_with_base

    _refuse_other_schema(load_yaml_with_base(args.config), args.config, "bench")
    _refuse_flag_and_set(_top_flags(args), list(args.set or []))
    # --out "" is the current folder, refused as such (not the config's out)
    flags = ({"out": args.out} if args.out is not None else {}) | ({"device": args.device} if args.device != "auto"
                                                                     else {})
    cfg = load_bench_config(args.config, list(args.set or []), **flags)  # --set last, as in every subcommand
    ddist.init_from_env("cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and _cuda()) else "cpu")
    bars = BenchBars(not args.quiet and ddist.current().is_main)
    try:
        rows = run_bench(cfg, progress=bars.cell, stage_progress=bars.stage if bars.enabled else None)
    finally:
        bars.close()
    _print(format_bench_table(rows))
    _print(f"table: {Path(cfg.out) / 'bench.json'}; report: ddkit report {shlex.quote(str(cfg.out))}")
    return 0


def cmd_report(args) -> int:
    from ddkit.report import write_report

    out = write_report(args.run_dir, args.out)
    if not args.quiet:
        print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0


def cmd_relabel(args) -> int:
    from ddkit import distributed as ddist
    from ddkit.artifacts import check_output_dir, hidden_path, writing
    from ddkit.config import apply_overrides
    from ddkit.distilled import DistilledSet, set_folder
    from ddkit.evaluate.runner import ensemble_with
    from ddkit.labels import relabel
    from ddkit.labels.fkd import KIND as FKD_KIND
    from ddkit.labels.fkd import TEACHER_BATCH
    from ddkit.teacher import Teacher

    device = _device(args)
    distilled = DistilledSet.load(set_folder(args.distilled))  # a run folder: its set
    teacher = Teacher.load(args.teacher, device)
    if teacher.classes != distilled.classes:
        raise DDKitError("teacher classes differ from the distilled set's; use the teacher of this dataset")
    extra = list(args.extra_teacher or [])
    if extra:  # the ensemble an evaluation with extra_teachers labels with (labelling_teacher): its store
        teacher = ensemble_with(teacher, extra, device)
    options = apply_overrides({}, list(args.augment_option or []))
    if args.out is None:  # beside the set's folder, however it was named (`set/.`, `set/manifest.json`)
        folder = Path(distilled.path)
        folder = folder.resolve() if folder.name in ("", "..") else folder
        out = folder.parent / f"{folder.name}.fkd"
    else:
        out = Path(args.out)
    check_output_dir(out, FKD_KIND)  # before any labelling
    presets = _protocol_presets()  # a broken plugin protocol is refused before any labelling, not after the store
    work = hidden_path(out, ".partial")  # finished epochs survive a kill; removed once saved
    progress = Progress(not args.quiet)
    with writing(work, out):  # another relabel to this --out would share (and remove) the work folder
        store = relabel(distilled, teacher, args.epochs, args.augment, options, args.cutmix_prob, args.seed,
                        args.top_k, device, progress.stage("relabel"), cutmix_alpha=args.cutmix_alpha,
                        batch_size=TEACHER_BATCH if args.batch_size is None else args.batch_size, work_dir=work,
                        out=out, teacher_bn=args.teacher_bn,
                        teacher_bn_batch=args.teacher_bn_batch)
        progress.close()
        if not ddist.current().is_main:
            return 0
        shutil.rmtree(work, ignore_errors=True)
    _print(f"FKD soft labels: {store.epochs} epochs x {store.num_images} images, {store.nbytes:,} bytes -> {out}")
    members = ",".join(extra)  # as the mismatch error of an ensemble's store names them
    ensemble = f" --set {shlex.quote(f'extra_teachers=[{members}]')}" if extra else ""
    _print(f"evaluate with: ddkit evaluate {shlex.quote(str(args.distilled))} --teacher "
           f"{shlex.quote(str(args.teacher))} {_protocol_for(store, presets)} --label-mode fkd --set "
           f"{shlex.quote(f'fkd_store={out}')}{ensemble}")
    return 0


def _protocol_presets() -> dict:
    """Every registered protocol's ProtocolConfig by name, soft-kl first, as :func:`ddkit.evaluate.protocol.preset`
    checks them (a plugin protocol that returns no ProtocolConfig is refused with its one-line error)."""
    from ddkit.evaluate import PROTOCOLS
    from ddkit.evaluate.protocol import preset

    return {n: preset(n) for n in dict.fromkeys(["soft-kl", *PROTOCOLS])}


def _protocol_for(store, presets: dict) -> str:
    """The ``--protocol`` (and ``--epochs``) flags of an evaluation that replays ``store`` as its protocol says: the
    first of ``presets`` (:func:`_protocol_presets`) whose students train on the store's views (soft-kl for relabel's
    defaults), else soft-kl with the store's augmentation set; ``--epochs`` where the store holds another number of
    epochs than the preset trains."""
    from ddkit.evaluate.runner import _other_views

    name = next((n for n, made in presets.items() if _other_views(made.train, store) is None), None)
    flags = f"--protocol {name or 'soft-kl'}"
    if name is None:
        aug = store.manifest["augment"]
        flags += (f" --set train.augment={shlex.quote(aug['spec'])} --set "
                  f"{shlex.quote('train.augment_options=' + json.dumps(aug.get('options') or {}))}")
    if store.epochs != presets[name or "soft-kl"].train.epochs:
        flags += f" --epochs {store.epochs}"
    return flags


def cmd_experts(args) -> int:
    from ddkit.data.base import load_dataset
    from ddkit.methods.trajectory import ExpertConfig, train_experts

    dcfg, cfg = _stage_config(args, "experts", ExpertConfig, {k: k for k in ("model", "num_experts", "epochs", "seed")})
    device = _device(args)
    bundle = load_dataset(dcfg)
    progress = Progress(not args.quiet)
    train_experts(bundle, cfg, args.out, device, epoch_progress=progress.stage("expert epochs"))
    progress.close()
    _print(f"{cfg.num_experts} expert trajectories of {cfg.model} ({cfg.epochs} epochs) -> {args.out}")
    return 0


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddkit", description="Dataset distillation toolkit.",
        epilog="Your own methods, models and datasets: DDKIT_PLUGINS=mymodule[,other] imports those modules (from the "
               "current folder or sys.path) before any command, so that they can register them. `ddkit list methods "
               "-l` lists the methods, `ddkit show METHOD` a method's options.")
    p.add_argument("--version", action="version", version=f"ddkit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, data=True, device=True, overrides=True, example="teacher.train.lr=0.1"):
        if data:
            sp.add_argument("--dataset", help="dataset key (`ddkit list datasets`)")
            sp.add_argument("--data-path", help="folder or file with the dataset")
        if device:
            sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        if overrides:
            sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                            help=f"config override, e.g. {example}; a mapping (KEY={{a: 1}}) merges into the section "
                            "key by key, keeping its other settings (an option dict such as augment_options is "
                            "replaced whole); KEY={} empties any mapping; VALUE is read as YAML: quote text that is "
                            "not valid YAML (KEY=\"'[a'\"); applied last, over the flags: a flag and a --set that "
                            "give one key different values are refused")
        sp.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (the result lines and warnings are still printed)")
        verbose(sp)

    def verbose(sp):
        # also after the subcommand; SUPPRESS: a -v given before it is not reset by this parser's default
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")

    def precision_flag(sp, what):
        sp.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help=f"mixed precision for {what}: bf16 or fp16 autocast (default fp32)")

    sp = sub.add_parser("teacher", help="train (or import) a teacher")
    sp.add_argument("--config", help="YAML with dataset: and teacher: sections")
    sp.add_argument("--model")
    sp.add_argument("--epochs", type=int)
    precision_flag(sp, "the teacher's training")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--checkpoint", help="import these weights instead of training (then nothing that sets how a "
                    "teacher trains is taken: --epochs, --precision, --seed, teacher.train, teacher.seed)")
    sp.add_argument("--out", required=True)
    common(sp)
    sp.set_defaults(func=cmd_teacher)

    sp = sub.add_parser("distill", help="make a distilled set with a method")
    sp.add_argument("--config", help="YAML with dataset: and distill: sections")
    sp.add_argument("--method", help="registered method key (`ddkit list methods -l`; its options: `ddkit show "
                    "METHOD`, set with --set distill.options.OPTION=VALUE)")
    sp.add_argument("--ipc", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--teacher", help="teacher artifact directory")
    sp.add_argument("--soft-labels", action="store_true", help="store the teacher's logits as soft labels")
    sp.add_argument("--image-dtype", choices=["float32", "uint8"],
                    help="store the images as float32 (default: as the method makes them) or uint8 (8-bit pixels, "
                    "4x smaller; pixels outside 0..1 are clipped and counted) (distill.image_dtype)")
    sp.add_argument("--out", required=True)
    common(sp, example="distill.options.iterations=200")
    sp.set_defaults(func=cmd_distill)

    sp = sub.add_parser("evaluate", help="train fresh students on a distilled set and report accuracy")
    sp.add_argument("distilled", help="distilled-set directory (or a `ddkit run` folder: its set)")
    sp.add_argument("--protocol", default="dc-protocol",
                    help="registered name (`ddkit list protocols`), or a YAML file's path: one ending in .yaml, .yml "
                    "or .json, or with a / (./NAME)")
    sp.add_argument("--label-mode", choices=["hard", "teacher", "stored", "fkd"])
    sp.add_argument("--epochs", type=int,
                    help="the students' training epochs (train.epochs); the full-data reference keeps its own "
                    "full_epochs: change them with --set full_epochs=N, or skip it with --set full_reference=false")
    precision_flag(sp, "the students' training and testing (train.precision)")
    sp.add_argument("--teacher", help="teacher artifact directory: needed for label mode teacher (the presets "
                    f"{', '.join(TEACHER_PRESETS)}), and for stored and fkd while the random baseline is on")
    sp.add_argument("--seeds", default="0,1,2", help="student seeds, comma-separated, in any order (reported sorted)")
    sp.add_argument("--data-path", help="dataset location if it moved since distillation")
    sp.add_argument("--cache-dir", help="cache of trained students (the set's, the random subset's and the full "
                    "data's: each is read back instead of trained again; default $DDKIT_CACHE or ~/.cache/ddkit)")
    sp.add_argument("--out", help="eval JSON path (default inside the distilled set)")
    common(sp, data=False, example="train.epochs=50")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("run", help="run a whole pipeline from a YAML config, reusing finished stages")
    sp.add_argument("config")
    sp.add_argument("--out")
    common(sp, data=False, example="distill.ipc=50")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("demo", help="Fashion-MNIST: teacher, DM IPC 10, evaluation, report (~15 min on 2 CPU cores)")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument("--data-path", help="folder with the Fashion-MNIST IDX files")
    precision_flag(sp, "teacher and students (e.g. bf16 on a GPU)")
    common(sp, data=False, overrides=False)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("bench", help="run a matrix of datasets x methods x IPCs x students x label modes (resumable)")
    sp.add_argument("config", help="bench YAML (see configs/bench/)")
    sp.add_argument("--out", help="run directory (default: the config's out)")
    common(sp, data=False, example="seeds=[0,1]")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("report", help="write report.md / report.html with tables and plots for a bench run")
    sp.add_argument("run_dir", metavar="BENCH_DIR", help="the folder of a `ddkit bench` run (holds bench.json; a "
                    "`ddkit run` folder has its report in its report/ already)")
    sp.add_argument("--out", help="report folder (default BENCH_DIR/report)")
    sp.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    verbose(sp)
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("relabel", help="FKD-style per-epoch soft labels for a distilled set (label mode fkd)")
    sp.add_argument("distilled", help="distilled-set directory (or a `ddkit run` folder: its set)")
    sp.add_argument("--teacher", required=True, help="teacher artifact directory")
    sp.add_argument("--extra-teacher", action="append", metavar="DIR",
                    help="another teacher artifact directory (repeatable): label with the equal-weight ensemble of "
                    "--teacher and these, the store an evaluation with --set extra_teachers=[DIR,...] replays")
    sp.add_argument("--epochs", type=int, default=300, help="epochs of stored views (match the protocol's epochs)")
    sp.add_argument("--augment", default="rrc_flip", help="augmentation of the stored views")
    sp.add_argument("--augment-option", action="append", metavar="KEY=VALUE", help="e.g. scale_min=0.08")
    sp.add_argument("--cutmix-prob", type=float, default=1.0)
    sp.add_argument("--cutmix-alpha", type=float, default=1.0)
    sp.add_argument("--top-k", type=int, help="store only the k largest logits per view")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--batch-size", type=int, help="views per teacher forward (default 256): another value can change "
                    "a few float16 logits by an ulp, so the store records it and its identity holds it")
    sp.add_argument("--teacher-bn", default="running", choices=["running", "batch"],
                    help="teacher BatchNorm: running statistics, or batch: statistics of the views labelled "
                         "together (CV-DD's batch-specific soft labels)")
    sp.add_argument("--teacher-bn-batch", type=int, metavar="N",
                    help="with --teacher-bn batch: statistics over groups of N views of an epoch (default: all views; "
                    "CV-DD: 8, the halves of its batches of 16)")
    sp.add_argument("--out", help="output directory (default: <distilled>.fkd)")
    common(sp, data=False, overrides=False)
    sp.set_defaults(func=cmd_relabel)

    sp = sub.add_parser("experts", help="train expert trajectories for mtt/tesla/ftd/datm/shq")
    sp.add_argument("--config", help="YAML with dataset: and experts: sections")
    sp.add_argument("--model")
    sp.add_argument("--num-experts", type=int)
    sp.add_argument("--epochs", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--out", required=True)
    common(sp, example="experts.epochs=20")
    sp.set_defaults(func=cmd_experts)

    sp = sub.add_parser("list", help="list registered models, methods, datasets or protocols")
    sp.add_argument("what", choices=["models", "methods", "datasets", "protocols"],
                    metavar="{models,methods,datasets,protocols}", help="which registry to list")
    sp.add_argument("pattern", nargs="?", help="glob on the names, e.g. 'convnet*' (a ConvNet name such as "
                    "convnet3-w32-p3 is accepted as itself)")
    sp.add_argument("-l", "--long", action="store_true",
                    help="each with its description (a method's paper; `ddkit show METHOD` for its options)")
    verbose(sp)
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("show", help="summarise what ddkit wrote (artifact, run or bench folder, eval JSON, cell), "
                        "a protocol or a method's options")
    sp.add_argument("target",
                    help="folder or JSON file ddkit wrote, a `ddkit export --format pt` file, a protocol name, or a "
                    "method name (its options; method:NAME for one that is also a protocol: edc, cvdd); a registered "
                    "name wins over a file of that name in the current folder (./NAME is the file)")
    sp.add_argument("--json", action="store_true", help="print the whole record (manifest, table) as JSON instead")
    sp.add_argument("-q", "--quiet", action="store_true",
                    help="print nothing but an error; exit 0 if the record reads (an artifact: with its files), "
                    "else 2 and the one-line error")
    verbose(sp)
    sp.set_defaults(func=cmd_show)

    sp = sub.add_parser("cache", help="list the cache ($DDKIT_CACHE, default ~/.cache/ddkit) by kind and size, or "
                        "prune its entries")

    def cache_list_flags(parser, default):
        parser.add_argument("-l", "--entries", action="store_true", default=default,
                            help="each entry too: name, size, last modified (imagefolder: dataset root, image_size)")
        parser.add_argument("--json", action="store_true", default=default, help="print it as JSON")

    cache_list_flags(sp, False)
    verbose(sp)
    actions = sp.add_subparsers(dest="action")
    cache_list_flags(actions.add_parser("list", help="list the cache (the default)"), argparse.SUPPRESS)
    verbose(actions.choices["list"])
    pp = actions.add_parser("prune", help="remove whole entries no process is building (and what killed builds "
                            "left); needs --kind, --older-than, --stale or --all")
    pp.add_argument("--kind", action="append", help="only entries of this kind (imagefolder, statistics, experts, "
                    "random-baseline, distilled-student, full-reference; `ddkit cache` lists them); repeatable")
    pp.add_argument("--older-than", type=float, metavar="DAYS", help="only entries last modified more than DAYS "
                    "days ago")
    pp.add_argument("--stale", action="store_true", help="only entries an older ddkit made, which this one never "
                    "reads (`ddkit cache -l` marks them)")
    pp.add_argument("--all", action="store_true", help="every entry (with --kind / --older-than: every one selected)")
    pp.add_argument("--dry-run", action="store_true", help="remove nothing; print what would go")
    pp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the result as JSON")
    verbose(pp)
    sp.set_defaults(func=cmd_cache, action="list")

    sp = sub.add_parser("export", help="write a distilled set as PNG folders, a tensor file or DD-Ranking's "
                                       "images.pt + labels.pt")
    sp.add_argument("distilled", help="distilled-set directory (or a `ddkit run` folder: its set)")
    sp.add_argument("--format", choices=["imagefolder", "pt", "ddranking"], required=True,
                    help="imagefolder: PNG per image (sets of 1 or 3 channels; pt keeps any); ddranking: normalised "
                         "class-major images.pt + labels.pt for DD-Ranking's evaluator")
    sp.add_argument("--out", required=True)
    sp.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    verbose(sp)
    sp.set_defaults(func=cmd_export)
    return p


def _as_flags(message: str, args) -> str:
    """``message`` as this command's user would act on it: the library names the config key
    ``dataset.path``, which a command with ``--data-path`` sets by that flag (``demo`` has no other way); a ``--set
    dataset.path=...`` the message quotes or proposes stays one."""
    return re.sub(r"dataset\.path(?!=)", "--data-path", message) if hasattr(args, "data_path") else message


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit, torchrun stopping the other ranks), raised in the
    main thread so that a command unwinds as on Ctrl-C: half-written outputs are removed, checkpoints
    kept for a re-run to resume, and the command ends with one line and exit code 143."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _launched_as() -> tuple[str, bool]:
    """This process's rank as torchrun's ``RANK`` gives it ("0" when not launched by torchrun), and
    whether it is one of several (``WORLD_SIZE`` > 1): read from the environment, before the process
    group starts and without importing torch (a Ctrl-C during that import must still end in one line)."""
    rank = os.environ.get("RANK", "0").strip() or "0"
    return rank, os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def _error(message: str) -> None:
    """Print ``error: message`` as one line in one write, so that the ranks of a ``torchrun`` job, which
    share stderr and usually fail alike, never interleave; every rank of a job of several names itself."""
    rank, several = _launched_as()
    who = f"rank {rank}: " if rank != "0" or several else ""
    sys.stderr.write(f"{who}error: {printable(message, keep=chr(10) + chr(9))}\n")
    sys.stderr.flush()


def _os_error(exc: OSError, out: str | None = None) -> str:
    """One line for a path the system refused, naming the output the user gave rather than ddkit's
    hidden temporary or checkpoint beside it (``out``, the command's --out, where the system names no
    file: a failed write), with the fix the error calls for."""
    import errno

    from ddkit.artifacts import output_for, write_failure

    path = output_for(exc.filename) if exc.filename else None
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return write_failure(path or out, exc.strerror or str(exc), exc.errno)
    where = f" {str(path)!r}" if path is not None else ""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and path is not None and path.is_file():
        return f"{str(path)!r} is a file where a folder is needed; choose another path"
    if path is None and out:
        where = f" {str(out)!r}"
    return f"cannot use{where}: {exc.strerror or exc}; check the path and its permissions"


def _log_level(args: argparse.Namespace) -> int:
    """The level the CLI logs at: INFO with -v; else WARNING, or ERROR (errors only) on the ranks of a
    torchrun job other than 0 (they run the same code and would repeat every warning; errors still
    come from every rank, naming it) and for export, report and show -q ("print nothing but errors")."""
    if args.verbose:
        return logging.INFO
    quiet_rank = _launched_as()[0] != "0"
    silent = getattr(args, "quiet", False) and args.command in ("export", "report", "show")
    return logging.ERROR if quiet_rank or silent else logging.WARNING


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "list":  # `list methods -l 'd*'`: argparse takes no positional after an option
        # its options first, then `--` and its words (`list -l -- methods 'd*'`); after a given `--` every word is
        # a positional already
        at = argv.index("list") + 1
        rest = argv[at:]
        cut = rest.index("--") if "--" in rest else len(rest)
        head = rest[:cut]
        argv = [*argv[:at], *(a for a in head if a.startswith("-")), "--", *(a for a in head if not a.startswith("-")),
                *rest[cut + 1 :]]
    args = parser.parse_args(argv)
    logging.basicConfig(level=_log_level(args), format="%(levelname)s %(name)s: %(message)s")
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return _main(args)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# the commands whose re-run resumes: finished stages, cells and epochs are reused, checkpoints resumed
RESUMABLE = ("teacher", "distill", "relabel", "experts", "run", "demo", "bench")


def _stopped(exc: KeyboardInterrupt, command: str | None = None) -> int:
    term = isinstance(exc, Terminated)
    hint = "; run the same command again to resume" if command in RESUMABLE else ""
    print(("terminated" if term else "interrupted") + hint, file=sys.stderr)
    return 143 if term else 130


def _peer_lost(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective's failure because another rank went away."""
    import torch.distributed as dist

    lost = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "nccl communicator")
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or any(w in str(exc).lower() for w in lost)


def load_plugins() -> list[str]:
    """Import the modules named in ``$DDKIT_PLUGINS`` (comma-separated, importable from ``sys.path`` or
    the current folder), which register a user's own models, methods or datasets with ddkit's registries
    before a command runs: the CLI can then train, load and evaluate them as ddkit's own."""
    import importlib

    names = [n.strip() for n in os.environ.get("DDKIT_PLUGINS", "").split(",") if n.strip()]
    if names and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `python -m` puts the current folder first; the ddkit script does not
    for name in names:
        if name.endswith(".py"):
            raise DDKitError(f"DDKIT_PLUGINS names modules, not files: use {name.removesuffix('.py')!r}, not {name!r}")
        try:
            importlib.import_module(name)
        except Exception as exc:  # a user's module: any failure is reported in one line, the traceback with -v
            # the traceback at INFO, which -v shows (DEBUG would bring every library's debug records with it)
            log.info("DDKIT_PLUGINS: importing %r failed:", name, exc_info=True)
            where = _innermost(exc)
            raise DDKitError(f"DDKIT_PLUGINS: cannot import {name!r} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}{f', at {where}' if where else ''}); fix "
                             "the module or remove it from DDKIT_PLUGINS (-v shows the traceback)") from None
    return names


def _innermost(exc: BaseException) -> str:
    """``file:line`` where an import failed: the innermost frame of the imported code (not importlib's
    own, nor load_plugins'), or a SyntaxError's line (which no frame holds); "" for neither."""
    import importlib
    import traceback

    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)[1:]
              if not f.filename.startswith("<frozen") and f.filename != importlib.__file__]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _out_of_memory(exc: BaseException) -> str | None:
    """One line for a failed allocation (Python's MemoryError, torch's CPU allocator, CUDA out of memory), with the
    size asked for where torch gives it and the line of ddkit that asked (the setting behind it is near there); None
    for any other error."""
    text = str(exc)
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", ())
    if not (isinstance(exc, MemoryError) or (oom and isinstance(exc, oom)) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return None
    size = ""
    if found := re.search(r"allocate (\d+) bytes", text):  # the CPU allocator
        from ddkit.cache import size_text

        size = f" allocating {size_text(int(found[1]))}"
    elif found := re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", text):  # CUDA
        size = f" allocating {found[1]}"
    import traceback

    ours = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}ddkit{os.sep}" in f.filename]
    where = f" (at ddkit/{ours[-1].filename.rpartition(f'{os.sep}ddkit{os.sep}')[2]}:{ours[-1].lineno})" if ours else ""
    return (f"out of memory{size}{where}: a size setting is too large for this machine; lower it (a model's width or "
            "depth, the dataset's image_size or train_per_class, a batch size, relabel epochs, a method's crops or "
            "images per step), or use a device with more memory (-v shows where it failed)")


def _distributed():
    """:mod:`ddkit.distributed` where the command imported it, else None: then it started no process group, and
    nothing imports torch for one (which takes seconds; ``show`` of a JSON record and ``cache`` need none)."""
    return sys.modules.get("ddkit.distributed")


def _shutdown(barrier: bool) -> None:
    """:func:`ddkit.distributed.shutdown`, where the command may have started a process group."""
    if (ddist := _distributed()) is not None:
        ddist.shutdown(barrier=barrier)


# the commands that read JSON records and list folders: they import torch (seconds) only where an artifact needs it
_NO_TORCH = ("cache", "show")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back for the block: one that comes meanwhile is recorded, and ends the command as it
    would have (Terminated, KeyboardInterrupt) once the block is done. For importing torch: its C++ initialisation
    calls back into Python, and the handler's exception raised there cannot be caught on its way out through C++:
    the process aborted (SIGABRT, a stack dump) instead of ending in one line. Handlers live in the main thread:
    elsewhere the block runs as it is. A signal ignored on entry (SIGINT of a ``ddkit ... &`` job in a script) stays
    ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)
              if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    if came:
        raise Terminated if signal.SIGTERM in came else KeyboardInterrupt


# the commands that write one output from what is on disk: under torchrun every rank would write it again
_ONE_PROCESS = ("export", "report", "cache")


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command in _ONE_PROCESS and _launched_as()[1]:
            raise DDKitError(f"ddkit {args.command} runs in one process (under torchrun every rank would write its "
                             "output again); run it without torchrun")
        if args.command not in _NO_TORCH:  # every other command imports it: here, where a stop waits for its end
            with _signals_held():
                import torch  # noqa: F401
        load_plugins()
        code = args.func(args)
    except DDKitError as exc:
        _error(_as_flags(str(exc), args))
        _shutdown(barrier=False)
        return 2
    except BrokenPipeError:  # `ddkit show edc | head`: the reader left; say nothing more
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _shutdown(barrier=False)
        return 0
    except OSError as exc:  # an output or input path the system refuses (not a folder, no permission, no space)
        _error(_os_error(exc, getattr(args, "out", None)))
        _shutdown(barrier=False)
        return 2
    except KeyboardInterrupt as exc:  # also while a command imports torch, which takes seconds
        code = _stopped(exc, args.command)
        _shutdown(barrier=False)
        return code
    except (MemoryError, RuntimeError) as exc:
        if (message := _out_of_memory(exc)) is not None:  # a size setting too large: one line, no traceback
            log.info("the failed allocation:", exc_info=True)  # -v shows where
            _error(message)
            _shutdown(barrier=False)
            return 2
        if isinstance(exc, MemoryError):
            _shutdown(barrier=False)
            raise
        ddist = _distributed()
        lost = ddist is not None and ddist.current().enabled and _peer_lost(exc)
        _shutdown(barrier=False)
        if not lost:
            raise
        # gloo / NCCL: another rank of the job was killed or failed while this one waited on it, or worked
        # on longer than the collectives' timeout
        # gloo: "...: Connection reset by peer. This is..."
        cause = str(exc).strip().splitlines()[0].split(". ")[0][:200]
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            _error(f"waited more than {ddist.timeout_minutes():g} min for another process of this torchrun job "
                   f"({cause}); if it was still working (a teacher, a set or a cell of its own), raise "
                   f"{ddist.TIMEOUT_ENV} (minutes) and rerun the command, which resumes where the job got to")
        else:
            _error(f"another process of this torchrun job stopped ({cause}); its own "
                   "output says why: rerun the command, which resumes where the job got to")
        return 1
    except BaseException:
        _shutdown(barrier=False)
        raise
    _shutdown(barrier=code == 0)  # every rank ran the same command: let the slowest finish its output
    return code


if __name__ == "__main__":
    sys.exit(main())
