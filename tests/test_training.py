import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddkit.errors import ConfigError, DDKitError
from ddkit.models import create_model
from ddkit.training import (
    NonFiniteOutputs,
    TrainConfig,
    accuracy,
    lr_factor,
    make_optimizer,
    per_sample_loss,
    sum_dtype,
    train_classifier,
)


def test_lr_schedules_match_formulas():
    step = TrainConfig(epochs=10, schedule="step")
    assert [lr_factor(step, e) for e in range(10)] == [1.0] * 5 + [0.1] * 5
    odd = TrainConfig(epochs=3, schedule="step")  # documented: the decay starts at epoch 3 // 2 = 1
    assert [lr_factor(odd, e) for e in range(3)] == [1.0, 0.1, 0.1]
    cos = TrainConfig(epochs=10, schedule="cosine")
    assert lr_factor(cos, 0) == 1.0 and lr_factor(cos, 5) == pytest.approx(0.5)
    smooth = TrainConfig(epochs=10, schedule="smoothing", smoothing_zeta=2.0)
    # EDC: (1 + cos(i*pi/(zeta*N)))/2 — at the last epoch it is still far from 0
    assert lr_factor(smooth, 9) == pytest.approx((1 + math.cos(9 * math.pi / 20)) / 2)
    assert lr_factor(smooth, 9) > 0.5
    warm = TrainConfig(epochs=10, schedule="constant", warmup_epochs=3)
    assert [lr_factor(warm, e) for e in range(4)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("bad, message", [
    ({"schedule": "smoothing", "smoothing_zeta": 0.0}, "smoothing_zeta must be > 0"),
    ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
    ({"warmup_epochs": -3}, r"warmup_epochs must lie in \[0, epochs\) = \[0, 3\), got -3"),
    ({"warmup_epochs": 3}, r"warmup_epochs must lie in \[0, epochs\)"),
    ({"weight_decay": -1.0}, "momentum and weight_decay must be >= 0"),
    ({"momentum": -0.5}, "momentum and weight_decay must be >= 0"),
    ({"cutmix_alpha": 0.0},
     r"cutmix_alpha must be a finite number > 0 \(CutMix's Beta\(alpha, alpha\); 1 is usual\), got 0.0"),
    ({"cutmix_alpha": float("nan")}, "^TrainConfig.cutmix_alpha: expected a finite number, got nan$"),  # the type check
    ({"cutmix_prob": 1.5}, r"cutmix_prob must be in \[0, 1\] \(0 disables CutMix\), got 1.5"),
    ({"momentum": 1.0}, "momentum must be < 1"),
    ({"lr": float("nan")}, "^TrainConfig.lr: expected a finite number, got nan$"),
    ({"lr": float("inf")}, "^TrainConfig.lr: expected a finite number, got inf$"),
])
def test_train_config_refuses_values_that_crash_or_mislead(bad, message):
    """Each used to pass: a ZeroDivisionError or a range() error after the whole training, a schedule that
    never reaches the peak lr or never leaves warm-up, or torch's bare ValueError."""
    with pytest.raises(ConfigError, match=message):
        TrainConfig(epochs=3, **bad)


def test_losses_match_hand_computation():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0]])
    y = torch.tensor([0])
    assert per_sample_loss(s, y, None, "ce", 1.0).item() == pytest.approx(F.cross_entropy(s, y).item())
    T = 4.0
    p, q = F.softmax(s / T, 1), F.softmax(t / T, 1)
    kl = (q * (q.log() - p.log())).sum().item() * T * T
    assert per_sample_loss(s, y, t, "kl", T).item() == pytest.approx(kl, rel=1e-5)
    mse_ce = ((s - t) ** 2).mean().item() + 0.025 * F.cross_entropy(s, y).item()
    assert per_sample_loss(s, y, t, "mse_ce", T).item() == pytest.approx(mse_ce, rel=1e-6)
    soft_y = torch.tensor([[0.25, 0.75, 0.0]])
    mixed = 0.25 * F.cross_entropy(s, torch.tensor([0])) + 0.75 * F.cross_entropy(s, torch.tensor([1]))
    assert per_sample_loss(s, soft_y, None, "ce", 1.0).item() == pytest.approx(mixed.item(), rel=1e-6)


