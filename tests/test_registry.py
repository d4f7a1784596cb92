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
    with pytest.raises(DDKitError, match=r"^model 'a' is already registered \(by int\); register yours under another "
                                         r"name$"):
        reg.add("a", 2)

    def make():
        return 1

    reg.add("f", make)
    reg.add("f", make)  # the same definition again (a re-run notebook cell): it replaces the entry

    def other():
        return 2

    with pytest.raises(DDKitError, match=r"is already registered \(by test_registry\..*make\)"):
        reg.add("f", other)


def test_unknown_name_suggests_the_name_in_another_case():
    reg = Registry("method")
    reg.add("edc", object())
    with pytest.raises(DDKitError, match=r"^unknown method 'EDC'; did you mean 'edc'\?$"):
        reg.get("EDC")


def test_a_check_refuses_an_entry_at_registration():
    """METHODS accepted anything (a class that is no Method failed later with a raw AttributeError): a
    registry may check what is registered; the other registries take anything, as before."""
    def positive(name, obj):
        if obj <= 0:
            raise DDKitError(f"widget {name!r} must be positive")

    reg = Registry("widget", check=positive)
    reg.add("a", 1)
    with pytest.raises(DDKitError, match=r"^widget 'b' must be positive$"):
        reg.add("b", -1)
    assert reg.list() == ["a"]
    Registry("model").add("c", -1)
