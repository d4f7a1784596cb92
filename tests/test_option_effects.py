"""Method options that no other test sets (a review found them by grep): each must change what the
method makes, so that an option which stops reaching the algorithm (a renamed field, a default read
in its place) fails here instead of being silently ignored."""

import pytest
import torch

from ddkit.config import from_dict
from ddkit.data.base import make_synthetic
from ddkit.methods import METHODS, FitContext


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One $DDKIT_CACHE for the module: a trajectory method's expert buffer is trained once."""
    return tmp_path_factory.mktemp("cache")


def _fit(name, data, teacher, work, **options):
    cls = METHODS.get(name)
    cfg = from_dict(cls.Config, {**cls.smoke_options, **options})
    return cls(cfg).fit(data, [teacher], FitContext(ipc=1, seed=0, work_dir=work)).synthetic_


@pytest.mark.parametrize("name, option, value, field", [
    ("edc", "flatness_tau", 1.0, "images"),  # the flatness KL's temperature (default 4)
    ("edc", "flatness_beta", 0.5, "images"),  # the EMA rate of the image copy (default 0.99)
    ("datm", "momentum_y", 0.0, "soft_labels"),  # SGD momentum of the learned logits (default 0.9)
    ("dm", "flip_plugin", True, "images"),  # FYI: each class embedded with its mirror images (default off)
    ("datadam", "flip_plugin", True, "images"),
    ("dc", "flip_plugin", True, "images"),
    ("dsa", "flip_plugin", True, "images"),
    ("mtt", "flip_plugin", True, "images"),
    ("datm", "flip_plugin", True, "soft_labels"),  # the learned logits train on both copies too
])
def test_an_option_changes_the_set(data, bn_teacher, cache, tmp_path, monkeypatch, name, option, value, field):
    monkeypatch.setenv("DDKIT_CACHE", str(cache))
    default = getattr(METHODS.get(name).Config(), option)
    assert value != default
    base = _fit(name, data, bn_teacher, tmp_path / "base")
    other = _fit(name, data, bn_teacher, tmp_path / "other", **{option: value})
    assert getattr(base, field) is not None and getattr(base, field).shape == getattr(other, field).shape
    assert not torch.equal(getattr(base, field), getattr(other, field)), f"{name}.{option} {value} changed nothing"
