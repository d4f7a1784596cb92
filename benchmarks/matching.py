"""The matching family (DC, DSA, DM, DataDAM, MTT, TESLA, FTD, DATM, and AST as shq) on Fashion-MNIST at IPC 1 / 10 / 50.

Hard labels, beside random subsets and the DC/DSA papers' numbers: the CPU tier evaluates under the DC
protocol (width-32 ConvNet-3), the full tier under DSA's (1000 epochs with DSA augmentation, the
papers' ConvNet-3 ``convnet3-p3``, 5 student seeds). See
benchmarks/fashion_mnist.py for the outputs; ``--tier cpu`` is the reduced 2-core configuration,
``--tier full`` the papers' settings (GPU). ``--family NAME`` runs one of the family's supplementary
runs of the cpu tier (``--help`` lists them; the decoupled family's are decoupled.py's).

    DDKIT_DATA=../shared/data python benchmarks/matching.py --tier cpu
"""  # noqa: E501 (the first line is the script's --help description)

from _cli import run_main
from fashion_mnist import main

if __name__ == "__main__":
    run_main(lambda: main(families=("matching",), script="matching", description=__doc__.splitlines()[0]))
