import pytest

from ddkit.errors import DDKitError
from ddkit.registry import Registry


def test_register_get_list_glob():
    reg = Registry("widget")
    reg.register("alpha")(1)
    reg.add("alpine", 2)
    reg.add("beta", 3)
    assert reg.get("beta") == 3
    assert reg.list() == ["alpha", "alpine", "beta"]
    assert reg.list("al*") == ["alpha", "alpine"]
    assert "alpha" in reg and "gamma" not in reg
    assert len(reg) == 3


def test_unknown_name_suggests():
    reg = Registry("method")
    reg.add("edc", object())
    with pytest.raises(DDKitError, match=r"unknown method 'edcc'; did you mean 'edc'\?"):
        reg.get("edcc")
    with pytest.raises(DDKitError, match="see `ddkit list methods`"):
        reg.get("zzzzzz")


def test_duplicate_registration_fails():
    reg = Registry("model")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)
