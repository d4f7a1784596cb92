"""DC / DSA / DM / DataDAM: distances against hand-computed values, learning, sharding, configs."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddkit.config import from_dict
from ddkit.data.base import make_synthetic
from ddkit.errors import ConfigError, DDKitError
from ddkit.methods import METHODS, FitContext, common
from ddkit.methods.datadam import (
    DataDAM,
    DataDAMConfig,
    attention_loss,
    attention_map,
    embed_with_features,
)
from ddkit.methods.dm import DM, DMConfig, dm_loss
from ddkit.methods.gradient_matching import (
    DCConfig,
    DSAConfig,
    _class_grads,
    layer_distance,
    loops_for,
    match_distance,
)
from ddkit.methods.matching import RealByClass, derive_seed, fresh_model
from ddkit.models import create_model

KEYS = ("dc", "dsa", "dm", "datadam")


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


def test_registered():
    for key in KEYS:
        assert key in METHODS


# ------------------------------------------------------------------------------------------------
# distances


def test_layer_distance_hand_computed():
    g_syn = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    g_real = torch.tensor([[2.0, 0.0], [1.0, 0.0], [4.0, 3.0]])
    # rows: cos 1, cos 0, cos 24/25  ->  0 + 1 + 1/25
    assert layer_distance(g_syn, g_real).item() == pytest.approx(1.04, abs=1e-5)
    # conv weights [out, in, kh, kw]: one row per output filter
    conv = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])
    assert layer_distance(conv, -conv).item() == pytest.approx(4.0, abs=1e-5)
    # biases / norm parameters contribute nothing (reference distance_wb)
    assert layer_distance(torch.ones(5), -torch.ones(5)).item() == 0.0


def test_match_distance_is_sum_of_formula():
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (5, 16)]
    g_syn = [torch.randn(s, generator=gen) for s in shapes]
    g_real = [torch.randn(s, generator=gen) for s in shapes]
    want = sum(
        (1 - F.cosine_similarity(s.reshape(len(s), -1), r.reshape(len(r), -1), dim=1, eps=1e-12)).sum().item()
        for s, r in zip(g_syn, g_real, strict=True) if s.dim() > 1
    )
    assert match_distance(g_syn, g_real).item() == pytest.approx(want, rel=1e-4)


def test_dm_loss_hand_computed():
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert dm_loss(real, torch.tensor([[2.0, 3.0]])).item() == 0.0
    assert dm_loss(real, torch.tensor([[0.0, 6.0], [4.0, 0.0]])).item() == 0.0  # same mean
    assert dm_loss(real, torch.zeros(1, 2)).item() == pytest.approx(13.0)


def test_attention_map_and_loss_hand_computed():
    f = torch.tensor([[[[1.0, 2.0]], [[1.0, 0.0]]]])  # [1, C=2, 1, 2]
    # p=2: mean over channels [1, 2] -> L2-normalised [1, 2] / sqrt(5)
    assert torch.allclose(attention_map(f, 2.0), torch.tensor([[1.0, 2.0]]) / math.sqrt(5))
    assert attention_loss([f], [f.clone()], 4.0).item() == 0.0
    g = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.0]]]])  # attention [1, 0]
    want = (1 / math.sqrt(5) - 1) ** 2 + (2 / math.sqrt(5)) ** 2
    assert attention_loss([f], [g], 2.0).item() == pytest.approx(want, rel=1e-6)


def test_embed_with_features_hooks_every_block_but_last():
    net = create_model("convnet", 1, 4, 16, depth=3, width=4)
    x = torch.randn(2, 1, 16, 16)
    emb, feats = embed_with_features(net, x)
    assert torch.equal(emb, net.embed(x))
    assert [tuple(f.shape) for f in feats] == [(2, 4, 16, 16), (2, 4, 8, 8)]
    assert not any(m._forward_hooks for m in net.modules()), "hooks must be removed"
    with pytest.raises(DDKitError, match="ConvNet-style"):
        embed_with_features(create_model("tiny_mlp", 1, 4, 16), x)


def test_loops_for():
    assert loops_for(1, None, None) == (1, 1)
    assert loops_for(10, None, None) == (10, 50)
    assert loops_for(50, None, None) == (50, 10)
    assert loops_for(2, None, None) == (1, 1)  # nearest tabulated IPC
    assert loops_for(10, 3, None) == (3, 50)


def test_fresh_model_is_seeded_and_leaves_global_rng_alone(data):
    before = torch.get_rng_state()
    a = fresh_model("tiny_convnet", {}, data, 7, torch.device("cpu"))
    b = fresh_model("tiny_convnet", {}, data, 7, torch.device("cpu"))
    c = fresh_model("tiny_convnet", {}, data, 8, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert derive_seed(0, "dm", 1) != derive_seed(0, "dm", 2) and derive_seed(0, "x") == derive_seed(0, "x")


# ------------------------------------------------------------------------------------------------
# learning: a few iterations reduce the matching loss (measured on held-out random networks)


def _eval_nets(data, n=2):
    return [fresh_model("tiny_convnet", {}, data, 10_000 + i, torch.device("cpu")) for i in range(n)]


def _dm_gap(data, images, ipc):
    real = RealByClass(data, torch.device("cpu"))
    syn = common.to_normalized(images, data)
    with torch.no_grad():
        return sum(
            dm_loss(net.embed(real.images[real.index[c]]), net.embed(syn[c * ipc:(c + 1) * ipc])).item()
            for net in _eval_nets(data) for c in range(data.num_classes)
        )


def _grad_gap(data, images, ipc):
    real = RealByClass(data, torch.device("cpu"))
    syn = common.to_normalized(images, data)
    total = 0.0
    for net in _eval_nets(data):
        for c in range(data.num_classes):
            g_real = _class_grads(net, real.images[real.index[c]], c, create_graph=False)
            g_syn = _class_grads(net, syn[c * ipc:(c + 1) * ipc], c, create_graph=False)
            total += match_distance(g_syn, g_real).item()
    return total


@pytest.mark.parametrize(("key", "options", "gap"), [
    # lr_img 1 instead of DC's 0.1: a clear decrease within a few seconds
    ("dc",
     {"iterations": 4, "outer_loop": 2, "inner_loop": 1, "batch_real": 24, "init": "noise", "lr_img": 1.0}, _grad_gap),
    ("dsa",
     {"iterations": 4, "outer_loop": 2, "inner_loop": 1, "batch_real": 24, "init": "noise", "lr_img": 1.0}, _grad_gap),
    ("dm", {"iterations": 8, "batch_real": 24, "init": "noise"}, _dm_gap),
    ("datadam", {"iterations": 8, "batch_real": 24, "init": "noise"}, _dm_gap),
])
def test_iterations_reduce_matching_loss(data, key, options, gap):
    ipc = 2
    cls = METHODS.get(key)
    cfg = from_dict(cls.Config, {"model": "tiny_convnet", **options})
    init, _ = common.init_images(data, ipc, "noise", 0)  # what fit starts from with seed 0
    out = cls(cfg).fit(data, [], FitContext(ipc=ipc, seed=0)).synthetic_
    assert out.images.dtype == torch.float32 and out.labels.dtype == torch.int64
    before, after = gap(data, init, ipc), gap(data, out.images, ipc)
    assert after < 0.9 * before, f"{key}: matching loss {before:.4f} -> {after:.4f}"


def _gradient_matching_the_old_way(data, cfg, ipc, seed, augment, tag):
    """DC/DSA's synthesis as it was until 2026-12-06: every class's distance summed, then one
    autograd.grad (all classes' double-backward graphs alive at once). One process, no BatchNorm."""
    from ddkit.methods.gradient_matching import loops_for
    from ddkit.methods.matching import model_keys

    outer, inner = loops_for(ipc, cfg.outer_loop, cfg.inner_loop)
    size, nc = tuple(data.image_shape[1:]), data.num_classes
    pixels, labels = common.init_images(data, ipc, cfg.init, seed)
    syn = common.to_normalized(pixels, data).requires_grad_(True)
    opt_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum_img)
    real = RealByClass(data, torch.device("cpu"))
    for it in range(cfg.iterations):
        gen = torch.Generator().manual_seed(derive_seed(seed, tag, "iteration", it))
        net = fresh_model(cfg.model, cfg.model_options, data, derive_seed(seed, tag, "net", it), torch.device("cpu"),
                          model_keys(FitContext(ipc=ipc, seed=seed)))
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        for ol in range(outer):
            loss = syn.new_zeros(())
            for c in range(nc):
                x_real, x_syn = real.batch(c, cfg.batch_real, gen), syn[c * ipc:(c + 1) * ipc]
                if augment is not None:
                    params = augment.sample(1, gen, size)
                    x_real, x_syn = augment.apply(x_real, params), augment.apply(x_syn, params)
                g_real = [g.detach() for g in _class_grads(net, x_real, c, create_graph=False)]
                loss = loss + match_distance(_class_grads(net, x_syn, c, create_graph=True), g_real)
            opt_img.zero_grad(set_to_none=True)
            syn.grad = torch.autograd.grad(loss, syn)[0]
            opt_img.step()
            if ol == outer - 1:
                break
            train_x, n = syn.detach().clone(), len(labels)
            for _ in range(inner):
                perm = torch.randperm(n, generator=gen)
                for lo in range(0, n, cfg.batch_train):
                    idx = perm[lo:lo + cfg.batch_train]
                    x = train_x[idx]
                    if augment is not None:
                        x = augment.apply(x, augment.sample(len(idx), gen, size))
                    opt_net.zero_grad(set_to_none=True)
                    F.cross_entropy(net(x), labels[idx]).backward()
                    opt_net.step()
    return common.to_pixels(syn.detach(), data).float()