@pytest.mark.parametrize("T", [4.0, 20.0])
def test_kl_is_the_authors_unscaled_kl_times_t_squared(T):
    """per_sample_loss's docstring (QA 18a F4): ddkit's kl is Hinton's, T^2 times the batchmean KLDivLoss that
    SRe2L's train_FKD.py, relabel_cifar.py and RDED's validation/main.py train on (400x at their T 20)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), 3 * torch.randn(8, 10, generator=g)
    ours = per_sample_loss(s, torch.zeros(8, dtype=torch.long), t, "kl", T).mean()
    theirs = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1))
    assert (ours / theirs).item() == pytest.approx(T * T, rel=1e-5)


def test_optimizer_decays_every_parameter_biases_and_batchnorm_included():
    """make_optimizer's docstring (QA 18a F6): one group, weight decay on every tensor; SRe2L's FKD, RDED, EDC and
    CV-DD students put biases and 1-D (BatchNorm) tensors in a second group without decay."""
    model = create_model("resnet18_cifar", num_classes=10, in_channels=1, image_size=28)
    opt = make_optimizer(TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01), model.parameters())
    (group,) = opt.param_groups
    assert group["weight_decay"] == 0.01 and len(group["params"]) == len(list(model.parameters()))
    assert sum(p.dim() == 1 for p in group["params"]) == 41  # the tensors the authors' get_parameters leaves out


def _train(tiny, cfg, seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model("tiny_convnet", 1, 4, 16)
    return train_classifier(model, tiny.train, tiny.mean, tiny.std, cfg, seed=seed, test=tiny.test, **kw)


def test_learns_and_is_deterministic(tiny):
    cfg = TrainConfig(epochs=15, batch_size=32, lr=0.05)
    untrained = create_model("tiny_convnet", 1, 4, 16)
    before = accuracy(untrained, tiny.test, tiny.mean, tiny.std, "cpu")
    a, b = _train(tiny, cfg), _train(tiny, cfg)
    assert a.test_accuracy >= 0.85 > before + 0.2
    assert a.test_accuracy == b.test_accuracy
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [h["epoch"] for h in a.history] == list(range(1, 16))
    assert a.history[-1]["loss"] < a.history[0]["loss"]


class _NoFloat64(torch.overrides.TorchFunctionMode):
    """The CPU as a device without float64 (Apple MPS, where torch raises on float64 tensors)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
            raise TypeError(f"{getattr(func, '__name__', func)} made a float64 tensor on a device without float64")
        return out


def test_running_sums_on_a_device_without_float64(tiny, monkeypatch):
    """Loss and accuracy sums stay on the device (no host sync per step) in float64, or in float32
    where the device has no float64 (mps); the CPU's and CUDA's are float64, as before."""
    assert sum_dtype("cpu") == sum_dtype(torch.device("cuda:1")) == sum_dtype("cuda") == torch.float64
    assert sum_dtype("mps") == sum_dtype(torch.device("mps:0")) == torch.float32
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, augment="rrc_flip", cutmix_prob=0.5)
    ref = _train(tiny, cfg, eval_every=1)
    import ddkit.training as training

    with _NoFloat64(), pytest.raises(TypeError, match="float64"):  # the simulation bites
        torch.zeros(2, dtype=torch.float64)
    monkeypatch.setattr(training, "sum_dtype", lambda device: torch.float32)
    with _NoFloat64():
        got = _train(tiny, cfg, eval_every=1)
    assert [h["test_accuracy"] for h in got.history[:-1]] == [h["test_accuracy"] for h in ref.history[:-1]]
    assert got.test_accuracy == ref.test_accuracy
    assert [h["loss"] for h in got.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-6)


@pytest.mark.parametrize("augment, precision", [("dsa", "fp32"), ("rrc_flip", "fp32"), ("crop_flip", "fp32"),
                                               ("rrc_flip", "fp16")])
