"""The decoupled family (SRe2L, CDA, G-VBSM, EDC and its ablation, RDED, DWA, CV-DD) on Fashion-MNIST.

IPC 1 / 10 / 50, teacher soft labels for every method and the random subset alike, synthesis time,
peak memory and image + label bytes; ConvNet-3 and ResNet-18 students (the CPU tier: a width-32
ConvNet-3 and a width-8 ResNet-18). See
benchmarks/fashion_mnist.py for the outputs; ``--tier cpu`` is the reduced 2-core configuration,
``--tier full`` the papers' settings (GPU).

    DDKIT_DATA=../shared/data python benchmarks/decoupled.py --tier cpu

The CPU tier trains students briefly (300 / 80 / 30 epochs). Whether EDC leads its family and beats
random is answered under one long protocol (every method of the tier plus ddkit's EDC configurations,
students trained to convergence at CPU scale), one run per IPC, and EDC's steps added one by one
under the same protocol. ``--family one-protocol`` runs all of them in order (each run takes hours on
2 cores; finished cells are reused) and ``fashion-mnist.md`` assembles their tables; one run alone:

    DDKIT_DATA=../shared/data python benchmarks/decoupled.py --family one-protocol
    DDKIT_DATA=../shared/data python benchmarks/decoupled.py --family decoupled-long1   # also -long10, -long50
    DDKIT_DATA=../shared/data python benchmarks/decoupled.py --family edc-build1        # also -build10, -build50
"""

from _cli import run_main
from fashion_mnist import EDC_STEP_RUNS, SINGLE_PROTOCOL, main

# the runs behind the one-protocol and EDC-steps tables; a run that adds rows in another's folder after it
ONE_PROTOCOL = tuple(dict.fromkeys((*SINGLE_PROTOCOL, *EDC_STEP_RUNS)))

if __name__ == "__main__":
    run_main(lambda: main(families=("decoupled",), groups={"one-protocol": ONE_PROTOCOL}, script="decoupled",
                          description=__doc__.splitlines()[0]))