@pytest.mark.parametrize("key", ["dc", "dsa"])
def test_gradient_matching_per_class_gradients_equal_the_summed_loss(data, key):
    """Each class's distance is now differentiated on its own (one class's double-backward graph in
    memory at a time); the images stay those of one gradient of the summed distance, bit for bit."""
    from ddkit.data.augment import build_augment

    cls = METHODS.get(key)
    cfg = from_dict(cls.Config, {**cls.smoke_options, "iterations": 2, "outer_loop": 3, "batch_real": 8})
    got = cls(cfg).fit(data, [], FitContext(ipc=2, seed=4)).synthetic_.images
    want = _gradient_matching_the_old_way(data, cfg, 2, 4, build_augment("dsa") if key == "dsa" else None, key)
    assert torch.equal(got, want)


def test_gradient_matching_rank_gathers_and_augments_only_its_own_classes(data, monkeypatch):
    """Under torchrun every rank gathered and DSA-augmented every class's batches, then dropped those
    of the classes it does not own; it still draws them all (the random streams stay one process's)."""
    from ddkit import distributed as ddist
    from ddkit.data.augment import DSA as DSAugment
    from ddkit.methods.matching import RealByClass as Real

    taken, siamese = [], []
    take, apply = Real.take, DSAugment.apply
    monkeypatch.setattr(Real, "take", lambda self, pick: taken.append(data.train.labels[pick].unique().tolist())
                        or take(self, pick))
    monkeypatch.setattr(DSAugment, "apply", lambda self, x, params: siamese.append(len(params["op"]) == 1)
                        or apply(self, x, params))
    monkeypatch.setattr(ddist, "current", lambda: ddist.DistInfo(rank=1, world_size=2))  # rank 1 of 2 ...
    monkeypatch.setattr(ddist, "all_reduce_sum", lambda t: t)  # ... whose peer contributes nothing
    cfg = from_dict(DSAConfig, {**METHODS.get("dsa").smoke_options, "iterations": 1, "outer_loop": 1})
    METHODS.get("dsa")(cfg).fit(data, [], FitContext(ipc=2, seed=0))
    assert taken == [[1], [3]]  # its classes only
    assert siamese == [True] * 4  # a real and a synthetic batch of each


