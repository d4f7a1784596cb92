"""Benchmark of the spine on Fashion-MNIST: teacher accuracy and `random` at IPC 1/10/50.

Protocol: DC's (ConvNet-3 width 128, instance norm, SGD 0.01 momentum 0.9, wd 5e-4, batch 256,
300 epochs, lr x0.1 at half, no augmentation, hard labels). The teacher is a `convnet3` trained on
the full training set; it is the whole-data reference. Published numbers beside ours come from
Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021, Table 1.

Usage (CPU, ~1.5 h on 2 cores; `--quick` for a smoke run, a 1-epoch `convnet3-w32` teacher and 20-epoch students:
13.5 min with 1 thread on a busy 2-core machine, 2 min of it the teacher, whose width-128 epoch took ~10 there):
    DDKIT_DATA=../shared/data python benchmarks/spine.py
Prints a table and writes JSON (and a markdown table next to it): docs/results/spine-fashion-mnist.json
for a run with the default settings; a `--quick` run, or one with other --ipcs, --seeds or --teacher-*,
writes runs/bench-spine/spine-trial.json unless --out says otherwise. The teacher is kept in
``<work>/teacher-<model>-e<epochs>-<augment>``: a teacher trained with other settings is never reused.
"""

from __future__ import annotations

import logging
import tempfile
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
    output_folder,
    positive_int,
    run_main,
    seed_int,
)
from _published import FASHION_MNIST, FASHION_MNIST_WHOLE_DATASET

from ddkit.artifacts import versions, write_results
from ddkit.data import load_dataset
from ddkit.data.augment import AUGMENTS
from ddkit.data.base import DatasetConfig
from ddkit.errors import DDKitError
from ddkit.evaluate import evaluate, resolve_protocol
from ddkit.pipeline import DistillConfig, distill
from ddkit.teacher import Teacher, TeacherConfig, train_teacher
from ddkit.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {"ipcs": [1, 10, 50], "seeds": [0, 1, 2], "teacher_epochs": 10, "teacher_augment": "flip", "quick": False}
# the DC paper's numbers (see _published)
PUBLISHED = {"random": FASHION_MNIST["random"], "whole dataset": FASHION_MNIST_WHOLE_DATASET}


