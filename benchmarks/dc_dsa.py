"""DC and DSA on Fashion-MNIST with the papers' loops and evaluation and a width-128 ConvNet-3, at one IPC.

Issue 4's reproduction check: the synthesis network and the students are the full ConvNet-3
(width 128, instance norm, avg pooling; its first conv padded by 1 unless ``--model convnet3-p3``,
below), the loops are the papers' for the IPC (outer/inner 1/1,
10/50, 50/10 at IPC 1/10/50; 256 real images per class, image SGD lr 0.1), and each method is
evaluated with its own paper's protocol: DC with ``dc-protocol`` (300 epochs, no augmentation), DSA
with ``dsa-protocol`` (1000 epochs with DSA augmentation), beside a random real subset under the
same protocol and seeds. Only the number of outer iterations may be reduced (papers: 1000), so the
table shows how far ``--iterations`` gets towards the published means (DC paper Table 1, DSA paper
Table 2): DC 70.5 / 82.3 / 83.6, DSA 70.6 / 84.6 / 88.7, random 51.4 / 73.8 / 82.5 at IPC 1 / 10 / 50.

Cost of one outer iteration: about 20 s (IPC 1) on one CPU thread, DC and DSA side by side on 2 cores
(4904 / 5000 s for 250 iterations in dc-dsa-ipc1-fashion-mnist-cpu.json); on one H200 0.09 / 2.2 / 9.2 s for
DC and 0.12 / 3.1 / 11.3 s for DSA at IPC 1 / 10 / 50 (docs/results/tier-cost-h200.md), so IPC 1 is
a CPU run (~1.5 h for both methods at the default 250 iterations) and IPC 10/50 are GPU runs.

    DDKIT_DATA=../shared/data python benchmarks/dc_dsa.py [--ipc 1] [--iterations 250] [--device cuda] \\
        [--model convnet3-p3] [--threads N]

The recorded IPC-1 table was made as two processes side by side, 1 torch thread each (its machine line):
``--methods dc --threads 1 & --methods dsa --threads 1``, then ``--report-only``. ``--threads`` is recorded in
each set's command and the thread count in its machine line (float sums, so the numbers, depend on it).

``--model convnet3-p3`` uses the papers' code's network exactly: on 1-channel 28x28 images it pads the
first conv by 3 (feature maps 32 -> 16 -> 8 -> 4); ``convnet3`` (the default, and the recorded IPC-1
run) pads by 1 (28 -> 14 -> 7 -> 3).

Resumable (finished sets and evaluations are reused; a synthesis killed part way, e.g. by a GPU
lease's time limit, resumes from its last checkpoint in ``<work>/.<set>.work`` and its synthesis
seconds sum the chunks; on a lent GPU, run it under ``timeout`` and take ``<work>`` back as a tarball
to carry into the next lease). An evaluation is reused only if it scored this very set (the set's
config hash and data fingerprint, the protocol and the seeds); a set made again loses its old one.
Two processes can share the work (each ``--methods`` one), then a last call writes the table without
any work: ``--methods dc`` / ``--methods dsa``, then ``--report-only`` (reads the finished files and
refuses, in one line, an evaluation that does not match). Writes
``docs/results/dc-dsa-ipc<IPC>-fashion-mnist-<cpu|cuda>[-<model>].{json,md}``; a trial with other
``--iterations`` or ``--seeds`` than the defaults adds them to the name (``-it5-seeds0``), so it never
replaces the published record.
"""

from __future__ import annotations

import logging
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
    one_of,
    output_folder,
    positive_int,
    registered_model,
    run_main,
    seed_int,
)
from _published import FASHION_MNIST, PAPERS_NETWORK, network_differences
from tqdm import tqdm

from ddkit.artifacts import read_json, versions, write_json, write_results
from ddkit.data import load_dataset
from ddkit.data.base import DatasetConfig
from ddkit.distilled import DistilledSet
from ddkit.errors import DDKitError
from ddkit.evaluate import evaluate, resolve_protocol
from ddkit.methods.gradient_matching import loops_for
from ddkit.pipeline import DistillConfig, distill, distill_hash