# ------------------------------------------------------------------------------------------------
# per-class independence: sharding classes over ranks gives the single-process result


@pytest.mark.parametrize("method_cls", [DM, DataDAM])
def test_per_class_fit_equals_full_fit(data, method_cls):
    cfg = from_dict(method_cls.Config, {**method_cls.smoke_options, "iterations": 3})
    ctx = FitContext(ipc=2, seed=3)
    full = method_cls(cfg).fit(data, [], ctx).synthetic_  # all classes in one process
    assert full.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    rank0 = method_cls(cfg).fit_classes(data, ctx, [0, 2])  # the classes of rank 0 of 2
    rank1 = method_cls(cfg).fit_classes(data, ctx, [3, 1])  # rank 1, visited in another order
    assert sorted([*rank0, *rank1]) == [0, 1, 2, 3]
    for part in (rank0, rank1):
        for c, images in part.items():
            assert torch.equal(images, full.images[c * 2:(c + 1) * 2]), f"class {c} depends on the other classes"


def test_tree_to_moves_every_tensor_and_keeps_the_rest():
    from ddkit.methods.matching import tree_to

    state = {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.5, "params": [0]}],
             "pair": (torch.zeros(1), "x")}
    moved = tree_to(state, "meta")
    assert moved["state"][0]["momentum_buffer"].is_meta and moved["pair"][0].is_meta
    assert moved["param_groups"] == [{"lr": 0.5, "params": [0]}] and isinstance(moved["pair"], tuple)
    assert moved["pair"][1] == "x" and not state["state"][0]["momentum_buffer"].is_meta  # the input is untouched


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_dm_checkpoint_gathers_its_state_on_the_cpu(data, device, tmp_path, monkeypatch):
    """The ranks all-gather DM's checkpoint by pickling it: an optimiser's momentum buffers on a GPU
    came out on the sending rank's GPU at every peer (or failed there). On the CPU this only checks
    that every tensor is gathered and resumed; the device move itself shows on CUDA (gpu tier)."""
    from ddkit import distributed as ddist

    gathered = []
    real_gather = ddist.all_gather_objects

    def spy(obj):
        if isinstance(obj, dict) and "optim" in obj:
            gathered.append(obj)
        return real_gather(obj)

    def kill(step, total, record):
        raise KeyboardInterrupt

    monkeypatch.setattr(ddist, "all_gather_objects", spy)
    cfg = from_dict(DMConfig, {**DM.smoke_options, "iterations": 2})
    ctx = FitContext(ipc=2, seed=0, device=device, work_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):  # after the checkpoint of iteration 1
        DM(cfg).fit(data, [], FitContext(ipc=2, seed=0, device=device, work_dir=tmp_path, progress=kill))
    assert len(gathered) == 1
    buffers = [s["momentum_buffer"] for c in range(4) for s in gathered[0]["optim"][str(c)]["state"].values()]
    assert len(buffers) == 4 and all(b.device.type == "cpu" for b in buffers)
    assert all(t.device.type == "cpu" for t in gathered[0]["images"].values())
    # the resume loads them back onto the device and ends where an uninterrupted run does
    resumed = DM(cfg).fit(data, [], ctx).synthetic_
    assert len(gathered) == 2
    assert torch.equal(resumed.images,
                       DM(cfg).fit(data, [], FitContext(ipc=2, seed=0, device=device)).synthetic_.images)


