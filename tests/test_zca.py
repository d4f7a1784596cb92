"""ZCA whitening (ddkit.data.zca) and its use by the trajectory-matching methods."""

import pytest
import torch

from ddkit.config import from_dict
from ddkit.data.base import make_synthetic
from ddkit.data.zca import ZCA
from ddkit.errors import ConfigError
from ddkit.methods import METHODS, FitContext
from ddkit.methods.common import to_normalized
from ddkit.methods.trajectory import ExpertConfig, train_experts


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


def _normalised(data):
    return to_normalized(data.train.float_images(), data)


def test_zca_whitens_and_inverts(data):
    zca = ZCA.fit(data.train, data.mean, data.std, reg=1e-4)
    x = _normalised(data)
    z = zca(x).reshape(len(x), -1).double()
    cov = torch.cov(z.T)
    evals = torch.linalg.eigvalsh(cov)
    # whitened: a direction of the pixel covariance with eigenvalue lam keeps lam / (lam + reg) of its variance,
    # ~1 for the rank n - 1 directions the data spans (lam >= 0.0106 here: >= 0.9906), 0 for the rest. The
    # whitening is stored in float32: the spectrum is off by ~eps32 x cond(whiten) = 1.2e-7 x sqrt(lam_max / reg)
    # ~ 2e-5 (1.9e-6 measured); a reg scaled by std**2 (fitted on normalised images) or left out is off by 8e-3.
    p = data.train.float_images().double().reshape(len(x), -1)
    lam = torch.linalg.eigvalsh(torch.cov(p.T)).clamp_min(0)
    rank = min(len(x) - 1, z.shape[1])
    assert torch.allclose(evals, lam / (lam + 1e-4), rtol=0, atol=1e-4), (evals - lam / (lam + 1e-4)).abs().max()
    assert int((evals > 0.5).sum()) == rank and evals[: len(evals) - rank].abs().max() < 1e-6
    assert z.mean(0).abs().max() < 1e-4
    assert torch.allclose(zca.invert(zca(x)), x, atol=1e-3)
    again = ZCA.fit(data.train, data.mean, data.std, reg=1e-4)
    assert torch.equal(again.whiten, zca.whiten)  # deterministic
    with pytest.raises(ConfigError, match="zca_reg must be > 0"):
        ZCA.fit(data.train, data.mean, data.std, reg=0.0)


def test_zca_keeps_the_images_dtype(data):
    """The matrices are stored in float32; float64 (or half) images used to fail in the matmul."""
    zca = ZCA.fit(data.train, data.mean, data.std, reg=0.1)
    x = _normalised(data)[:4]
    z = zca(x.double())
    assert z.dtype == torch.float64 and torch.allclose(z.float(), zca(x), atol=1e-5)
    back = zca.invert(z)
    assert back.dtype == torch.float64 and torch.allclose(back.float(), x, atol=1e-4)


def test_zca_is_mtts_pixel_space_whitening(data):
    """MTT's --zca (kornia ZCAWhitening, eps 0.1) whitens the raw [0, 1] pixels: the regularisation is
    in pixel units, so ddkit's transform of the normalised images must equal that one, not a ZCA
    fitted on the normalised images (which would be eps * std**2 in pixel units)."""
    p = data.train.float_images().double().reshape(len(data.train), -1)
    mu = p.mean(0)
    cov = (p - mu).T @ (p - mu) / (len(p) - 1)
    evals, evecs = torch.linalg.eigh(cov)
    kornia_like = (p - mu) @ (evecs @ torch.diag((evals.clamp_min(0) + 0.1).rsqrt()) @ evecs.T)
    zca = ZCA.fit(data.train, data.mean, data.std, reg=0.1)
    x = _normalised(data)
    got = zca(x).reshape(len(x), -1).double()
    assert torch.allclose(got, kornia_like, atol=1e-4 * float(kornia_like.abs().max()))
    assert torch.allclose(zca.invert(zca(x)), x, atol=1e-3)
    # fitted on the normalised images instead, the same eps whitens much harder (std < 1 here)
    xn = x.double().reshape(len(x), -1)
    cn = torch.cov(xn.T)
    en, vn = torch.linalg.eigh(cn)
    normalised_fit = (xn - xn.mean(0)) @ (vn @ torch.diag((en.clamp_min(0) + 0.1).rsqrt()) @ vn.T)
    assert normalised_fit.norm() > 1.2 * got.norm()