def teacher_recipe(quick: bool, epochs: int, augment: str) -> tuple[TeacherConfig, str]:
    """The teacher's config and folder name; ``--quick`` trains a 1-epoch 32-wide ConvNet-3 (several times cheaper
    on a CPU than the width-128 one, whose epoch on all 60k images takes ~6 min on 2 cores)."""
    model, epochs = ("convnet3-w32", 1) if quick else ("convnet3", epochs)
    cfg = TeacherConfig(model=model, train=TrainConfig(epochs=epochs, batch_size=256, lr=0.05, schedule="cosine",
                                                        augment=augment))
    return cfg, f"teacher-{model}-e{epochs}-{augment}"  # keyed on what changes between runs


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON path, the markdown beside it (default: docs/results/spine-fashion-mnist.json "
                    "with the default settings, else runs/bench-spine/spine-trial.json)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-spine"),
                    help="folder of the teacher and the random sets (default runs/bench-spine in the repo)")
    ap.add_argument("--ipcs", type=comma_list(positive_int, "1,10,50"), default="1,10,50",
                    help="images per class, comma-separated")
    ap.add_argument("--seeds", type=comma_list(seed_int, "0,1,2"), default="0,1,2",
                    help="student seeds, comma-separated")
    ap.add_argument("--teacher-epochs", type=positive_int, default=10,
                    help="epochs of the convnet3 teacher (--quick: 1 epoch of a convnet3-w32)")
    ap.add_argument("--teacher-augment", default="flip", choices=list(AUGMENTS), help="the teacher's augmentation")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (1-epoch convnet3-w32 teacher, 20-epoch students): ~15 min on 1 busy core")
    ap.add_argument("--device", type=device_spec, default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:N or auto (default: cuda if present, else cpu)")
    args = ap.parse_args()
    distinct_seeds(ap, args.seeds)
    trial = any(getattr(args, k) != v for k, v in DEFAULTS.items())  # never the published file unless --out says so
    out = output_file(ap, args.out or ROOT / ("runs/bench-spine/spine-trial.json" if trial else
                                              "docs/results/spine-fashion-mnist.json"))
    work = output_folder(ap, args.work, "--work")
    data = load_dataset(DatasetConfig(name="fashion-mnist"))
    ipcs, seeds = args.ipcs, args.seeds
    smallest = int(data.train.class_counts(data.num_classes).min())
    if max(ipcs) > smallest:
        ap.error(f"--ipcs {max(ipcs)} is more than the {smallest} images of the smallest class; lower --ipcs")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # after the checks: one line on bad input
    epochs = 20 if args.quick else 300

    t0 = time.perf_counter()
    tcfg, tname = teacher_recipe(args.quick, args.teacher_epochs, args.teacher_augment)
    teacher_epochs, tdir = tcfg.train.epochs, work / tname
    teacher = Teacher.load(tdir) if (tdir / "manifest.json").is_file() else train_teacher(data, tcfg, tdir, args.device)
    made = teacher.manifest["config"]["train"]
    if (made["epochs"], made["augment"]) != (teacher_epochs, args.teacher_augment):
        raise DDKitError(f"the teacher in {tdir} was trained for {made['epochs']} epochs with augment "
                         f"{made['augment']!r}, not {teacher_epochs} with {args.teacher_augment!r}; remove that folder "
                         "or choose another --work")
    teacher_s = time.perf_counter() - t0

    protocol = resolve_protocol("dc-protocol", {"random_baseline": False, "full_reference": False,
                                                "train": {"epochs": epochs}})
    rows = []
    for ipc in ipcs:
        ds = distill(data, DistillConfig(method="random", ipc=ipc, seed=0), DatasetConfig(name="fashion-mnist"),
                     work / f"random-ipc{ipc}")
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as fresh:  # eval_seconds times the training: no student read from a cache
            rep = evaluate(ds, protocol, seeds, data=data, device=args.device, cache_dir=fresh)
        res = rep["results"]["distilled"]
        pub = PUBLISHED["random"].get(ipc)
        rows.append({"method": "random", "ipc": ipc, "mean": 100 * res["mean"], "std": 100 * res["std"],
                     "per_seed": [100 * a for a in res["per_seed"]], "published": pub,
                     "image_bytes": rep["bytes"]["images"], "label_bytes": rep["bytes"]["labels"],
                     "eval_seconds": round(time.perf_counter() - t1, 1)})
        print(f"random ipc={ipc}: {100 * res['mean']:.2f} ± {100 * res['std']:.2f} (published {pub})", flush=True)

    result = {
        "benchmark": "spine-fashion-mnist",
        "command": command("spine", data=True),
        "protocol": rep["config"], "protocol_hash": rep["protocol_hash"], "seeds": seeds,
        "teacher": {"model": tcfg.model, "test_accuracy": 100 * teacher.test_accuracy,
                    "epochs": teacher.manifest["config"]["train"]["epochs"],
                    "published_whole_dataset": PUBLISHED["whole dataset"], "train_seconds": round(teacher_s, 1)},
        "rows": rows, "device": str(args.device), "versions": versions(),
        "machine": machine_record(),  # the thread count too: float sums, so the students, depend on it
    }
    lines = [f"| set | IPC | ddkit top-1 % (mean ± std, {len(seeds)} seeds) | DC Table 1 | image bytes |",
             "|---|---|---|---|---|"]
    for r in rows:
        pub = f"{r['published'][0]} ± {r['published'][1]}" if r["published"] else "–"
        lines.append(f"| random | {r['ipc']} | {r['mean']:.2f} ± {r['std']:.2f} | {pub} | {r['image_bytes']:,} |")
    lines.append(f"| whole dataset ({tcfg.model} teacher, {result['teacher']['epochs']} epochs) | – | "
                 f"{result['teacher']['test_accuracy']:.2f} | {PUBLISHED['whole dataset']} | – |")
    table = "\n".join(lines)
    print(table)
    write_results(out, result, table + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    run_main(main)