def test_resume_with_other_settings_is_refused(data, tmp_path):
    ctx = FitContext(ipc=2, seed=0, work_dir=tmp_path)
    DM(from_dict(DMConfig, {**DM.smoke_options, "iterations": 1})).fit(data, [], ctx)
    other = from_dict(DMConfig, {**DM.smoke_options, "iterations": 1, "lr_img": 0.5})
    with pytest.raises(DDKitError, match="other settings"):
        DM(other).fit(data, [], ctx)
    # other data of the same shape and sizes (another subset, another normalisation) is other settings too
    import dataclasses

    from ddkit.data.base import make_synthetic

    cfg = from_dict(DMConfig, {**DM.smoke_options, "iterations": 1})
    for changed in (make_synthetic(seed=7), dataclasses.replace(data, std=tuple(2 * s for s in data.std))):
        assert changed.train.images.shape == data.train.images.shape
        with pytest.raises(DDKitError, match="other settings"):
            DM(cfg).fit(changed, [], ctx)


# ------------------------------------------------------------------------------------------------
# config errors


@pytest.mark.parametrize(("cfg_cls", "options", "match"), [
    (DCConfig, {"iterations": 0}, "iterations"),
    (DCConfig, {"outer_loop": 0}, "outer_loop"),
    (DCConfig, {"lr_net": 0.0}, "lr_net"),
    (DCConfig, {"batch_train": 0}, "batch_train"),
    (DCConfig, {"bn_real_per_class": -1}, "bn_real_per_class must be >= 0"),
    (DCConfig, {"model": "convnet_nope"}, "model"),
    (DSAConfig, {"dsa_options": {"bogus": 1}}, "bogus"),
    (DSAConfig, {"lr_img": -1.0}, "lr_img"),
    (DMConfig, {"init": "zeros"}, "init"),
    (DMConfig, {"checkpoint_every": 0}, "checkpoint_every"),
    (DMConfig, {"momentum_img": 1.0}, "momentum_img"),
    (DMConfig, {"batch_real": 0}, "batch_real"),
    (DataDAMConfig, {"power": 0.0}, "power"),
    (DataDAMConfig, {"attention_weight": 0.0, "mmd_weight": 0.0}, "nothing to optimise"),
    (DataDAMConfig, {"mmd_weight": -1.0}, "mmd_weight"),
])
def test_config_errors(cfg_cls, options, match):
    with pytest.raises(ConfigError, match=match):
        cfg_cls(**options)