def test_zca_regularisation_shrinks_low_variance_directions(data):
    x = _normalised(data)
    small = ZCA.fit(data.train, data.mean, data.std, reg=1e-3)(x).reshape(len(x), -1)
    big = ZCA.fit(data.train, data.mean, data.std, reg=10.0)(x).reshape(len(x), -1)
    assert big.var(0).sum() < small.var(0).sum()


def test_zca_experts_and_mtt_round_trip(data, tmp_path):
    cfg = from_dict(ExpertConfig, {"model": "tiny_convnet", "num_experts": 1, "epochs": 2, "batch_size": 32,
                                   "augment": "none", "zca": True, "lr": 0.05})
    buffer = train_experts(data, cfg, tmp_path / "experts")
    assert buffer.manifest["config"]["zca"] is True and buffer.zca(data) is not None
    # the experts are tested on whitened test images: the recorded accuracy is the whitened one
    from ddkit.methods.trajectory import FunctionalStudent

    student = FunctionalStudent(buffer.build_model().eval())
    zca = buffer.zca(data)
    with torch.no_grad():
        pred = student(buffer.params(0, buffer.epochs), zca(to_normalized(data.test.float_images(), data))).argmax(1)
    assert (buffer.manifest["experts"][0]["test_accuracy"]
            == pytest.approx(float((pred == data.test.labels).float().mean())))
    plain = from_dict(ExpertConfig, {**{k: getattr(cfg, k) for k in ("model", "num_experts", "epochs", "batch_size",
                                                                      "augment", "lr")}})
    assert not torch.equal(train_experts(data, plain).trajectories[0], buffer.trajectories[0])
    # with a negligible image learning rate the images go to whitened space and come back unchanged
    cls = METHODS.get("mtt")
    mcfg = from_dict(cls.Config, {"experts": str(tmp_path / "experts"), "iterations": 1, "syn_steps": 2,
                                  "expert_epochs": 1, "max_start_epoch": 1, "lr_img": 1e-12, "augment": "none"})
    out = cls(mcfg).fit(data, [], FitContext(ipc=2, seed=0)).synthetic_
    from ddkit.methods.common import init_images

    pixels, _ = init_images(data, 2, "real", 0)
    assert torch.allclose(out.images, pixels, atol=1e-4)
    assert out.meta["zca_reg"] == 0.1  # marks the set for protocol zca: true
    # the whitening is refitted on the data being distilled: other data than the experts' is refused
    import dataclasses

    from ddkit.errors import DDKitError

    other = dataclasses.replace(data, train=data.train.subset(torch.arange(len(data.train) - 1)))
    with pytest.raises(DDKitError, match="ZCA-whitened images of other data"):
        buffer.zca(other)
    # a buffer whitened by ddkit's older ZCA (no zca_space marker) is refused, and the distilled
    # sets of a ZCA buffer recipe get their own identity
    import json

    from ddkit.methods.trajectory import load_experts

    manifest = json.loads((tmp_path / "experts" / "manifest.json").read_text())
    assert manifest["zca_space"] == "pixel"
    del manifest["zca_space"]
    (tmp_path / "experts" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DDKitError, match="older ZCA"):
        load_experts(tmp_path / "experts").zca(data)
    assert cls.identity_tags({"buffer": {"zca": True}}) == {"zca_space": "pixel"}
    assert cls.identity_tags({"buffer": {"zca": False}}) == {} == cls.identity_tags({})


