"""AST (``shq``): each piece as an option of the expert recipe / MTT, checked against hand values."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddkit.config import from_dict
from ddkit.data.base import make_synthetic
from ddkit.errors import ConfigError
from ddkit.methods import METHODS, FitContext
from ddkit.methods import trajectory as tr
from ddkit.methods.mtt import (
    AST_CLIP_LOSS,
    MTTConfig,
    SHQConfig,
    _init_representative,
    balance_scale,
    kmeans,
    representative_clusters,
    representative_indices,
)
from ddkit.methods.trajectory import (
    ExpertConfig,
    FunctionalStudent,
    Intermediate,
    Step,
    input_gradient_penalty,
    intermediate_terms,
    perturb_start,
    train_experts,
    trajectory_gradients,
)
from test_trajectory_methods import _Linear

TINY = {"model": "tiny_convnet", "num_experts": 1, "epochs": 2, "batch_size": 32}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


def _expert(data, **extra):
    return tr.train_one_expert(data, from_dict(ExpertConfig, {**TINY, **extra}), 0, CPU)[0]


# ------------------------------------------------------------------------------------------------
# experts: clipping loss and gradient penalty


def test_ast_options_are_off_by_default():
    cfg, mtt = ExpertConfig(), MTTConfig()
    assert cfg.clip_loss == [] and cfg.grad_penalty == 0.0
    assert mtt.init == "real" and not mtt.balance_loss and mtt.intermediate_matching == "off"
    assert mtt.weight_perturb == 0.0 and mtt.inner_momentum == 0.0 and mtt.representative_clusters == 0
    assert cfg.lr_drop == 1.0


def test_clip_loss_scales_the_epochs_step_exactly(data):
    """Plain SGD: loss × c in epoch 0 is the same trajectory as lr × c for that epoch."""
    clipped = _expert(data, epochs=1, lr=0.02, clip_loss=[0.5])
    half_lr = _expert(data, epochs=1, lr=0.01)
    plain = _expert(data, epochs=1, lr=0.02)
    assert torch.equal(clipped[0], plain[0])
    assert torch.allclose(clipped[1], half_lr[1], rtol=1e-5, atol=1e-7)
    assert (clipped[1] - clipped[0]).norm() < 0.75 * (plain[1] - plain[0]).norm()
    # factors only for the listed epochs: epoch 1 of a [0.5] run trains at the full rate again
    two = _expert(data, lr=0.02, clip_loss=[0.5])
    assert torch.equal(two[1], clipped[1])


def test_input_gradient_penalty_hand_value():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(2 * 2 * 2, 3))  # x: [B, C=2, 2, 2]
    x = torch.randn(4, 2, 2, 2)
    # d(Σ logits)/dx = column sums of W, the same for every image; norm over the channel axis
    g = lin[1].weight.detach().sum(0).view(2, 2, 2)
    want = ((g.pow(2).sum(0).sqrt() - 1) ** 2).mean()
    got = input_gradient_penalty(lin, x)
    assert torch.allclose(got, want, rtol=1e-6)
    got.backward()  # differentiable in the parameters (it regularises them)
    assert lin[1].weight.grad is not None and lin[1].weight.grad.abs().sum() > 0


def test_grad_penalty_changes_the_expert_trajectory(data):
    plain = _expert(data, epochs=1)
    gp = _expert(data, epochs=1, grad_penalty=2.0)
    assert torch.equal(plain[0], gp[0]) and torch.isfinite(gp).all()
    assert not torch.allclose(plain[1], gp[1])


def test_ast_expert_recipe_slows_early_change(data):
    """SHQ's buffer (clip loss + gradient penalty) moves less in epoch 0 than the same optimiser without them."""
    base = {"lr": 0.003, "momentum": 0.9, "weight_decay": 1e-3}
    off = _expert(data, **base)
    on = _expert(data, **base, clip_loss=[0.5, 0.55], grad_penalty=2.0)
    step = lambda t, e: float((t[e + 1] - t[e]).norm())
    assert step(on, 0) < 0.75 * step(off, 0) and step(on, 1) < step(off, 1)


