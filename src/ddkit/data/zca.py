"""ZCA whitening as a dataset transform of the trajectory-matching methods.

KIP, MTT, FTD, TESLA and DATM train their experts and optimise their synthetic images on
ZCA-whitened data. MTT's ``--zca`` (copied by FTD, DATM and AST) loads the images without
normalising them and fits kornia's ``ZCAWhitening`` (regularisation 0.1) on the raw ``[0, 1]``
pixels. ddkit does the same: with ``P`` the pixel-space training images flattened to ``[N, D]``,
``mu`` their mean and ``C = (P - mu)^T (P - mu) / (N - 1) = U diag(s) U^T``::

    whiten(p) = (p - mu) U diag(1 / sqrt(s + eps)) U^T        invert(z) = z U diag(sqrt(s + eps)) U^T + mu

``eps`` (``reg``) keeps the low-variance directions from exploding; it is added in pixel units, so
its effect does not depend on the dataset's normalisation (fitting on normalised images, as ddkit
did before revision 2 of the trajectory methods, amounts to ``eps * std**2``: about 8x weaker on
Fashion-MNIST than MTT's). ddkit's pipeline hands models normalised images, so the transform is
called on normalised images and folds the normalisation into its matrices: ``zca(x)`` equals
``whiten(x * std + mean)``. ddkit stores distilled images in pixel space, so a method that works in
whitened space maps its images back with :meth:`ZCA.invert` (which returns normalised images) and
every evaluation protocol can read them.
"""

from __future__ import annotations

import torch

from ddkit.data.base import ImageSet
from ddkit.errors import ConfigError


def check_reg(reg: float) -> None:
    """ConfigError unless the ZCA regularisation ``reg`` (config key ``zca_reg``) is positive."""
    if reg <= 0:
        raise ConfigError(f"zca_reg must be > 0, got {reg}")


class ZCA:
    """A fitted whitening: call it on normalised images ``[B, C, H, W]``; :meth:`invert` undoes it.

    ``mean`` is the training images' mean in normalised units; ``whiten`` / ``unwhiten`` act on
    flattened normalised images (pixel-space ZCA with the normalisation folded in).
    """

    def __init__(self, mean: torch.Tensor, whiten: torch.Tensor, unwhiten: torch.Tensor, reg: float) -> None:
        self.mean, self.whiten, self.unwhiten, self.reg = mean, whiten, unwhiten, reg
        self._moved: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def _on(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The matrices on ``like``'s device and dtype, copied there once (the transform runs on every
        training batch: a D x D copy per batch, 38 MB on CIFAR, made the host wait for the GPU each time)."""
        key = (like.device, like.dtype)
        if key not in self._moved:
            self._moved[key] = {name: getattr(self, name).to(like.device, like.dtype)
                                for name in ("mean", "whiten", "unwhiten")}
        return self._moved[key]

    @classmethod
    @torch.no_grad()
    def fit(cls, data: ImageSet, mean, std, reg: float = 0.1, batch_size: int = 8192) -> ZCA:
        """Fit on ``data`` (pixel-space images) in pixel space, as MTT; ``mean``/``std`` are the
        normalisation the returned transform's inputs carry. Float64 sums."""
        check_reg(reg)
        n = len(data)
        if n < 2:
            raise ConfigError("ZCA needs at least 2 training images")
        c, h, w = data.images.shape[1:]
        d = c * h * w
        total = torch.zeros(d, dtype=torch.float64)
        outer = torch.zeros(d, d, dtype=torch.float64)
        for lo in range(0, n, batch_size):
            p = data.subset(torch.arange(lo, min(n, lo + batch_size))).float_images().double().reshape(-1, d)
            total += p.sum(0)
            outer += p.T @ p
        mu = total / n
        cov = (outer - n * torch.outer(mu, mu)) / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(0) + reg
        whiten = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
        unwhiten = evecs @ torch.diag(evals.sqrt()) @ evecs.T
        # fold the normalisation x = (p - m) / s in: p - mu = (x - (mu - m) / s) * s
        m = torch.tensor(mean, dtype=torch.float64).view(c, 1, 1).expand(c, h, w).reshape(d)
        s = torch.tensor(std, dtype=torch.float64).view(c, 1, 1).expand(c, h, w).reshape(d)
        mu_x = (mu - m) / s
        return cls(mu_x.float(), (s[:, None] * whiten).float(), (unwhiten / s[None, :]).float(), reg)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self._on(x)
        return ((self._flat(x) - m["mean"]) @ m["whiten"]).reshape(x.shape)

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        m = self._on(z)
        return (self._flat(z) @ m["unwhiten"] + m["mean"]).reshape(z.shape)
