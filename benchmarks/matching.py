"""The matching family (DC, DSA, DM, DataDAM, MTT, TESLA, FTD, DATM) on Fashion-MNIST at IPC 1 / 10 / 50.

Hard labels under the DC protocol, beside random subsets and the DC/DSA papers' numbers. See
benchmarks/fashion_mnist.py for the outputs; ``--tier cpu`` is the reduced 2-core configuration,
``--tier full`` the papers' settings (GPU).

    DDKIT_DATA=../shared/data python benchmarks/matching.py --tier cpu
"""

from fashion_mnist import main

if __name__ == "__main__":
    main(families=("matching",))
