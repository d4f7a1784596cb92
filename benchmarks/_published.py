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

# the network behind those numbers: the DC/DSA code's ConvNet-3 for 1x28x28 images, first conv padded by 3
# (feature maps 32 -> 16 -> 8 -> 4); ddkit's convnet3 pads by 1 (28 -> 14 -> 7 -> 3)
PAPERS_NETWORK = "convnet3-p3"


def network_differences(model: str, options: dict | None = None) -> dict[str, tuple]:
    """Where ``model`` built with ``options`` differs from the papers' network (:data:`PAPERS_NETWORK`):
    ``{option: (ours, theirs)}``, e.g. ``{'first_padding': (1, 3)}`` for ``convnet3``; empty for the
    papers' network itself; a model of another family differs in ``model``."""
    from ddkit.models.registry import model_options, resolve_model

    def spec(name: str, given: dict | None) -> tuple[object, dict]:
        factory, implied = resolve_model(name)
        return getattr(factory, "func", factory), {**model_options(factory), **implied, **(given or {})}

    (mine, ours), (paper, theirs) = spec(model, options), spec(PAPERS_NETWORK, None)
    if mine is not paper:
        return {"model": (model, PAPERS_NETWORK)}
    return {k: (ours.get(k), theirs.get(k)) for k in dict.fromkeys([*theirs, *ours]) if ours.get(k) != theirs.get(k)}