ROOT = Path(__file__).resolve().parent.parent
# the DC and DSA papers' numbers (see _published), by IPC
PUBLISHED = {ipc: {m: FASHION_MNIST[m][ipc] for m in ("dc", "dsa", "random")} for ipc in (1, 10, 50)}
PROTOCOL = {"dc": "dc-protocol", "dsa": "dsa-protocol"}
ITERATIONS = 250  # default outer iterations (papers: 1000)
SEEDS = [0, 1, 2, 3, 4, 5, 6, 7]  # default student seeds
MODEL = "convnet3"  # synthesis network and students; convnet3-p3 is the papers' code's padding on 1x28x28


def _bar(desc: str):
    bar = tqdm(desc=desc, unit="it", leave=False)

    def update(done: int, total: int, info: dict | None = None) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix({k: f"{v:.3g}" for k, v in (info or {}).items() if isinstance(v, float)}, refresh=False)
        bar.refresh()

    return update


def set_name(method: str, iterations: int, model: str = MODEL) -> str:
    """The name of a method's set (a folder in ``--work``; ``<name>.eval.json`` and ``.synthesis.json`` beside it)."""
    return f"{method}-it{iterations}" + (f"-{model}" if model != MODEL else "")


def _protocol(method: str, model: str):
    return resolve_protocol(PROTOCOL[method],
                            {"full_reference": False, **({"student": model} if model != MODEL else {})})


def unscored(report: dict, manifest: dict, protocol_hash: str, seeds: list[int]) -> str | None:
    """Why an evaluation report is not this set's under this protocol and these seeds (None: it is). The
    report records the set's config hash (ddkit's own reports the data fingerprint it scored)."""
    if report["protocol_hash"] != protocol_hash:
        return (f"it was evaluated under another protocol (hash {report['protocol_hash'][:12]}, now "
                f"{protocol_hash[:12]})")
    if report["seeds"] != sorted(seeds):  # evaluate reports its seeds sorted (any order gives the same numbers)
        return f"it scored student seeds {report['seeds']}, not {sorted(seeds)}"
    fingerprint = manifest.get("dataset", {}).get("fingerprint")
    if report.get("distilled", {}).get("dataset_fingerprint") != fingerprint:
        return ("it scored a set made from other data (fingerprint "
                f"{report.get('distilled', {}).get('dataset_fingerprint')}, the set's {fingerprint})")
    if report.get("set_config_hash", manifest.get("config_hash")) != manifest.get("config_hash"):
        return (f"it scored another making of the set (config hash {report['set_config_hash']}, the set's "
                f"{manifest.get('config_hash')})")
    return None


def machine(device: str) -> str:
    """This machine in one line: platform, CPUs, torch threads and ``device`` (with the GPU's name)."""
    gpu = f" ({torch.cuda.get_device_name(torch.device(device))})" if torch.device(device).type == "cuda" else ""
    m = machine_record()
    return f"{m['platform']}, {m['cpus']} CPUs, {m['torch_threads']} torch thread(s), device {device}{gpu}"


def _row(method: str, ipc: int, model: str, iterations: int, seeds: list[int], timing: dict, report: dict) -> dict:
    """A table row; ``timing``: the set's synthesis record (its seconds, and the device and machine it
    was made on, which the table reports whoever assembles it)."""
    published = PUBLISHED[ipc]
    return {"method": method, "ipc": ipc, "model": model, "loops": list(loops_for(ipc, None, None)),
            "iterations": iterations, "protocol": PROTOCOL[method], "protocol_hash": report["protocol_hash"],
            "seeds": seeds, "synthesis_seconds": round(timing["wall_seconds"], 1),
            "distilled": report["results"]["distilled"], "random": report["results"]["random"],
            "published": published[method], "published_random": published["random"], "bytes": report["bytes"],
            "device": timing["device"], "machine": timing["machine"]}


