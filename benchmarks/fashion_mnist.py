"""Every ddkit method on Fashion-MNIST at IPC 1 / 10 / 50, beside random subsets and published numbers.

Two families, each one `ddkit bench` matrix (resumable: re-run the same command after a stop):

- ``matching``  (configs/bench/fashion-mnist-matching[-cpu].yaml): DC, DSA, DM, DataDAM, MTT, TESLA,
  FTD, DATM, AST (shq) and random, hard labels; the CPU tier under the DC protocol (SGD 0.01, batch
  256, no augmentation), the full tier under DSA's (1000 epochs with DSA augmentation).
- ``decoupled`` (configs/bench/fashion-mnist-decoupled[-cpu].yaml): SRe2L, CDA, G-VBSM, EDC (+ its
  ablation), RDED, DWA, CV-DD and random, teacher soft labels under one soft-label protocol, ConvNet-3
  and ResNet-18 students (the CPU tier: width-32 ConvNet-3 and width-8 ResNet-18).

``--tier cpu`` runs the reduced configurations (2 CPU cores, about 2.5 h for both families);
``--tier full`` the papers' settings (needs a GPU). Writes, per family, ``<family>-fashion-mnist-<tier>.json``
(the bench table), ``.md`` (tables) and a ``-report/`` folder (plots, image grids, HTML), then
``fashion-mnist.md`` assembling every family found in the results folder.

Usage (the one documented command; ~2.5 h on 2 CPU cores):
    DDKIT_DATA=../shared/data python benchmarks/fashion_mnist.py --tier cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

from _cli import Parser, command, device_spec, output_folder, run_main
from _published import FASHION_MNIST, network_differences

from ddkit.artifacts import read_json, write_results, write_text
from ddkit.bench import BenchConfig, load_bench_config, run_bench, synthesis_cell, synthesis_seconds
from ddkit.config import from_dict, load_yaml, to_dict
from ddkit.evaluate import ProtocolConfig, resolve_protocol
from ddkit.evaluate.tables import summary_text

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("matching", "decoupled")
# Supplementary matrices (cpu tier only, run with --family NAME, not part of "all"): each answers one
# question the family tables raise, under the same teacher and protocol as its family.
EXTRAS = {"edc-recipe": "EDC with part of its authors' CIFAR-10 recover recipe (75 iterations from real images, "
                        "crop 0.08-1; unlike the script with global statistics only, alpha 1, and with the preset's "
                        "flatness term), with 75 iterations, and with a 10x weaker statistics loss, beside "
                        "the decoupled bench's EDC, RDED and random",
          "edc-transfer": "why recovered sets fall below random on the ResNet-18 student: RDED/EDC from "
                          "larger crops or whole real images, and EDC with a ResNet-18 in its backbone pool",
          "rded-crops": "RDED with crops of at least half the image (the fix edc-transfer found for the ResNet-18 "
                        "student) on the ConvNet-3 student, beside default RDED and random",
          "edc-gentle": "EDC on the ResNet-18 student from RDED's larger crops with a 5x and a 25x smaller image lr, "
                        "with and without a ResNet-18 observer: does any amount of optimisation beat its "
                        "initialisation?",
          "edc-gentle50": "edc-gentle's gentlest EDC (image lr 0.002, ResNet-18 observer) at IPC 50 on the ResNet-18 "
                          "student, beside its initialisation and random",
          "edc-long50": "the tier's EDC, edc-gentle50's gentlest EDC, their RDED initialisation and random at IPC 50 "
                        "on the ResNet-18 student with 90 instead of 30 student epochs (bf16): are recovered sets "
                        "below random there because the students train too briefly?",
          "edc-long10": "edc-long50 at IPC 10: the same sets and random on the ResNet-18 student with 240 instead of "
                        "80 student epochs (bf16)",
          "edc-real-long": "EDC from a random real subset (instead of RDED's crops) with gentle recovering and a "
                           "ResNet-18 observer, both students with edc-long's long training, IPC 1/10/50, beside its "
                           "initialisation, RDED and random: does recovering add anything to real images?",
          "decoupled-long10": "every decoupled method at IPC 10 under edc-long's long training (240 epochs, bf16), "
                              "both students, with edc-real-long's EDC configuration beside EDC's own recipe: does "
                              "EDC lead its family and beat random under one protocol?",
          "decoupled-long1": "decoupled-long10 at IPC 1 (300 epochs, bf16, 8 student seeds), with edc-ipc1-seeds' "
                             "EDC from RDED's larger crops beside ddkit's EDC configuration from real images",
          "decoupled-long50": "decoupled-long10 at IPC 50 (90 epochs, bf16): every method of the family, EDC's two "
                              "configurations, RDED from larger crops and random: does EDC lead and beat random?",
          "edc-ablate10": "ddkit's EDC configuration (edc-real-lr002-r18) at IPC 10 under decoupled-long10's protocol "
                          "with one EDC knob taken out per row (flatness, category-aware matching, weak crops, "
                          "G-VBSM's statistics EMA and patch statistics, the ResNet-18 observer): which "
                          "knobs carry it?",
          "edc-build10": "EDC's knobs added one by one (G-VBSM's core, real init, flatness, category-aware "
                         "matching, weak crops = EDC's recipe), then whole real images, a 25x smaller image lr and a "
                         "ResNet-18 observer (ddkit's configuration), at IPC 10 under decoupled-long10's protocol",
          "edc-build1": "edc-build10 at IPC 1 under decoupled-long1's protocol (300 epochs, 8 student seeds), with "
                        "ddkit's IPC-1 EDC configuration (from RDED's larger crops) and RDED beside them",
          "edc-build50": "edc-build10 at IPC 50 under decoupled-long50's protocol (90 epochs), in its folder so its "
                         "EDC sets are reused: EDC's knobs one by one, then whole real images and ddkit's "
                         "configuration",
          "edc-lr002-long1": "EDC's own recipe (RDED's output as initialisation) with image lr 0.002, "
                             "without and with a ResNet-18 observer, at IPC 1 under decoupled-long1's protocol, "
                             "in its folder",
          "edc-lr002-long10": "edc-lr002-long1 at IPC 10 under decoupled-long10's protocol, in its folder",
          "edc-lr002-long50": "edc-lr002-long1 at IPC 50 under decoupled-long50's protocol, in its folder",
          "seed1-long1": "decoupled-long1's closest IPC-1 race (edc-lr002-r18, RDED, random) with synthesis seed 1, "
                         "in its folder: does EDC's lead over RDED outlast a new synthesis?",
          "seed2-long1": "seed1-long1 with synthesis seed 2",
          "seed1-long10": "decoupled-long10's IPC-10 race (ddkit's EDC, edc-real-lr002-r18, against the random "
                          "method's subset it starts from) with synthesis seed 1, in its folder: does EDC's lead over "
                          "random outlast a new synthesis?",
          "seed2-long10": "seed1-long10 with synthesis seed 2",
          "seed1-long50": "seed1-long10 at IPC 50, in decoupled-long50's folder",
          "seed2-long50": "seed1-long50 with synthesis seed 2",
          "edc-r18teacher": "EDC when the main teacher (soft labels, statistics, first observer) is a ResNet-18: "
                            "do recovered images then favour the ResNet-18 student instead of the ConvNet-3?",
          "edc-instnorm": "RDED and EDC on a ResNet-18 student with instance norm instead of BatchNorm: is the "
                          "BatchNorm student why recovered images fall below random on the ResNet-18?",
          "edc-protocol": "RDED, EDC and random at IPC 10 evaluated with EDC's own recipe (MSE + CE on teacher "
                          "logits, crops of scale 0.5-1, EMA student) instead of soft-kl's 0.08-1 crops",
          "mtt-steps": "why the matching CPU tier's trajectory methods fall below random at IPC 10: the tier's 10 "
                       "unrolled steps per expert epoch against MTT's IPC-10 unroll (30 steps, learned lr), and a "
                       "10x smaller image lr",
          "mtt-steps50": "mtt-steps at IPC 50: the tier's MTT against MTT's 30-step unroll with a learned lr, and AST "
                         "(shq) with it",
          "edc-ipc1": "EDC at IPC 1 (where RDED, its initialisation, beats it on the ConvNet-3) from RDED's larger "
                      "crops and with smaller image lrs",
          "edc-ipc1-seeds": "edc-ipc1 with 8 student seeds and a ResNet-18 observer added to its gentlest EDC: does "
                            "EDC tie or beat RDED at IPC 1 on the ConvNet-3 once the seeds can tell?",
          "edc-ipc1-seed1": "edc-ipc1-seeds' gentlest EDC and its RDED initialisation with synthesis seed "
                            "1 (new crops, random subset and augmentations)",
          "edc-ipc1-seed2": "edc-ipc1-seed1 with synthesis seed 2",
          "recover-code": "SRe2L, G-VBSM and EDC at IPC 10 (G-VBSM and EDC also at IPC 1 and 50) with the recover loop "
                          "as the authors' code has it: conv statistics at the conv inputs (conv_features: input) and "
                          "one crop and flip per batch (augment_per: batch), each beside the tier's setting",
          "edc-real-code": "edc-real-long's best EDC at IPC 10 with the authors' conv-input statistics and per-batch "
                           "crops, beside itself and random (both students, 240 epochs)",
          "softkl-s05": "every decoupled method at IPC 10 under soft-kl with crops of scale 0.5-1 instead of 0.08-1: "
                        "how much of the soft-label numbers' gap to EDC's own recipe the crops explain",
          "mtt-iters50": "mtt-steps50's 30-step MTT and AST rows with 4x the iterations (240): is the short run why "
                         "MTT stays below random at IPC 50?",
          "mtt-experts50": "mtt-iters50's MTT row with 8-epoch experts, matching 2 expert epochs from start epochs in "
                           "[0, 6) and [3, 6): do the 2-epoch experts keep MTT below random at IPC 50?",
          "traj-labels": "TESLA's expert soft labels and DATM's learned soft labels evaluated with the labels they "
                         "store (soft cross-entropy), beside MTT and random with the teacher's, IPC 10",
          "traj-labels-e8": "traj-labels with mtt-experts50's 8-epoch experts: are TESLA's and DATM's own labels "
                            "better from longer-trained experts?",
          "traj-ipc1-e8": "MTT and DATM at IPC 1 with 8-epoch experts and their papers' IPC-1 unrolls, hard and "
                          "stored labels",
          "traj-flat-e8": "FTD and AST (shq) at IPC 10 with their own 8-epoch expert recipes (GSAM; clipping loss "
                          "and gradient penalty), beside traj-labels-e8's MTT row",
          "ast-ablate-e8": "why AST (shq) trails MTT at IPC 10 with 8-epoch experts: its student momentum "
                           "off, then its other student pieces on MTT's experts, and MTT on AST's experts",
          "traj-ipc1-flat-e8": "FTD and AST (shq) at IPC 1 with their own 8-epoch expert recipes and MTT's IPC-1 "
                               "unroll, beside traj-ipc1-e8's MTT row",
          "traj-flat-e8-seed1": "traj-flat-e8's FTD row and traj-labels-e8's MTT row with synthesis seed 1: is FTD's "
                                "lead over MTT more than the synthesis spread?",
          "ast-segment-e8": "MTT on its own and on AST's 8-epoch experts matched over 1 expert epoch instead of 2: do "
                            "AST's faster-moving experts need shorter segments?",
          "traj-ipc50-e8": "DATM and FTD at IPC 50 with 8-epoch experts (mtt-experts50's setting), hard and stored "
                           "labels: do they follow MTT above random there?",
          "segment-seed1-e8": "ast-segment-e8's mtt-e8-x1 (1 matched expert epoch, the best IPC-10 set) with "
                              "synthesis seed 1: is its lead over MTT's 2 epochs more than the synthesis spread?",
          "segment50-e8": "mtt-experts50's mtt-e8 at IPC 50 matched over 1 expert epoch instead of 2",
          "ast50-e8": "AST (shq) at IPC 50 with its own 8-epoch experts and mtt-experts50's IPC-50 settings",
          "datm-ablate-e8": "why DATM trails MTT at IPC 10 with 8-epoch experts: MTT's image lr, and 1 matched "
                            "expert epoch",
          "segment-ipc1-e8": "traj-ipc1-e8's MTT and DATM rows at IPC 1 matched over 1 expert epoch instead of 2",
          "segment-seed2-e8": "MTT at IPC 10 matched over 1 and over 2 expert epochs with a third synthesis seed",
          "tesla-e8-ipc1": "TESLA at IPC 1 with 8-epoch experts (traj-ipc1-e8's MTT settings): its exact "
                           "constant-memory gradient and its reference code's first-order one, hard labels",
          "tesla-e8-ipc10": "TESLA at IPC 10 with 8-epoch experts (traj-labels-e8's MTT settings): exact and "
                            "first-order gradients, hard labels",
          "tesla-e8-ipc50": "TESLA at IPC 50 with 8-epoch experts (mtt-experts50's MTT settings): exact and "
                            "first-order gradients, hard labels",
          "traj-e30": "traj-labels-e8 with 30-epoch experts (the full tier's length, starts in [0, 20)): "
                      "TESLA's expert labels and 1 vs 2 matched expert epochs",
          "traj-e30-window": "traj-e30's MTT with 4x the iterations, and with starts in [0, 10): iterations or start "
                             "window?",
          "dsa-eval": "the matching tier's DC, DSA, DM and DataDAM sets (re-made from its settings) and random subsets "
                      "with students trained under DSA augmentation (DSA's protocol: 1000 / 500 / 300 epochs), each "
                      "also scored without it, and DC and DSA at IPC 10 with 30 and 60 outer iterations instead of "
                      "4: does DSA's evaluation restore the papers' DSA >= DC order?",
          "edc-flat": "EDC with its code's flatness term (the reverse KL averaged over classes; ddkit's older term "
                      "was about 10x stronger), beside EDC without flatness and RDED, IPC 1/10/50, both students",
          "convnet-p3": "the matching CPU tier's DC, DSA, DM and DataDAM with the papers' ConvNet (first "
                        "conv padded by 3 on 28x28 images, 4x4 final maps instead of ddkit's 3x3) as synthesis "
                        "network and student",
          "learned-lr-e8": "MTT's evaluation: students trained with the set's learned lr (protocol learned_lr) "
                           "instead of the DC protocol's 0.01, MTT at IPC 10 with 8-epoch experts",
          "zca-e8": "MTT at IPC 10 with ZCA-whitened 8-epoch experts, its sets evaluated on whitened images as MTT "
                    "does (protocol zca), beside plain MTT and random under the same whitened protocol",
          "zca-e8-plain": "zca-e8's sets and random evaluated on plain images (ddkit's evaluation of ZCA sets before "
                          "the protocol field zca)",
          "zca-e8-ipc1": "zca-e8 at IPC 1 (traj-ipc1-e8's MTT settings): MTT with plain and with ZCA-whitened experts, "
                         "evaluated on whitened images",
          "zca-e8-ipc1-plain": "zca-e8-ipc1's sets and random evaluated on plain images"}

# The supplementary runs of the matching family (its experts, methods and DC protocol); every other one
# is the decoupled family's (its teacher, methods and soft-label protocol). matching.py and decoupled.py
# offer only their own family's runs under --family, fashion_mnist.py all of them.
MATCHING_EXTRAS = ("mtt-steps", "mtt-steps50", "mtt-iters50", "mtt-experts50", "traj-labels", "traj-labels-e8",
                   "traj-ipc1-e8", "traj-flat-e8", "ast-ablate-e8", "traj-ipc1-flat-e8", "traj-flat-e8-seed1",
                   "ast-segment-e8", "traj-ipc50-e8", "segment-seed1-e8", "segment50-e8", "ast50-e8", "datm-ablate-e8",
                   "segment-ipc1-e8", "segment-seed2-e8", "tesla-e8-ipc1", "tesla-e8-ipc10",
                   "tesla-e8-ipc50", "traj-e30", "traj-e30-window", "dsa-eval", "convnet-p3", "learned-lr-e8", "zca-e8",
                   "zca-e8-plain", "zca-e8-ipc1", "zca-e8-ipc1-plain")


# named groups of supplementary runs, and the family whose script runs them (decoupled.py defines the runs)
GROUP_FAMILY = {"one-protocol": "decoupled"}


def extra_family(name: str) -> str:
    """The family (of FAMILIES) supplementary run ``name`` belongs to."""
    return "matching" if name in MATCHING_EXTRAS else "decoupled"


PUBLISHED = FASHION_MNIST  # the DC and DSA papers' numbers (see _published)
# the evaluation behind each published number (the DC paper scored its random subsets as its DC sets)
PAPER_PROTOCOLS = {"dc": "dc-protocol", "dsa": "dsa-protocol", "random": "dc-protocol"}
# what a row may change from the papers' ConvNet-3 and still stand beside their number: the cpu tier's
# width and first-conv padding (its epochs too); fashion-mnist.md's Tiers paragraph states them
TIER_CHANGES = ("width", "first_padding")
WHOLE_DATASET = 93.5  # ConvNet-3 on all 60k images, DC paper Table 1
# the EDC ablation rows of the decoupled configs (EDC Fig. 1 steps), kept out of the main tables
ABLATION = ("edc-A", "edc-AB", "edc-ABD", "edc-ABDF")


def main_rows(rows: list[dict], student: str, mode: str) -> list[dict]:
    """The rows of one student and label mode, ablation rows left out: one main table."""
    return [r for r in rows if r["student"] == student and r["label_mode"] == mode and r["method"] not in ABLATION]


def config_path(family: str, tier: str) -> Path:
    return ROOT / "configs" / "bench" / f"fashion-mnist-{family}{'-cpu' if tier == 'cpu' else ''}.yaml"


def run_family(family: str, tier: str, device: str | None = None, quiet: bool = False) -> tuple[list[dict], Path]:
    """Run (or resume) one family's matrix; returns its rows and run directory."""
    cfg = load_bench_config(config_path(family, tier))
    if device:
        cfg.device = device
    from ddkit.cli import BenchBars

    bars = BenchBars(not quiet, desc=f"{family} cells")
    try:
        rows = run_bench(cfg, progress=bars.cell, stage_progress=bars.stage)
    finally:
        bars.close()
    return rows, Path(cfg.out)