def test_expert_config_errors():
    with pytest.raises(ConfigError, match="clip_loss"):
        from_dict(ExpertConfig, {"clip_loss": [0.5, 0.0]})
    with pytest.raises(ConfigError, match="grad_penalty"):
        from_dict(ExpertConfig, {"grad_penalty": -1.0})
    with pytest.raises(ConfigError, match="weight_perturb"):
        from_dict(MTTConfig, {"weight_perturb": -0.1})
    with pytest.raises(ConfigError, match="intermediate_matching"):
        from_dict(MTTConfig, {"intermediate_matching": "sometimes"})


# ------------------------------------------------------------------------------------------------
# representative initialisation


def test_representative_indices_hand_case():
    # two clusters; centres (1/3, 1/3) and (32/3, 31/3); nearest rows: (0, 0) at 2 and (10, 10) at 5
    pts = torch.tensor([[0.0, 1.0], [10.0, 11.0], [0.0, 0.0], [12.0, 10.0], [1.0, 0.0], [10.0, 10.0]])
    for seed in range(5):
        got = representative_indices(pts, 2, torch.Generator().manual_seed(seed))
        assert sorted(got.tolist()) == [2, 5], seed
    # k = n: every row is its own centre; picks are distinct
    assert sorted(representative_indices(pts, 6, torch.Generator().manual_seed(0)).tolist()) == list(range(6))
    # AST's IPC / k nearest rows per centre: each cluster's three points, nearest first
    got = representative_indices(pts, 2, torch.Generator().manual_seed(0), per_centre=3)
    assert sorted(got.tolist()) == list(range(6))
    assert {tuple(sorted(got[:3].tolist())), tuple(sorted(got[3:].tolist()))} == {(0, 2, 4), (1, 3, 5)}
    assert got[0] in (2, 5) and got[3] in (2, 5)


def test_representative_clusters_rule():
    assert [representative_clusters(ipc, 0) for ipc in (1, 7, 50)] == [1, 7, 50]
    assert [representative_clusters(ipc, 10) for ipc in (1, 3, 10, 20, 50)] == [1, 3, 10, 10, 10]
    with pytest.raises(ConfigError, match="does not divide IPC 15"):
        representative_clusters(15, 10)


def test_representative_init_picks_real_images_nearest_to_centres(data, tmp_path):
    buffer = train_experts(data, from_dict(ExpertConfig, TINY), tmp_path / "experts")
    student = FunctionalStudent(buffer.build_model())
    pixels, labels = _init_representative(data, 3, buffer, student, 7, CPU)
    again, _ = _init_representative(data, 3, buffer, student, 7, CPU)
    assert torch.equal(pixels, again) and labels.tolist() == [c for c in range(data.num_classes) for _ in range(3)]
    real = data.train.float_images()
    from ddkit.methods.common import to_normalized

    params = buffer.params(0, buffer.epochs)
    gen = torch.Generator().manual_seed(7)  # the init's generator: one k-means per class, in order
    for c in range(data.num_classes):
        idx = torch.nonzero(data.train.labels == c).flatten()
        chosen = pixels[labels == c]
        # each picked image is a real image of class c, all distinct
        match = [int(torch.nonzero((real[idx] == im).flatten(1).all(1)).flatten()[0]) for im in chosen]
        assert len(set(match)) == 3
        with torch.no_grad():
            logits = student(params, to_normalized(real[idx], data)).double()
        centres = kmeans(logits, 3, gen)
        # the centres are a k-means solution: each is the mean of its Voronoi cell ...
        cell = torch.cdist(logits, centres).argmin(1)
        for k in range(3):
            assert torch.allclose(centres[k], logits[cell == k].mean(0))
        # ... and the picks are the real images nearest to them (brute force over the class)
        assert sorted(match) == sorted(int(torch.cdist(centres[k][None], logits).argmin()) for k in range(3))


# ------------------------------------------------------------------------------------------------
# balanced inner loss, intermediate matching, weight perturbation