def finished_row(method: str, ipc: int, iterations: int, seeds: list[int], work: Path, model: str = MODEL) -> dict:
    """``--report-only``: the table row of a finished method, read from ``work`` (nothing trained or made);
    a missing file, an evaluation that did not score this set with this protocol and these seeds, or a
    synthesis record that does not say where the set was made, is refused in one line naming the fix."""
    name = set_name(method, iterations, model)
    paths = {"set": work / name / "manifest.json", "synthesis time": work / f"{name}.synthesis.json",
             "evaluation": work / f"{name}.eval.json"}
    for what, path in paths.items():
        if not path.is_file():
            raise DDKitError(f"--report-only: the {what} of {method} ({path}) is missing; run --methods {method} "
                             "(without --report-only) to finish it, or give the --work, --iterations and "
                             "--model it ran with")
    report = read_json(paths["evaluation"], "evaluation report")
    why = unscored(report, read_json(paths["set"], "set manifest"), _protocol(method, model).hash, seeds)
    if why:
        raise DDKitError(f"--report-only: {paths['evaluation']} cannot go in the table: {why}; give the --seeds it "
                         f"scored, or run --methods {method} (without --report-only) to evaluate it again")
    timing = read_json(paths["synthesis time"])
    if "device" not in timing:
        raise DDKitError(f"--report-only: {paths['synthesis time']} does not record the device {method} was made on "
                         f"(written before ddkit recorded it); run --methods {method} without --report-only on that "
                         "machine to assemble its table there")
    return _row(method, ipc, model, iterations, seeds, timing, report)


def run_method(method: str, ipc: int, iterations: int, seeds: list[int], work: Path, device: str,
               model: str = MODEL) -> dict:
    """Make (or reuse) the method's set and evaluate it under its paper's protocol. An evaluation is
    reused only if it scored this very set (its config hash and data fingerprint), protocol and seeds;
    making the set again deletes the old evaluation first."""
    dcfg = DatasetConfig(name="fashion-mnist")
    data = load_dataset(dcfg)
    options = {"iterations": iterations, **({"model": model} if model != MODEL else {})}
    cfg = DistillConfig(method=method, ipc=ipc, seed=0, options=options)
    name = set_name(method, iterations, model)
    out = work / name
    timing = work / f"{name}.synthesis.json"
    path = work / f"{name}.eval.json"
    distilled = DistilledSet.load(out) if (out / "manifest.json").is_file() else None
    if distilled is not None and distilled.manifest.get("config_hash") == distill_hash(cfg, data, None):
        record = read_json(timing)
    else:
        path.unlink(missing_ok=True)  # it scored the set made before (other data, an older method revision)
        # a run killed part way (a GPU lease's time limit) resumes from the method's last checkpoint;
        # the time its earlier chunks took is kept beside it and summed in
        partial = work / f"{name}.synthesis.partial.json"
        before = read_json(partial)["wall_seconds"] if partial.is_file() else 0.0
        t0 = last = time.perf_counter()
        bar = _bar(f"{method} synthesis")

        def progress(done: int, total: int, info: dict | None = None) -> None:
            nonlocal last
            bar(done, total, info)
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                write_json(partial,
                           {"schema_version": 1, "kind": "synthesis-timing", "wall_seconds": before + last - t0})

        distilled = distill(data, cfg, dcfg, out, device=device, progress=progress)
        # where it was made, which a table assembled elsewhere (--report-only) reports
        # and the command that made it, which a table assembled by --report-only records beside its own
        record = {"schema_version": 1, "kind": "synthesis-timing", "wall_seconds": before + time.perf_counter() - t0,
                  "chunks_resumed": before > 0, "device": torch.device(device).type, "machine": machine(device),
                  "command": command("dc_dsa", data=True)}
        write_json(timing, record)
        partial.unlink(missing_ok=True)
    protocol = _protocol(method, model)
    report = read_json(path) if path.is_file() else None
    if report is None or unscored(report, distilled.manifest, protocol.hash, seeds):
        bar = tqdm(desc=f"{method} students", unit="ep", leave=False)

        def student_progress(epoch: int, epochs: int, record: dict) -> None:
            if epoch == 1:
                bar.reset(epochs)
                bar.set_description(f"{method} {record['stage']}")
            bar.update(1)

        report = evaluate(distilled, protocol, seeds, data=data, device=device, progress=student_progress)
        bar.close()
        report["set_config_hash"] = distilled.manifest.get("config_hash")  # which making of the set it scored
        write_json(path, report)
    return _row(method, ipc, model, iterations, seeds, {"device": torch.device(device).type, "machine": machine(device),
                                                         **record}, report)