def test_resume_equals_uninterrupted(tiny, tmp_path, augment, precision):
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, augment=augment, cutmix_prob=0.5, ema_decay=0.9,
                      precision=precision)
    full = _train(tiny, cfg)
    state = tmp_path / "state.pt"

    def kill_after_second_epoch(epoch, total, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny, cfg, state_path=state, progress=kill_after_second_epoch)
    # the killed run left the epoch-2 checkpoint; the resumed run continues from it
    ck = torch.load(state, weights_only=True)
    assert ck["epoch"] == 2
    assert ("scaler" in ck) == (precision == "fp16")  # fp16: GradScaler state travels with the checkpoint
    if precision == "fp16":
        assert ck["scaler"]["scale"] > 0
    calls = []
    resumed = _train(tiny, cfg, state_path=state, progress=lambda e, n, r: calls.append((e, n)))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    # the bar starts where the training does (it appeared only after the first epoch it ran)
    assert calls == [(2, 4), (3, 4), (4, 4)]
    for va, vb in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(va, vb)


def test_resume_with_dropout_equals_uninterrupted(tiny, tmp_path):
    """Dropout masks come from the global generator: the checkpoint carries its state, so a resumed run
    draws the masks the uninterrupted one drew (torchvision's MobileNet/EfficientNet heads have dropout)."""
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05)

    def run(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(create_model("tiny_convnet", 1, 4, 16), nn.Dropout(0.3), nn.Linear(4, 4))
        return train_classifier(model, tiny.train, tiny.mean, tiny.std, cfg, seed=0, **kw)

    def kill_after_second_epoch(epoch, total, record):
        if epoch == 2:
            raise KeyboardInterrupt

    full, state = run(), tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        run(state_path=state, progress=kill_after_second_epoch)
    torch.rand(7)  # the resuming process's global generator is elsewhere
    resumed = run(state_path=state)
    for va, vb in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(va, vb)


def test_soft_label_modes(tiny):
    cfg = TrainConfig(epochs=10, batch_size=32, lr=0.05)
    teacher = _train(tiny, cfg).model
    online = _train(tiny, cfg, seed=1, label_source="teacher", loss="kl", teacher=teacher)
    stored = torch.randn(len(tiny.train), 4)
    stored[torch.arange(len(tiny.train)), tiny.train.labels] += 6.0
    st = _train(tiny, cfg, seed=1, label_source="stored", loss="mse_ce", stored_targets=stored)
    assert online.test_accuracy > 0.7 and st.test_accuracy > 0.7
    with pytest.raises(Exception, match="needs a teacher"):
        _train(tiny, cfg, label_source="teacher", loss="kl")
    with pytest.raises(Exception, match="needs soft labels"):
        _train(tiny, cfg, label_source="stored", loss="kl")


def test_stored_labels_under_cutmix_mix_distributions_for_kl(tiny, monkeypatch):
    """CutMix on stored soft labels used to mix the logits linearly for every loss. For ``kl`` the
    target must be the mixture of the two distributions at the temperature (as one-hot labels mix);
    ``mse_ce`` regresses logits and mixes those."""
    from ddkit import training
    from ddkit.training import mix_targets

    a, b = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 4.0]])
    lam = torch.tensor([0.3])
    for t in (1.0, 4.0):
        want = 0.3 * F.softmax(a / t, 1) + 0.7 * F.softmax(b / t, 1)
        got = F.softmax(mix_targets(a, b, lam, "kl", t) / t, 1)
        assert torch.allclose(got, want, atol=1e-6)
        linear = F.softmax((0.3 * a + 0.7 * b) / t, 1)
        assert not torch.allclose(linear, want, atol=1e-3)  # the old target was another distribution
    assert torch.allclose(mix_targets(a, b, lam, "mse_ce", 2.0), 0.3 * a + 0.7 * b)
    # the training loop mixes stored targets through it, with the run's loss and temperature
    seen = []
    monkeypatch.setattr(training, "mix_targets", lambda *args: seen.append(args[3:]) or mix_targets(*args))
    stored = torch.randn(len(tiny.train), 4)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, cutmix_prob=1.0)
    _train(tiny, cfg, label_source="stored", loss="kl", temperature=3.0, stored_targets=stored)
    assert seen and set(seen) == {("kl", 3.0)}


