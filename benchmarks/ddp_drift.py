"""How far a teacher trained under 2-process ``torchrun`` (DDP, gloo) drifts from the one-process teacher.

Both see the same global batches and augmentation draws; the weights differ only by the order in
which floats are summed (each rank sums half a batch, then the gradients are all-reduced), and that
difference grows with training. The README quotes these numbers. Generated data (``synthetic``: 96
training images, 4 classes, 16x16), ``tiny_convnet``, batch 32, CPU.

    python benchmarks/ddp_drift.py [--epochs 3,50,800]

Prints a table (largest absolute weight difference, the largest relative to the weight's size, the
test accuracies) and writes docs/results/ddp-drift-cpu.json.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _cli import Parser, comma_list, command, output_file, positive_int, run_main
from safetensors.torch import load_file

from ddkit.artifacts import read_json, versions, write_json
from ddkit.errors import DDKitError

REPO = Path(__file__).resolve().parents[1]


def train(epochs: int, out: Path, world: int) -> float:
    """Train the teacher in ``world`` processes (1: plain, 2: torchrun); seconds taken."""
    args = ["-m", "ddkit", "teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", str(epochs),
            "--set", "teacher.train.batch_size=32", "--out", str(out), "-q"]
    if world > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise DDKitError(f"teacher training ({world} process(es), {epochs} epochs) failed: "
                         f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return time.perf_counter() - t0


def gap(a: Path, b: Path) -> tuple[float, float]:
    """The largest absolute weight difference of two teachers, and the largest relative to the
    tensor's largest weight."""
    w1, w2 = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    floats = [k for k in w1 if w1[k].is_floating_point()]
    absolute = max(float((w1[k] - w2[k]).abs().max()) for k in floats)
    relative = max(float((w1[k] - w2[k]).abs().max() / w1[k].abs().max().clamp_min(1e-12)) for k in floats)
    return absolute, relative


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=comma_list(positive_int, "3,50,800"), default=[3, 50, 800],
                    help="teacher epochs, e.g. 3,50,800")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "ddp-drift-cpu.json"),
                    help="JSON path (default docs/results/ddp-drift-cpu.json)")
    args = ap.parse_args()
    output_file(ap, args.out)
    rows = []
    print(f"{'epochs':>6} {'max |w1-w2|':>12} {'relative':>10} {'acc 1 proc':>10} {'acc 2 proc':>10} "
          f"{'s 1 / 2 proc':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in args.epochs:
            one, two = Path(tmp) / f"t{epochs}-1", Path(tmp) / f"t{epochs}-2"
            s1, s2 = train(epochs, one, 1), train(epochs, two, 2)
            absolute, relative = gap(one, two)
            acc = [read_json(p / "manifest.json")["test_accuracy"] for p in (one, two)]
            rows.append({"epochs": epochs, "max_abs_weight_diff": absolute, "max_rel_weight_diff": relative,
                         "test_accuracy_1proc": acc[0], "test_accuracy_2proc": acc[1],
                         "seconds_1proc": round(s1, 2), "seconds_2proc": round(s2, 2)})
            print(f"{epochs:>6} {absolute:>12.2e} {relative:>10.2e} {acc[0]:>10.4f} {acc[1]:>10.4f} "
                  f"{s1:>6.1f} / {s2:<6.1f}")
    write_json(args.out, {
        "what": "teacher weights, 1 process vs 2-process torchrun (DDP, gloo): synthetic data, tiny_convnet, batch 32, "
                "seed 0, CPU",
        "rows": rows, "command": command("ddp_drift"),
        "machine": {"cpus": os.cpu_count(), "torch_threads_per_process": 1, "platform": platform.platform()},
        "versions": versions(),
    })
    print(f"-> {args.out}")


if __name__ == "__main__":
    run_main(main)
