"""Mixed precision for student and teacher training (``train.precision``): speed and accuracy.

For each student and each precision (``fp32``; ``bf16``; ``fp16`` with loss scaling, on CUDA by
default), on the same Fashion-MNIST images (``DDKIT_DATA``), through ``train_classifier`` itself:

- ``img/s``: one epoch over ``--steps`` batches of 256 training images (SGD, hard labels), timed
  after a warm-up epoch; ``x fp32`` is the ratio to the fp32 row of the same student, in this run;
- ``accuracy %``: the DC protocol's recipe (SGD 0.01, momentum 0.9, lr x0.1 at half, batch 256, hard
  labels) on a stratified random ``--ipc`` subset for ``--epochs`` epochs, tested on the whole test
  set in the same precision, mean ± std over ``--seeds``; ``diff`` is the change against fp32 in
  points. Same subset, seeds and initial weights in every precision.

    python benchmarks/precision.py [--students convnet3 resnet18_cifar] [--device cuda] [--precisions fp32 bf16 fp16]

Prints a table and writes docs/results/precision-<device>.json and .md. On a CPU, bf16 pays only
with AVX512-BF16 or AMX (the table records whether the CPU has them); fp16 on a CPU is emulated.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from _cli import (
    Parser,
    comma_list,
    command,
    device_spec,
    distinct_seeds,
    machine_record,
    output_file,
    positive_int,
    run_main,
    seed_int,
)

from ddkit.artifacts import versions, write_results
from ddkit.data.base import DataBundle, load_dataset
from ddkit.evaluate.protocol import resolve_protocol
from ddkit.methods.random import stratified_indices
from ddkit.models import create_model
from ddkit.training import TrainConfig, cpu_bf16_support, train_classifier

REPO = Path(__file__).resolve().parents[1]
STUDENTS = {"convnet3": {}, "convnet3-w32": {}, "resnet18_cifar": {}, "tiny_convnet": {}}
BATCH = 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(name: str, real: DataBundle, seed: int) -> torch.nn.Module:
    c, h, _ = real.image_shape
    torch.manual_seed(seed)
    return create_model(name, c, real.num_classes, h, **STUDENTS[name])


def throughput(name: str, real: DataBundle, precision: str, steps: int, device: torch.device) -> float:
    """Training images per second of one epoch of ``steps`` full batches (after a warm-up epoch)."""
    images = real.train.subset(torch.arange(min(len(real.train), steps * BATCH)))
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=0.01, precision=precision)
    model = _model(name, real, 0)
    train_classifier(model, images.subset(torch.arange(min(len(images), 2 * BATCH))), real.mean, real.std, cfg,
                     seed=0, device=device)  # warm-up: kernels, allocator, autocast caches
    _sync(device)
    t0 = time.perf_counter()
    train_classifier(model, images, real.mean, real.std, cfg, seed=0, device=device)
    _sync(device)
    return len(images) / (time.perf_counter() - t0)


def accuracy(name: str, real: DataBundle, precision: str, ipc: int, epochs: int, seeds: list[int],
             device: torch.device) -> list[float]:
    """Test accuracy of students trained on the same random ``ipc`` subset, one per seed."""
    subset = real.train.subset(stratified_indices(real.train.labels, real.num_classes, ipc, 0))
    cfg = dataclasses.replace(resolve_protocol("dc-protocol").train, epochs=epochs, precision=precision)
    accs = []
    for seed in seeds:
        result = train_classifier(_model(name, real, seed), subset, real.mean, real.std, cfg, seed=seed,
                                  device=device, test=real.test)
        accs.append(float(result.test_accuracy))
    return accs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def measure(name: str, real: DataBundle, precisions: list[str], args, device: torch.device) -> list[dict]:
    rows = []
    for precision in precisions:
        speed = throughput(name, real, precision, args.steps, device)
        accs = accuracy(name, real, precision, args.ipc, args.epochs, args.seeds, device)
        mean, std = _mean_std(accs)
        rows.append({"student": name, "precision": precision, "images_per_s": round(speed, 1),
                     "accuracy": accs, "accuracy_mean": mean, "accuracy_std": std})
    base = next((r for r in rows if r["precision"] == "fp32"), None)
    for r in rows:
        r["speedup"] = round(r["images_per_s"] / base["images_per_s"], 2) if base else None
        r["diff_points"] = round(100 * (r["accuracy_mean"] - base["accuracy_mean"]), 2) if base else None
    return rows


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"## Mixed-precision training ({result['device']})", "",
             f"`{result['command']}`; {result['dataset']}, torch {result['versions'].get('torch')}, "
             f"{result['machine']['torch_threads']} threads"
             + (f", CPU support {result['machine']['cpu_bf16']}" if result["device"] == "cpu" else "") + ". "
             f"img/s: one training epoch of {result['steps']} batches of {BATCH} (SGD, hard labels) after a warm-up; "
             "x fp32: ratio to the same student's fp32 row, this run. accuracy: the DC protocol's recipe "
             f"on one random IPC-{result['ipc']} subset for {result['epochs']} epochs, whole test set, mean ± std over "
             f"seeds {seeds}; diff: against fp32, points.", "",
             "| student | precision | img/s | x fp32 | accuracy % | diff |", "|---|---|---:|---:|---|---:|"]
    for r in result["rows"]:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "–"
        diff = f"{r['diff_points']:+.2f}" if r["diff_points"] is not None else "–"
        lines.append(f"| {r['student']} | {r['precision']} | {r['images_per_s']:,.0f} | {speedup} | "
                     f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} | {diff} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", nargs="+", default=["convnet3", "convnet3-w32", "resnet18_cifar"],
                    choices=list(STUDENTS), help="student models, space-separated")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"],
                    help="default: fp32 bf16, and fp16 on CUDA")
    ap.add_argument("--dataset", default="fashion-mnist", help="a registered dataset (tests use synthetic)")
    ap.add_argument("--device", type=device_spec, default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--threads", type=positive_int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    ap.add_argument("--steps", type=positive_int, default=10, help="batches of 256 in the timed epoch")
    ap.add_argument("--ipc", type=positive_int, default=50, help="images per class of the random subset trained on")
    ap.add_argument("--epochs", type=positive_int, default=30, help="student epochs for the accuracy check")
    ap.add_argument("--seeds", type=comma_list(seed_int, "0,1,2"), nargs="+", default=[[0, 1, 2]], metavar="SEEDS",
                    help="student seeds, comma- or space-separated: 0,1,2 or 0 1 2 (default: 0,1,2)")
    ap.add_argument("--out", help="JSON path, the markdown beside it (default docs/results/precision-<device>.json)")
    args = ap.parse_args()
    args.seeds = [s for group in args.seeds for s in group]  # `0,1 2`: one list
    distinct_seeds(ap, args.seeds)
    out = output_file(ap, args.out or REPO / "docs" / "results" / f"precision-{torch.device(args.device).type}.json")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = args.precisions or (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    real = load_dataset(args.dataset)
    smallest = int(real.train.class_counts(real.num_classes).min())
    if args.ipc > smallest:
        ap.error(f"--ipc {args.ipc} is more than the {smallest} images of the smallest class; lower --ipc")
    rows = []
    print(f"{'student':<16} {'precision':<9} {'img/s':>8} {'x fp32':>7} {'accuracy %':>14} {'diff':>6}")
    for name in args.students:
        for r in measure(name, real, precisions, args, device):
            rows.append(r)
            print(f"{name:<16} {r['precision']:<9} {r['images_per_s']:>8.0f} {r['speedup'] or float('nan'):>6.2f}x "
                  f"{100 * r['accuracy_mean']:>7.2f} ± {100 * r['accuracy_std']:<4.2f} "
                  f"{r['diff_points'] if r['diff_points'] is not None else float('nan'):>+6.2f}", flush=True)
    result = {
        "what": "student training in each train.precision: images/s and accuracy against fp32",
        "command": command("precision", data=args.dataset != "synthetic"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dataset": real.name, "steps": args.steps, "ipc": args.ipc, "epochs": args.epochs,
        "seeds": args.seeds, "rows": rows,
        "machine": {**machine_record(args.threads), "cpu_bf16": cpu_bf16_support()},
        "versions": versions(),
    }
    md = write_results(out, result, markdown(result))
    print(f"-> {out}, {md.name}")


if __name__ == "__main__":
    run_main(main)  # missing data, a bad dataset name: one line, no traceback, no output file
