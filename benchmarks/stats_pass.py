"""Cost of the real-data statistics pass of the recover methods (SRe2L, G-VBSM, EDC, CV-DD).

Before a teacher's first synthesis, :func:`ddkit.methods.statistics.compute_real_statistics`
runs it once over the whole training set with hooks on every BatchNorm input and conv output,
summing per-class channel moments (and, for G-VBSM and EDC, per-patch moments of the conv outputs).
This script times, per teacher architecture, on the same images:

- ``forward s``: the plain forward pass, no hooks (the floor);
- ``stats s``: ddkit's pass without patch statistics (SRe2L, CDA), ``+patch s`` with 4x4 patch
  statistics (G-VBSM, EDC's preset);
- ``ref s``: the same statistics computed the straightforward way, every feature map cast to float64
  before summing, sums moved to the host per layer and batch (ddkit's pass until 2026-12);
- ``max rel diff``: the largest difference between ddkit's statistics and the float64 reference,
  relative to the largest variance for variances and the largest RMS (sqrt(var + mean^2)) for
  means (a mean's own value can be ~0), the largest magnitude for the logits.

Teachers are untrained (their weights do not change the cost). Images are ``--per-class`` images
of each Fashion-MNIST class (``DDKIT_DATA``); 6000 is the whole set.

    python benchmarks/stats_pass.py [--models resnet18_cifar convnet3-bn ...] [--per-class 1000] [--device cpu]

Prints a table and writes docs/results/stats-pass-<device>.json and .md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from _cli import Parser, command, device_spec, machine_record, output_file, positive_int, run_main

from ddkit.artifacts import versions, write_results
from ddkit.data.base import DataBundle, load_dataset
from ddkit.determinism import seeded_cpu_rng, use_deterministic_cuda
from ddkit.errors import DDKitError
from ddkit.methods import common
from ddkit.methods import statistics as S
from ddkit.models import create_model

REPO = Path(__file__).resolve().parents[1]
# (registry name, options): the full decoupled tier's teachers, then the CPU tier's
MODELS = {
    "resnet18_cifar": {}, "convnet3-bn": {}, "convnetd4-bn": {},
    "resnet18_cifar-w8": {"width": 8}, "convnet3-w32-bn": {}, "convnetd4-w32-bn": {},
}
PATCH = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


@torch.no_grad()
def forward_pass(model, real: DataBundle, device: torch.device, batch_size: int = 256) -> None:
    for lo in range(0, len(real.train), batch_size):
        part = real.train.subset(torch.arange(lo, min(lo + batch_size, len(real.train))))
        model(common.to_normalized(part.float_images().to(device), real))


@torch.no_grad()
def reference_statistics(model, real: DataBundle, keys: list[str], device: torch.device,
                         batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Float64 feature maps, host-side sums: the exact baseline ``compute_real_statistics`` must equal."""
    k = real.num_classes
    count = torch.zeros(k, dtype=torch.float64)
    logit_sum = torch.zeros(k, k, dtype=torch.float64)
    sums: dict[str, list[torch.Tensor]] = {}
    pix: dict[str, int] = {}
    patched = [key for key in keys if key.startswith("conv:")]
    with S.FeatureHooks(model, keys) as hooks:
        for lo in range(0, len(real.train), batch_size):
            part = real.train.subset(torch.arange(lo, min(lo + batch_size, len(real.train))))
            y = part.labels
            logit_sum.index_add_(0, y, model(common.to_normalized(part.float_images().to(device), real)).double().cpu())
            count.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
            for key in keys:
                f = hooks.features[key].double()
                flat = f.reshape(f.shape[0], f.shape[1], -1)
                pix[key] = flat.shape[2]
                acc = sums.setdefault(key, [torch.zeros(k, f.shape[1], dtype=torch.float64) for _ in range(2)])
                acc[0].index_add_(0, y, flat.sum(2).cpu())
                acc[1].index_add_(0, y, (flat * flat).sum(2).cpu())
            for key in patched:
                g = S.patch_grid(hooks.features[key].double(), PATCH)  # [n, P, C * p * p]
                acc = sums.setdefault(f"{key}/patch", [torch.zeros(g.shape[1], dtype=torch.float64) for _ in range(2)])
                pix[f"{key}/patch"] = g.shape[2]
                acc[0] += g.sum((0, 2)).cpu()
                acc[1] += (g * g).sum((0, 2)).cpu()
    out = {f"{S.LOGITS}/class_mean": logit_sum / count[:, None]}
    for key in keys:
        a, b = sums[key]
        n = count[:, None] * pix[key]
        out[f"{key}/class_mean"], out[f"{key}/class_var"] = a / n, b / n - (a / n) ** 2
        m = a.sum(0) / n.sum()
        out[f"{key}/mean"], out[f"{key}/var"] = m, b.sum(0) / n.sum() - m * m
    for key in patched:
        a, b = sums[f"{key}/patch"]
        n = count.sum() * pix[f"{key}/patch"]
        out[f"{key}/patch_mean"], out[f"{key}/patch_var"] = a / n, b / n - (a / n) ** 2
    return out


