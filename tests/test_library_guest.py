"""ddkit as a library in a caller's long-lived process (a notebook, a training script): what the caller's objects,
callbacks, umask and repeated calls meet (QA review 15a)."""

import pickle

import pytest
import torch
from torch import nn

import ddkit
from ddkit.config import from_dict
from ddkit.distilled import DistilledSet
from ddkit.errors import ConfigError
from ddkit.evaluate import ProtocolConfig
from ddkit.labels import relabel
from ddkit.methods.base import SyntheticSet
from ddkit.pipeline import DistillConfig, RunConfig, distill, run
from ddkit.training import TrainConfig


@pytest.fixture(scope="module")
def data():
    """The generated data as ``load_dataset`` gives it (a config to record, unlike ``tiny``)."""
    return ddkit.load_dataset("synthetic")


def _float_set(data, normalize=False):
    images = torch.linspace(-0.5, 1.5, 8 * 16 * 16).view(8, 1, 16, 16)
    ds = DistilledSet.build(SyntheticSet(images, torch.arange(4).repeat_interleave(2)), data, method="dm",
                            method_config={}, ipc=2, seed=0, config={}, dataset_config={"name": "synthetic"})
    ds.normalize = normalize
    return ds


def _one_epoch(**kw) -> ProtocolConfig:
    return ProtocolConfig(student="tiny_convnet", full_reference=False, random_baseline=False,
                          train=TrainConfig(epochs=1, batch_size=8), **kw)


def test_a_sample_of_a_float_set_is_the_callers_own(data, tmp_path):
    """ds[i] of a float32 set was a view of the set's images: the caller's in-place transform (x.mul_()) rewrote
    the set, which later stages used and recorded as the original. Now a copy, with the same values."""
    ds = _float_set(data)
    before = ds.images.clone()
    x, y = ds[3]
    assert torch.equal(x, before[3]) and x.dtype == torch.float32 and y == 1  # the numbers are unchanged
    x.clamp_(0, 1).mul_(0.5)
    assert torch.equal(ds.images, before)
    ds.save(tmp_path / "set")
    loaded = ddkit.load(tmp_path / "set")
    loaded[0][0].zero_()
    assert torch.equal(loaded.images, before)
    norm = _float_set(data, normalize=True)
    mean, std = torch.tensor(norm.mean).view(-1, 1, 1), torch.tensor(norm.std).view(-1, 1, 1)
    assert torch.equal(norm[5][0], (before[5] - mean) / std)
    quantised = distill(data, DistillConfig(method="random", ipc=2))  # uint8 pixels: a new tensor as before
    assert torch.equal(quantised[2][0], quantised.images[2].float() / 255.0)


def test_a_soft_label_store_pickles_after_a_replay(data):
    """evaluate's replay memoised a lambda normaliser in the store: pickle (a spawn DataLoader worker, joblib)
    failed with "Can't pickle local object" afterwards. The memo is left out and made again."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 4))
    ds = distill(data, DistillConfig(method="random", ipc=2))
    store = relabel(ds, teacher, 1)
    replay = store.replay(0, torch.arange(4))
    views = store.render(replay, ds.images.float() / 255.0, data.mean, data.std)
    assert store._norms  # render's memo, filled
    again = pickle.loads(pickle.dumps(store))
    assert again._norms == {} and store._norms  # the caller's store keeps its memo
    assert torch.equal(again.render(again.replay(0, torch.arange(4)), ds.images.float() / 255.0, data.mean,
                                    data.std), views)


def test_distill_and_run_take_a_dict_config(data, tmp_path):
    """distill(data, {...}) and run({...}) raised AttributeError ('dict' object has no attribute 'method'), where
    evaluate takes a dict protocol: a dict is checked as YAML is, anything else is one line naming the type."""
    assert torch.equal(distill(data, {"method": "random", "ipc": 2}).images,
                       distill(data, DistillConfig(method="random", ipc=2)).images)
    with pytest.raises(ConfigError, match=r"^unknown config key 'distill.ipcs'; did you mean 'ipc'\?$"):
        distill(data, {"method": "random", "ipcs": 2})
    with pytest.raises(ConfigError, match=r"^cfg must be a DistillConfig or a dict of its settings, got str 'random'$"):
        distill(data, "random")
    with pytest.raises(ConfigError, match=r"^cfg must be a RunConfig or a dict of its settings, got list \[\]$"):
        run([])
    with pytest.raises(ConfigError, match=r"^cfg must be a TeacherConfig or a dict of its settings, got int 3$"):
        ddkit.train_teacher(data, 3)
    settings = {"dataset": {"name": "synthetic"}, "teacher": None, "distill": {"method": "random", "ipc": 2},
                "out": str(tmp_path / "run"),
                "evaluate": {"label_modes": ["hard"], "seeds": [0],
                             "overrides": {"student": "tiny_convnet", "full_reference": False,
                                           "random_baseline": False, "train": {"epochs": 1}}}}
    summary = run(settings)
    assert summary["evaluations"] == run(from_dict(RunConfig, settings))["evaluations"]
    assert summary["reused"] == []