def test_student_transform_is_training_on_whitened_images(data):
    """train_classifier's ``transform`` (protocol zca) trains on whitened batches and tests on whitened
    images: the same run as on images whitened beforehand and passed with an identity normalisation."""
    import dataclasses

    from ddkit.data.base import ImageSet
    from ddkit.models import create_model
    from ddkit.training import TrainConfig, train_classifier

    zca = ZCA.fit(data.train, data.mean, data.std, reg=0.1)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, augment="dsa", augment_options={"strategy": "crop_flip"})
    c, h, _ = data.image_shape

    def run(train, test, mean, std, transform):
        torch.manual_seed(0)
        model = create_model("tiny_convnet", c, data.num_classes, h)
        return train_classifier(model, train, mean, std, cfg, seed=0, test=test, transform=transform)

    got = run(data.train, data.test, data.mean, data.std, zca)
    white = [ImageSet(zca(_normalised(dataclasses.replace(data, train=s))), s.labels) for s in (data.train, data.test)]
    want = run(white[0], white[1], (0.0,) * c, (1.0,) * c, None)
    for a, b in zip(got.model.state_dict().values(), want.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)
    assert got.test_accuracy == want.test_accuracy
    plain = run(data.train, data.test, data.mean, data.std, None)
    assert not torch.allclose(plain.model.state_dict()["features.0.weight"],
                              got.model.state_dict()["features.0.weight"])
    with pytest.raises(ConfigError, match="use label mode hard or stored"):
        train_classifier(create_model("tiny_convnet", c, data.num_classes, h), data.train, data.mean,
                         data.std, cfg, seed=0, label_source="teacher",
                         teacher=create_model("tiny_convnet", c, data.num_classes, h), loss="kl", transform=zca)


def test_zca_protocol_whitens_set_random_subset_and_full_data(data, tmp_path, caplog, monkeypatch):
    """Protocol ``zca: true`` (MTT's evaluation): the set's, the random subset's and the full-data
    students all get the training set's whitening; it keys the protocol hash and the full-data cache;
    a set distilled in ZCA space evaluated without it draws a warning; teacher labels are refused."""
    import logging

    import ddkit.evaluate.runner as runner
    from ddkit.distilled import DistilledSet
    from ddkit.evaluate import evaluate, resolve_protocol
    from ddkit.methods.common import init_images

    base = {"student": "tiny_convnet", "full_epochs": 2, "train": {"epochs": 4, "batch_size": 32, "lr": 0.05}}
    plain = resolve_protocol("dc-protocol", base)
    white = resolve_protocol("dc-protocol", {**base, "zca": True})
    assert "zca" not in plain.identity() and "zca_reg" not in white.identity() and white.hash != plain.hash
    with pytest.raises(ConfigError, match="use label_mode hard or stored"):
        resolve_protocol("soft-kl", {"zca": True})
    with pytest.raises(ConfigError, match="zca_reg must be > 0, got 0"):
        resolve_protocol("dc-protocol", {"zca": True, "zca_reg": 0})
    pixels, labels = init_images(data, 2, "real", 0)
    ds = DistilledSet(pixels, labels, {"dataset": data.describe(), "method": {"name": "mtt"}, "ipc": 2,
                                       "meta": {"zca_reg": 0.1}})
    seen = []
    real = runner.train_classifier
    monkeypatch.setattr(runner, "train_classifier", lambda *a, **k: seen.append(k["transform"]) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="ddkit"):
        rep = evaluate(ds, white, [0], data=data, cache_dir=tmp_path)
    assert not [r for r in caplog.records if "ZCA" in r.getMessage()]
    want = ZCA.fit(data.train, data.mean, data.std, reg=0.1)
    # set, random, full
    assert len(seen) == 3 and all(t is not None and torch.equal(t.whiten, want.whiten) for t in seen)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddkit"):
        other = evaluate(ds, plain, [0], data=data, cache_dir=tmp_path)
    assert seen[3:] == [None, None, None]
    assert any("distilled on ZCA-whitened images" in r.getMessage() and "zca: true" in r.getMessage()
               for r in caplog.records)
    assert len(list((tmp_path / "full-reference").glob("*.json"))) == 2  # whitened and plain full data: two entries
    assert rep["results"]["full"]["key"] != other["results"]["full"]["key"]


def test_zca_moves_its_matrices_once_per_device_and_dtype():
    """The transform runs on every training batch: it copied its D x D matrix to the batch's device at
    every call (38 MB per batch on CIFAR, and a host wait on CUDA)."""
    data = make_synthetic(train_per_class=8)
    zca = ZCA.fit(data.train, data.mean, data.std)
    x = torch.rand(4, *data.image_shape)
    first = zca(x)
    moved = zca._on(x)["whiten"]
    assert torch.equal(zca(x), first) and zca._on(x)["whiten"] is moved  # the copy made once is reused
    assert torch.allclose(zca.invert(first), x, atol=1e-4)
    assert zca._on(x.double())["whiten"].dtype == torch.float64 and len(zca._moved) == 2