def max_rel_diff(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    if set(ours) != set(ref):
        raise DDKitError(f"statistics keys differ from the reference: {sorted(set(ours) ^ set(ref))[:4]}; "
                         "reference_statistics() must compute every key compute_real_statistics() returns")
    return max(float((ours[k].double().cpu() - v).abs().max() / _scale(k, ref)) for k, v in ref.items())


def _scale(key: str, ref: dict[str, torch.Tensor]) -> float:
    """What a difference at ``key`` is relative to: a variance's largest value, a mean's largest RMS
    (sqrt(var + mean^2)), not its own value, which can be ~0 (a patch mean of 5e-8 made the relative
    difference 1e-4 from rounding alone); the logits' largest magnitude."""
    v = ref[key]
    var = ref.get(key[: -len("mean")] + "var") if key.endswith("mean") else None
    size = (var + v * v).sqrt() if var is not None else v.abs()
    return max(float(size.max()), 1e-12)


def measure(label: str, real: DataBundle, device: torch.device, reference: bool) -> dict:
    name = label.removesuffix("-w8")
    channels, size, _ = real.image_shape
    with seeded_cpu_rng(0):  # the same weights every run, so rel diff repeats
        model = create_model(name, in_channels=channels, num_classes=real.num_classes, image_size=size,
                             **MODELS[label]).to(device).eval()
    keys = S.statistic_layers(model)
    forward_pass(model, real, device, batch_size=256)  # warm-up (kernels, allocator)
    _, fwd = _timed(lambda: forward_pass(model, real, device), device)
    S.compute_real_statistics(model, real, keys, device, patch_size=PATCH)  # warm-up of the statistics hooks
    _, plain = _timed(lambda: S.compute_real_statistics(model, real, keys, device), device)
    ours, patch = _timed(lambda: S.compute_real_statistics(model, real, keys, device, patch_size=PATCH), device)
    row = {"model": label, "layers": len(keys), "images": len(real.train), "forward_s": round(fwd, 3),
           "stats_s": round(plain, 3), "patch_s": round(patch, 3), "patch_over_forward": round(patch / fwd, 2)}
    if reference:
        ref, ref_s = _timed(lambda: reference_statistics(model, real, keys, device), device)
        row.update({"reference_s": round(ref_s, 3), "speedup": round(ref_s / patch, 2),
                    "max_rel_diff": max_rel_diff(ours, ref)})
    return row


def _markdown(result: dict) -> str:
    lines = [f"## Real-data statistics pass ({result['device']})", "",
             f"`{result['command']}`; {result['images']} {result['dataset']} images, batch 256, untrained teachers, "
             f"torch {result['versions'].get('torch')}, {result['machine']['torch_threads']} threads. "
             "stats = BN + conv channel statistics (SRe2L); +patch = also 4x4 patch statistics of conv outputs "
             "(G-VBSM, EDC); ref = the same with float64 feature maps and per-layer host sums (ddkit before 2026-12); "
             "speedup = ref / +patch.", "",
             "| teacher | layers | forward s | stats s | +patch s | +patch / forward | ref s | speedup | "
             "max rel diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ref = (f"{r['reference_s']:.2f} | {r['speedup']:.2f}x | {r['max_rel_diff']:.1e}" if "reference_s" in r
               else "– | – | –")
        lines.append(f"| {r['model']} | {r['layers']} | {r['forward_s']:.2f} | {r['stats_s']:.2f} | "
                     f"{r['patch_s']:.2f} | {r['patch_over_forward']:.2f}x | {ref} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="teachers, space-separated")
    ap.add_argument("--dataset", default="fashion-mnist", help="a registered dataset (tests use synthetic)")
    ap.add_argument("--per-class", type=positive_int, default=1000,
                    help="images per class (6000 = all of Fashion-MNIST)")
    ap.add_argument("--device", type=device_spec, default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--threads", type=positive_int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    ap.add_argument("--no-reference", action="store_true", help="skip the float64 reference (slowest part)")
    ap.add_argument("--out", help="JSON path, the markdown beside it (default docs/results/stats-pass-<device>.json)")
    args = ap.parse_args()
    out = output_file(ap, args.out or REPO / "docs" / "results" / f"stats-pass-{torch.device(args.device).type}.json")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_deterministic_cuda(device)
    real = load_dataset(args.dataset, train_per_class=args.per_class, test_per_class=1)
    rows = []
    print(f"{'teacher':<18} {'layers':>6} {'fwd s':>7} {'stats s':>8} {'+patch s':>9} {'ref s':>7} {'speedup':>8} "
          f"{'rel diff':>9}")
    for label in args.models:
        r = measure(label, real, device, reference=not args.no_reference)
        rows.append(r)
        print(f"{label:<18} {r['layers']:>6} {r['forward_s']:>7.2f} {r['stats_s']:>8.2f} {r['patch_s']:>9.2f} "
              f"{r.get('reference_s', float('nan')):>7.2f} {r.get('speedup', float('nan')):>7.2f}x "
              f"{r.get('max_rel_diff', float('nan')):>9.1e}", flush=True)
    result = {
        "what": "real-data statistics pass of the recover methods: ddkit's against a float64 reference and "
                "a forward pass",
        "command": command("stats_pass", data=args.dataset != "synthetic"),
        "device": str(device), "dataset": real.name, "images": len(real.train), "patch_size": PATCH, "rows": rows,
        "machine": machine_record(args.threads),
        "versions": versions(),
    }
    md = write_results(out, result, _markdown(result))
    print(f"-> {out}, {md.name}")


if __name__ == "__main__":
    run_main(main)  # missing data or a bad dataset name: one line, no traceback, no output file