def test_balance_scale_hand_values():
    cfg = MTTConfig(max_start_epoch=20)  # h = 10
    assert balance_scale(10, cfg) == pytest.approx(math.log(8) / math.log(5))
    assert balance_scale(15, cfg) == pytest.approx(math.log(13) / math.log(5))
    assert balance_scale(3, cfg) == pytest.approx(math.log(5) / math.log(15))
    assert balance_scale(0, cfg) < balance_scale(9, cfg) < 1 < balance_scale(10, cfg) < balance_scale(19, cfg)


def _softmax_grad(theta, x, y):
    w, b = theta[:12].view(3, 4), theta[12:]
    p = F.softmax(x.flatten(1) @ w.T + b, 1) - F.one_hot(y, 3).float()
    return torch.cat([(p.T @ x.flatten(1) / len(y)).reshape(-1), p.mean(0)])


def test_balanced_and_intermediate_loss_hand_value():
    torch.manual_seed(0)
    student = FunctionalStudent(_Linear())
    x = torch.randn(6, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    start, target, middle = torch.randn(15), torch.randn(15), torch.randn(15)
    alpha, scale, w = 0.3, 1.7, 0.6
    plan = [Step(torch.arange(3), None), Step(torch.arange(3, 6), None)]
    th1 = start - alpha * scale * _softmax_grad(start, x[:3], y[:3])
    th2 = th1 - alpha * scale * _softmax_grad(th1, x[3:], y[3:])
    want = ((th2 - target) ** 2).sum() / ((start - target) ** 2).sum() \
        + w * ((th1 - middle) ** 2).sum() / ((start - middle) ** 2).sum()
    for mode in ("unroll", "exact", "first_order"):
        res = trajectory_gradients(student, start, target, x, y, torch.tensor(alpha), plan, mode=mode,
                                   inner_scale=scale, intermediate=[Intermediate(1, middle, w)])
        assert torch.allclose(res.loss, want, rtol=1e-5), mode


def _tiny_case(steps=4):
    from ddkit.data.augment import build_augment
    from ddkit.methods.trajectory import plan_steps

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(3, 3), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()
    student = FunctionalStudent(model)
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    target = start + 0.05 * torch.randn_like(start)
    middle = start + 0.03 * torch.randn_like(start)
    images = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    augment = build_augment("dsa")
    plan = plan_steps(6, steps, 4, torch.Generator().manual_seed(0), augment, (8, 8))
    return student, start, target, middle, images, augment, plan


def test_intermediate_and_balance_exact_gradient_equals_unroll():
    student, start, target, middle, images, augment, plan = _tiny_case()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    lr = torch.tensor(0.1, dtype=torch.float64)
    terms = [Intermediate(1, middle, 0.5), Intermediate(2, middle + 0.01, 1.0)]
    ref = trajectory_gradients(student, start, target, images, y, lr, plan, augment, "unroll",
                               inner_scale=1.3, intermediate=terms)
    got = trajectory_gradients(student, start, target, images, y, lr, plan, augment, "exact",
                               inner_scale=1.3, intermediate=terms)
    assert torch.allclose(got.loss, ref.loss, rtol=1e-10)
    assert torch.allclose(got.grad_images, ref.grad_images, rtol=1e-7, atol=1e-12)
    assert torch.allclose(got.grad_lr, ref.grad_lr, rtol=1e-7)
    plain = trajectory_gradients(student, start, target, images, y, lr, plan, augment, "unroll")
    assert not torch.allclose(plain.grad_images, ref.grad_images, rtol=1e-4), "the terms changed nothing"
    # zero weight == MTT
    zero = trajectory_gradients(student, start, target, images, y, lr, plan, augment, "unroll",
                                intermediate=[Intermediate(2, middle, 0.0)])
    assert torch.allclose(zero.loss, plain.loss) and torch.allclose(zero.grad_images, plain.grad_images)


def test_intermediate_terms_schedule():
    params = lambda i: torch.full((2,), float(i))
    uni = intermediate_terms(params, 20, 3, "uniform")
    assert [(t.step, float(t.target[0]), t.weight) for t in uni] == [(6, 1.0, 1.0), (12, 2.0, 1.0)]
    lin = intermediate_terms(params, 20, 3, "linear")
    assert [t.weight for t in lin] == pytest.approx([1 / 3, 2 / 3])
    assert intermediate_terms(params, 2, 3, "uniform") == []  # steps 0: dropped, as the reference
    assert intermediate_terms(params, 20, 1, "uniform") == [] and intermediate_terms(params, 20, 3, "off") == []


def test_weight_perturbation_hand_value_and_determinism():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
    student = FunctionalStudent(model)
    flat = torch.randn(student.num_params)
    got = perturb_start(student, flat, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(got, perturb_start(student, flat, 0.7, torch.Generator().manual_seed(3)))
    assert not torch.equal(got, perturb_start(student, flat, 0.7, torch.Generator().manual_seed(4)))
    n = 2 * 1 * 3 * 3  # the conv weight comes first; bias and linear parameters are untouched
    d = torch.randn(n, generator=torch.Generator().manual_seed(3))
    want = flat[:n] + 0.7 * d / d.norm() * flat[:n]
    assert torch.allclose(got[:n], want) and torch.equal(got[n:], flat[n:])


# ------------------------------------------------------------------------------------------------
# the preset


def _fit(data, **over):
    cls = METHODS.get("shq")
    cfg = from_dict(cls.Config, {**cls.smoke_options, **over})
    return cls(cfg).fit(data, [], FitContext(ipc=2, seed=0)).synthetic_


def test_shq_preset_defaults_and_doc():
    cfg = SHQConfig()
    assert cfg.init == "representative" and cfg.balance_loss and cfg.intermediate_matching == "uniform"
    assert cfg.weight_perturb == 1.0 and cfg.buffer.clip_loss == AST_CLIP_LOSS and cfg.buffer.grad_penalty == 2.0
    assert cfg.buffer.momentum == 0.9 and cfg.buffer.weight_decay == 1e-3
    assert cfg.buffer.lr_drop == 0.6 and cfg.buffer.lr_drop_epoch is None
    assert cfg.inner_momentum == 0.9 and cfg.representative_clusters == 10
    doc = METHODS.get("shq").__doc__
    assert "2310.10541" in doc and "Not implemented" in doc


def test_shq_weight_perturbation_changes_result_and_is_deterministic(data):
    on = _fit(data, iterations=2)
    assert torch.equal(on.images, _fit(data, iterations=2).images)
    off = _fit(data, iterations=2, weight_perturb=0.0)
    assert not torch.equal(on.images, off.images)


def test_shq_inner_momentum_changes_result(data):
    on = _fit(data, iterations=2)
    off = _fit(data, iterations=2, inner_momentum=0.0)
    assert torch.isfinite(on.images).all() and not torch.equal(on.images, off.images)


def test_representative_init_with_clusters(data, tmp_path):
    """k = 2 clusters per class at IPC 4: two images per centre, all distinct real images of the class."""
    buffer = train_experts(data, from_dict(ExpertConfig, TINY), tmp_path / "experts")
    student = FunctionalStudent(buffer.build_model())
    pixels, labels = _init_representative(data, 4, buffer, student, 7, CPU, clusters=2)
    assert labels.tolist() == [c for c in range(data.num_classes) for _ in range(4)]
    real = data.train.float_images()
    for c in range(data.num_classes):
        pool = real[data.train.labels == c]
        match = [int(torch.nonzero((pool == im).flatten(1).all(1)).flatten()[0]) for im in pixels[labels == c]]
        assert len(set(match)) == 4
    one_each, _ = _init_representative(data, 4, buffer, student, 7, CPU)
    assert not torch.equal(pixels, one_each)
    cls = METHODS.get("shq")
    cfg = from_dict(cls.Config, {**cls.smoke_options, "representative_clusters": 2})
    with pytest.raises(ConfigError, match="does not divide IPC 3"):  # before any expert is trained
        cls(cfg).fit(data, [], FitContext(ipc=3, seed=0))


def test_ast_options_run_with_exact_gradient(data):
    out = _fit(data, gradient="exact", iterations=1)
    assert torch.isfinite(out.images).all()