@pytest.mark.parametrize("cfg_cls", [DSAConfig, DMConfig, DataDAMConfig])
def test_dsa_option_errors_name_dsa_options(cfg_cls):
    """They named build_augment's augment_options, a key these methods do not have."""
    with pytest.raises(ConfigError, match=r"^distill.options.dsa_options: DSA strategy '' with flip=True has no "
                                          r"operation left$"):
        from_dict(cfg_cls, {"dsa_options": {"strategy": ""}}, "distill.options")
    with pytest.raises(ConfigError, match=r"^distill.options.dsa_options: augmentation 'dsa' has no option\(s\) "
                                          r"\['bogus'\]"):
        from_dict(cfg_cls, {"dsa_options": {"bogus": 1}}, "distill.options")


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match="lr_img"):
        from_dict(DMConfig, {"lr_imgs": 1.0})


@pytest.mark.slow
def test_dsa_under_torchrun_shards_classes_and_equals_one_process(tmp_path):
    """2 gloo ranks split DSA's classes (DC's loop, plus the siamese augmentation) and all-reduce the
    image gradient: same images, bit for bit."""
    from safetensors.torch import load_file

    from conftest import run_ddkit

    def run(out, ranks=1):
        run_ddkit(tmp_path, "distill", "--dataset", "synthetic", "--method", "dsa", "--ipc", "2", "--out", out,
                  "--set", "distill.options.model=tiny_convnet", "--set", "distill.options.iterations=2",
                  "--set", "distill.options.outer_loop=2", "--set", "distill.options.inner_loop=1",
                  "--set", "distill.options.batch_real=8", ranks=ranks)
        return load_file(str(tmp_path / out / "images.safetensors"))

    one, two = run("d1"), run("d2", ranks=2)
    assert torch.equal(one["images"], two["images"]) and torch.equal(one["labels"], two["labels"])


def test_trajectory_window_beyond_the_buffer_fails_before_training_experts():
    """A start window the experts to be trained cannot serve is a config error, not an error after them."""
    from ddkit.config import from_dict
    from ddkit.methods.mtt import DATMConfig

    with pytest.raises(ConfigError, match="need experts of at least 31 epochs, but they have 30"):
        from_dict(DATMConfig, {"buffer": {"epochs": 30}, "max_start_epoch": 30, "current_max_start_epoch": 20})
    assert from_dict(DATMConfig, {"buffer": {"epochs": 30}, "max_start_epoch": 29}).max_start_epoch == 29
    # with a given buffer the epochs are known only once it is read: fit checks them then
    assert from_dict(DATMConfig, {"experts": "somewhere", "max_start_epoch": 60}).max_start_epoch == 60


