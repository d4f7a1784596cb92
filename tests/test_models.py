import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddkit.data import make_synthetic
from ddkit.errors import ConfigError, DDKitError
from ddkit.models import MODELS, create_model, list_models

ALL = list_models()
# the smallest image each model takes (5 poolings of 2x2 need 32 px); every other model takes 28 px
MIN_SIZE = {"convnetd5": 32}


@pytest.fixture(autouse=True)
def _one_thread():
    """Batch-2 passes are many tiny ops: one thread is as fast, and two threads slow down tenfold
    when other jobs share the 2 cores (OpenMP threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _size(name: str) -> int:
    return max(28, MIN_SIZE.get(name, 0))


def _final_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _check_contract(model: nn.Module, channels: int, size: int, num_classes: int) -> None:
    x = torch.randn(2, channels, size, size)
    model.train()
    logits = model(x)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    feats = model.embed(x)
    assert feats.shape == (2, model.feature_dim)
    assert torch.isfinite(feats).all()
    # every parameter takes part in the forward pass (gradient matching needs all of them)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
    # embed is exactly the input of the final linear layer (no dropout in eval mode)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            _final_linear(model)(model.embed(x)), model(x), rtol=1e-4, atol=1e-5
        )


def test_registry_holds_the_documented_models():
    assert set(ALL) >= {
        "convnet", "convnet3", "convnetd1", "convnetd2", "convnetd4", "convnetd5", "convnet3-bn",
        "convnet3-nonorm", "convnet3-w32", "convnet3-w64", "convnet3-w32-bn", "resnet18_cifar",
        "resnet18_cifar_in", "tv_resnet18", "tv_resnet50", "tv_mobilenet_v2", "tv_efficientnet_b0",
        "tv_vgg11_bn", "tv_densenet121", "tiny_convnet", "tiny_mlp",
    }  # fmt: skip
    assert list(MODELS) == ALL


@pytest.mark.parametrize("name", ALL)
def test_every_model_keeps_the_contract_on_1x28(name):
    size = _size(name)
    _check_contract(create_model(name, 1, 10, size), 1, size, 10)


@pytest.mark.parametrize(
    "name,options",
    [("convnet3", {}), ("resnet18_cifar", {"width": 8}), ("resnet18_cifar_in", {"width": 8}), ("tiny_mlp", {}),
     ("tv_resnet18", {}), ("tv_mobilenet_v2", {}), ("tv_vgg11_bn", {})],
)  # fmt: skip
def test_three_channel_32px(name, options):
    _check_contract(create_model(name, 3, 7, 32, **options), 3, 32, 7)


def test_thin_resnet_width_sets_channels():
    model = create_model("resnet18_cifar", 1, 10, 28, width=8)
    assert model.conv1.out_channels == 8 and model.feature_dim == 64
    assert isinstance(model.bn1, nn.BatchNorm2d)
    model_in = create_model("resnet18_cifar_in", 1, 10, 28, width=8)
    assert isinstance(model_in.bn1, nn.GroupNorm) and model_in.bn1.num_groups == 8


def test_glob_listing():
    convnets = list_models("convnet*")
    assert "convnet3" in convnets and "convnet3-w32-bn" in convnets
    assert "resnet18_cifar" not in convnets and "tiny_convnet" not in convnets
    assert list_models("tv_*") == sorted(n for n in ALL if n.startswith("tv_"))
    assert list_models("nothing*") == []


def test_unknown_name_suggests():
    with pytest.raises(DDKitError, match=r"unknown model 'convnt3'; did you mean 'convnet3'\?"):
        create_model("convnt3", 1, 10, 28)
    with pytest.raises(DDKitError, match="unknown model 'convnet33'; did you mean"):
        create_model("convnet33", 1, 10, 28)
    # a malformed parameterised ConvNet name explains the name grammar
    with pytest.raises(
        DDKitError, match=r"unknown model 'convnet3-gn'.*ConvNet names read convnet\["
    ):
        create_model("convnet3-gn", 1, 10, 28)


def test_unknown_option_names_key_and_valid_ones():
    with pytest.raises(DDKitError) as err:
        create_model("convnet3", 1, 10, 28, widht=64)
    msg = str(err.value)
    assert "\n" not in msg
    assert "'widht'" in msg and "did you mean 'width'" in msg
    assert "valid options: activation, depth, first_padding, norm, pooling, width" in msg
    with pytest.raises(
        DDKitError, match="model 'tv_resnet18' has no option 'width'; valid options: none"
    ):
        create_model("tv_resnet18", 1, 10, 28, width=8)


def test_bad_option_values():
    with pytest.raises(
        DDKitError, match="unknown ConvNet norm 'batchnrom'; did you mean 'batchnorm'"
    ):
        create_model("convnet", 1, 10, 28, norm="batchnrom")
    with pytest.raises(DDKitError, match="choose one of avgpooling, maxpooling, none"):
        create_model("convnet", 1, 10, 28, pooling="sum")
    with pytest.raises(DDKitError, match="width must be a positive integer"):
        create_model("convnet3", 1, 10, 28, width=0)
    with pytest.raises(DDKitError, match="in_channels must be a positive integer"):
        create_model("convnet3", 0, 10, 28)


def test_image_too_small():
    with pytest.raises(
        DDKitError, match="image size 28 is too small for a depth-5 ConvNet.*at least 32 px"
    ):
        create_model("convnetd5", 1, 10, 28)
    with pytest.raises(DDKitError, match=r"image size 4 is too small for a depth-3 ConvNet .*use a smaller depth \(at "
                                         r"most 2\) or pooling='none'$"):
        create_model("convnet3", 1, 10, 4)
    with pytest.raises(DDKitError, match=r"image size 1 is too small for a depth-1 ConvNet .*; use pooling='none'$"):
        create_model("convnet", 1, 10, 1, depth=1)
    assert create_model("convnet3", 1, 10, 8).feature_dim == 128  # 8 -> 4 -> 2 -> 1


def test_instance_norm_resnet_refuses_images_its_last_stage_sees_as_1x1():
    """8 px -> 1x1 maps in the last stage, where GroupNorm(c, c) leaves only its bias: every image
    would get the same logits. 9 px (-> 2x2) still tells images apart."""
    with pytest.raises(DDKitError, match="image size 8 is too small for resnet18_cifar_in"):
        create_model("resnet18_cifar_in", 3, 10, 8, width=8)
    torch.manual_seed(0)
    model = create_model("resnet18_cifar_in", 3, 10, 9, width=8)
    logits = model(torch.randn(2, 3, 9, 9))
    assert (logits[0] - logits[1]).abs().max() > 1e-3
    assert create_model("resnet18_cifar", 3, 10, 8, width=8).feature_dim == 64  # batch norm: fine
    assert create_model("convnet3", 1, 10, 4, pooling="none").feature_dim == 128 * 4 * 4


def test_wrong_input_size_is_explained():
    model = create_model("convnet3", 1, 10, 28)
    with pytest.raises(
        DDKitError, match="built for 28x28 images but got 32x32; create it with image_size=32"
    ):
        model(torch.zeros(1, 1, 32, 32))
    # non-square data (an imagefolder of 16x24 images): no image_size fits, so the advice was a dead end
    fix = ("resize them to one square size (dataset.image_size for an imagefolder) or use a model that pools "
           "adaptively (resnet18_cifar)")
    with pytest.raises(DDKitError) as err:
        create_model("tiny_convnet", 1, 10, 16)(torch.zeros(1, 1, 16, 24))
    assert str(err.value) == f"ConvNet models need square images, the data's are 16x24 (height x width); {fix}"
    with pytest.raises(DDKitError) as err:
        create_model("tiny_mlp", 1, 10, 16)(torch.zeros(1, 1, 16, 24))
    assert str(err.value) == f"MLP models need square images, the data's are 16x24 (height x width); {fix}"
    assert create_model("resnet18_cifar", 1, 10, 16, width=4)(torch.zeros(2, 1, 16, 24)).shape == (2, 10)


def test_convnet3_parameter_count_by_hand():
    c, w, k, n = 1, 128, 3, 10
    conv1 = c * w * k * k + w
    conv23 = 2 * (w * w * k * k + w)
    norms = 3 * 2 * w  # GroupNorm(w, w) weight and bias per block
    linear = (w * 3 * 3) * n + n  # 28 -> 14 -> 7 -> 3
    expected = conv1 + conv23 + norms + linear
    assert expected == 308_746
    model = create_model("convnet3", 1, 10, 28)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.feature_dim == 1152
    norm_layers = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [(g.num_groups, g.num_channels, g.affine) for g in norm_layers] == [(128, 128, True)] * 3
    assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == 3


def test_papers_convnet_for_28px_grayscale():
    """The DC/DSA/DM/MTT code pads the first conv by 3 on 1-channel 28x28 images (28 -> 32 -> 16 -> 8
    -> 4): ``-p3`` builds that network, 4*4*128 = 2048 features, the other convs padded by 1."""
    m = create_model("convnet3-p3", 1, 10, 28)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert [c.padding for c in convs] == [(3, 3), (1, 1), (1, 1)]
    assert m.feature_dim == 2048 and m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with torch.no_grad():
        assert m.features[:4](torch.zeros(1, 1, 28, 28)).shape[-2:] == (16, 16)
    # one more linear input block than convnet3 (1152 features): 896 * 10 more weights
    n = sum(p.numel() for p in m.parameters())
    assert n - sum(p.numel() for p in create_model("convnet3", 1, 10, 28).parameters()) == (2048 - 1152) * 10
    assert create_model("convnet3-w32-p3-bn", 1, 10, 28).feature_dim == 32 * 4 * 4
    with pytest.raises(DDKitError, match="first_padding must be a positive integer"):
        create_model("convnet3", 1, 10, 28, first_padding=0)


def test_convnet_options_build_the_named_layers():
    m = create_model("convnet", 3, 10, 32, depth=2, width=16, norm="layernorm", pooling="maxpooling",
                     activation="leakyrelu")  # fmt: skip
    kinds = [type(x) for x in m.features]
    assert kinds == [nn.Conv2d, nn.GroupNorm, nn.LeakyReLU, nn.MaxPool2d] * 2
    assert m.features[1].num_groups == 1 and m.feature_dim == 16 * 8 * 8
    m = create_model("convnet3-nonorm", 1, 10, 28, activation="sigmoid")
    assert [type(x) for x in m.features[:4]] == [nn.Conv2d, nn.Identity, nn.Sigmoid, nn.AvgPool2d]
    m = create_model("convnet3-w32-bn", 1, 10, 28)
    assert isinstance(m.features[1], nn.BatchNorm2d) and m.features[0].out_channels == 32


def test_parameterised_convnet_names():
    m = create_model("convnetd4-w16-bn-maxpool", 3, 10, 32)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 4 and {x.out_channels for x in convs} == {16}
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 4
    assert sum(isinstance(x, nn.MaxPool2d) for x in m.modules()) == 4
    assert m.feature_dim == 16 * 2 * 2
    # a parameterised name builds the same architecture as the registered one it spells
    torch.manual_seed(0)
    a = create_model("convnet3-w64-bn", 1, 10, 28)
    torch.manual_seed(0)
    b = create_model("convnet3", 1, 10, 28, width=64, norm="batchnorm")
    _assert_same_state(a, b)
    # options passed explicitly win over those the name implies
    assert not any(
        isinstance(x, nn.BatchNorm2d)
        for x in create_model("convnet3-bn", 1, 10, 28, norm="none").modules()
    )
    with pytest.raises(DDKitError, match="sets the ConvNet norm twice"):
        create_model("convnet3-bn-in", 1, 10, 28)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_weights(name):
    size = _size(name)

    def build(seed):
        torch.manual_seed(seed)
        return create_model(name, 1, 10, size)

    a, b, c = build(0), build(0), build(1)
    _assert_same_state(a, b)
    assert any(
        not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values())
    )


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "vgg11_bn"])
def test_torchvision_model_unchanged_for_3ch_64px(arch):
    import torchvision

    torch.manual_seed(0)
    ours = create_model(f"tv_{arch}", 3, 10, 64)
    torch.manual_seed(0)
    ref = torchvision.models.get_model(arch, weights=None, num_classes=10)
    _assert_same_state(ours, ref)  # same keys, so torchvision checkpoints load strictly
    x = torch.randn(2, 3, 64, 64)
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_torchvision_small_image_adaptations():
    big, small = create_model("tv_resnet18", 1, 10, 64), create_model("tv_resnet18", 1, 10, 32)
    assert (big.conv1.in_channels, big.conv1.kernel_size, big.conv1.stride) == (1, (7, 7), (2, 2))
    assert isinstance(big.maxpool, nn.MaxPool2d)
    assert (small.conv1.in_channels, small.conv1.kernel_size, small.conv1.stride) == (
        1,
        (3, 3),
        (1, 1),
    )
    assert isinstance(small.maxpool, nn.Identity)
    assert list(big.state_dict()) == list(small.state_dict())  # torchvision's keys either way
    dense = create_model("tv_densenet121", 1, 10, 28)
    assert dense.features.conv0.kernel_size == (3, 3) and isinstance(
        dense.features.pool0, nn.Identity
    )
    vgg = create_model("tv_vgg11_bn", 1, 10, 28)
    assert vgg.feature_dim == 512 and vgg.min_size == 32  # 28 px input is upsampled to 32 px
    mobile = create_model("tv_mobilenet_v2", 1, 10, 28)
    assert mobile.features[0][0].in_channels == 1 and mobile.features[0][0].stride == (2, 2)


@pytest.mark.parametrize("name", ["tiny_convnet", "tiny_mlp"])
def test_tiny_models_learn_synthetic(name):
    bundle = make_synthetic()
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    x_train = (bundle.train.float_images() - mean) / std
    x_test = (bundle.test.float_images() - mean) / std
    y_train, y_test = bundle.train.labels, bundle.test.labels
    c, h = x_train.shape[1], x_train.shape[-1]

    torch.manual_seed(0)
    model = create_model(name, c, bundle.num_classes, h)

    def test_accuracy() -> float:
        model.eval()
        with torch.no_grad():
            return (model(x_test).argmax(1) == y_test).float().mean().item()

    before = test_accuracy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):  # epochs of 96 images in batches of 32
        model.train()
        for idx in torch.randperm(len(y_train), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    after = test_accuracy()
    assert after > 0.8, (before, after)
    assert after > before + 0.3


def _weight_normed(model):
    import warnings

    with warnings.catch_warnings():  # torch suggests its parametrizations version; users still use this one
        warnings.simplefilter("ignore")
        model.head = torch.nn.utils.weight_norm(model.head)
    return model


def test_a_users_model_that_breaks_the_contract_is_named_with_the_rule(monkeypatch):
    """A user's model without embed failed inside dm with AttributeError, one giving 2 logits for 3
    classes inside the teacher's loss with IndexError; create_model now checks a user's factory once."""
    from torch import nn

    import ddkit.models.registry as registry

    class Good(nn.Module):
        def __init__(self, c, k, s):
            super().__init__()
            self.feature_dim = 6
            self.body, self.head = nn.Linear(c * s * s, 6), nn.Linear(6, k)

        def embed(self, x):
            return self.body(x.flatten(1))

        def forward(self, x):
            return self.head(self.embed(x))

    class NoEmbed(nn.Module):
        feature_dim = 4

        def __init__(self, c, k, s):
            super().__init__()

        def forward(self, x):
            return x.flatten(1)[:, :3]

    class TwoLogits(Good):
        def __init__(self, c, k, s):
            super().__init__(c, 2, s)

    class TextDim(Good):
        def __init__(self, c, k, s):
            super().__init__(c, k, s)
            self.feature_dim = "6"

    factories = {"qa_good": Good, "qa_noembed": NoEmbed, "qa_two": TwoLogits, "qa_dim": TextDim,
                 "qa_none": lambda c, k, s: None}
    monkeypatch.setattr(MODELS, "_entries", {**MODELS._entries})
    monkeypatch.setattr(registry, "_CHECKED", set())
    for name, f in factories.items():
        MODELS.add(name, f)
    rule = ("a model has float32 weights, maps [B, C, H, W] images to [B, num_classes] logits (in eval and training "
            "mode) and has embed(x) -> [B, feature_dim] and an integer feature_dim (README, Models)")
    torch.manual_seed(0)
    good = create_model("qa_good", 1, 3, 4)
    after_check = torch.rand(1)
    torch.manual_seed(0)
    plain = Good(1, 3, 4)
    assert torch.equal(after_check, torch.rand(1))  # the check draws nothing from the RNG
    assert torch.equal(good.body.weight, plain.body.weight) and good.training  # nor changes the model's mode
    # a model deepcopy refuses (weight_norm keeps a non-leaf tensor) is probed as it is
    MODELS.add("qa_weightnorm", lambda c, k, s: _weight_normed(Good(c, k, s)))
    assert create_model("qa_weightnorm", 1, 3, 4).head.weight.shape == (3, 6)
    for name, problem in [("qa_noembed", "it has no embed(x) method"),
                          ("qa_two", "model(x) gives [2, 2] for 2 images, expected [2, 3]"),
                          ("qa_dim", "feature_dim is '6'"),
                          ("qa_none", "its factory returned a NoneType, not an nn.Module")]:
        with pytest.raises(DDKitError) as err:
            create_model(name, 1, 3, 4)
        assert str(err.value) == f"model {name!r} does not keep ddkit's model contract: {problem}; {rule}"
    # ddkit's own models are not probed (dm builds one per iteration)
    with pytest.raises(ConfigError, match=r"^teacher.model: model 'qa_noembed' does not keep"):  # not its options
        registry.configured_model(("teacher.model", "teacher.model_options"), "qa_noembed", 1, 3, 4, {})
    create_model("tiny_convnet", 1, 3, 8)
    assert {k[0] for k in registry._CHECKED} == {"qa_good", "qa_weightnorm"}


def test_a_factory_registered_anew_under_its_name_is_checked_again(monkeypatch):
    """The contract check was remembered by name and settings: a re-run notebook cell that redefined the factory
    under the same name skipped it, and the broken model failed later in a method calling embed."""
    from torch import nn

    import ddkit.models.registry as registry

    class Good(nn.Module):
        feature_dim = 4

        def __init__(self, c, k, s):
            super().__init__()
            self.body, self.head = nn.Linear(c * s * s, 4), nn.Linear(4, k)

        def embed(self, x):
            return self.body(x.flatten(1))

        def forward(self, x):
            return self.head(self.embed(x))

    monkeypatch.setattr(MODELS, "_entries", {**MODELS._entries})
    monkeypatch.setattr(registry, "_CHECKED", set())

    def qa_cell(c, k, s):
        return Good(c, k, s)

    MODELS.add("qa_cell", qa_cell)
    create_model("qa_cell", 1, 3, 4)

    def qa_cell(c, k, s):  # the cell edited and run again: no embed, no feature_dim
        return nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, k))

    MODELS.add("qa_cell", qa_cell)
    with pytest.raises(DDKitError, match=r"^model 'qa_cell' does not keep ddkit's model contract: feature_dim is None"):
        create_model("qa_cell", 1, 3, 4)


def test_a_users_model_of_other_dtypes_or_training_outputs_is_refused_by_the_check(monkeypatch):
    """QA 18c #2, #14: a user's model with float64 or bf16 weights, or one whose output is a tuple in training mode
    only (torchvision Inception-style auxiliary logits), passed the contract check (fed in the model's own dtype, in
    eval mode only), then every stage failed with a dtype-mismatch or AttributeError traceback. The check now asks for
    float32 weights and probes training mode too, leaving the model as it was (BatchNorm statistics, mode, RNG)."""
    from torch import nn

    import ddkit.models.registry as registry

    class Net(nn.Module):
        feature_dim = 6

        def __init__(self, c, k, s):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, 6), nn.BatchNorm1d(6), nn.Dropout(0.5))
            self.head = nn.Linear(6, k)

        def embed(self, x):
            return self.body(x + 1)

        def forward(self, x):
            return self.head(self.embed(x))

    class Aux(Net):
        def forward(self, x):
            out = super().forward(x)
            return (out, out / 2) if self.training else out

    monkeypatch.setattr(MODELS, "_entries", {**MODELS._entries})
    monkeypatch.setattr(registry, "_CHECKED", set())
    for name, f in {"qa_net": Net, "qa_f64": lambda c, k, s: Net(c, k, s).double(),
                    "qa_bf16": lambda c, k, s: Net(c, k, s).bfloat16(), "qa_aux": Aux}.items():
        MODELS.add(name, f)
    torch.manual_seed(0)
    net = create_model("qa_net", 1, 3, 4)
    after_check = torch.rand(1)
    torch.manual_seed(0)
    plain = Net(1, 3, 4)
    assert torch.equal(after_check, torch.rand(1)) and net.training and net.body[2].training
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), plain.state_dict().values()))
    assert int(net.body[2].num_batches_tracked) == 0 and torch.equal(net.body[2].running_var, torch.ones(6))
    for name, problem in [("qa_f64", "its weights are float64, not float32 (return model.float() from its factory)"),
                          ("qa_bf16", "its weights are bfloat16, not float32 (return model.float() from its factory)"),
                          ("qa_aux", "model(x) gives tuple for 2 images in training mode, expected [2, 3]")]:
        with pytest.raises(DDKitError) as err:
            create_model(name, 1, 3, 4)
        assert str(err.value).startswith(f"model {name!r} does not keep ddkit's model contract: {problem}; a model "
                                         "has float32 weights")


def test_a_users_model_with_lazy_modules_or_a_rebound_buffer_comes_back_as_before_the_check(monkeypatch):
    """QA 19a F2, F3: a user's model with lazy modules (LazyConv2d, LazyBatchNorm2d) could not be created (a raw
    ValueError: the check copied the uninitialized buffers before the first forward), and a buffer that a
    training-mode forward rebinds (``self.seen = self.seen + len(x)``) kept the check's value. The eval-mode pass
    materialises lazy modules (as at their first forward); each pass puts every buffer tensor back as it was."""
    from torch import nn

    import ddkit.models.registry as registry

    class Net(nn.Module):
        feature_dim = 8

        def __init__(self, body, k):
            super().__init__()
            self.body, self.head = body, nn.Linear(8, k)
            self.register_buffer("seen", torch.zeros(()))

        def embed(self, x):
            return self.body(x)

        def forward(self, x):
            if self.training:
                self.seen = self.seen + len(x)
            return self.head(self.embed(x))

    def lazy(c, k, s):
        return Net(nn.Sequential(nn.LazyConv2d(8, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten()), k)

    made = []

    def counter(c, k, s):
        net = Net(nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, 8)), k)
        made.append((net, net.seen))
        return net

    monkeypatch.setattr(MODELS, "_entries", {**MODELS._entries})
    monkeypatch.setattr(registry, "_CHECKED", set())
    MODELS.add("qa_lazy", lazy)
    MODELS.add("qa_counter", counter)
    torch.manual_seed(0)
    net = create_model("qa_lazy", 1, 3, 4)
    torch.manual_seed(0)
    plain = lazy(1, 3, 4)
    with torch.no_grad():  # its first forward, as the check's eval-mode pass (the RNG forked) makes it
        plain.eval()(torch.zeros(2, 1, 4, 4))
    assert type(net.body[1]) is nn.BatchNorm2d and net.training and net.body[1].training
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), plain.state_dict().values()))
    assert int(net.body[1].num_batches_tracked) == 0 and torch.equal(net.body[1].running_var, torch.ones(8))
    assert float(net.seen) == 0
    net = create_model("qa_counter", 1, 3, 4)
    assert made == [(net, net.seen)] and net._buffers["seen"] is made[0][1] and float(net.seen) == 0


def test_a_users_model_under_a_convnet_family_name_or_of_a_wrong_signature_is_refused(monkeypatch):
    """QA 18c #1, #17: a user's model could take a name that ddkit's ConvNet family builds from its pattern
    (``convnetd2-w8``: only registered names were refused), after which ddkit's own teachers of that name read as
    damaged; and a factory that cannot take the three sizes was registered, then failed at first use with a TypeError
    traceback. Both are refused at registration, in one line."""
    from ddkit.models import ConvNet

    monkeypatch.setattr(MODELS, "_entries", {**MODELS._entries})

    def mine(in_channels, num_classes, image_size, width=8):
        return MODELS.get("tiny_mlp")(in_channels, num_classes, image_size)

    for name, message in [
        ("convnetd2-w8", "model 'convnetd2-w8' is a name ddkit's convnet family builds (convnet with depth=2, "
                         "width=8); register yours under another name"),
        ("convnet5", "model 'convnet5' is a name ddkit's convnet family builds (convnet with depth=5); register yours "
                     "under another name"),
        ("convnet3", "model 'convnet3' is already registered (by ddkit.models.convnet.convnet); register yours under "
                     "another name"),
    ]:
        with pytest.raises(DDKitError) as err:
            MODELS.add(name, mine)
        assert str(err.value) == message
    assert isinstance(create_model("convnetd2-w8", 1, 3, 8), ConvNet)
    MODELS.add("convnet-mine", mine)  # the family's prefix, but no name it builds
    MODELS.add("sized", lambda *sizes, **options: mine(*sizes))

    def two_args(in_channels, num_classes):
        return mine(in_channels, num_classes, 16)

    with pytest.raises(DDKitError) as err:
        MODELS.add("two_args", two_args)
    assert str(err.value).startswith("model 'two_args': its factory test_models.")
    assert str(err.value).endswith(
        ".two_args(in_channels, num_classes) cannot take the three sizes create_model passes; a model factory is "
        "f(in_channels, num_classes, image_size, **options), its options keywords with defaults")
    with pytest.raises(DDKitError, match=r"^model 'three': an object of type int is not a factory; register a "):
        MODELS.add("three", 3)
    assert "two_args" not in MODELS and "three" not in MODELS and "convnet-mine" in MODELS
