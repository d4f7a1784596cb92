"""FYI's flip plug-in (``flip_plugin``): which methods take it, what the others say, and what it changes."""

import dataclasses

import pytest

from conftest import REPO
from ddkit.cli import main
from ddkit.config import from_dict
from ddkit.errors import ConfigError
from ddkit.methods import METHODS

TAKERS = sorted(k for k in METHODS.list()
                if "flip_plugin" in {f.name for f in dataclasses.fields(METHODS.get(k).Config)})
OTHERS = sorted(set(METHODS.list()) - set(TAKERS))


def test_the_methods_that_take_the_plugin():
    assert TAKERS == ["cda", "cvdd", "dwa", "edc", "gvbsm", "sre2l"]


@pytest.mark.parametrize("name", OTHERS)
def test_a_method_without_the_plugin_refuses_it_naming_those_that_take_it(name):
    """It used to be the generic 'unknown config key ...; valid keys: ...', which reads like a typo."""
    with pytest.raises(ConfigError) as err:
        from_dict(METHODS.get(name).Config, {"flip_plugin": True}, "distill.options")
    assert str(err.value) == (f"distill.options.flip_plugin: flip_plugin (FYI) is supported by {', '.join(TAKERS)}; "
                              f"{name} does not take it: remove the key, or use one of those methods")


def test_the_refusal_comes_with_the_configs_other_problems():
    with pytest.raises(ConfigError) as err:
        from_dict(METHODS.get("random").Config, {"flip_plugin": False, "sede": 1}, "distill.options")
    first, second = str(err.value).split("; unknown config key ")
    assert first.startswith("distill.options.flip_plugin: flip_plugin (FYI) is supported by ")
    assert second.startswith("'distill.options.sede'")


def test_run_refuses_the_plugin_in_one_line_before_any_stage(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(REPO / "configs/fashion-mnist/random/ipc10.yaml"), "--out", str(out), "-q", "--set",
                 "dataset.name=synthetic", "--set", "distill.ipc=2", "--set", "distill.options.flip_plugin=true"])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"error: distill.options.flip_plugin: flip_plugin (FYI) is supported by "
                                 f"{', '.join(TAKERS)}; random does not take it: remove the key, or use one of those "
                                 "methods\n")
    assert list(tmp_path.iterdir()) == []