_pm = summary_text  # mean ± std in %, the mean alone for one seed


def _pub(method: str, ipc: int) -> str:
    p = PUBLISHED.get(method, {}).get(ipc)
    return f"{p[0]:.1f} ± {p[1]:.1f}" if p else "–"


def _seconds(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def papers_evaluation(method: str, protocol: ProtocolConfig) -> bool:
    """Whether students of hard-label ``protocol`` train as those behind ``method``'s published number did:
    the paper's protocol (:data:`PAPER_PROTOCOLS`: augmentation, optimizer, schedule, batch, no ZCA, no
    learned lr) but for its epochs, and a ConvNet-3 that differs from the papers' only in
    :data:`TIER_CHANGES`."""
    paper = resolve_protocol(PAPER_PROTOCOLS[method])
    train = dataclasses.replace(protocol.train, epochs=paper.train.epochs)
    return (all(getattr(protocol, k) == getattr(paper, k) for k in ("zca", "learned_lr"))
            and to_dict(train) == to_dict(paper.train)
            and set(network_differences(protocol.student, protocol.student_options)) <= set(TIER_CHANGES))


def published_cells(table: dict) -> Callable[[str, str, int, str], str]:
    """``(method, student, ipc, label_mode) -> cell`` for the rows of bench ``table``: the published
    number of ``method`` at ``ipc`` where the row has hard labels (the papers' numbers are of hard labels)
    and its students trained as the paper's (:func:`papers_evaluation` of the cell's protocol, from the
    table's config), else –."""
    config = functools.cache(lambda: from_dict(BenchConfig, table["config"]))  # needed by a published method only

    def cell(method: str, student: str, ipc: int, label_mode: str) -> str:
        if label_mode != "hard" or ipc not in PUBLISHED.get(method, {}):
            return "–"
        return _pub(method, ipc) if papers_evaluation(method, config().protocol_for(student, "hard", ipc=ipc)) else "–"

    return cell


def full_reference(rows: list[dict]) -> list[str]:
    """The full-data reference line, each student's own: a bench with two students has two, named."""
    refs: list[tuple[str, dict]] = []  # (student, reference), distinct, in row order
    for r in rows:
        if r.get("full_hard") and (r["student"], r["full_hard"]) not in refs:
            refs.append((r["student"], r["full_hard"]))
    if not refs:
        return []
    epochs = {f"{full.get('epochs', '?')} epochs" for _, full in refs}
    published = f"(published whole-dataset ConvNet-3, 300 epochs: {WHOLE_DATASET})."
    if len(refs) == 1:
        return ["", f"Full-data reference (same student, hard labels, {epochs.pop()}): "
                    f"{100 * refs[0][1]['mean']:.2f} % {published}"]
    each = ", ".join(f"{student} {100 * full['mean']:.2f} %"
                     + ("" if len(epochs) == 1 else f" ({full.get('epochs', '?')} epochs)") for student, full in refs)
    return ["", f"Full-data reference (each row's own student, hard labels"
                f"{', ' + epochs.pop() if len(epochs) == 1 else ''}): {each} {published}"]


def family_markdown(family: str, tier: str, table: dict) -> str:
    """Tables of one family: every cell, the EDC ablation and cross-architecture accuracy."""
    rows = table["rows"]
    cfg = table["config"]
    options = cfg.get("student_options") or {}
    lines = [f"## {family} family ({tier} tier)", "",
             f"Config: `{config_path(family, tier).relative_to(ROOT)}`; label mode(s) {', '.join(cfg['label_modes'])}; "
             f"student seeds {cfg['seeds']}; " + (f"student options `{options}`; " if options else "")
             + f"protocol `{cfg['protocol']}` with overrides "
             f"`{cfg['overrides']}` and per-IPC overrides `{cfg.get('ipc_overrides', {})}`. Accuracies: top-1 % on the "
             "10k test images, mean ± std over student seeds, final epoch. `random` = a stratified random real subset "
             "of the same IPC under the identical protocol and seeds; IOR = method − random (points); HLR = full-data "
             "hard − distilled hard (points). Synthesis s leaves out building the cached teacher statistics or expert "
             "buffer that every set of the same teacher or expert recipe shares; shared s is what building those took. "
             "Where shared s is – the run predates that split, and synthesis s of the first set made for a teacher or "
             "expert recipe includes it. Synthesis s marked (resumed) counts only the time after the set's synthesis "
             "resumed from an interrupted run's checkpoints. Published (FMNIST): the DC/DSA papers' number where the "
             "row's students train as theirs did (hard labels, the paper's protocol but for its epochs, a ConvNet-3 "
             "of any width and first-conv padding), else –. Peak MiB: 2^20 bytes.", "",
             "| method | IPC | student | labels | accuracy % | random % | IOR | HLR | published (FMNIST) | synthesis s "
             "| shared s | peak MiB | image B | label B |",
             "|---|---:|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    published = published_cells(table)
    for r in rows:
        syn = r["synthesis"]
        ior = f"{100 * r['ior']['mean']:+.2f}" if r.get("ior") else "–"
        hlr = f"{100 * r['hlr']['mean']:.2f}" if r.get("hlr") else "–"
        pub = (published(r["method_name"], r["student"], r["ipc"], r["label_mode"])
               if r["method"] == r["method_name"] else "–")
        lines.append(f"| {r['method']} | {r['ipc']} | {r['student']} | {r['label_mode']} | {_pm(r['acc'])} | "
                     f"{_pm(r['random'])} | {ior} | {hlr} | {pub} | {synthesis_cell(r, 1)} | "
                     f"{_seconds(syn.get('shared_seconds'))} | {_mib(syn['peak_memory_bytes'])} | "
                     f"{r['bytes']['images']:,} | {r['bytes']['labels']:,} |")
    lines += full_reference(rows)
    ablation = [r for r in rows if r["method"] in ABLATION or (r["method"] == "edc" and any(
        x["method"] in ABLATION for x in rows))]
    if ablation:
        ipc = min(r["ipc"] for r in ablation if r["method"] in ABLATION)
        lines += ["", f"### EDC ablation (IPC {ipc}, knobs added one by one as in EDC Fig. 1)", "",
                  "| step | knobs | student | accuracy % | vs random |", "|---|---|---|---|---:|"]
        steps = {"edc-A": "G-VBSM's core in EDC's loop: backbones, BN + conv statistics, noise init (not the "
                          "`gvbsm` preset: logit matching, conv dropout, densification and all-slot batches off)",
                 "edc-AB": "+ real-image init (RDED output; iterations not halved)",
                 "edc-ABD": "+ flatness regularisation",
                 "edc-ABDF": "+ soft category-aware matching (alpha 0.5)", "edc": "+ weak augmentation (= EDC)"}
        for key, text in steps.items():
            for r in rows:
                if r["method"] == key and r["ipc"] == ipc:
                    gain = f"{100 * r['ior']['mean']:+.2f}" if r.get("ior") else "–"
                    lines.append(f"| {key} | {text} | {r['student']} | {_pm(r['acc'])} | {gain} |")
    cross = [r for r in rows if r.get("cross_arch") and r["method"] not in ABLATION]
    if cross:
        students = sorted({s for r in cross for s in r["cross_arch"]})
        lines += ["", "### Cross-architecture accuracy (same distilled set, each student)", "",
                  "| method | IPC | " + " | ".join(students) + " |", "|---|---:|" + "---:|" * len(students)]
        seen = set()
        for r in cross:
            if (r["method"], r["ipc"]) in seen:
                continue
            seen.add((r["method"], r["ipc"]))
            lines.append(f"| {r['method']} | {r['ipc']} | " + " | ".join(
                f"{100 * r['cross_arch'][s]:.2f}" if s in r["cross_arch"] else "–" for s in students) + " |")
    robust = [r for r in rows if r.get("aug_acc")]
    if robust:
        lines += ["", f"### With and without augmentation (the same students' seeds; `robust_scores`, augmentation "
                      f"`{cfg.get('ars_augment', 'dsa')}` where the protocol has none)", "",
                  "| method | IPC | student | labels | with aug % | random with aug % | without aug % | random "
                  "without aug % | gain from aug | ARS |", "|---|---:|---|---|---|---|---|---|---:|---:|"]
        for r in robust:
            # left out, as ARS, where students diverged: their NaN/inf outputs count as wrong
            diverged = r["aug_acc"].get("diverged") or r["noaug_acc"].get("diverged")
            gain = "–" if diverged else f"{100 * (r['aug_acc']['mean'] - r['noaug_acc']['mean']):+.2f}"
            ars = f"{r['ars']['mean']:.3f}" if r.get("ars") else "–"  # left out where students diverged
            lines.append(f"| {r['method']} | {r['ipc']} | {r['student']} | {r['label_mode']} | {_pm(r['aug_acc'])} | "
                         f"{_pm(r['aug_random'])} | {_pm(r['noaug_acc'])} | {_pm(r['noaug_random'])} | {gain} | "
                         f"{ars} |")
    for student in dict.fromkeys(r["student"] for r in rows):
        for mode in dict.fromkeys(r["label_mode"] for r in rows):
            main = main_rows(rows, student, mode)
            if main:
                lines += ["", f"Student {student}, label mode `{mode}`. "
                          + "\n".join(findings(main, sorted({r['ipc'] for r in main})))]
    versions = rows[0]["versions"] if rows else {}
    hashes = sorted({r["protocol_hash"][:12] for r in rows})
    lines += ["", f"Protocol hashes: {', '.join(hashes)}. Versions: {versions}."]
    teachers = sorted({r["teacher_sha"][:12] for r in rows if r.get("teacher_sha")})
    threads = sorted({r["torch_threads"] for r in rows if r.get("torch_threads")})
    if teachers or threads:  # cells recorded these from 2026-12-03 on
        lines.append(f"Teacher weights sha: {', '.join(teachers) or '–'}; torch threads per cell: "
                     f"{', '.join(map(str, threads)) or '–'} (both change the numbers).")
    lines.append("")
    return "\n".join(lines)


def used_device(device: str | None, config_device: str) -> dict:
    """The device a run used (``--device``, else the config's, ``auto`` resolved) and, on CUDA, its name."""
    import torch

    from ddkit.distributed import resolve_device

    dev = resolve_device(device or config_device)
    return {"device": str(dev), **({"device_name": torch.cuda.get_device_name(dev)} if dev.type == "cuda" else {})}


def write_family(family: str, tier: str, run_dir: Path, results: Path, command_line: str | None = None,
                 device: str | None = None) -> Path:
    """``command_line``: the command that ran it (recorded in the JSON); ``device``: its ``--device``."""
    import os
    import platform

    from ddkit.report import write_report

    table = read_json(run_dir / "bench.json", "bench table")
    table["command"] = command_line or f"python benchmarks/fashion_mnist.py --tier {tier} --family {family}"
    table["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "config_device": table["config"]["device"], **used_device(device, table["config"]["device"])}
    stem = f"{family}-fashion-mnist-{tier}"
    write_results(results / f"{stem}.json", table, family_markdown(family, tier, table))
    write_report(run_dir, results / f"{stem}-report")
    return results / f"{stem}.md"


def findings(rows: list[dict], ipcs: list[int]) -> list[str]:
    """Plain statements read off the table (so they stay true when it is re-run)."""
    out = ["What the table says (computed from it):"]
    for ipc in ipcs:
        cells = [r for r in rows if r["ipc"] == ipc and r["method"] != "random"]
        if not cells:
            continue
        best = max(cells, key=lambda r: r["acc"]["mean"])
        # "below random": the method's mean is under the random subset's by more than their stds together
        below = [r["method"] for r in cells if r.get("random") and
                 r["acc"]["mean"] + r["acc"]["std"] + r["random"]["std"] < r["random"]["mean"]]
        ties = [r["method"] for r in cells if r.get("random") and r["method"] not in below and
                abs(r["acc"]["mean"] - r["random"]["mean"]) <= r["acc"]["std"] + r["random"]["std"]]
        line = f"- IPC {ipc}: best {best['method']} ({_pm(best['acc'])} %)"
        if below:
            line += f"; below the random subset: {', '.join(below)}"
        if ties:
            line += f"; within the sum of their stds of random: {', '.join(ties)}"
        out.append(line + ".")
        edc = next((r for r in cells if r["method"] == "edc"), None)
        if edc is not None:
            beaten = [r["method"] for r in cells if r["method"] != "edc" and r["acc"]["mean"] > edc["acc"]["mean"]]
            out.append(f"  EDC {'is the best of its family' if not beaten else 'is beaten by ' + ', '.join(beaten)} "
                       f"and {'beats' if edc['acc']['mean'] > edc['random']['mean'] else 'does not beat'} random "
                       f"({_pm(edc['acc'])} vs {_pm(edc['random'])}).")
    return out


def _student_table(family: str, tier: str, student: str, mode: str, main: list[dict],
                   published: Callable[[str, str, int, str], str]) -> list[str]:
    """One student's and label mode's table of a tier; ``published``: :func:`published_cells` of its bench table."""
    ipcs = sorted({r["ipc"] for r in main})
    methods = list(dict.fromkeys(r["method"] for r in main))
    out = [f"## {family} family, {tier} tier — student {student}, label mode `{mode}`", "",
           "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " | published (hard) | synthesis s (sum) |",
           "|---|" + "---|" * len(ipcs) + "---|---:|"]
    for m in methods:
        cells = {r["ipc"]: r for r in main if r["method"] == m}
        accs = " | ".join(_pm(cells[i]["acc"]) if i in cells else "–" for i in ipcs)
        pubs = [published(m, student, i, mode) for i in ipcs]
        pub = " / ".join(pubs) if any(p != "–" for p in pubs) else "–"
        syn = sum(synthesis_seconds(c) for c in cells.values())
        out.append(f"| {m} | {accs} | {pub} | {syn:.0f} |")
    return out + [""] + findings(main, ipcs) + [""]


def _derives_from(config: Path, ancestor: Path) -> bool:
    """Whether bench config ``config`` is ``ancestor`` or reaches it through its chain of ``base:`` files."""
    seen: set[Path] = set()
    while config.is_file() and config.resolve() not in seen:
        if config.resolve() == ancestor.resolve():
            return True
        seen.add(config.resolve())
        ref = load_yaml(config).get("base")
        if not isinstance(ref, str):
            return False
        config = config.parent / ref
    return False


def _student_training(config: Path, student: str, ipcs: list[int]) -> dict[int, dict]:
    """How bench config ``config`` trains hard-label ``student``s at each of ``ipcs``: its protocol's
    training settings (epochs, optimizer, augmentation, precision...), student options, and whether
    the lr is the set's learned one (``learned_lr``), and whether students train on ZCA-whitened images
    (``zca``, ``zca_reg``: a whitened set is scored against a whitened random subset)."""
    cfg = load_bench_config(config)
    protocols = {i: cfg.protocol_for(student, "hard", ipc=i) for i in ipcs}
    return {i: {"train": to_dict(p.train, identity=True), "student_options": p.student_options,
                "learned_lr": p.learned_lr, "zca": p.zca, "zca_reg": p.zca_reg if p.zca else None}
            for i, p in protocols.items()}


def best_sets(results: Path, family: str = "matching", configs: Path = ROOT / "configs" / "bench") -> list[str]:
    """Each method's best set per IPC over a family's cpu tier and the supplementary runs built on its config.

    Only runs whose bench config names the tier's config through ``base:`` count (same data and student),
    only at the IPCs where they train students as the tier does (a run that changes the epochs, the
    augmentation, the precision or trains with the learned lr is left out there), and only the tier's
    label mode and student (a run without rows of them is not listed). Each
    cell gives the set's accuracy, its gain over the random subset of the same run (IOR), its label and
    run, and how many sets of that method and IPC were run: the best of several configurations, each one
    synthesis seed, is an optimistic number.
    """
    tier_path = results / f"{family}-fashion-mnist-cpu.json"
    if not tier_path.is_file():
        return []
    tier_rows = read_json(tier_path)["rows"]
    if not tier_rows:
        return []
    student, mode = tier_rows[0]["student"], tier_rows[0]["label_mode"]
    ancestor = configs / f"fashion-mnist-{family}-cpu.yaml"
    sources = [(f"{family} tier", tier_rows, ancestor)] + [
        (name, read_json(results / f"{name}-fashion-mnist-cpu.json")["rows"],
         configs / f"fashion-mnist-{name}-cpu.yaml")
        for name in EXTRAS if (results / f"{name}-fashion-mnist-cpu.json").is_file()
        and _derives_from(configs / f"fashion-mnist-{name}-cpu.yaml", ancestor)]
    methods = list(dict.fromkeys(r["method_name"] for r in tier_rows if r["method_name"] != "random"))
    ipcs = sorted({r["ipc"] for r in tier_rows})
    tier_training = _student_training(ancestor, student, ipcs)
    tried: dict[tuple[str, int], list[tuple[dict, str]]] = {}
    randoms: dict[int, list[float]] = {}
    counted = []
    for name, rows, path in sources:
        training = _student_training(path, student, ipcs)
        same = {i for i in ipcs if training[i] == tier_training[i]}
        if same and any(r["student"] == student and r["label_mode"] == mode for r in rows):
            counted.append(name)  # a run of other students or label modes only (convnet-p3) has nothing here
        for r in rows:
            if (r["label_mode"] != mode or r["student"] != student or r["method"] in ABLATION
                    or r["ipc"] not in same):
                continue
            if r["method_name"] == "random":
                randoms.setdefault(r["ipc"], []).append(100 * r["acc"]["mean"])
            elif r["method_name"] in methods:
                tried.setdefault((r["method_name"], r["ipc"]), []).append((r, name))
    best = {key: max(sets, key=lambda x: x[0]["acc"]["mean"]) for key, sets in tried.items()}
    out = [f"## {family} family, cpu scale — each method's best set (tier and supplementary runs)", "",
           f"Student {student}, label mode `{mode}`, the tier's per-IPC protocol; runs counted: "
           f"{', '.join(counted)} (every bench config built on the tier's through `base:`, at the IPCs where it "
           "trains students as the tier does). "
           "Cell: accuracy % (IOR: points over the random subset of the same run; set label, run; sets of that "
           "method and IPC run). The best of several configurations, each from one synthesis seed, is optimistic; "
           "the tier table above is the like-for-like one.", "",
           "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |", "|---|" + "---|" * len(ipcs)]
    for m in methods:
        cells = []
        for i in ipcs:
            if (m, i) not in best:
                cells.append("–")
                continue
            r, name = best[m, i]
            ior = f"{100 * r['ior']['mean']:+.2f}" if r.get("ior") else "–"
            cells.append(f"{_pm(r['acc'])} ({ior}; `{r['method']}`, {name}; {len(tried[m, i])})")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "What the table says (computed from it):"]
    for i in ipcs:
        ranked = sorted((m for m in methods if (m, i) in best), key=lambda m: -best[m, i][0]["acc"]["mean"])
        if not ranked:
            continue
        order = " > ".join(f"{m} {100 * best[m, i][0]['acc']['mean']:.2f}" for m in ranked)
        spread = randoms.get(i, [])
        rand = f"; random rows of these runs {min(spread):.2f}-{max(spread):.2f}" if spread else ""
        out.append(f"- IPC {i}: {order}{rand}.")
    return out + [""]


def _cpu_runs(results: Path, runs: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    """The ``runs`` whose cpu-tier table is in ``results``, and their rows one after another."""
    found = [n for n in runs if (results / f"{n}-fashion-mnist-cpu.json").is_file()]
    return found, [r for n in found for r in read_json(results / f"{n}-fashion-mnist-cpu.json")["rows"]]


def _run_links(found: list[str]) -> str:
    return ", ".join(f"[{n}]({n}-fashion-mnist-cpu.md)" for n in found)


# the decoupled family under ONE protocol: every method of the tier, teacher soft labels, long student training
SINGLE_PROTOCOL = ("decoupled-long1", "decoupled-long10", "decoupled-long50",
                   "edc-lr002-long1", "edc-lr002-long10", "edc-lr002-long50")  # the last three: more EDC rows


def single_protocol(results: Path, runs: tuple[str, ...] = SINGLE_PROTOCOL) -> list[str]:
    """The decoupled family's answer table: every method's set beside the random subset of the same run,
    per student and IPC, from the ``runs`` that evaluate every method under one protocol (one run per
    IPC, each IPC with its own student epochs). Cell: accuracy % and IOR. Findings name, per IPC, the
    best set, the best EDC configuration (rows whose method is ``edc``), and whether it leads the family
    and beats random by more than the two stds together."""
    found, rows = _cpu_runs(results, runs)
    if not rows:
        return []
    ipcs = sorted({r["ipc"] for r in rows})
    out = ["## decoupled family under one protocol — every method at IPC " + " / ".join(map(str, ipcs)), "",
           f"Runs: {_run_links(found)} (decoupled-long<IPC> and the runs that add rows in its folder: the "
           "same teachers, observer pool and soft-kl protocol with teacher soft labels, students trained long enough "
           "to converge at CPU scale). Cell: accuracy % mean ± std over student seeds (IOR: points over the random "
           "subset of the same run and seeds). `edc` is EDC's own recipe; `edc-real-lr002-r18` / "
           "`edc-s05-lr002-r18` are ddkit's EDC configurations for this scale (whole real images / RDED's larger crops "
           "as initialisation, image lr 0.002, a ResNet-18 observer in the pool). The baseline row draws a random real "
           "subset per student seed; `random` is the random method's one set. \"Best EDC\" is the best of the EDC rows "
           "at that IPC (up to five configurations, each one synthesis seed): a selection, so slightly optimistic.", ""]
    for student in dict.fromkeys(r["student"] for r in rows):
        mine = [r for r in rows if r["student"] == student and r["method"] not in ABLATION]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        out += [f"Student {student}:", "", "| set | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
                "|---|" + "---|" * len(ipcs)]
        rnd = {r["ipc"]: r["random"] for r in mine if r.get("random")}
        out.append("| random subset (baseline) | " + " | ".join(_pm(rnd.get(i)) for i in ipcs) + " |")
        for m in methods:
            cells = {r["ipc"]: r for r in mine if r["method"] == m}
            out.append(f"| {m} | " + " | ".join(
                f"{_pm(cells[i]['acc'])} ({100 * cells[i]['ior']['mean']:+.2f})" if i in cells and cells[i].get("ior")
                else (_pm(cells[i]["acc"]) if i in cells else "–") for i in ipcs) + " |")
        out += ["", "What the table says (computed from it):"]
        for i in ipcs:
            sets = [r for r in mine if r["ipc"] == i and r["method_name"] != "random"]
            edcs = [r for r in sets if r["method_name"] == "edc"]
            if not sets or not edcs:
                continue
            best = max(sets, key=lambda r: r["acc"]["mean"])
            edc = max(edcs, key=lambda r: r["acc"]["mean"])
            others = [r for r in sets if r["method_name"] != "edc"]
            rival = max(others, key=lambda r: r["acc"]["mean"]) if others else None
            gap = edc["acc"]["mean"] - edc["random"]["mean"]
            clear = gap > edc["acc"]["std"] + edc["random"]["std"]
            verdict = ("beats random by more than the stds together" if clear else
                       "above random, inside the stds" if gap > 0 else "does not beat random")
            lead = ("leads the family" if rival is None or edc["acc"]["mean"] >= rival["acc"]["mean"] else
                    f"is behind {rival['method']} ({_pm(rival['acc'])})")
            out.append(f"- IPC {i}: best set {best['method']} ({_pm(best['acc'])}); best EDC `{edc['method']}` "
                       f"{_pm(edc['acc'])}, {lead}, {verdict} ({100 * gap:+.2f} against {_pm(edc['random'])}).")
        out.append("")
    return out


# each IPC's closest race of the one-protocol table again with other synthesis seeds:
# IPC -> (the runs holding synthesis seed 0, seed runs -> their distill_seed, the race's sets by their label at seed 0:
# the best EDC set, its rival, then any other set shown)
SeedRace = tuple[tuple[str, ...], dict[str, int], tuple[str, ...]]
SEED_RACES: dict[int, SeedRace] = {
    1: (("decoupled-long1", "edc-lr002-long1"), {"seed1-long1": 1, "seed2-long1": 2},
        ("edc-lr002-r18", "rded", "random")),
    10: (("decoupled-long10",), {"seed1-long10": 1, "seed2-long10": 2}, ("edc-real-lr002-r18", "random")),
    50: (("decoupled-long50",), {"seed1-long50": 1, "seed2-long50": 2}, ("edc-real-lr002-r18", "random")),
}


def synthesis_seeds(results: Path, races: dict[int, SeedRace] = SEED_RACES) -> list[str]:
    """Each IPC's closest race of the one-protocol table (the best EDC set against its nearest rival:
    RDED at IPC 1, the random method's set at IPC 10 / 50) with every synthesis seed run, per student:
    each seed's accuracy, the mean and std over synthesis seeds, and EDC's margin over the rival per
    seed. A seed run labels its sets ``<label>-seed<N>``; an IPC without a seed run is left out."""
    out: list[str] = []
    for ipc, (base, runs, race) in races.items():
        first, rows = _cpu_runs(results, base)
        seeds = {0: [r for r in rows if r["ipc"] == ipc]}
        for run, seed in runs.items():
            found, got = _cpu_runs(results, (run,))
            if found:
                first += found
                seeds[seed] = [{**r, "method": r["method"].removesuffix(f"-seed{seed}")} for r in got
                               if r["ipc"] == ipc]
        if len(seeds) > 1 and seeds[0]:
            out += _seed_race(ipc, first, seeds, race)
    if not out:
        return []
    return ["## The closest races across synthesis seeds", "",
            "Each IPC's closest race of the one-protocol table again with other synthesis seeds, in the run's folder "
            "(its teachers, protocol and student seeds). A synthesis seed draws a new initialisation for EDC (RDED's "
            "crops at IPC 1, a real subset at IPC 10 / 50: the random method's set of that seed), new recover "
            "augmentations and a new random method's set; the baseline row draws its subsets per student seed, so it "
            "is the same at every synthesis seed. Cell: accuracy % mean ± std over student seeds; the last column is "
            "the mean ± std over synthesis seeds of those means.", "", *out]


def _seed_race(ipc: int, runs: list[str], seeds: dict[int, list[dict]], race: tuple[str, ...]) -> list[str]:
    order = sorted(seeds)
    edc, rival = race[0], race[1]
    out = [f"### IPC {ipc}: {edc} against {rival}", "", f"Runs: {_run_links(runs)}.", ""]
    for student in dict.fromkeys(r["student"] for r in seeds[0]):
        cell = {(r["method"], s): r for s in order for r in seeds[s] if r["student"] == student}
        out += [f"Student {student}:", "", "| set | " + " | ".join(f"seed {s}" for s in order) + " | over seeds |",
                "|---|" + "---|" * (len(order) + 1)]
        base = {s: next((r["random"] for r in seeds[s] if r["student"] == student and r.get("random")), None)
                for s in order}
        rnd = base[0]
        out.append("| random subset (baseline) | " + " | ".join(_pm(base[s]) for s in order) + " | |")
        means: dict[str, list[float]] = {}
        for m in race:
            got = [cell.get((m, s)) for s in order]
            means[m] = [100 * r["acc"]["mean"] for r in got if r is not None]
            spread = (f"{statistics.fmean(means[m]):.2f} ± {statistics.pstdev(means[m]):.2f}"
                      if len(means[m]) == len(order) else "–")
            out.append(f"| {m} | " + " | ".join(_pm(r["acc"]) if r else "–" for r in got) + f" | {spread} |")
        if len(means[edc]) == len(means[rival]) == len(order):
            gaps = [a - b for a, b in zip(means[edc], means[rival])]
            out.append(f"| {edc} − {rival} | " + " | ".join(f"{g:+.2f}" for g in gaps)
                       + f" | {statistics.fmean(gaps):+.2f} |")
            above = sum(m > 100 * rnd["mean"] for m in means[edc]) if rnd else 0
            out += ["", f"- {edc} is ahead of {rival} on {sum(g > 0 for g in gaps)} of {len(gaps)} synthesis seeds "
                        f"(margin {statistics.fmean(gaps):+.2f} ± {statistics.pstdev(gaps):.2f} points over seeds) and "
                        f"above the random subset baseline on {above} of {len(gaps)}."]
        out.append("")
    return out


# EDC's design steps added one by one under the one protocol (the tier's own ablation trains students briefly)
EDC_STEP_RUNS = ("edc-build1", "edc-build10", "edc-build50", "edc-lr002-long1", "edc-lr002-long10", "edc-lr002-long50")
EDC_STEPS = {  # row -> (what it is, the row it adds one change to)
    "gvbsm": ("G-VBSM's own preset", None),
    "edc-A": ("A: G-VBSM's core in EDC's loop (noise init; unlike `gvbsm`, no logit matching, conv dropout, "
              "densification or all-slot batches)", None),
    "edc-AB": ("+ B: real-image init (RDED's output; iterations not halved)", "edc-A"),
    "edc-ABD": ("+ D: flatness regularisation", "edc-AB"),
    "edc-ABDF": ("+ F: soft category-aware matching", "edc-ABD"),
    "edc": ("+ G: weak crops = EDC's recipe (image lr 0.05)", "edc-ABDF"),
    "edc-lr002-d2d4": ("EDC's recipe with image lr 0.002", "edc"),
    "edc-lr002-r18": ("... and a ResNet-18 observer", "edc-lr002-d2d4"),
    "edc-real": ("EDC's recipe from whole real images", "edc"),
    "edc-real-lr002-d2d4": ("... with image lr 0.002", "edc-real"),
    "edc-real-lr002-r18": ("... and a ResNet-18 observer (ddkit's IPC 10 / 50 configuration)", "edc-real-lr002-d2d4"),
    "edc-s05-lr002-r18": ("from RDED's larger crops, lr 0.002, ResNet-18 observer (ddkit's IPC 1 configuration)", None),
    "rded": ("RDED (EDC's initialisation)", None),
    "random": ("the random method's subset (edc-real's initialisation)", None),
}


def edc_steps(results: Path, runs: tuple[str, ...] = EDC_STEP_RUNS) -> list[str]:
    """EDC's steps added one by one (EDC Fig. 1), then ddkit's changes, per student and IPC, from the
    ``runs`` that evaluate them under the one protocol. Cell: accuracy % and, for a step, its change
    from the row it adds to; findings name each IPC's largest step."""
    found, rows = _cpu_runs(results, runs)
    rows = [r for r in rows if r["method"] in EDC_STEPS]
    if not rows:
        return []
    ipcs = sorted({r["ipc"] for r in rows})
    out = ["## EDC's design steps under one protocol", "",
           f"Runs: {_run_links(found)} (the teachers, observer pool and "
           "soft-kl protocol of the one-protocol table above). EDC's synthesis-side steps are added one by one as in "
           "its Fig. 1 (C and E are evaluation-side: the `edc` protocol), then ddkit's changes. Cell: accuracy % "
           "mean ± std over student seeds; in brackets the change from the row above it in the chain.", ""]
    for student in dict.fromkeys(r["student"] for r in rows):
        cell = {(r["method"], r["ipc"]): r for r in rows if r["student"] == student}
        out += [f"Student {student}:", "", "| step | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
                "|---|" + "---|" * len(ipcs)]
        rnd = {r["ipc"]: r["random"] for r in rows if r["student"] == student and r.get("random")}
        out.append("| random subset (baseline) | " + " | ".join(_pm(rnd.get(i)) for i in ipcs) + " |")
        steps: dict[int, list[tuple[float, str]]] = {i: [] for i in ipcs}
        for m, (what, prev) in EDC_STEPS.items():
            if not any((m, i) in cell for i in ipcs):
                continue
            parts = []
            for i in ipcs:
                r, p = cell.get((m, i)), cell.get((prev, i))
                if r is None:
                    parts.append("–")
                elif p is None:
                    parts.append(_pm(r["acc"]))
                else:
                    d = 100 * (r["acc"]["mean"] - p["acc"]["mean"])
                    steps[i].append((d, what))
                    parts.append(f"{_pm(r['acc'])} ({d:+.2f})")
            out.append(f"| `{m}`: {what} | " + " | ".join(parts) + " |")
        out += ["", "What the table says (computed from it):"]
        for i in ipcs:
            if steps[i]:
                d, what = max(steps[i], key=lambda t: abs(t[0]))
                out.append(f"- IPC {i}: largest step {what} ({d:+.2f}); steps within 0.5 point: "
                           f"{sum(abs(x) < 0.5 for x, _ in steps[i])} of {len(steps[i])}.")
        out.append("")
    return out


def overview(results: Path) -> str:
    """``fashion-mnist.md``: one table of every method found, per IPC, with published numbers."""
    out = ["# Fashion-MNIST: every ddkit method at IPC 1 / 10 / 50", "",
           "Produced by `DDKIT_DATA=../shared/data python benchmarks/fashion_mnist.py --tier cpu` (re-run it "
           "when a method lands; finished cells are reused). Published numbers are hard-label ConvNet-3 results from "
           "the DC (ICLR 2021) and DSA (ICML 2021) papers; no other method here reports Fashion-MNIST. They stand only "
           "beside rows whose students train as the paper's did (hard labels; DC's and the random subsets' protocol "
           "without augmentation, DSA's with it; no ZCA, no learned lr; a ConvNet-3), up to the tier's differences "
           "below; elsewhere the column shows –.", "",
           "**Tiers.** `cpu` is the reduced configuration that 2 CPU cores finish in about two hours: ConvNet-3 of "
           "width 32 (papers: 128) with its first conv padded by 1 (the papers' code: 3, `convnet3-p3`) as synthesis "
           "network, experts and student (the decoupled family also trains a "
           "width-8 ResNet-18 student); minutes of synthesis per set "
           "(papers: 1000-20000 iterations); 300 / 150 / 60 student epochs (matching) or 300 / 80 / 30 "
           "(decoupled) at IPC 1 / 10 / 50. It measures every method under one protocol against the random "
           "subset, not a reproduction of the papers: methods that need long optimisation (DC/DSA at IPC 10/50, "
           "the trajectory family) are far from converged, and the published numbers beside them come from "
           "width-128 networks trained to convergence. `full` (configs/bench/fashion-mnist-*.yaml without "
           "`-cpu`) holds the papers' settings for a GPU; its rows appear here once run.", "",
           "**Adapted to 1x28x28 Fashion-MNIST in the full matching tier** (no matching paper but DC/DSA reports it; "
           "configs/bench/fashion-mnist-matching.yaml and configs/fashion-mnist/<method>/ipc<N>.yaml): the papers' "
           "ConvNet-3 as their code builds it for 28x28 inputs (first conv padded by 3, `convnet3-p3`); no ZCA (MTT, "
           "FTD and DATM whiten CIFAR; DC/DSA/DM never did, and none of them whitened Fashion-MNIST); DSA's "
           "augmentation keeps its flips; 50 experts of 30 epochs instead of 100 of 50 (MTT) or 100 (DATM), so "
           "start windows at IPC 1 / 10 / 50 end at 2 / 20 / 29 for MTT, TESLA and FTD (MTT's 2 / 20 / 40) and at "
           "4 / 20 / 29 for DATM (its configs' 4 / 20 / 40), the last cut to what 30-epoch experts can serve; unrolls, "
           "lrs and thresholds are the CIFAR-10 values of each method's configs at the same IPC (FTD: its Table 7, "
           "with GSAM alpha 1 experts at IPC 50), and IPC 50 unrolls on all 500 images; DC starts from noise, as "
           "the DC paper's Table 1 (ddkit's `dc` default: real images); every set is evaluated with DSA's protocol "
           "(1000 epochs, DSA augmentation, student lr 0.01, hard labels), so the trajectory rows measure their "
           "images only: configs/bench/fashion-mnist-matching-learned.yaml evaluates them as their papers do "
           "(learned student lr; DATM's learned soft labels).", ""]
    found = False
    for tier in ("full", "cpu"):
        for family in FAMILIES:
            path = results / f"{family}-fashion-mnist-{tier}.json"
            if not path.is_file():
                continue
            found = True
            table = read_json(path)
            rows, published = table["rows"], published_cells(table)
            # one table per label mode and student architecture (a tier run with several label modes)
            for mode in dict.fromkeys(r["label_mode"] for r in rows):
                for student in dict.fromkeys(r["student"] for r in rows if r["label_mode"] == mode):
                    out += _student_table(family, tier, student, mode, main_rows(rows, student, mode), published)
            out += [f"Details, ablation, cross-architecture, bytes and memory: [{family}-fashion-mnist-{tier}.md]"
                        f"({family}-fashion-mnist-{tier}.md); plots and image grids: "
                        f"[{family}-fashion-mnist-{tier}-report/report.md]"
                        f"({family}-fashion-mnist-{tier}-report/report.md).", ""]
            if family == "decoupled" and tier == "cpu" and _cpu_runs(results, SINGLE_PROTOCOL)[0]:
                out += ["This tier trains students briefly (300 / 80 / 30 epochs at IPC 1 / 10 / 50), too briefly for "
                        "the recovered sets on the ResNet-18 (edc-long50, edc-long10); for whether EDC "
                        "leads its family and beats random, read the table under one long protocol below, which holds "
                        "every method of this tier and ddkit's EDC configurations at every IPC.", ""]
    if not found:
        out.append("No results yet: run the command above.")
    out += single_protocol(results)
    out += synthesis_seeds(results)
    out += edc_steps(results)
    out += best_sets(results)
    extras = [(f"{name}-fashion-mnist-cpu.md", text, f"python benchmarks/fashion_mnist.py --family {name}")
              for name, text in EXTRAS.items()]
    extras.append(("dc-dsa-ipc1-fashion-mnist-cpu.md", "DC and DSA at IPC 1 with a width-128 ConvNet-3 (`convnet3`: "
                   "first conv padded by 1, where the papers' code pads by 3) and the papers' loops and evaluation "
                   "protocols, only the outer iterations reduced: how close 2 CPU cores get to the published numbers",
                   "python benchmarks/dc_dsa.py"))
    extras = [f"- [{md}]({md}): {text} (`{cmd}`)." for md, text, cmd in extras if (results / md).is_file()]
    if extras:
        out += ["## Supplementary runs", ""] + extras + [""]
    return "\n".join(out) + "\n"


def parser(families: tuple[str, ...] = FAMILIES, groups: dict[str, tuple[str, ...]] | None = None,
           description: str | None = None) -> Parser:
    """The command line of a script running ``families``: ``--family`` offers them, their supplementary
    runs and ``groups`` (each listed under --help with what it runs); another family's family, run or
    group is refused naming the script that runs it. ``description``: the script's own (its docstring's
    first line)."""
    groups = groups or {}
    extras = [name for name in EXTRAS if extra_family(name) in families]

    def family(name: str) -> str:  # checked before argparse's list of choices
        owner = (extra_family(name) if name in EXTRAS else name if name in FAMILIES else GROUP_FAMILY.get(name))
        if owner and (owner not in families or name in GROUP_FAMILY) and name not in groups:
            what = (f"the {owner} family" if name == owner else
                    f"a {'run' if name in EXTRAS else 'group of runs'} of the {owner} family")
            raise argparse.ArgumentTypeError(f"{name!r} is {what}; run benchmarks/{owner}.py --family {name}")
        return name

    epilog = ["--family choices:", "  all: " + " then ".join(families) + " (the default)"]
    epilog += [f"  {name}: the {name} family's tier matrix" for name in families]
    epilog += [f"  {name}: runs {', '.join(runs)} in order (cpu tier)" for name, runs in groups.items()]
    epilog += [f"  {name}: {' '.join(EXTRAS[name].split())} (cpu tier)" for name in extras]
    ap = Parser(description=description or __doc__.splitlines()[0], epilog="\n".join(epilog))  # epilog as written
    ap.add_argument("--tier", choices=["cpu", "full"], default="cpu",
                    help="cpu: the reduced 2-core configuration; full: the papers' settings (GPU)")
    ap.add_argument("--family", type=family, choices=[*families, *extras, *groups, "all"], default="all",
                    metavar="FAMILY", help="what to run (default all); the choices are listed below")
    ap.add_argument("--results", default=str(ROOT / "docs" / "results"),
                    help="folder for the JSON, markdown and reports")
    ap.add_argument("--device", type=device_spec, default=None,
                    help="cpu, cuda, cuda:N or auto (default: the config's 'auto')")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return ap


def check_data(runs: tuple[str, ...], tier: str) -> None:
    """Load every dataset the runs read, so missing data is one error line before any progress bar."""
    from ddkit.data.base import load_dataset

    seen = set()
    for name in runs:
        for dataset in load_bench_config(config_path(name, tier)).datasets:
            if repr(dataset) not in seen:
                seen.add(repr(dataset))
                load_dataset(dataset)


def main(argv: list[str] | None = None, families: tuple[str, ...] = FAMILIES,
         groups: dict[str, tuple[str, ...]] | None = None, script: str = "fashion_mnist",
         description: str | None = None) -> None:
    """Run ``families`` (``--family all``), one family or one of its supplementary runs, or a named group
    of supplementary runs (``groups``: name -> runs, run in order; cpu tier only). Every run's config
    is read before the first starts, and the results folder is made only once a run has finished, so
    bad input (missing data included) leaves nothing behind. ``script``: the file name (no ``.py``) the
    JSON's recorded command names; ``description``: its --help line."""
    groups = groups or {}
    ap = parser(families, groups, description)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.family in groups and args.tier != "cpu":
        ap.error(f"--family {args.family} runs supplementary runs of the cpu tier; drop --tier {args.tier}")
    if args.family in EXTRAS and args.tier != "cpu":
        ap.error(f"--family {args.family} is a supplementary run of the cpu tier; drop --tier {args.tier}")
    results = output_folder(ap, args.results, "--results")
    runs = families if args.family == "all" else groups.get(args.family, (args.family,))
    for family in runs:  # a missing or bad config fails before any run starts
        load_bench_config(config_path(family, args.tier))
    check_data(runs, args.tier)  # missing data too: one line before the first progress bar
    command_line = command(script, argv, data=True)
    for family in runs:
        rows, run_dir = run_family(family, args.tier, args.device, args.quiet)
        results.mkdir(parents=True, exist_ok=True)
        md = write_family(family, args.tier, run_dir, results, command_line, args.device)
        print((results / md).read_text())
    write_text(results / "fashion-mnist.md", overview(results))
    print(f"wrote {results / 'fashion-mnist.md'}")


if __name__ == "__main__":
    run_main(main)