def test_cutmix_mixes_the_augmented_views(monkeypatch):
    """CutMix pastes a box of the partner's view into the image's view (after crop and flip, as SRe2L,
    RDED and CV-DD mix; the FKD store's views too), so a label's weight on a class is the share of the
    view that class's image fills. CutMix used to come before the crop, which moved and rescaled the
    box: the label weights then differed from what the student saw."""
    from ddkit import training
    from ddkit.data.base import ImageSet

    levels = torch.tensor([0.1, 0.35, 0.6, 0.85])  # every image of class c is the constant levels[c]
    labels = torch.arange(64) % 4
    data = ImageSet(levels[labels].view(-1, 1, 1, 1).expand(-1, 1, 16, 16).contiguous(), labels)
    seen = []
    real = training.per_sample_loss
    monkeypatch.setattr(training, "per_sample_loss", lambda logits, y, *a: seen.append(y) or real(logits, y, *a))
    model = create_model("tiny_convnet", 1, 4, 16)
    inputs = []
    model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.01, augment="rrc_flip", cutmix_prob=1.0)
    train_classifier(model, data, (0.5,), (0.25,), cfg, seed=0)
    assert len(seen) == 2 and len(inputs) == 2
    norm = (levels - 0.5) / 0.25
    for x, y in zip(inputs, seen):
        share = torch.stack([((x[:, 0] - v).abs() < 1e-4).float().mean((1, 2)) for v in norm], 1)
        assert y.shape == share.shape == (32, 4)
        assert torch.allclose(share, y, atol=1e-6), (share - y).abs().max()
        assert ((y > 0) & (y < 1)).any()  # some views do hold two classes


def test_ema_decay_warms_up_and_copies_buffers():
    from torch import nn

    from ddkit.training import EMA

    live = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    ema = EMA(live, 0.99)
    want = live[0].weight.detach().clone()
    for n in range(40):
        with torch.no_grad():
            live[0].weight.add_(1.0)
            live[1].running_mean.fill_(float(n))
        d = min(0.99, (1 + n) / (10 + n))
        want = d * want + (1 - d) * live[0].weight.detach()
        ema.update(live)
    assert ema.updates == 40 and ema.current_decay() == pytest.approx(41 / 50)
    # both sides are float32 recurrences: each step rounds a multiply and an add (<= 1 ulp each; the update's
    # add_(alpha=) is fused differently by the vector kernels: 2 ulps apart with AVX2/AVX-512, 0 without), and
    # each step damps the earlier error by d <= 41/50: they differ by at most 2 sides x 2 ulps / (1 - 41/50)
    # ~ 22 ulps of the weight (~36). A warm-up one step off moves it by 0.1, no warm-up by 29.
    assert torch.allclose(ema.model[0].weight, want, rtol=22 * torch.finfo(torch.float32).eps, atol=0)
    # after 40 steps the weights sit within a few steps of the live ones, not 0.99**40 = 67 % at the start
    assert (live[0].weight - ema.model[0].weight).abs().max() < 10
    assert torch.equal(ema.model[1].running_mean, live[1].running_mean)


def test_fp16_step_skipped_by_the_grad_scaler_leaves_the_ema_alone():
    from ddkit.training import EMA, _step

    torch.manual_seed(0)
    live = nn.Linear(3, 2)
    opt = torch.optim.SGD(live.parameters(), lr=0.1)
    ema = EMA(live, 0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(4, 3)
    before = [p.detach().clone() for p in ema.model.parameters()]
    _step(opt, live(x).sum() * float("inf"), live, ema, scaler)  # overflow: optimizer step skipped
    assert scaler.get_scale() == 2.0**9
    assert ema.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, ema.model.parameters(), strict=True))
    _step(opt, live(x).sum(), live, ema, scaler)  # a finite step moves both
    assert ema.updates == 1
    assert not torch.equal(before[0], ema.model.weight)


