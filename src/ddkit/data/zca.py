"""ZCA whitening of normalised images, as a dataset transform of the trajectory-matching methods.

KIP, MTT, FTD, TESLA and DATM train their experts and optimise their synthetic images on
ZCA-whitened data (MTT's ``--zca``: kornia's ``ZCAWhitening`` fitted on the normalised training
set, regularisation 0.1). With ``X`` the normalised training images flattened to ``[N, D]``,
``mu`` their mean and ``C = (X - mu)^T (X - mu) / (N - 1) = U diag(s) U^T``::

    whiten(x) = (x - mu) U diag(1 / sqrt(s + eps)) U^T        invert(z) = z U diag(sqrt(s + eps)) U^T + mu

``eps`` (``reg``) keeps the low-variance directions from exploding. ddkit stores distilled images in
pixel space, so a method that works in whitened space maps its images back with :meth:`ZCA.invert`
and every evaluation protocol can read them.
"""

from __future__ import annotations

import torch

from ddkit.data.base import ImageSet
from ddkit.errors import ConfigError


class ZCA:
    """A fitted whitening: call it on normalised images ``[B, C, H, W]``; :meth:`invert` undoes it."""

    def __init__(self, mean: torch.Tensor, whiten: torch.Tensor, unwhiten: torch.Tensor, reg: float) -> None:
        self.mean, self.whiten, self.unwhiten, self.reg = mean, whiten, unwhiten, reg

    @classmethod
    @torch.no_grad()
    def fit(cls, data: ImageSet, mean, std, reg: float = 0.1, batch_size: int = 8192) -> ZCA:
        """Fit on ``data`` (pixel-space images) normalised with ``mean``/``std``; float64 sums."""
        if reg <= 0:
            raise ConfigError(f"zca_reg must be > 0, got {reg}")
        n = len(data)
        if n < 2:
            raise ConfigError("ZCA needs at least 2 training images")
        c = data.images.shape[1]
        m = torch.tensor(mean, dtype=torch.float64).view(1, c, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(1, c, 1, 1)
        d = data.images[0].numel()
        total = torch.zeros(d, dtype=torch.float64)
        outer = torch.zeros(d, d, dtype=torch.float64)
        for lo in range(0, n, batch_size):
            x = ((data.subset(torch.arange(lo, min(n, lo + batch_size))).float_images().double() - m) / s).reshape(-1, d)
            total += x.sum(0)
            outer += x.T @ x
        mu = total / n
        cov = (outer - n * torch.outer(mu, mu)) / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(0) + reg
        whiten = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
        unwhiten = evecs @ torch.diag(evals.sqrt()) @ evecs.T
        return cls(mu.float(), whiten.float(), unwhiten.float(), reg)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        return ((self._flat(x) - self.mean.to(dev)) @ self.whiten.to(dev)).reshape(x.shape)

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        dev = z.device
        return (self._flat(z) @ self.unwhiten.to(dev) + self.mean.to(dev)).reshape(z.shape)
