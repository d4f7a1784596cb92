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


@pytest.mark.parametrize("name", ["", "x/../../esc", "../esc", "cls/mean", "..", ".hidden", "-x", "my mlp", "a\\b",
                                  "edc ", 3])
def test_a_name_that_is_no_file_name_is_refused(name):
    """Any string was taken (QA 18c #11): a bench built its cell and set paths from a method named
    'x/../../../../esc2' and wrote them outside its out folder; '' distilled; 'cls/mean' lost report's grids."""
    reg = Registry("method")
    with pytest.raises(DDKitError, match=r"^method name .* is not allowed: a name starts with a letter or digit and "
                                         r"holds only letters, digits, '_', '-' and '\.' \(it becomes part of file "
                                         r"names\); register it under such a name$"):
        reg.add(name, object())
    assert len(reg) == 0


def test_every_built_in_name_passes_the_name_rule():
    import ddkit.cli  # noqa: F401  (registers everything)
    from ddkit.data import DATASETS
    from ddkit.evaluate import PROTOCOLS
    from ddkit.methods import METHODS
    from ddkit.models import MODELS
    from ddkit.registry import check_name

    for reg in (DATASETS, PROTOCOLS, METHODS, MODELS):
        for name in reg:
            check_name(reg.kind, name)
    for name in ("resnet18_cifar", "convnet3-w32", "fashion-mnist", "v1.2", "3x"):
        Registry("model").add(name, object())


def test_a_far_fetched_name_is_not_suggested_and_the_plugin_hint_stays():
    """'myrec' (a plugin's method, its module not imported) got "did you mean 'edc'?" and lost the DDKIT_PLUGINS hint
    (QA 18c #6): only names at least SUGGEST_CUTOFF alike are suggested, and the hint stays beside a suggestion."""
    reg = Registry("method")
    for name in ("edc", "random", "tiny_mlp"):
        reg.add(name, object())
    own = ("one of your own: import the module that registers it first; the CLI imports those named in "
           "DDKIT_PLUGINS")
    with pytest.raises(DDKitError) as err:
        reg.get("myrec")
    assert str(err.value) == f"unknown method 'myrec'; see `ddkit list methods` ({own})"
    with pytest.raises(DDKitError) as err:
        reg.get("my_mlp")  # 0.71 alike: suggested, with the hint
    assert str(err.value) == f"unknown method 'my_mlp'; did you mean 'tiny_mlp'? (or {own})"
    with pytest.raises(DDKitError) as err:
        reg.get("RANDON")  # case ignored in the likeness
    assert str(err.value) == f"unknown method 'RANDON'; did you mean 'random'? (or {own})"