def test_ema_protocols_alone_get_new_hashes():
    from ddkit.evaluate.protocol import resolve_protocol

    edc = resolve_protocol("edc")
    assert edc.identity()["train"]["ema_warmup"] is True
    assert "ema_warmup" not in resolve_protocol("soft-kl").identity()["train"]
    assert resolve_protocol("edc", {"train": {"ema_decay": 0.0}}).hash != edc.hash


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_convolutions_in_the_reduced_type_and_learns(tiny, precision):
    cfg = TrainConfig(epochs=15, batch_size=32, lr=0.05)
    low = dataclasses.replace(cfg, precision=precision)
    seen: set[torch.dtype] = set()
    torch.manual_seed(0)
    model = create_model("tiny_convnet", 1, 4, 16)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    mixed = train_classifier(model, tiny.train, tiny.mean, tiny.std, low, seed=0, test=tiny.test)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen == {want}  # every forward pass, training and test, ran under autocast
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())  # weights stay fp32
    full = _train(tiny, cfg)
    assert mixed.test_accuracy >= 0.85 and abs(mixed.test_accuracy - full.test_accuracy) <= 0.1
    losses = [h["loss"] for h in mixed.history]
    assert losses != [h["loss"] for h in full.history]  # not silently fp32
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0]
    again = _train(tiny, low)
    assert [h["loss"] for h in again.history] == losses  # deterministic in reduced precision too


def test_precision_is_validated_and_enters_hashes_only_when_not_fp32():
    from ddkit.config import from_dict
    from ddkit.errors import ConfigError
    from ddkit.evaluate.protocol import resolve_protocol
    with pytest.raises(ConfigError, match="precision"):
        from_dict(TrainConfig, {"precision": "fp8"})
    with pytest.raises(ConfigError, match=r"^TrainConfig.precision: 'half' is not one of \['fp32', 'bf16', 'fp16'\]"):
        TrainConfig(precision="half")  # the Literal type's check, as from_dict's
    base = resolve_protocol("dc-protocol")
    assert "precision" not in base.identity()["train"]  # protocols hashed before the option keep their hash
    bf16 = resolve_protocol("dc-protocol", {"train": {"precision": "bf16"}})
    assert bf16.identity()["train"]["precision"] == "bf16" and bf16.hash != base.hash
    assert resolve_protocol("dc-protocol", {"train": {"precision": "fp32"}}).hash == base.hash


def test_bf16_on_a_cpu_without_native_support_warns_once(monkeypatch, caplog):
    import ddkit.training as T

    T._warn_emulated_bf16.cache_clear()
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    with caplog.at_level("WARNING", logger="ddkit.training"):
        T.warn_slow_precision("fp32", torch.device("cpu"))
        assert not caplog.records
        for _ in range(3):
            T.warn_slow_precision("bf16", torch.device("cpu"))
    assert len(caplog.records) == 1 and "emulated" in caplog.records[0].getMessage()
    T._warn_emulated_bf16.cache_clear()  # later tests see this machine's own CPU again


def _steps_as_rank(monkeypatch, tiny, cfg, rank: int, world: int, **kw) -> list[dict]:
    """Train as rank ``rank`` of ``world`` (the process group faked: no DDP wrapper, collectives that
    return their input) and record per step the images moved to the device, the student's input, its
    labels and targets."""
    from ddkit import distributed as ddist
    from ddkit import training
    from ddkit.labels import fkd

    monkeypatch.setattr(ddist, "current", lambda: ddist.DistInfo(rank=rank, world_size=world))
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda model, device_ids=None: model)
    monkeypatch.setattr(ddist, "all_reduce_sum", lambda t: t)
    monkeypatch.setattr(ddist, "broadcast_buffers", lambda module, src=0: None)
    steps, moved = [], []
    for module in (training, fkd):  # the FKD views are rendered by fkd.render
        real_to_float = module.to_float
        monkeypatch.setattr(module, "to_float", lambda x, d, f=real_to_float: moved.append(len(x)) or f(x, d))
    real_loss = training.per_sample_loss

    def loss(logits, labels, targets, *args):
        steps[-1].update(labels=labels, targets=targets, moved=sum(moved))
        moved.clear()
        return real_loss(logits, labels, targets, *args)

    monkeypatch.setattr(training, "per_sample_loss", loss)
    torch.manual_seed(0)
    model = create_model("tiny_convnet", 1, 4, 16)
    model.register_forward_pre_hook(lambda m, args: steps.append({"x": args[0].detach().clone()}))
    train_classifier(model, tiny.train, tiny.mean, tiny.std, cfg, seed=3, distributed=world > 1, **kw)
    monkeypatch.undo()
    return steps


