"""Memory and time of one trajectory-matching update against the number of unrolled student steps.

MTT (Cazenavette et al., CVPR 2022) back-propagates through ``syn_steps`` student updates, so
autograd keeps every step's activations: memory grows linearly with the unroll. TESLA (Cui et al.,
"Scaling Up Dataset Distillation to ImageNet-1K with Constant Memory", ICML 2023) computes the
same gradient step by step (``gradient: exact``; ``first_order`` drops the Hessian term through
the student's own parameters), keeping one step's graph at a time plus the flat parameter vector of
every step. This script measures both with ddkit's own :func:`trajectory_gradients` on the
Fashion-MNIST shapes of issue 4 (1x28x28, 10 classes, IPC 10 = 100 images in one synthetic batch,
DSA augmentation in every step as MTT does) and the ConvNet-3 students of the benchmarks:

- ``graph MiB``: peak bytes (in MiB, 2^20 bytes) of the storages autograd saved for backward
  (:class:`ddkit.bench.SavedTensorBytes`): exact, and what grows with the unroll;
- ``peak MiB``: on CPU the sampled RSS high-water mark of the update minus the RSS before it
  (:class:`ddkit.bench.PeakMemory`), each cell in a fresh process with the warm-up's freed memory
  handed back to the OS first (``malloc_trim``), so no earlier allocation hides this one's; it
  includes the update's non-graph allocations (the DSA draws, every step's parameter vector);
  on CUDA ``torch.cuda.max_memory_allocated`` over the update;
- ``s/update``: wall time of one update (the second in its process; a 2-step warm-up runs first);
- ``rel. err``: ``||g - g_MTT|| / ||g_MTT||`` (L2) of the image gradient against the unrolled one
  with the same images, start/target parameters and augmentation draws, both in float32.

Float32 rounding alone moves the image gradient of a deep unroll by about 1e-3 (relative L2), so
``rel. err`` cannot tell TESLA's exact gradient from MTT's; a second table repeats the fewest-steps
case of each student in float64 and measures every gradient, float32 and float64, against MTT's
float64 one: there the exact mode agrees with MTT to rounding (~1e-15) and the first-order mode
does not.

Images, parameters and targets are random draws of the right shapes: memory and time do not depend
on their values, so no expert buffer or dataset is needed.

    python benchmarks/unroll_memory.py [--steps 5 10 20 40] [--models convnet3 convnet3-w32] [--device cpu]

Prints a table and writes docs/results/unroll-memory.json, .md and .png (graph and peak memory against steps).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _cli import Parser, command, device_spec, machine_record, output_file, positive_int, registered_model, run_main

from ddkit.artifacts import versions, write_results
from ddkit.bench import PeakMemory, SavedTensorBytes
from ddkit.data.augment import build_augment
from ddkit.methods.trajectory import FunctionalStudent, plan_steps, trajectory_gradients
from ddkit.models import create_model

REPO = Path(__file__).resolve().parents[1]
MODES = {"unroll": "MTT (unrolled)", "exact": "TESLA (exact)", "first_order": "TESLA (first order)"}
MiB = 2**20  # the rows' graph_mb / peak_mb hold MiB (keys kept for the recorded JSON)


def _case(model_name: str, steps: int, ipc: int, device: torch.device):
    """Student, start/target parameters, images, labels, lr and a DSA plan, all from fixed seeds."""
    torch.manual_seed(0)
    model = create_model(model_name, 1, 10, 28).to(device)
    student = FunctionalStudent(model)
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    target = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(1)).to(device)
    n = 10 * ipc
    images = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(2)).to(device)
    labels = torch.arange(10).repeat_interleave(ipc).to(device)
    augment = build_augment("dsa")
    plan = plan_steps(n, steps, n, torch.Generator().manual_seed(3), augment, (28, 28))
    return student, start, target, images, labels, torch.tensor(0.01, device=device), plan, augment


def _release_freed_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError):  # glibc keeps freed heap pages; give them back (no-op elsewhere)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_cell(model_name: str, mode: str, steps: int, ipc: int, device: str, grad_out: str | None) -> dict:
    """One (model, mode, steps) measurement in this process; returns the row as a dict."""
    dev = torch.device(device)
    case = _case(model_name, steps, ipc, dev)
    student, start, target, images, labels, lr, plan, augment = case
    # warm-up on 2 steps (thread pools, kernels), then hand freed memory back to the OS so the
    # measured update's RSS high-water mark is not hidden by what the warm-up left in the allocator
    trajectory_gradients(student, start, target, images, labels, lr, plan[:2], augment, mode)
    _release_freed_memory(dev)
    with PeakMemory(dev) as mem:
        out = trajectory_gradients(student, start, target, images, labels, lr, plan, augment, mode)
    t0 = time.perf_counter()
    trajectory_gradients(student, start, target, images, labels, lr, plan, augment, mode)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    with SavedTensorBytes() as saved:
        trajectory_gradients(student, start, target, images, labels, lr, plan, augment, mode)
    if grad_out:
        torch.save(out.grad_images.cpu(), grad_out)
    return {"model": model_name, "mode": mode, "steps": steps, "ipc": ipc, "device": dev.type,
            "params": student.num_params, "graph_mb": saved.peak / MiB, "peak_mb": (mem.peak or 0) / MiB,
            "peak_kind": mem.kind, "seconds": seconds, "loss": float(out.loss)}


def _rel(g: torch.Tensor, ref: torch.Tensor) -> float:
    return float((g.double() - ref.double()).norm() / ref.double().norm())


def precision_check(model_name: str, steps: int, ipc: int, modes: list[str]) -> dict:
    """Every mode's image gradient in float32 and float64 against MTT's (unrolled) in float64."""
    grads = {}
    for dtype in (torch.float64, torch.float32):
        student, start, target, images, labels, lr, plan, augment = _case(model_name, steps, ipc, torch.device("cpu"))
        student.model.to(dtype)
        start, target, images, lr = (t.to(dtype) for t in (start, target, images, lr))
        for mode in modes:
            out = trajectory_gradients(student, start, target, images, labels, lr, plan, augment, mode)
            grads[str(dtype).removeprefix("torch."), mode] = out.grad_images
    ref = grads["float64", "unroll"]
    errors = [{"dtype": d, "mode": m, "rel_err": _rel(g, ref)} for (d, m), g in grads.items()
              if (d, m) != ("float64", "unroll")]
    return {"model": model_name, "steps": steps, "errors": errors}


def _in_fresh_process(args, model_name: str, mode: str, steps: int, grad_out: str) -> dict:
    cmd = [sys.executable, __file__, "--cell", json.dumps([model_name, mode, steps]), "--ipc", str(args.ipc),
           "--device", args.device, "--threads", str(args.threads), "--grad-out", grad_out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"cell {model_name}/{mode}/{steps} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _markdown(result: dict, plot: str = "unroll-memory.png") -> str:
    """The markdown table of ``result``; ``plot``: the file name of the png beside it (``--out``'s stem)."""
    lines = [
        "## Memory of one trajectory-matching update against unrolled steps",
        "",
        f"`{result['command'].strip()}` on {result['device']} ({result['machine']['torch_threads']} "
        f"threads): IPC {result['ipc']} (one synthetic batch of {10 * result['ipc']} 1x28x28 images), DSA "
        "augmentation in every step, float32. graph MiB = peak bytes of the storages autograd holds for backward "
        "(exact); "
        f"peak MiB = {result['peak_kind']}; rel. err = ||g - g_MTT|| / ||g_MTT|| of the image gradient, both in "
        "float32.",
        "",
        "| student | params | gradient | steps | graph MiB | peak MiB | s / update | rel. err vs MTT |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        err = "–" if r["mode"] == "unroll" else f"{r['rel_err']:.1e}"
        lines.append(f"| {r['model']} | {r['params']:,} | {MODES[r['mode']]} | {r['steps']} | {r['graph_mb']:.1f} | "
                     f"{r['peak_mb']:.1f} | {r['seconds']:.2f} | {err} |")
    lines += ["", "Growth from the fewest to the most steps (ratio of the last row to the first, per student "
              "and gradient):", ""]
    for g in result["growth"]:
        lines.append(f"- {g['model']}, {MODES[g['mode']]}: steps x{g['steps_ratio']:g}: graph x{g['graph_ratio']:.2f}, "
                     f"peak x{g['peak_ratio']:.2f}, time x{g['time_ratio']:.2f}")
    lines += ["", "Float32 rounding against the gradient itself: the fewest-steps case again, every image gradient "
              "against MTT's (unrolled) in float64, relative L2 error:", "",
              "| student | steps | gradient | float32 | float64 |", "|---|---:|---|---:|---:|"]
    for check in result["precision"]:
        err = {(e["dtype"], e["mode"]): e["rel_err"] for e in check["errors"]}
        for mode in [m for m in MODES if ("float32", m) in err]:
            f64 = "reference" if mode == "unroll" else f"{err['float64', mode]:.1e}"
            lines.append(f"| {check['model']} | {check['steps']} | {MODES[mode]} | "
                         f"{err['float32', mode]:.1e} | {f64} |")
    lines += ["", f"![memory against steps]({plot})", "",
              f"Versions: {result['versions']}.", ""]
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    metrics = [("graph_mb", "autograd saved tensors (MiB)"), ("peak_mb", f"peak memory (MiB, {result['peak_kind']})")]
    styles = {"unroll": ("o", "-"), "exact": ("s", "--"), "first_order": ("^", ":")}
    fig, axes = plt.subplots(len(metrics), len(models), figsize=(4.5 * len(models), 3.4 * len(metrics)), squeeze=False)
    for col, model in enumerate(models):
        for row, (key, ylabel) in enumerate(metrics):
            ax = axes[row][col]
            for mode, name in MODES.items():
                sel = [r for r in result["rows"] if r["model"] == model and r["mode"] == mode]
                if sel:
                    marker, line = styles[mode]
                    ax.plot([r["steps"] for r in sel], [r[key] for r in sel], marker=marker, linestyle=line, label=name)
            ax.set_title(f"{model}, IPC {result['ipc']}")
            ax.set_xlabel("unrolled student steps")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _ratio(a: float, b: float) -> float:
    return b / a if a else float("nan")


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=positive_int, nargs="+", default=[5, 10, 20, 40],
                    help="unrolled student steps per update, space-separated")
    ap.add_argument("--models", type=registered_model, nargs="+", default=["convnet3-w32", "convnet3"],
                    help="student models, space-separated")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                    help="gradients to measure: unroll (MTT, required), exact and first_order (TESLA)")
    ap.add_argument("--ipc", type=positive_int, default=10, help="images per class in the synthetic batch")
    ap.add_argument("--device", type=device_spec, default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--threads", type=positive_int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "unroll-memory.json"),
                    help="JSON path; the markdown and png go beside it (default docs/results/unroll-memory.json)")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--grad-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cell:  # child process: one measurement, printed as a JSON line
        model_name, mode, steps = json.loads(args.cell)
        print(json.dumps(run_cell(model_name, mode, int(steps), args.ipc, args.device, args.grad_out)))
        return
    if "unroll" not in args.modes:
        ap.error("--modes must include unroll: the other gradients are checked against it")
    out = output_file(ap, args.out)
    rows = []
    print(f"{'student':<14} {'gradient':<20} {'steps':>5} {'graph MiB':>9} {'peak MiB':>9} {'s/update':>9} "
          f"{'rel.err':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            for steps in sorted(args.steps):
                ref = None
                for mode in ["unroll"] + [m for m in args.modes if m != "unroll"]:
                    grad_path = str(Path(tmp) / f"{mode}.pt")
                    row = _in_fresh_process(args, model_name, mode, steps, grad_path)
                    g = torch.load(grad_path, weights_only=True)
                    if mode == "unroll":
                        ref, row["rel_err"] = g, 0.0
                    else:
                        row["rel_err"] = _rel(g, ref)
                    rows.append(row)
                    err = "–" if mode == "unroll" else f"{row['rel_err']:.1e}"
                    print(f"{model_name:<14} {MODES[mode]:<20} {steps:>5} {row['graph_mb']:>9.1f} "
                          f"{row['peak_mb']:>9.1f} {row['seconds']:>9.2f} {err:>8}", flush=True)
    precision = []
    for model_name in args.models:
        check = precision_check(model_name, min(args.steps), args.ipc,
                                ["unroll"] + [m for m in args.modes if m != "unroll"])
        precision.append(check)
        for e in check["errors"]:
            print(f"{model_name}, {check['steps']} steps, {e['dtype']} {MODES[e['mode']]}: "
                  f"rel. err vs MTT in float64 {e['rel_err']:.1e}")
    growth = []
    for model_name in args.models:
        for mode in args.modes:
            sel = sorted((r for r in rows if r["model"] == model_name and r["mode"] == mode), key=lambda r: r["steps"])
            lo, hi = sel[0], sel[-1]
            growth.append({"model": model_name, "mode": mode, "steps_ratio": hi["steps"] / lo["steps"],
                           "graph_ratio": _ratio(lo["graph_mb"], hi["graph_mb"]),
                           "peak_ratio": _ratio(lo["peak_mb"], hi["peak_mb"]),
                           "time_ratio": _ratio(lo["seconds"], hi["seconds"])})
    result = {
        "what": "memory and time of one trajectory-matching update vs unrolled steps: MTT's unroll vs TESLA",
        "command": command("unroll_memory"),
        "ipc": args.ipc, "device": args.device, "peak_kind": rows[0]["peak_kind"], "rows": rows, "growth": growth,
        "precision": precision,
        "machine": machine_record(args.threads),
        "versions": versions(),
    }
    for g in growth:
        print(f"{g['model']}, {MODES[g['mode']]}: steps x{g['steps_ratio']:g} -> graph x{g['graph_ratio']:.2f}, "
              f"peak x{g['peak_ratio']:.2f}, time x{g['time_ratio']:.2f}")
    md = write_results(out, result, _markdown(result, out.with_suffix(".png").name))
    _plot(result, out.with_suffix(".png"))
    print(f"-> {out}, {md.name}, {out.with_suffix('.png').name}")


if __name__ == "__main__":
    run_main(main)