@pytest.mark.parametrize("key", ["dm", "dc", "datadam"])
def test_a_model_too_deep_for_the_images_names_its_option(data, key, tmp_path):
    """"image size 16 is too small for a depth-5 ConvNet" did not say which setting made the ConvNet."""
    from ddkit.data.base import DatasetConfig
    from ddkit.pipeline import DistillConfig, distill

    cfg = DistillConfig(method=key, ipc=1,
                        options={"model": "convnet3", "model_options": {"depth": 5}, "iterations": 1})
    with pytest.raises(ConfigError) as err:
        distill(data, cfg, DatasetConfig(name="synthetic"), tmp_path / "set")
    assert str(err.value) == ("distill.options.model_options: image size 16 is too small for a depth-5 ConvNet with "
                              "pooling: 5 poolings need at least 32 px; use a smaller depth (at most 4) or "
                              "pooling='none'")
    assert list(tmp_path.iterdir()) == []  # no set, no checkpoints


@pytest.mark.parametrize("key", ["dc", "dsa"])
def test_gradient_matching_takes_a_model_that_needs_more_than_32_px(key, tmp_path):
    """A set's identity asked whether the model has BatchNorm by building it at 32 px: a depth-6
    ConvNet (64 px and up) failed with "image size 32 is too small" even on 64 px data."""
    from ddkit.data.base import DatasetConfig
    from ddkit.pipeline import DistillConfig, distill

    data = make_synthetic(num_classes=2, train_per_class=4, test_per_class=2, image_size=64)
    for model, tags in (("convnetd6", {}), ("convnetd6-bn", {"bn_real_per_class": 16})):
        assert METHODS.get(key).identity_tags({"model": model}) == tags
    options = {"model": "convnetd6", "model_options": {"width": 4}, "iterations": 1, "outer_loop": 1, "inner_loop": 1,
               "batch_real": 2, "batch_train": 2}
    out = distill(data, DistillConfig(method=key, ipc=1, options=options), DatasetConfig(name="synthetic"),
                  tmp_path / "set")
    assert out.images.shape == (2, 1, 64, 64) and torch.isfinite(out.images).all()
    # only a size error sends the check to larger images: a bad option is named as it stands
    from ddkit.methods.gradient_matching import has_batchnorm

    with pytest.raises(DDKitError, match=r"^model 'convnet' has no option 'bogus'"):
        has_batchnorm("convnet", {"bogus": 1})
    with pytest.raises(DDKitError, match=r"^cannot tell whether model 'convnetd12' has BatchNorm layers: it cannot be "
                                         r"built for 1-channel images of 32 to 1024 px \(image size 1024 is too small"):
        has_batchnorm("convnetd12", {})


def test_an_expert_model_too_deep_for_the_images_names_the_buffer_option(data, tmp_path, monkeypatch):
    from ddkit.data.base import DatasetConfig
    from ddkit.methods.trajectory import ExpertConfig, train_experts
    from ddkit.pipeline import DistillConfig, distill

    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    buffer = {"model": "convnetd5", "num_experts": 1, "epochs": 2}
    cfg = DistillConfig(method="mtt", ipc=1, options={"buffer": buffer, "expert_epochs": 1, "max_start_epoch": 1})
    with pytest.raises(ConfigError, match=r"^distill.options.buffer.model_options: image size 16 is too small for a "
                                          r"depth-5 ConvNet .*; use a smaller depth \(at most 4\) or pooling='none'$"):
        distill(data, cfg, DatasetConfig(name="synthetic"), tmp_path / "set")
    assert not (tmp_path / "set").exists()
    with pytest.raises(ConfigError, match=r"^experts.model_options: image size 16 is too small"):  # `ddkit experts`
        train_experts(data, ExpertConfig(**buffer), tmp_path / "buffer")
    assert not (tmp_path / "buffer").exists()


