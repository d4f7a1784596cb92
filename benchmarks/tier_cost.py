"""What a bench tier costs on this machine: every stage measured briefly, then extrapolated.

The full tiers of the decoupled and matching benchmarks (``configs/bench/fashion-mnist-decoupled.yaml``,
``fashion-mnist-matching.yaml``) are too long to run inside one short GPU lease. This script runs
every stage of a bench config on the real data for a few seconds, times its repeated unit from the
library's own progress callbacks, and multiplies by the number of units the config asks for:

- teachers (main and pool): one epoch trained and timed (its test pass included), times the epochs;
- expert buffers (trajectory methods): one expert of a few epochs, per-epoch time from the epoch
  callbacks, times ``num_experts x epochs``;
- synthesis: each method at each IPC with the config's own options (trajectory methods read the
  short buffer above and start at epoch 0 or 1: one iteration costs the same at any start epoch);
  per-step time from the method's progress reports over ``--budget`` seconds, plus the set-up time
  before the first step (teacher statistics, initialisation), times the config's step count;
- evaluation: one student per (student, label mode, IPC), seed 0, on a random subset under the config's
  protocol, per-epoch time times epochs, seeds and the sets evaluated (every method plus the random
  baseline); the label modes are the config's and ``hard``, whose students every cell of another label
  mode trains too (its HLR and ``hard_acc``, as ``ddkit bench`` does); the full-data reference once per
  student (once per distinct full-data training: the bench's cache trains it once for every label mode).

Extrapolated time = set-up + per-unit time x units. It leaves out what the bench adds around the
stages (loading, artifacts, reports: seconds) and assumes one process; under ``torchrun`` the
stages are spread over ranks.

    python benchmarks/tier_cost.py configs/bench/fashion-mnist-decoupled.yaml \\
        configs/bench/fashion-mnist-matching.yaml --device cuda [--budget 1.5] [--out docs/results/tier-cost.json]

Prints a table and writes the JSON (every measured stage) and a markdown table beside it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _cli import Parser, command, device_spec, output_file, positive_float, run_main

from ddkit import determinism
from ddkit.artifacts import versions, write_results
from ddkit.bench import BenchConfig, load_bench_config
from ddkit.config import config_hash, from_dict, to_dict
from ddkit.data.base import DataBundle, load_dataset
from ddkit.evaluate.protocol import merge_overrides
from ddkit.methods import METHODS, FitContext
from ddkit.methods.random import stratified_indices
from ddkit.methods.trajectory import ExpertConfig, train_experts
from ddkit.models import create_model
from ddkit.teacher import Teacher, train_teacher
from ddkit.training import train_classifier

REPO = Path(__file__).resolve().parents[1]
# progress records of set-up passes, not of the repeated step
SETUP_KEYS = {"statistics_pass", "expert_epochs_pass"}


class Stop(Exception):
    """Raised from a progress callback once a stage has been timed long enough."""


class Clock:
    """A progress callback that timestamps each reported step and stops the stage after ``budget``
    seconds of steps (at least ``min_points`` reports)."""

    def __init__(self, device: torch.device, budget: float | None, min_points: int = 2) -> None:
        self.device, self.budget, self.min_points = device, budget, min_points
        self.points: list[tuple[int, float]] = []
        self.total: int | None = None
        self.t0 = self.t_end = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __enter__(self) -> Clock:
        self.t0 = self._now()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self.t_end = self._now()
        return kind is Stop

    def __call__(self, done: int, total: int, record: dict | None = None) -> None:
        if record and SETUP_KEYS & set(record):
            return
        now = self._now()
        self.points.append((done, now))
        self.total = total
        if self.budget is not None and len(self.points) >= self.min_points and now - self.points[0][1] >= self.budget:
            raise Stop

    def estimate(self, units: int | None = None) -> dict:
        """Per-step time from the reports; extrapolated to ``units`` steps (default: the reported total)."""
        units = units if units is not None else self.total
        wall = self.t_end - self.t0
        if len(self.points) < 2 or self.points[-1][0] == self.points[0][0]:
            # too few reports for a slope: the whole stage ran (or one step did): wall time per unit
            done = self.points[-1][0] if self.points else 1
            per = wall / max(1, done)
            return {"setup_s": 0.0, "per_unit_s": per, "units": units, "measured_s": wall, "units_measured": done,
                    "total_s": per * (units or done)}
        (d0, t0), (d1, t1) = self.points[0], self.points[-1]
        per = (t1 - t0) / (d1 - d0)
        setup = max(0.0, t0 - self.t0 - per * d0)
        return {"setup_s": setup, "per_unit_s": per, "units": units, "measured_s": wall, "units_measured": d1,
                "total_s": setup + per * (units or d1)}


class TierProbe:
    def __init__(self, cfg: BenchConfig, name: str, device: torch.device, budget: float, work: Path,
                 on_row=None) -> None:
        self.cfg, self.name, self.device, self.budget, self.work = cfg, name, device, budget, work
        self.on_row = on_row
        self.data: DataBundle = load_dataset(cfg.datasets[0])
        self.rows: list[dict] = []
        self.teacher: Teacher | None = None
        self.pool: dict[str, Path] = {}
        self.buffers: dict[str, Path] = {}

    def _row(self, stage: str, item: str, unit: str, est: dict | None, error: str | None = None) -> dict:
        row = {"tier": self.name, "stage": stage, "item": item, "unit": unit, **(est or {}), "error": error}
        self.rows.append(row)
        total = f"{row['total_s'] / 3600:8.3f} h" if est else "   failed"
        per = f"{row['per_unit_s']:9.4f} s/{unit}" if est else error
        print(f"  {stage:<10} {item:<34} {per:<28} {total}", flush=True)
        if self.on_row is not None:
            self.on_row(row)
        return row

    def _guard(self, stage: str, item: str, unit: str, fn) -> None:
        try:
            self._row(stage, item, unit, fn())
        except Exception as exc:  # one failing stage must not hide the others' numbers
            traceback.print_exc()
            self._row(stage, item, unit, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    # --- teachers -------------------------------------------------------------------------------
    def teachers(self) -> None:
        if not self.cfg.needs_teacher():
            return
        jobs = [("teacher", self.cfg.teacher)] + [(f"pool @{k}", v) for k, v in self.cfg.teacher_pool.items()]
        for label, tcfg in jobs:
            def run(label=label, tcfg=tcfg):
                one = dataclasses.replace(tcfg, train=dataclasses.replace(tcfg.train, epochs=1))
                out = self.work / "teachers" / label.replace(" @", "-")
                with Clock(self.device, None) as clock:
                    teacher = train_teacher(self.data, one, out, self.device)
                if label == "teacher":
                    self.teacher = teacher
                else:
                    self.pool[label.split("@")[1]] = out
                return clock.estimate(tcfg.train.epochs)  # no reports: the one epoch's wall time per epoch
            self._guard("teacher", f"{label} {tcfg.model}", "epoch", run)

    # --- expert buffers -------------------------------------------------------------------------
    def _buffer_key(self, options: dict, cls) -> tuple[str, ExpertConfig] | None:
        if "buffer" not in {f.name for f in dataclasses.fields(cls.Config)}:
            return None
        buf = from_dict(cls.Config, {k: v for k, v in options.items() if k == "buffer"} or {}).buffer
        return config_hash(buf), buf

    def buffers_stage(self) -> None:
        seen: dict[str, ExpertConfig] = {}
        for m in self.cfg.methods:
            cls = METHODS.get(m.name)
            for ipc in self.cfg.ipcs:
                found = self._buffer_key(merge_overrides(m.options, m.ipc_options.get(ipc, {})), cls)
                if found:
                    seen.setdefault(found[0], found[1])
        for i, (key, buf) in enumerate(seen.items()):
            def run(key=key, buf=buf, i=i):
                out = self.work / "experts" / f"buffer{i}"
                with Clock(self.device, None, min_points=2) as clock:
                    train_experts(self.data, dataclasses.replace(buf, num_experts=1, epochs=4), out, self.device,
                                  epoch_progress=clock)
                self.buffers[key] = out
                return clock.estimate(buf.num_experts * buf.epochs)
            sam = f", SAM rho {buf.sam_rho} alpha {buf.sam_alpha}" if buf.sam_rho else ""
            self._guard("experts", f"{buf.model} x{buf.num_experts}x{buf.epochs}{sam}", "expert-epoch", run)

    # --- synthesis ------------------------------------------------------------------------------
    def synthesis(self) -> None:
        for m in self.cfg.methods:
            cls = METHODS.get(m.name)
            for ipc in self.cfg.method_ipcs_of(m.key):
                options = merge_overrides(m.options, m.ipc_options.get(ipc, {}))
                self._guard("synthesis", f"{m.key} ipc{ipc}", "step",
                            lambda cls=cls, options=options, ipc=ipc, key=m.key:
                            self._fit(cls, options, ipc, key))

    def _fit(self, cls, options: dict, ipc: int, key: str) -> dict:
        options = dict(options)
        if "extra_teachers" in options:
            options["extra_teachers"] = [str(self.pool[r[1:]]) if isinstance(r, str) and r.startswith("@") else r
                                         for r in options["extra_teachers"]]
        found = self._buffer_key(options, cls)
        if found:  # the short buffer; start epochs 0..1 (the cost of a step does not depend on it)
            options.pop("buffer", None)  # its recipe made the short buffer; with `experts` given it is refused
            options["experts"] = str(self.buffers[found[0]])
            options["max_start_epoch"] = 2
            options["min_start_epoch"] = 0
            if "current_max_start_epoch" in {f.name for f in dataclasses.fields(cls.Config)}:
                options["current_max_start_epoch"] = 1
        mcfg = from_dict(cls.Config, options)
        clock = Clock(self.device, self.budget)
        ctx = FitContext(ipc=ipc, seed=0, device=self.device,
                         work_dir=self.work / "fits" / f"{key}-ipc{ipc}", progress=clock)
        teachers = [self.teacher] if self.teacher is not None else []
        with clock:
            cls(mcfg).fit(self.data, teachers, ctx)
        return clock.estimate()

    # --- evaluation -----------------------------------------------------------------------------
    def evaluation(self) -> None:
        cfg = self.cfg
        fulls: dict[str, tuple] = {}  # the full-data references, one per distinct training (as its cache key)
        for student in cfg.students:
            # each label mode's students and the hard-label ones behind HLR / hard_acc, which every cell of another
            # label mode trains too (Bench.compute); cells of both modes share the hard ones (one cached evaluation)
            for mode in dict.fromkeys([*cfg.label_modes, "hard"]):
                for ipc in cfg.student_ipcs_of(student):
                    protocol = cfg.protocol_for(student, mode, ipc=ipc)
                    sets = sum(ipc in cfg.method_ipcs_of(m.key) for m in cfg.methods)
                    sets += 1 if protocol.random_baseline else 0
                    idx = stratified_indices(self.data.train.labels, self.data.num_classes, ipc, 0)
                    self._guard("evaluate",
                                f"{student} {mode} ipc{ipc} ({sets} sets x {len(cfg.seeds)} seeds)", "epoch",
                                lambda p=protocol, idx=idx, n=sets * len(cfg.seeds): self._train(
                                    p, self.data.train.subset(idx), p.train, n))
                    if protocol.full_reference:  # every evaluation asks for it; the cache trains it once
                        fulls.setdefault(config_hash({
                            "student": protocol.student, "options": protocol.student_options,
                            "train": to_dict(protocol.full_train(), identity=True), "seeds": protocol.full_seeds}),
                            (student, protocol))
        for student, protocol in fulls.values():  # trained on hard labels whatever the cell's label mode
            self._guard("evaluate", f"{student} full data ({protocol.full_seeds} seeds)", "epoch",
                        lambda p=protocol: self._train(p, self.data.train, p.full_train(), p.full_seeds,
                                                       min_points=2, mode="hard"))

    def _train(self, protocol, train_set, tcfg, runs: int, min_points: int = 2, mode: str | None = None) -> dict:
        """Time ``runs`` trainings of the protocol's student on ``train_set`` under ``tcfg``, with its label mode
        or ``mode``."""
        c, h, _ = self.data.image_shape
        mode = mode or protocol.label_mode
        teacher = self.teacher.model if self.teacher is not None and mode != "hard" else None
        clock = Clock(self.device, self.budget, min_points)
        # the student's initial weights and dropout masks from seed 0, as its batches (evaluate's students: their
        # seed): the same training in every run, a diverging one too (its row's error)
        with determinism.global_rng(0, self.device):
            model = create_model(protocol.student, c, self.data.num_classes, h, **protocol.student_options)
            with clock:
                train_classifier(model, train_set, self.data.mean, self.data.std, tcfg, seed=0, device=self.device,
                                 label_source=mode if mode in ("hard", "teacher") else "hard",
                                 loss=protocol.loss if teacher is not None else "ce",
                                 temperature=protocol.temperature, teacher=teacher, progress=clock)
        return clock.estimate(tcfg.epochs * runs)

    def run(self) -> list[dict]:
        print(f"[{self.name}] {self.data.name}: {len(self.data.train)} training images, device "
              f"{self.device}", flush=True)
        self.teachers()
        self.buffers_stage()
        self.synthesis()
        self.evaluation()
        return self.rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for tier in dict.fromkeys(r["tier"] for r in rows):
        mine = [r for r in rows if r["tier"] == tier]
        stages = {}
        for r in mine:
            stages.setdefault(r["stage"], 0.0)
            stages[r["stage"]] += r.get("total_s") or 0.0
        out.append({"tier": tier, "stages_h": {k: v / 3600 for k, v in stages.items()},
                    "total_h": sum(stages.values()) / 3600, "failed": [r["item"] for r in mine if r["error"]]})
    return out


def markdown(result: dict) -> str:
    lines = [f"# Bench tier cost on {result['device_name']}", "",
             f"Each stage timed for about {result['budget_s']} s on the real data, then extrapolated "
             "(`benchmarks/tier_cost.py`). One process; set-up + per-unit time x units.", "",
             *([f"Command: `{result['command']}`; CUDA deterministic algorithms "
                f"{'on' if result['cuda_deterministic']['enabled'] else 'off'} "
                f"(DDKIT_CUDA_DETERMINISTIC={result['cuda_deterministic']['DDKIT_CUDA_DETERMINISTIC'] or 'unset'}).",
                ""]
               if "cuda_deterministic" in result else []),  # recorded from 2026-12-06 on
             "| tier | stage | item | s / unit | units | set-up s | extrapolated h |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"| {r['tier']} | {r['stage']} | {r['item']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['tier']} | {r['stage']} | {r['item']} | {r['per_unit_s']:.4f} per {r['unit']} | "
                         f"{_units(r)} | {r['setup_s']:.1f} | {r['total_s'] / 3600:.3f} |")
    lines += ["", "| tier | " + " | ".join(["teacher", "experts", "synthesis", "evaluate"]) + " | total h | failed |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in result["summary"]:
        cells = [f"{s['stages_h'].get(k, 0.0):.2f}" for k in ("teacher", "experts", "synthesis", "evaluate")]
        lines.append(f"| {s['tier']} | " + " | ".join(cells)
                     + f" | {s['total_h']:.2f} | {', '.join(s['failed']) or '-'} |")
    return "\n".join(lines) + "\n"


def _units(row: dict) -> str:
    """A row's unit count: the config's, else (a stage with no count of its own, ``random``'s
    synthesis) the units measured, which its extrapolation used."""
    return str(row["units"] if row["units"] is not None else row.get("units_measured", "-"))


def main(argv: list[str] | None = None) -> dict:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="bench configs (YAML)")
    ap.add_argument("--set", action="append", default=[], help="override for every config, e.g. datasets=[synthetic]")
    ap.add_argument("--device", type=device_spec, default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:N or auto (default: cuda if present, else cpu)")
    ap.add_argument("--budget", type=positive_float, default=1.5, help="seconds of repeated steps timed per stage")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "tier-cost.json"),
                    help="JSON path, the markdown beside it (default docs/results/tier-cost.json)")
    args = ap.parse_args(argv)
    out = output_file(ap, args.out)
    device = torch.device(args.device)
    rows: list[dict] = []
    result = {"schema_version": 1, "kind": "tier-cost", "command": command("tier_cost", argv, data=True),
              "configs": args.configs, "overrides": args.set, "device": str(device), "budget_s": args.budget,
              # CUDA kernels: deterministic unless DDKIT_CUDA_DETERMINISTIC=0 (ddkit.determinism); changes the timings
              "cuda_deterministic": {"DDKIT_CUDA_DETERMINISTIC": os.environ.get("DDKIT_CUDA_DETERMINISTIC"),
                                     "wanted": determinism.wanted(),
                                     "enabled": torch.are_deterministic_algorithms_enabled()},
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "versions": versions(), "rows": rows, "summary": []}

    def save(row: dict) -> None:  # after every stage: a run killed at its time limit keeps what it measured
        rows.append(row)
        result["cuda_deterministic"]["enabled"] = torch.are_deterministic_algorithms_enabled()  # as the stages left it
        result["summary"] = summarise(rows)
        write_results(out, result, markdown(result))

    cfgs = [(Path(p).stem, load_bench_config(p, args.set)) for p in args.configs]  # every config valid before any work
    with tempfile.TemporaryDirectory(prefix="ddkit-tier-cost-") as tmp:
        os.environ["DDKIT_CACHE"] = str(Path(tmp) / "cache")  # nothing cached outside this run
        for name, cfg in cfgs:
            TierProbe(cfg, name, device, args.budget, Path(tmp) / name, on_row=save).run()
    print("\n" + markdown(result))
    return result


if __name__ == "__main__":
    run_main(main)  # a bad config or override, missing data: one line, no traceback, no output file