def set_commands(work: Path, rows: list[dict]) -> dict[str, str | None]:
    """The command that made each row's set, from its synthesis record (None: made before they recorded
    it): ``command`` is the one that assembled the table, a ``--report-only`` run that made nothing."""
    return {r["method"]: read_json(work / f"{set_name(r['method'], r['iterations'], r['model'])}.synthesis.json",
                                   "synthesis record").get("command") for r in rows}


def upgrade(table: dict) -> dict:
    """A table in the first shape (dc-dsa-ipc1-fashion-mnist-cpu.json, 2026-11: no ``ipc``, ``device`` or
    ``model``; rows without ``loops`` or ``model``) given the keys it implies; numbers untouched."""
    table = dict(table)
    if "ipc" not in table:  # the first shape's kind names it: dc-dsa-ipc1
        table["ipc"] = int(table["kind"].removeprefix("dc-dsa-ipc"))
    table.setdefault("device", table.get("machine", "").rpartition("device ")[2] or "cpu")
    table.setdefault("model", MODEL)
    table["rows"] = [{"ipc": table["ipc"], "model": table["model"],
                      "loops": list(loops_for(table["ipc"], None, None)), **r}
                     for r in table["rows"]]
    return table


def network(model: str) -> tuple[str, str]:
    """How a table names ``model``: in its title, and in its header against the papers' network."""
    differs = network_differences(model)
    paper = "the DC/DSA code's width-128 ConvNet-3 on 1x28x28 images, first conv padded by 3"
    if not differs:
        return "the papers' network", f"`{model}`, the papers' network ({paper})"
    how = ", ".join(f"{k} {ours} (theirs {theirs})" for k, (ours, theirs) in differs.items())
    return (f"`{model}` (not the papers' network)",
            f"`{model}`, not the papers' network `{PAPERS_NETWORK}` ({paper}): it differs in {how}")