@pytest.mark.parametrize("key", ["dc", "dsa"])
def test_gradient_matching_freezes_batchnorm_from_real_images(data, key, monkeypatch):
    """For a BatchNorm network (the reference's BN_flag), the running statistics are set by one
    forward pass over real images before each image update and stay frozen while every class's
    gradients are matched; the inner loop trains on batch statistics. Instance-norm networks are
    untouched, and only BatchNorm sets get a new identity."""
    import ddkit.methods.gradient_matching as gm

    seen = []
    real_grads = gm._class_grads

    def spy(net, x, label, create_graph):
        bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        seen.append((tuple(m.training for m in bn), int(bn[0].num_batches_tracked), bn[0].running_mean.clone()))
        return real_grads(net, x, label, create_graph)

    monkeypatch.setattr(gm, "_class_grads", spy)
    cls = METHODS.get(key)
    opts = {"model": "convnet3-bn", "model_options": {"width": 8}, "iterations": 1, "outer_loop": 2, "inner_loop": 1,
            "batch_real": 8, "batch_train": 4}
    frozen = cls(from_dict(cls.Config, opts)).fit(data, [], FitContext(ipc=2, seed=0)).synthetic_
    per_step = 2 * data.num_classes  # a real and a synthetic gradient per class
    assert len(seen) == 2 * per_step and not any(any(flags) for flags, _, _ in seen)  # every BN layer in eval mode
    # one statistics pass before step 0; before step 1 the inner loop's 2 batches (8 images, batch 4) and one more pass
    assert [n for _, n, _ in seen] == [1] * per_step + [4] * per_step
    for step in (seen[:per_step], seen[per_step:]):
        assert all(torch.equal(m, step[0][2]) for _, _, m in step) and step[0][2].abs().sum() > 0
    seen.clear()
    batch_stats = cls(from_dict(cls.Config, {**opts, "bn_real_per_class": 0})).fit(
        data, [], FitContext(ipc=2, seed=0)).synthetic_
    assert all(all(flags) for flags, _, _ in seen)  # the old behaviour: batch statistics while matching
    assert not torch.equal(frozen.images, batch_stats.images)
    assert cls.identity_tags(opts) == {"bn_real_per_class": 16}
    assert cls.identity_tags({**opts, "bn_real_per_class": 0}) == {} == cls.identity_tags({}) == cls.identity_tags(
        {"model": "convnet3-w32"})
    monkeypatch.setattr(gm, "_class_grads", real_grads)
    plain = {**opts, "model": "tiny_convnet", "model_options": {}}
    a = cls(from_dict(cls.Config, plain)).fit(data, [], FitContext(ipc=2, seed=0)).synthetic_
    b = cls(from_dict(cls.Config, {**plain, "bn_real_per_class": 0})).fit(
        data, [], FitContext(ipc=2, seed=0)).synthetic_
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("key, options", [
    ("dm", {"iterations": 2, "batch_real": 8}),
    ("dc", {"model": "tiny_convnet", "iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 8,
            "batch_train": 4}),
])
def test_progress_losses_on_a_device_without_float64(data, monkeypatch, key, options):
    """The progress loss sums on the device in float32 where it has no float64 (mps, simulated on the
    CPU), and is the CPU's float64 sum to float32 rounding."""
    import ddkit.methods.gradient_matching as gm
    import ddkit.methods.matching as mt
    from test_training import _NoFloat64

    cls = METHODS.get(key)

    def losses():
        records = []
        cls(from_dict(cls.Config, options)).fit(data, [], FitContext(ipc=1, seed=0, progress=lambda s, t, r:
                                                                     records.append(r["loss"])))
        return records

    ref = losses()
    for module in (mt, gm, common):
        monkeypatch.setattr(module, "sum_dtype", lambda device: torch.float32)
    with _NoFloat64():
        got = losses()
    assert got == pytest.approx(ref, rel=1e-6) and len(got) == 2
