"""Batch augmentations with explicit parameters: determinism, Siamese use, slicing, gradients, values."""

from __future__ import annotations

import math

import pytest
import torch

from ddkit.data.augment import (
    AUGMENTS,
    DSA,
    DSA_OPS,
    Augment,
    CropFlip,
    CutMix,
    Flip,
    RandomResizedCropFlip,
    build_augment,
    slice_params,
)
from ddkit.errors import ConfigError, DDKitError

SIZE = (16, 12)  # non-square on purpose: catches swapped H/W
# every spec, plus DSA restricted to each single operation so that every operation is exercised
CASES = [("dsa", {}), ("rrc_flip", {}), ("rrc_flip", {"scale_min": 0.5}), ("flip", {}), ("crop_flip", {})]
CASES += [("dsa", {"strategy": op}) for op in DSA_OPS]
IDS = [f"{spec}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for spec, kw in CASES]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 8, c: int = 3, seed: int = 1) -> torch.Tensor:
    """Random images plus a horizontal ramp, so that no image equals its mirror image."""
    x = torch.rand(n, c, *SIZE, generator=gen(seed))
    return x + torch.linspace(0, 1, SIZE[1])


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("spec,kw", CASES, ids=IDS)
def test_contract(spec, kw):
    aug = build_augment(spec, **kw)
    assert isinstance(aug, Augment)
    x = images()
    params = aug.sample(8, gen(0), SIZE)
    assert all(v.device.type == "cpu" and v.shape[0] == 8 for v in params.values())
    out = aug.apply(x, params)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all()
    # same seed -> identical parameters and outputs; other seed -> other parameters
    again = aug.sample(8, gen(0), SIZE)
    assert same(params, again) and torch.equal(aug.apply(x, again), out)
    assert not same(params, aug.sample(8, gen(1), SIZE))
    # Siamese: the same parameters on a copy give the same output
    assert torch.equal(aug.apply(x.clone(), params), out)
    # other float dtypes are kept
    assert aug.apply(x.double(), params).dtype == torch.float64


@pytest.mark.parametrize("spec,kw", CASES, ids=IDS)
def test_gradients_reach_pixels(spec, kw):
    aug = build_augment(spec, **kw)
    x = images().requires_grad_(True)
    aug.apply(x, aug.sample(8, gen(3), SIZE)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("spec,kw", CASES, ids=IDS)
def test_slices_equal_full_batch(spec, kw):
    """Data parallel: each rank applies its slice of the global parameters."""
    aug = build_augment(spec, **kw)
    x = images()
    params = aug.sample(8, gen(5), SIZE)
    full = aug.apply(x, params)
    halves = [aug.apply(x[s], slice_params(params, s)) for s in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(torch.cat(halves), full, rtol=0, atol=1e-6)
    one = aug.apply(x[2:3], slice_params(params, 2))
    torch.testing.assert_close(one, full[2:3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec,kw", [c for c in CASES if c[1].get("strategy") != "color"],
                         ids=[i for i, c in zip(IDS, CASES) if c[1].get("strategy") != "color"])
def test_siamese_same_geometry_on_different_batches(spec, kw):
    """Geometric transforms commute with scaling the pixels, so the same params on ``x`` and on
    ``3 * x`` give outputs that differ by the same factor. (Plain 'dsa' may draw color: skip it.)"""
    aug = build_augment(spec, **kw)
    params = aug.sample(8, gen(7), SIZE)
    assert "op" not in params or params["op"][0] != DSA_OPS.index("color")  # seed 7 draws flip
    x = images()
    torch.testing.assert_close(aug.apply(3 * x, params), 3 * aug.apply(x, params))


def test_siamese_flip_decisions_shared_across_batches():
    aug = Flip()
    params = aug.sample(16, gen(0), SIZE)
    flags = params["flip"]
    assert 0 < flags.sum() < 16
    for x in (images(16, seed=1), images(16, seed=2)):
        out = aug.apply(x, params)
        for i in range(16):
            assert torch.equal(out[i], x[i].flip(-1) if flags[i] else x[i])


def test_shared_params_broadcast_to_any_batch_size():
    """DSA's Siamese mode: one draw (n=1) for a real batch and a synthetic batch of other sizes."""
    aug = DSA(strategy="rotate")
    params = aug.sample(1, gen(0), SIZE)
    real, syn = images(5, seed=1), images(3, seed=2)
    both = aug.apply(torch.cat([real, syn]), params)
    torch.testing.assert_close(aug.apply(real, params), both[:5])
    torch.testing.assert_close(aug.apply(syn, params), both[5:])
    assert slice_params(params, slice(4, 8))["rotate"].shape == (1,)  # shared rows stay shared
    with pytest.raises(DDKitError, match="slice_params"):
        aug.apply(real, aug.sample(4, gen(0), SIZE))


@pytest.mark.parametrize("spec", ["flip", "crop_flip", "rrc_flip", "dsa"])
def test_params_replay_after_storage(spec, tmp_path):
    aug = build_augment(spec)
    x = images()
    params = aug.sample(8, gen(11), SIZE)
    torch.save(params, tmp_path / "p.pt")
    loaded = torch.load(tmp_path / "p.pt", weights_only=True)
    assert torch.equal(aug.apply(x, loaded), aug.apply(x, params))


# ------------------------------------------------------------------------------------------------
# values of individual operations


def test_flip_is_exact():
    x = images()
    params = {"flip": torch.tensor([True, False] * 4)}
    out = Flip().apply(x, params)
    assert torch.equal(out[0::2], torch.flip(x[0::2], dims=[3]))
    assert torch.equal(out[1::2], x[1::2])


def test_rrc_full_box_without_flip_is_identity():
    x = images()
    no_flip = torch.zeros(8, dtype=torch.bool)
    params = {"box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(8, 1), "flip": no_flip}
    torch.testing.assert_close(RandomResizedCropFlip().apply(x, params), x, rtol=0, atol=1e-5)


def test_rrc_box_crops_the_right_region():
    """Box = left half, on an image 2x as wide: output columns sample the left half's columns."""
    x = torch.arange(8.0).repeat(1, 1, 4, 1)  # [1, 1, 4, 8], value = column index
    params = {"box": torch.tensor([[0.0, 0.0, 0.5, 1.0]]), "flip": torch.tensor([False])}
    out = RandomResizedCropFlip().apply(x, params)
    # output column j (centre (j + .5) / 8) samples input at (j + .5) / 2 - .5 pixels, border-clamped
    expected = ((torch.arange(8.0) + 0.5) / 2 - 0.5).clamp(min=0)
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_rrc_matches_torchvisions_resized_crop_but_at_the_boxs_outer_pixels():
    """RandomResizedCropFlip's docstring (QA 18a F7): sampling the box from the whole image mixes the pixels just
    outside it into the outer 1-2 rows and columns of an enlarged crop, where torchvision crops first; the interior
    agrees to float rounding."""
    from torchvision.transforms import functional as TF

    x = torch.rand(1, 3, 28, 28, generator=gen(0))
    for top, left, h, w in [(10, 2, 9, 9), (5, 5, 20, 20), (3, 7, 25, 18)]:
        box = torch.tensor([[left / 28, top / 28, (left + w) / 28, (top + h) / 28]])
        ours = RandomResizedCropFlip().apply(x, {"box": box, "flip": torch.tensor([False])})
        diff = (ours - TF.resized_crop(x, top, left, h, w, [28, 28], antialias=False)).abs()[0]
        assert diff[:, 2:-2, 2:-2].max().item() < 1e-5
        assert 0.1 < max(diff[:, :2].max(), diff[:, -2:].max(), diff[:, :, :2].max(), diff[:, :, -2:].max()) < 0.4


@pytest.mark.parametrize("scale_min", [0.08, 0.5])
def test_rrc_box_statistics(scale_min):
    params = RandomResizedCropFlip(scale_min=scale_min).sample(2000, gen(0), (32, 32))
    box = params["box"]
    w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    assert (box[:, :2] >= 0).all() and (box[:, 2:] <= 1).all() and (w > 0).all() and (h > 0).all()
    area = w * h
    slack = 2.5 / 32  # pixel rounding of the side lengths
    assert area.min() >= scale_min - slack and area.max() <= 1
    assert ((w / h) > 3 / 4 - slack * 4).all() and ((w / h) < 4 / 3 + slack * 4).all()
    assert 0.4 < params["flip"].float().mean() < 0.6
    # pixel-aligned boxes
    torch.testing.assert_close(box * 32, (box * 32).round())


def test_crop_flip_translation_values():
    x = images(2)
    params = {"translate": torch.tensor([[1, 0], [0, -2]]), "flip": torch.tensor([False, False])}
    out = CropFlip().apply(x, params)
    assert torch.equal(out[0, :, :-1], x[0, :, 1:]) and (out[0, :, -1] == 0).all()
    assert torch.equal(out[1, :, :, 2:], x[1, :, :, :-2]) and (out[1, :, :, :2] == 0).all()


def test_crop_flip_padding():
    assert CropFlip().padding((32, 32)) == 4 and CropFlip().padding((64, 64)) == 4
    assert CropFlip().padding((28, 28)) == 4 and CropFlip().padding((16, 16)) == 2
    t = CropFlip().sample(500, gen(0), (16, 16))["translate"]
    assert t.min() == -2 and t.max() == 2


def test_dsa_cutout_zeroes_expected_area():
    aug = DSA(strategy="cutout")
    params = aug.sample(32, gen(0), SIZE)
    out = aug.apply(torch.ones(32, 2, *SIZE), params)
    ch, cw = 8, 6  # half of 16 x 12
    for i in range(32):
        cy, cx = params["cutout"][i].tolist()
        y0, x0 = cy - ch // 2, cx - cw // 2
        rows = min(y0 + ch, SIZE[0]) - max(y0, 0)
        cols = min(x0 + cw, SIZE[1]) - max(x0, 0)
        zero = out[i] == 0
        assert zero.sum() == 2 * rows * cols
        assert zero[:, max(y0, 0) : y0 + ch, max(x0, 0) : x0 + cw].all()
    assert params["cutout"][:, 0].max() <= SIZE[0] and params["cutout"][:, 1].max() <= SIZE[1]


def test_dsa_color_values():
    aug = DSA(strategy="color")
    params = aug.sample(4, gen(0), SIZE)
    x = images(4)
    b, s, c = (params[k].view(-1, 1, 1, 1) for k in ("brightness", "saturation", "contrast"))
    y = x + b
    y = (y - y.mean(1, keepdim=True)) * s + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * c + y.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(aug.apply(x, params), y)


def test_dsa_parameter_ranges():
    p = DSA().sample(4000, gen(0), (32, 32))
    assert p["brightness"].min() >= -0.5 and p["brightness"].max() <= 0.5
    assert p["saturation"].min() >= 0 and p["saturation"].max() <= 2
    assert p["contrast"].min() >= 0.5 and p["contrast"].max() <= 1.5
    assert p["translate"].min() == -4 and p["translate"].max() == 4  # 0.125 * 32
    assert p["scale"].min() >= 1 / 1.2 - 1e-6 and p["scale"].max() <= 1.2
    assert p["rotate"].abs().max() <= math.radians(15) + 1e-6
    assert 0.45 < p["flip"].float().mean() < 0.55


def test_dsa_chooses_one_operation_per_batch():
    aug = DSA()
    g = gen(0)
    chosen = []
    for _ in range(300):
        op = aug.sample(5, g, SIZE)["op"]
        assert (op == op[0]).all()
        chosen.append(int(op[0]))
    counts = torch.bincount(torch.tensor(chosen), minlength=len(DSA_OPS))
    assert (counts > 20).all()  # each of 6 ops ~50 times
    custom = {int(DSA(strategy="color_crop").sample(2, g, SIZE)["op"][0]) for _ in range(100)}
    assert custom == {DSA_OPS.index("color"), DSA_OPS.index("crop")}


def test_dsa_without_flip_never_flips():
    aug = build_augment("dsa", flip=False)
    assert "flip" not in aug.ops and len(aug.ops) == 5
    g = gen(0)
    x = images()
    for _ in range(200):
        params = aug.sample(8, g, SIZE)
        assert "flip" not in params and int(params["op"][0]) != DSA_OPS.index("flip")
    with pytest.raises(DDKitError, match="no operation left"):
        DSA(strategy="flip", flip=False)
    # the result of an op choice matches applying that single op
    params = DSA(strategy="crop", flip=False).sample(8, gen(1), SIZE)
    no_flip = torch.zeros(8, dtype=torch.bool)
    torch.testing.assert_close(aug.apply(x, params), CropFlip().apply(x, {**params, "flip": no_flip}))


def test_dsa_per_image_operations():
    """Concatenated parameters from two batches with different operations apply per image."""
    aug = DSA()
    x = images()
    a = DSA(strategy="flip").sample(4, gen(0), SIZE)
    b = DSA(strategy="rotate").sample(4, gen(1), SIZE)
    full = aug.sample(8, gen(2), SIZE)
    mixed = {k: v.clone() for k, v in full.items()}
    mixed["op"] = torch.cat([a["op"], b["op"]])
    mixed["flip"][:4] = a["flip"]
    mixed["rotate"][4:] = b["rotate"]
    out = aug.apply(x, mixed)
    torch.testing.assert_close(out[:4], DSA(strategy="flip").apply(x[:4], a))
    torch.testing.assert_close(out[4:], DSA(strategy="rotate").apply(x[4:], b))


@pytest.mark.parametrize("option, bad", [("crop_ratio", -0.5), ("crop_ratio", 1.5), ("cutout_ratio", -1.0),
                                         ("cutout_ratio", 2.0), ("saturation", -1.0), ("rotate_degrees", -5.0)])
def test_dsa_refuses_out_of_range_magnitudes(option, bad):
    """A negative crop used to crash inside torch and a negative cutout silently turned cutout off."""
    with pytest.raises(ConfigError, match=rf"DSA {option} must be"):
        DSA(**{option: bad})


def test_dsa_missing_parameter_is_an_error():
    params = DSA(strategy="crop").sample(2, gen(0), SIZE)
    params["op"][:] = DSA_OPS.index("rotate")
    with pytest.raises(DDKitError, match="'rotate'"):
        DSA().apply(images(2), params)


# ------------------------------------------------------------------------------------------------
# CutMix


def test_cutmix_lambda_matches_box_and_pixels():
    x = images(16)
    mix = CutMix(alpha=1.0, prob=1.0)
    p = mix.sample(16, gen(0), SIZE)
    out, perm, lam = mix.apply(x, p)
    assert sorted(perm.tolist()) == list(range(16))
    for i in range(16):
        x0, y0, x1, y1 = p["box"][i].tolist()
        assert 0 <= x0 <= x1 <= SIZE[1] and 0 <= y0 <= y1 <= SIZE[0]
        assert lam[i] == pytest.approx(1 - (x1 - x0) * (y1 - y0) / (SIZE[0] * SIZE[1]))
        inside = torch.zeros(SIZE, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(out[i][:, inside], x[perm[i]][:, inside])
        assert torch.equal(out[i][:, ~inside], x[i][:, ~inside])
    assert (lam < 1).any()
    # the caller's label mix: weights per row sum to 1
    onehot = torch.nn.functional.one_hot(torch.arange(16) % 4, 4).float()
    target = lam[:, None] * onehot + (1 - lam[:, None]) * onehot[perm]
    torch.testing.assert_close(target.sum(1), torch.ones(16))


def test_cutmix_prob_zero_is_identity_and_determinism():
    x = images()
    out, perm, lam = CutMix(prob=0.0).apply(x, CutMix(prob=0.0).sample(8, gen(0), SIZE))
    assert torch.equal(out, x) and torch.equal(perm, torch.arange(8)) and (lam == 1).all()
    mix = CutMix(alpha=0.4, prob=0.5)
    a, b = mix.sample(64, gen(0), SIZE), mix.sample(64, gen(0), SIZE)
    assert same(a, b) and not same(a, mix.sample(64, gen(1), SIZE))
    assert 0.3 < a["apply"].float().mean() < 0.7 and (a["lam"][~a["apply"]] == 1).all()
    before = torch.random.get_rng_state()
    mix.sample(4, gen(0), SIZE)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone


def test_seeded_draws_leave_the_cuda_generators_alone(monkeypatch):
    """CutMix's Beta(alpha != 1) draws and the models DM / the experts build from a seed use the global
    CPU generator alone: torch.manual_seed would also reseed every CUDA generator (which fork_rng does
    not restore), restarting a training run's CUDA randomness at every batch or iteration."""
    from ddkit.data.base import make_synthetic
    from ddkit.determinism import seeded_cpu_rng
    from ddkit.methods.matching import fresh_model

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    before = torch.random.get_rng_state()
    a = CutMix(alpha=0.4).sample(16, gen(0), SIZE)
    assert same(a, CutMix(alpha=0.4).sample(16, gen(0), SIZE))
    assert not (a["lam"] == a["lam"][0]).all()  # the draws still vary per image
    data = make_synthetic()
    w = [fresh_model("tiny_convnet", {}, data, s, torch.device("cpu")).state_dict() for s in (3, 3, 4)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0]) and not all(torch.equal(w[0][k], w[2][k]) for k in w[0])
    with seeded_cpu_rng(5):
        x = torch.rand(4)
    assert torch.equal(x, torch.rand(4, generator=torch.Generator().manual_seed(5)))
    assert reseeded == [] and torch.equal(torch.random.get_rng_state(), before)


def test_cutmix_gradients():
    x = images().requires_grad_(True)
    p = CutMix().sample(8, gen(0), SIZE)
    out, perm, _ = CutMix().apply(x, p)
    out.sum().backward()
    # image j keeps its pixels outside its own box and gives the pixels inside its borrower's box
    inside = torch.zeros(8, *SIZE)
    for i, (x0, y0, x1, y1) in enumerate(p["box"].tolist()):
        inside[i, y0:y1, x0:x1] = 1
    borrower = torch.argsort(perm)
    expected = (1 - inside) + inside[borrower]
    torch.testing.assert_close(x.grad, expected[:, None].expand_as(x))


# ------------------------------------------------------------------------------------------------
# factory


def test_build_augment_specs_and_errors():
    assert build_augment("none") is None
    dsa = build_augment("dsa")
    assert isinstance(dsa, DSA) and dsa.strategy == "color_crop_cutout_flip_scale_rotate"
    assert build_augment("rrc_flip", scale_min=0.5).scale_min == 0.5
    assert isinstance(build_augment("flip"), Flip) and isinstance(build_augment("crop_flip"), CropFlip)
    with pytest.raises(DDKitError) as err:
        build_augment("dsaa")
    assert str(err.value) == "unknown augmentation 'dsaa'; valid: " + ", ".join(AUGMENTS)
    assert "\n" not in str(err.value) and "rrc_flip" in str(err.value)
    with pytest.raises(DDKitError, match="scale_min"):
        build_augment("dsa", scale_min=0.5)
    with pytest.raises(DDKitError, match="unknown DSA operation"):
        build_augment("dsa", strategy="color_blur")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["dsa", "rrc_flip", "flip", "crop_flip"])
def test_cuda_matches_cpu(spec):
    aug = build_augment(spec)
    x = images()
    params = aug.sample(8, gen(0), SIZE)
    out = aug.apply(x.cuda(), params)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), aug.apply(x, params), rtol=1e-4, atol=1e-4)
    mixed, perm, lam = CutMix().apply(x.cuda(), CutMix().sample(8, gen(0), SIZE))
    assert mixed.is_cuda and perm.is_cuda and lam.is_cuda


def test_dsa_moves_only_the_parameters_of_the_chosen_operation(monkeypatch):
    """DSA.apply copied every parameter to the images' device (up to 9 copies, each a pinned copy on
    a GPU), though the one operation it applies reads 1 to 3 of them."""
    import ddkit.data.augment as augment

    reads = {"color": {"brightness", "saturation", "contrast"}, "crop": {"translate"}, "cutout": {"cutout"},
             "flip": {"flip"}, "scale": {"scale"}, "rotate": {"rotate"}}
    aug, x = DSA(), images()
    moved, real_to_device = [], augment.to_device
    monkeypatch.setattr(augment, "to_device", lambda t, device: moved.append(t) or real_to_device(t, device))
    seen = set()
    for seed in range(40):
        params = aug.sample(1, gen(seed), SIZE)
        name = aug.ops[[augment.DSA_OPS.index(o) for o in aug.ops].index(int(params["op"][0]))]
        moved.clear()
        aug.apply(x, params)
        assert {k for t in moved for k, v in params.items() if v is t} == reads[name]
        seen.add(name)
    assert seen == set(reads)
    with pytest.raises(DDKitError, match="slice_params"):  # the rows of a parameter the operation skips: checked too
        aug.apply(x, {**params, "flip": torch.zeros(3, dtype=torch.bool)})


@pytest.mark.parametrize("op", ["scale", "rotate"])
def test_dsa_scale_and_rotate_equal_the_reference_resampling(op):
    """The reference (DatasetCondensation utils.py rand_scale / rand_rotate) resamples with
    ``affine_grid``/``grid_sample`` under ``align_corners=True``, ddkit with False: for a map without
    translation both send an output pixel to the same input point on square images, so they agree to
    float rounding (the docstring once said they differ by up to a pixel's shift)."""
    import torch.nn.functional as F

    x = torch.randn(4, 1, 28, 28, generator=gen(3))
    if op == "scale":
        p = torch.tensor([[1.15, 0.9], [0.85, 1.2], [1.0, 1.1], [0.9, 0.95]])
        theta = torch.zeros(4, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = p[:, 0], p[:, 1]
    else:
        p = torch.tensor([0.25, -0.2, 0.1, -0.05])  # radians, within DSA's ±15°
        theta = torch.stack([torch.stack([p.cos(), -p.sin(), torch.zeros(4)], 1),
                             torch.stack([p.sin(), p.cos(), torch.zeros(4)], 1)], 1)
    ref = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=True), align_corners=True)
    out = build_augment("dsa").apply(x, {"op": torch.full((4,), DSA_OPS.index(op)), op: p})
    assert (out - ref).abs().max().item() < 1e-4
    assert (out - x).abs().max().item() > 0.1  # the map moved pixels: the comparison is not vacuous


@pytest.fixture
def fresh_flip_warnings(monkeypatch):
    from ddkit.data import augment

    monkeypatch.setattr(augment, "_warned_digits", set())


def _flip_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ddkit.data.augment" and r.levelname == "WARNING" and "flip" in r.getMessage()]


def test_dsa_flips_on_mnist_warn_once_naming_the_option(caplog, fresh_flip_warnings):
    """DSA's README drops flips for digit datasets; ddkit keeps them but says so on `mnist`, once per option."""
    from ddkit.data.augment import warn_digit_flips

    caplog.set_level("WARNING", logger="ddkit.data.augment")
    dsa = build_augment("dsa")
    for _ in range(3):
        warn_digit_flips(dsa, "mnist", "distill.options.dsa_options")
    assert _flip_warnings(caplog) == [
        "DSA augmentation flips the images of dataset 'mnist', a digit dataset, where DSA's authors drop flips (a "
        "mirrored digit is another symbol); set distill.options.dsa_options: {flip: false} to turn them off"]
    warn_digit_flips(dsa, "mnist", "train.augment_options")  # another option: its own warning
    assert "set train.augment_options: {flip: false}" in _flip_warnings(caplog)[-1]
    caplog.clear()
    # no flips, another dataset, another augmentation: nothing
    warn_digit_flips(build_augment("dsa", flip=False), "mnist", "x.dsa_options")
    warn_digit_flips(build_augment("dsa", strategy="color_crop_cutout_scale_rotate"), "mnist", "y.dsa_options")
    warn_digit_flips(dsa, "fashion-mnist", "z.dsa_options")
    warn_digit_flips(build_augment("flip"), "mnist", "w.augment_options")
    warn_digit_flips(None, "mnist", "v.augment_options")
    assert _flip_warnings(caplog) == []


def test_dsa_flips_warn_where_methods_and_students_build_them_on_mnist(caplog, fresh_flip_warnings):
    """The warning comes from where a DataBundle named `mnist` meets a DSA with flips: DM's synthesis (its
    dsa_options), a protocol's students (train.augment_options) and the expert training of a trajectory method."""
    import dataclasses

    from ddkit.config import from_dict
    from ddkit.data.base import make_synthetic
    from ddkit.evaluate.protocol import ProtocolConfig
    from ddkit.evaluate.runner import _train_student
    from ddkit.methods import METHODS, FitContext
    from ddkit.methods.trajectory import ExpertConfig, train_experts
    from ddkit.training import TrainConfig

    caplog.set_level("WARNING", logger="ddkit.data.augment")
    data = dataclasses.replace(make_synthetic(num_classes=2, train_per_class=8, test_per_class=2), name="mnist")
    dm = METHODS.get("dm")
    dm(from_dict(dm.Config, {"model": "tiny_convnet", "iterations": 1, "batch_real": 4})).fit(
        data, [], FitContext(ipc=1, seed=0))
    protocol = ProtocolConfig(student="tiny_convnet", random_baseline=False,
                              train=TrainConfig(epochs=1, batch_size=8, augment="dsa"))
    _train_student(data.train, data, protocol, protocol.train, 0, "cpu", "hard")
    train_experts(data, ExpertConfig(model="tiny_convnet", num_experts=1, epochs=1, batch_size=8), None, "cpu",
                  where="distill.options.buffer")
    said = _flip_warnings(caplog)
    assert [s.split("; set ")[1] for s in said] == [
        "distill.options.dsa_options: {flip: false} to turn them off",
        "train.augment_options (in a run: evaluate.overrides.train.augment_options; in a bench: "
        "overrides.train.augment_options): {flip: false} to turn them off",
        "distill.options.buffer.augment_options: {flip: false} to turn them off"]
    caplog.clear()  # flips off: silent
    protocol = ProtocolConfig(student="tiny_convnet", random_baseline=False,
                              train=TrainConfig(epochs=1, batch_size=8, augment="dsa",
                                                augment_options={"flip": False}))
    _train_student(data.train, data, protocol, protocol.train, 1, "cpu", "hard")
    assert _flip_warnings(caplog) == []