@pytest.mark.parametrize("mode", ["hard", "stored", "fkd"])
def test_a_ddp_rank_moves_only_its_slice_and_its_partners(tiny, monkeypatch, mode):
    """Under DDP every rank used to gather, move and normalise the whole global batch (and FKD rendered
    the whole batch's views and partners) to train on its slice. A rank now reads its rows and the
    CutMix partners they need: the student's inputs, labels and targets are bit for bit the rows of
    the single-process batch, and at most twice the slice's images reach the device."""
    cfg = TrainConfig(epochs=1, batch_size=19, lr=0.05, augment="rrc_flip" if mode == "hard" else "dsa",
                      cutmix_prob=0.5 if mode == "hard" else 1.0)
    kw: dict = {"label_source": mode}
    if mode == "stored":
        kw.update(loss="kl", stored_targets=torch.randn(len(tiny.train), 4, generator=torch.Generator().manual_seed(1)))
    if mode == "fkd":
        from ddkit.labels import relabel

        class Set:
            images, labels, classes, mean, std = tiny.train.images, tiny.train.labels, tiny.classes, tiny.mean, tiny.std

        torch.manual_seed(1)
        kw.update(loss="kl", fkd_store=relabel(Set, create_model("tiny_convnet", 1, 4, 16).eval(), 1, cutmix_prob=1.0))
    one = _steps_as_rank(monkeypatch, tiny, cfg, 0, 1, **kw)
    world = 4
    sizes = [len(s["x"]) for s in one]
    assert sizes == [19] * 5 + [1]  # 96 images: the last batch has fewer images than ranks
    for rank in range(world):
        steps = _steps_as_rank(monkeypatch, tiny, cfg, rank, world, **kw)
        assert len(steps) == len(one)
        for gb, mine, whole in zip(sizes, steps, one):
            lo, hi = (gb * rank // world, gb * (rank + 1) // world) if gb >= world else (0, gb)
            assert torch.equal(mine["x"], whole["x"][lo:hi])
            assert torch.equal(mine["labels"], whole["labels"][lo:hi])
            assert (mine["targets"] is None) == (mode == "hard")
            if mode != "hard":
                assert torch.equal(mine["targets"], whole["targets"][lo:hi])
            # own rows and their partners (FKD renders both); the whole batch of 19 before
            assert mine["moved"] <= 2 * (hi - lo) and (gb < world or mine["moved"] < gb), (gb, mine["moved"])


class _NanInEval(nn.Module):
    """Finite weights whose eval-mode outputs are NaN for images of class-0-like brightness (as a BatchNorm
    model's degenerate running statistics give): an argmax would still name a class."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels * image_size * image_size, num_classes)
        self.cut = math.inf  # images whose mean normalised pixel is below it give NaN: all of them by default
        self.feature_dim = in_channels * image_size * image_size

    def embed(self, x):
        return x.flatten(1)

    def forward(self, x):
        out = self.fc(self.embed(x))
        return out if self.training else torch.where(x.flatten(1).mean(1, keepdim=True) < self.cut, math.nan, out)


def test_non_finite_outputs_count_as_wrong_with_a_warning(tiny, caplog):
    """An argmax over NaN outputs names a class (the first NaN's): a model that gave NaN on every image
    scored class 0's share, silently."""
    torch.manual_seed(0)
    model = _NanInEval(*tiny.image_shape[:1], tiny.num_classes, tiny.image_shape[-1])
    from ddkit.training import normalizer, to_float

    x = normalizer(tiny.mean, tiny.std, "cpu")(to_float(tiny.test.images, "cpu"))
    model.cut = float(x.flatten(1).mean(1).median())
    with torch.no_grad():
        out = model.eval()(x)
    bad = ~torch.isfinite(out).all(1)
    assert 0 < int(bad.sum()) < len(bad)
    right = int(((out.argmax(1) == tiny.test.labels) & ~bad).sum())
    with caplog.at_level("WARNING"):
        acc = accuracy(model, tiny.test, tiny.mean, tiny.std, "cpu", batch_size=7)
    assert acc == right / len(bad)
    assert f"{int(bad.sum())} of {len(bad)} test images give non-finite outputs (NaN/inf) in eval mode" in caplog.text
    with pytest.raises(NonFiniteOutputs, match=f"^{int(bad.sum())} of {len(bad)} test images give non-finite"):
        accuracy(model, tiny.test, tiny.mean, tiny.std, "cpu", nonfinite="raise")


class _NanInEvalBN(_NanInEval):
    """:class:`_NanInEval` with a BatchNorm layer (unused): the model its NaN outputs imitate."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__(in_channels, num_classes, image_size)
        self.bn = nn.BatchNorm1d(num_classes)


@pytest.mark.parametrize("model, fix", [
    # BatchNorm: statistics of too few images, or the lr (convnet3-bn at lr 1e8): the fix named only the first
    (_NanInEvalBN, r"lower teacher.train.lr \(now 0.01\), or train it on more images or epochs, or pick a model "
                   r"without BatchNorm \(now 'nan_eval'\)"),
    # no BatchNorm: finite weights so large that the outputs overflow; the fix used to name BatchNorm
    (_NanInEval, r"lower teacher.train.lr \(now 0.01\)"),
])
def test_a_teacher_with_non_finite_outputs_is_refused(tiny, tmp_path, monkeypatch, model, fix):
    from ddkit.models import MODELS
    from ddkit.teacher import TeacherConfig, train_teacher

    monkeypatch.setattr(MODELS, "_entries", {**MODELS._entries, "nan_eval": model})
    cfg = TeacherConfig(model="nan_eval", train=TrainConfig(epochs=2, batch_size=16, lr=0.01))
    with pytest.raises(DDKitError, match=r"^teacher: \d+ of \d+ test images give non-finite outputs \(NaN/inf\) in "
                                         rf"eval mode, counted as wrong; nothing was saved: {fix}$"):
        train_teacher(tiny, cfg, tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


class _PooledBN(nn.Module):
    """A conv, then BatchNorm on the 1x1 average-pooled map (``pool_first``: one value per channel and image, as
    the last block of a ResNet-18 or MobileNetV2 on small images) or on the full map, then a linear head."""

    def __init__(self, in_channels, num_classes, image_size, pool_first=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        norm = [nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4)]
        self.body = nn.Sequential(*(norm if pool_first else norm[::-1]))
        self.fc = nn.Linear(4, num_classes)
        self.feature_dim = 4

    def embed(self, x):
        return self.body(self.conv(x)).flatten(1)

    def forward(self, x):
        return self.fc(self.embed(x))


_FIX = "which needs 2 images to normalise"


def test_a_one_image_batch_at_batchnorm_on_a_1x1_map_names_the_batch_size(tiny):
    """torch's bare ValueError ('Expected more than 1 value per channel when training') used to end
    evaluate and teacher training when the last batch held one image; a 1-image batch whose BatchNorm sees
    a larger map trains as before."""
    data = tiny.train.subset(torch.arange(3))
    cfg = TrainConfig(epochs=1, batch_size=2, lr=0.01)
    with pytest.raises(ConfigError, match=rf"^train.batch_size=2 on 3 images leaves a last batch of 1 image, and "
                                          rf"_PooledBN's BatchNorm meets a 1x1 feature map there, {_FIX}; pick a "
                                          r"train.batch_size that leaves no single image over$"):
        train_classifier(_PooledBN(1, 4, 16), data, tiny.mean, tiny.std, cfg, seed=0)
    with pytest.raises(ConfigError, match=r"^teacher.train.batch_size=1 makes every batch 1 image, .* set "
                                          r"teacher.train.batch_size to 2 or more$"):
        train_classifier(_PooledBN(1, 4, 16), data, tiny.mean, tiny.std, dataclasses.replace(cfg, batch_size=1),
                         seed=0, settings="teacher.train")
    result = train_classifier(_PooledBN(1, 4, 16, pool_first=False), data, tiny.mean, tiny.std, cfg, seed=0)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss"])


def test_a_one_image_teacher_bn_group_names_teacher_bn_batch(tiny):
    """Batch-statistics teacher labels (CV-DD) on a last group of one image: in training (evaluate's label
    mode teacher) and for static labels (relabel, distill --soft-labels)."""
    from ddkit.training import one_image_batch, teacher_labels

    teacher = _PooledBN(1, 4, 16).eval()
    data = tiny.train.subset(torch.arange(10))
    student = nn.Sequential(nn.Flatten(), nn.Linear(256, 4))
    with pytest.raises(ConfigError, match=rf"^teacher_bn_batch=3 on 10 images leaves a last group of 1 image, and "
                                          rf"_PooledBN's BatchNorm .*{_FIX}; pick a teacher_bn_batch that"):
        train_classifier(student, data, tiny.mean, tiny.std, TrainConfig(epochs=1, batch_size=10, lr=0.01), seed=0,
                         label_source="teacher", loss="kl", teacher=teacher, teacher_bn="batch", teacher_bn_batch=3)
    with pytest.raises(ConfigError, match=r"^teacher_bn=batch with train.batch_size=3 on 10 images leaves a last "
                                          r"batch of 1 image, .* pick a train.batch_size that"):
        train_classifier(student, data, tiny.mean, tiny.std, TrainConfig(epochs=1, batch_size=3, lr=0.01), seed=0,
                         label_source="teacher", loss="kl", teacher=teacher, teacher_bn="batch")
    images = tiny.train.images[:10].float()
    with pytest.raises(ConfigError, match=r"^distill.soft_labels_bn_batch=3 on 10 images leaves a last group of 1 "
                                          r"image, .* pick a distill.soft_labels_bn_batch that"):
        teacher_labels(teacher, lambda idx: images[idx], 10, 64, "batch", 3, torch.Generator().manual_seed(0),
                       "distill.soft_labels_bn")
    assert teacher_labels(teacher, lambda idx: images[idx], 10, 64, "batch", 5, torch.Generator()).shape == (10, 4)
    with pytest.raises(ValueError, match="^another$"), one_image_batch(teacher, lambda: ("", "")):
        raise ValueError("another")  # other ValueErrors pass through


def test_a_teacher_whose_last_batch_is_one_image_is_refused_in_one_line(tiny, tmp_path, monkeypatch):
    from ddkit.models import MODELS
    from ddkit.teacher import TeacherConfig, train_teacher

    monkeypatch.setattr(MODELS, "_entries", {**MODELS._entries, "pooled_bn": _PooledBN})
    n = len(tiny.train)
    cfg = TeacherConfig(model="pooled_bn", train=TrainConfig(epochs=1, batch_size=n - 1, lr=0.01))
    with pytest.raises(ConfigError, match=rf"^teacher.train.batch_size={n - 1} on {n} images leaves a last batch of "
                                          "1 image, "):
        train_teacher(tiny, cfg, tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


def test_a_ddp_rank_slice_of_one_image_names_the_batch_size_and_ranks(tiny, monkeypatch):
    """3 images over 2 ranks: rank 0 trains 1 of them (the process group faked, as in _steps_as_rank)."""
    from ddkit import distributed as ddist

    monkeypatch.setattr(ddist, "current", lambda: ddist.DistInfo(rank=0, world_size=2))
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda model, device_ids=None: model)
    data = tiny.train.subset(torch.arange(3))
    with pytest.raises(ConfigError, match=r"^train.batch_size=4 over 2 ranks gives a rank 1 image of a batch of 3, .* "
                                          r"pick a train.batch_size that gives every rank 2 or more images$"):
        train_classifier(_PooledBN(1, 4, 16), data, tiny.mean, tiny.std, TrainConfig(epochs=1, batch_size=4, lr=0.01),
                         seed=0, distributed=True)
