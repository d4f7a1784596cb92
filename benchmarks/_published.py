"""Published Fashion-MNIST numbers that the benchmark tables print beside ddkit's (one copy for every script).

Top-1 %, mean and std, ConvNet-3 (128 wide, instance norm), hard labels: the DC paper (Zhao, Mopuri &
Bilen, ICLR 2021) Table 1 for DC, random subsets and the whole dataset (5 x 20 students), the DSA paper
(Zhao & Bilen, ICML 2021) Table 2 for DSA. No other method ddkit implements reports Fashion-MNIST.
"""

FASHION_MNIST: dict[str, dict[int, tuple[float, float]]] = {
    "dc": {1: (70.5, 0.6), 10: (82.3, 0.4), 50: (83.6, 0.4)},
    "dsa": {1: (70.6, 0.6), 10: (84.6, 0.3), 50: (88.7, 0.2)},
    "random": {1: (51.4, 3.8), 10: (73.8, 0.7), 50: (82.5, 0.7)},
}
FASHION_MNIST_WHOLE_DATASET = 93.5  # the same ConvNet trained on all 60000 images (DC paper, Table 1)