def markdown(table: dict) -> str:
    table = upgrade(table)
    outer, inner = loops_for(table["ipc"], None, None)
    title, header = network(table["model"])
    lines = [f"## DC and DSA at IPC {table['ipc']}, {title} and the papers' protocols ({table['device']})", "",
             f"Command: `{table['command']}`. Synthesis network and students {header}; "
             f"loops of IPC {table['ipc']} (outer {outer}, inner {inner}), 256 real images per class per "
             "step, image SGD lr 0.1 momentum 0.5; each method evaluated with its own paper's protocol beside a random "
             f"real subset (same protocol, same seeds). Student seeds {table['seeds']}. Outer iterations: "
             f"{table['iterations']} (papers: 1000).", "",
             "| method | iterations | protocol | accuracy % | published % | gap | random % | published random % | "
             "synthesis s |",
             "|---|---:|---|---|---|---:|---|---|---:|"]
    for r in table["rows"]:
        d, rnd, (pm, ps) = r["distilled"], r["random"], r["published"]
        gap = 100 * d["mean"] - pm
        lines.append(f"| {r['method']} | {r['iterations']} | `{r['protocol']}` | {100 * d['mean']:.2f} ± "
                     f"{100 * d['std']:.2f} | {pm:.1f} ± {ps:.1f} | {gap:+.2f} | {100 * rnd['mean']:.2f} ± "
                     f"{100 * rnd['std']:.2f} | {r['published_random'][0]:.1f} ± {r['published_random'][1]:.1f} | "
                     f"{r['synthesis_seconds']:.0f} |")
    lines += ["", "gap = our mean − the published mean (points); the check is |gap| ≤ 1.5. Synthesis seconds are the "
              "wall time of the run that made the set (see the machine line for its threads; methods made side by "
              "side share the cores).", "", f"Machine: {table['machine']}. Versions: {table['versions']}.", ""]
    made = {m: c for m, c in (table.get("set_commands") or {}).items() if c and c != table["command"]}
    if made:  # a --report-only table: the runs that made the sets
        lines[-1:-1] = [f"Sets made by: {'; '.join(f'{m}: `{c}`' for m, c in made.items())}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--ipc", type=int, default=1, choices=sorted(PUBLISHED),
                    help="images per class (sets the papers' loops; 1 is a CPU run, 10 and 50 GPU runs)")
    ap.add_argument("--methods", type=one_of("dc", "dsa"), default="dc,dsa",
                    help="dc, dsa or dc,dsa; the table is written when both are asked (or with --report-only)")
    ap.add_argument("--iterations", type=positive_int, default=ITERATIONS, help="outer iterations (papers: 1000)")
    ap.add_argument("--seeds", type=comma_list(seed_int, "0,1,2"), default=",".join(map(str, SEEDS)),
                    help="student seeds, comma-separated (default 0,...,7)")
    ap.add_argument("--work",
                    help="folder of the sets and evaluations (default runs/bench/dc-dsa-ipc<IPC> in the repo)")
    ap.add_argument("--results", default=str(ROOT / "docs" / "results"),
                    help="folder for the table's JSON and markdown (default docs/results); runs with other "
                         "--iterations or --seeds than the defaults get those settings in the file name")
    ap.add_argument("--device", type=device_spec, default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:N or auto (default: cuda if present, else cpu)")
    ap.add_argument("--model", type=registered_model, default=MODEL,
                    help="synthesis network and students (convnet3-p3: "
                    "the papers' code's first-conv padding 3 on 28x28 grayscale, 2048 features instead of 1152)")
    ap.add_argument("--threads", type=positive_int,
                    help="torch CPU threads (default: torch's own, the CPU count unless OMP_NUM_THREADS sets it); "
                         "the recorded IPC-1 sets were made with 1 each, --methods dc and --methods dsa side by side")
    ap.add_argument("--report-only", action="store_true",
                    help="only assemble the table from the finished methods in --work (nothing is trained)")
    args = ap.parse_args()
    distinct_seeds(ap, args.seeds)
    work = output_folder(ap, args.work or ROOT / "runs" / "bench" / f"dc-dsa-ipc{args.ipc}", "--work")
    results = output_folder(ap, args.results, "--results")
    seeds, methods = args.seeds, args.methods
    suffix = f"-{args.model}" if args.model != MODEL else ""
    finished = [m for m in ("dc", "dsa") if (work / f"{set_name(m, args.iterations, args.model)}.eval.json").is_file()]
    if args.report_only and not finished:
        ap.error(f"--report-only: no finished method in {work} (iterations {args.iterations}, model {args.model}); "
                 "run --methods dc and --methods dsa first, or give their --work, --iterations and --model")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads is not None:  # in the command and each set's machine line, so a re-run states it
        torch.set_num_threads(args.threads)
    if args.report_only:  # read, never train: a report that does not match is refused
        rows = [finished_row(m, args.ipc, args.iterations, seeds, work, args.model) for m in finished]
    else:
        rows = [run_method(m, args.ipc, args.iterations, seeds, work, args.device, args.model) for m in methods]
    if args.report_only or set(methods) == {"dc", "dsa"}:
        # the device the sets were made on (a table assembled on another machine reports theirs)
        made_on = {r["method"]: r["device"] for r in rows}
        if len(set(made_on.values())) > 1:
            raise DDKitError("the sets were made on different devices "
                             f"({', '.join(f'{m}: {d}' for m, d in made_on.items())}), so their synthesis times do not "
                             "compare; make them on one device, or report them apart")
        device = rows[0]["device"]
        table = {"schema_version": 2, "kind": "dc-dsa", "ipc": args.ipc, "device": device,
                 "iterations": args.iterations, "model": args.model, "seeds": seeds, "rows": rows,
                 "command": command("dc_dsa", data=True), "set_commands": set_commands(work, rows),
                 "machine": rows[0]["machine"], "versions": versions()}
        # a trial with fewer iterations or other seeds never takes the published record's name
        trial = ((f"-it{args.iterations}" if args.iterations != ITERATIONS else "")
                 + (f"-seeds{'_'.join(map(str, seeds))}" if seeds != SEEDS else ""))
        stem = f"dc-dsa-ipc{args.ipc}-fashion-mnist-{device}{suffix}{trial}"
        md = markdown(table)
        write_results(results / f"{stem}.json", table, md)
        print(md)


if __name__ == "__main__":
    run_main(main)
