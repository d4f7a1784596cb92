import contextvars
import json
import re
from pathlib import Path

import pytest

import ddkit.config as config
from conftest import REPO
from ddkit.config import apply_overrides, config_hash, from_dict, is_count, load_yaml, to_dict
from ddkit.errors import ConfigError
from ddkit.evaluate import ProtocolConfig, resolve_protocol
from ddkit.pipeline import RunConfig, demo_config
from ddkit.teacher import TeacherConfig
from ddkit.training import TrainConfig


def test_unknown_key_suggests_and_lists_all_errors():
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"epoch": 3, "lr": "fast", "optimizer": "sgdd"})
    msg = str(err.value)
    assert "unknown config key 'epoch'; did you mean 'epochs'?" in msg
    assert "lr: expected a number, got 'fast'" in msg
    assert "optimizer: 'sgdd' is not one of" in msg and "did you mean 'sgd'?" in msg


def test_non_finite_numbers_and_non_mapping_sections_are_refused():
    from ddkit.pipeline import DistillConfig

    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"teacher.train.lr: expected a finite number, got (nan|inf)"):
            from_dict(RunConfig, {"teacher": {"train": {"lr": bad}}})
    for bad in ("foo", None, 3):  # a plain dict field
        with pytest.raises(ConfigError, match=rf"distill.options: expected a mapping, got {bad!r}"):
            from_dict(DistillConfig, {"method": "random", "ipc": 1, "options": bad}, "distill")
    with pytest.raises(ConfigError, match=r"dataset: expected a mapping of settings, got 'foo'"):
        from_dict(TeacherConfig, "foo", "dataset")


def test_numbers_beyond_float32_are_refused_by_key():
    """torch's optimisers take lr / weight_decay as float32: 1e39 passed the checks, then crashed in torch."""
    from ddkit.methods import METHODS

    for key, bad in (("lr", 1e39), ("weight_decay", 1e300), ("lr", -1e39), ("lr", 10**400)):
        with pytest.raises(ConfigError, match=rf"teacher.train.{key}: .* beyond float32's range"
                           if bad != 10**400 else rf"teacher.train.{key}: expected a finite number"):
            from_dict(RunConfig, {"teacher": {"train": {key: bad}}})
    with pytest.raises(ConfigError, match=r"TrainConfig.lr: 1e\+39 is beyond float32's range"):
        TrainConfig(lr=1e39)  # built in Python
    for method, key in (("dm", "lr_img"), ("sre2l", "lr"), ("datm", "lr_y")):
        with pytest.raises(ConfigError, match=rf"distill.options.{key}: 1e\+300 is beyond float32's range"):
            from_dict(METHODS.get(method).Config, {key: 1e300}, "distill.options")
    assert from_dict(TrainConfig, {"lr": 3.4e38}).lr == 3.4e38  # float32's largest is still a number


def test_seeds_must_fit_the_generators():
    from ddkit.bench import BenchConfig
    from ddkit.pipeline import DistillConfig

    with pytest.raises(ConfigError, match=r"distill.seed: seeds must lie in \[0, 2\^32\), got 18446744073709551616"):
        from_dict(DistillConfig, {"method": "random", "ipc": 1, "seed": 2**64}, "distill")
    with pytest.raises(ConfigError, match=r"teacher.seed: seeds must lie in \[0, 2\^32\), got -1"):
        from_dict(RunConfig, {"teacher": {"seed": -1}})
    with pytest.raises(ConfigError, match=r"seeds: seeds must lie in \[0, 2\^32\), got 4294967296"):
        from_dict(BenchConfig, {"datasets": ["synthetic"], "methods": ["random"], "seeds": [0, 2**32]})
    assert from_dict(DistillConfig, {"method": "random", "ipc": 1, "seed": 2**32 - 1}).seed == 2**32 - 1


def test_is_count_takes_integers_from_low_and_refuses_bools_and_floats():
    assert [is_count(v) for v in (1, 7, 0, -1, True, 1.0, "3", None)] == [True, True] + [False] * 6
    assert is_count(0, 0) and not is_count(False, 0) and not is_count(-1, 0)
    assert is_count(2, 2) and not is_count(1, 2)


def test_numbers_written_without_a_dot_and_sections_without_settings():
    """YAML 1.1 reads 1e-3 as text, ddkit's loader as YAML 1.2 and JSON do; a method without options used to
    list "valid keys: " (none)."""
    assert apply_overrides({}, ["train.lr=1e-3", "train.weight_decay=5E-4"]) == {"train": {"lr": 1e-3,
                                                                                          "weight_decay": 5e-4}}
    assert from_dict(TrainConfig, apply_overrides({}, ["lr=1e-3"])).lr == 1e-3
    for text in ("fast", "0.001"):  # text is text: only YAML reads numbers (exponent text: older records)
        with pytest.raises(ConfigError, match=f"expected a number, got '{text}'"):
            from_dict(TrainConfig, {"lr": text})
    from ddkit.methods import METHODS
    with pytest.raises(ConfigError, match="distill.options takes no settings; remove 'distill.options.iterations'"):
        from_dict(METHODS.get("random").Config, {"iterations": 5}, "distill.options")


def test_evaluation_seeds_may_not_repeat():
    with pytest.raises(ConfigError, match=r"evaluate.seeds: \[0, 0\] repeats a seed"):
        from_dict(RunConfig, {**load_yaml(REPO / "configs/fashion-mnist/demo.yaml"), "evaluate": {"seeds": [0, 0]}})


def test_full_reference_needs_an_epoch_after_warmup():
    with pytest.raises(ConfigError, match="full_epochs 2 leaves no epoch after train.warmup_epochs 2"):
        resolve_protocol("dc-protocol", {"full_epochs": 2, "train": {"warmup_epochs": 2, "epochs": 6}})
    assert resolve_protocol("dc-protocol",
                            {"full_epochs": 3, "train": {"warmup_epochs": 2, "epochs": 6}}).full_epochs == 3
    # without the reference its epochs decide nothing (an override of them is refused as inert; a protocol's own are
    # not checked)
    assert not resolve_protocol({"full_epochs": 2, "full_reference": False,
                                 "train": {"warmup_epochs": 2, "epochs": 6}}).full_reference


def test_nested_paths_in_errors():
    with pytest.raises(ConfigError, match=r"unknown config key 'teacher.train.lrr'; did you mean 'lr'\?"):
        from_dict(RunConfig, {"teacher": {"train": {"lrr": 0.1}}})


def test_validation_in_post_init():
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        from_dict(TrainConfig, {"epochs": 0})
    with pytest.raises(ConfigError, match="label_mode 'hard' needs loss 'ce'"):
        from_dict(ProtocolConfig, {"loss": "kl"})


def test_configs_built_in_python_check_their_field_types():
    """DistillConfig(ipc="2") was accepted and failed later; ipc=True was taken as 1."""
    from ddkit.data.augment import RandomResizedCropFlip
    from ddkit.pipeline import DistillConfig

    with pytest.raises(ConfigError, match=r"^DistillConfig.ipc: expected an integer, got '2'$"):
        DistillConfig(ipc="2")
    with pytest.raises(ConfigError, match=r"^DistillConfig.ipc: expected an integer, got True$"):
        DistillConfig(ipc=True)
    with pytest.raises(ConfigError) as err:  # every wrong field at once, on one line
        TrainConfig(lr="fast", epochs=2.5, optimizer="sgdd")
    assert str(err.value) == ("TrainConfig.epochs: expected an integer, got 2.5; TrainConfig.optimizer: "
                              "'sgdd' is not one of ['sgd', 'adam', 'adamw']; did you mean 'sgd'?; TrainConfig.lr: "
                              "expected a number, got 'fast'")
    with pytest.raises(ConfigError, match=r"DistillConfig.seed: seeds must lie in \[0, 2\^32\), got -1"):
        DistillConfig(seed=-1)
    with pytest.raises(ConfigError, match=r"ProtocolConfig.train: expected a mapping for TrainConfig, got 'fast'"):
        ProtocolConfig(train="fast")
    with pytest.raises(ConfigError, match=r"RandomResizedCropFlip.ratio: expected a list of 2 values"):
        RandomResizedCropFlip(ratio=(0.5,))  # a frozen dataclass is checked too
    assert DistillConfig(ipc=None, method="full").ipc is None


def test_configs_built_in_python_store_values_as_from_dict_does():
    from ddkit.data.augment import RandomResizedCropFlip
    from ddkit.pipeline import DistillConfig

    built = TrainConfig(lr=1, epochs=3)  # an int for a float, as YAML writes it
    assert built.lr == 1.0 and isinstance(built.lr, float) and isinstance(from_dict(TrainConfig, {"lr": 1}).lr, float)
    assert config_hash(built) == config_hash(from_dict(TrainConfig, {"lr": 1, "epochs": 3}))
    assert RandomResizedCropFlip(ratio=[0.5, 2]).ratio == (0.5, 2.0)
    run = RunConfig(distill={"method": "random", "ipc": 2})  # a mapping for a nested config becomes that config
    assert isinstance(run.distill, DistillConfig) and run.distill.ipc == 2
    with pytest.raises(ConfigError, match=r"unknown config key 'RunConfig.distill.ipcs'; did you mean 'ipc'\?"):
        RunConfig(distill={"ipcs": 2})
    assert to_dict(from_dict(RunConfig, to_dict(RunConfig()))) == to_dict(RunConfig())
    # a field's own check names its key (it said only "unknown augmentation 'flips'")
    with pytest.raises(ConfigError, match=r"^train.augment: unknown augmentation 'flips'; valid: none, dsa"):
        from_dict(ProtocolConfig, {"train": {"augment": "flips"}})
    # a mapping lands on the field's own default, not its class's: a teacher's train recipe is not TrainConfig()
    teacher = TeacherConfig(train={"epochs": 1})
    assert (teacher.train.lr, teacher.train.schedule, teacher.train.augment) == (0.05, "cosine", "crop_flip")
    assert config_hash(teacher) == config_hash(from_dict(TeacherConfig, {"train": {"epochs": 1}}))


def _wrong_value(tp):
    return {int: "2", float: "fast", bool: 1, str: 3}.get(tp)


def _checked_config_classes():
    import dataclasses

    import ddkit.data.augment as augment
    from ddkit.bench import BenchConfig, MethodSpec, RelabelSpec
    from ddkit.methods import METHODS
    from ddkit.methods.trajectory import ExpertConfig
    from ddkit.pipeline import DistillConfig, EvalConfig

    classes = {METHODS.get(m).Config for m in METHODS.list()} | {
        RunConfig, DistillConfig, EvalConfig, TeacherConfig, TrainConfig, ProtocolConfig, ExpertConfig, BenchConfig,
        MethodSpec, RelabelSpec, *[c for c in augment.AUGMENTS.values() if c is not None]}
    assert all(dataclasses.is_dataclass(c) for c in classes)
    return sorted(classes, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _checked_config_classes(), ids=lambda c: c.__name__)
def test_every_config_class_checks_the_types_of_python_arguments(cls):
    """Each registered method's Config and every pipeline config refuses a wrong type with a ConfigError
    naming the field (not a TypeError from its own checks, nor silent acceptance)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    scalar = [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if _wrong_value(hints[f.name]) is not None]
    assert scalar or not dataclasses.fields(cls), f"{cls.__name__}: no plain int/float/bool/str field to try"
    for name, tp in scalar:
        bad = _wrong_value(tp)
        hint = re.escape("; YAML reads an unquoted number as a number (3 is the number read, not the text written): "
                         "quote the text as you meant it") if tp is str else ""
        got = re.escape(repr(bad)) + hint  # a str field given 3 says how to quote it
        with pytest.raises(ConfigError, match=rf"^{cls.__name__}.{name}: expected .*, got {got}$"):
            cls(**{name: bad})


def test_partial_nested_section_keeps_parent_defaults():
    cfg = from_dict(TeacherConfig, {"train": {"epochs": 3}})
    default = TeacherConfig().train
    assert cfg.train.epochs == 3
    assert cfg.train.lr == default.lr == 0.05  # the teacher recipe, not TrainConfig's 0.01
    assert cfg.train.schedule == "cosine"


def test_option_dicts_are_replaced_whole_by_overrides():
    """An override's augment_options replaces the preset's (``{}`` clears them), so a preset with crop
    options can be evaluated with another augmentation; other sections still merge key by key."""
    from ddkit.evaluate import resolve_protocol

    edc = resolve_protocol("edc", {"train": {"augment_options": {"scale_max": 0.9}}})
    assert edc.train.augment_options == {"scale_max": 0.9} and edc.train.ema_decay == 0.99
    flip = resolve_protocol("soft-kl", {"train": {"augment": "flip", "augment_options": {}}})
    assert (flip.train.augment, flip.train.augment_options, flip.train.lr) == ("flip", {}, 1e-3)


def test_overrides_parse_values_and_nest():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=0.5", "d=[1, 2]", "e=hello", "f=true"])
    assert data == {"a": {"b": 2, "c": 0.5}, "d": [1, 2], "e": "hello", "f": True}
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides({}, ["novalue"])


def test_overrides_reach_an_integer_key():
    """A path part is text: `ipc_overrides.10.lr` missed the YAML's key 10 and added a key "10" beside it,
    which then replaced the entry whole. It changes the entry's one setting; a text key is still taken first."""
    data = apply_overrides({"o": {10: {"lr": 1, "epochs": 2}}}, ["o.10.lr=3", "o.+10.epochs=4", "o.20.lr=5"])
    assert data == {"o": {10: {"lr": 3, "epochs": 4}, "20": {"lr": 5}}}
    # a mapping merges into the entry (the other layers' rule), as settings one by one do
    assert apply_overrides({"o": {10: {"lr": 1}}}, ["o.10={epochs: 2}"]) == {"o": {10: {"lr": 1, "epochs": 2}}}
    assert apply_overrides({"o": {"10": {"lr": 1}, 10: {}}}, ["o.10.lr=3"]) == {"o": {"10": {"lr": 3}, 10: {}}}
    assert apply_overrides({"o": {True: {}}}, ["o.1.lr=3"]) == {"o": {True: {}, "1": {"lr": 3}}}


def test_yaml_11_numbers_are_refused(tmp_path):
    """YAML 1.1 reads 010 as octal 8 and 1:20 as base-60 80: `--set distill.seed=010` recorded seed 8 where
    `--seeds 010` gives 10. In a --set value and in a config file alike, such a number is refused."""
    in_decimal = "write the number in decimal"
    for raw, read, fix in [("010", 8, "write the decimal number 10"), ("-0_10", -8, "write the decimal number -10"),
                           ("1:20", 80, in_decimal), ("1:20.5", 80.5, in_decimal)]:
        kind = "base-60" if ":" in raw else "octal"
        with pytest.raises(ConfigError) as err:
            apply_overrides({}, [f"distill.seed={raw}"])
        assert str(err.value) == (f"override 'distill.seed={raw}': {raw} reads as the {kind} number {read} (YAML "
                                  f"""1.1); {fix}, or quote it (--set "distill.seed='{raw}'") if it is text""")
        path = tmp_path / "c.yaml"
        path.write_text(f"distill:\n  seed: [1, {raw}]\n")
        with pytest.raises(ConfigError) as err:
            load_yaml(path)
        assert str(err.value) == (f"config file '{path}' line 2: {raw} reads as the {kind} number {read} (YAML 1.1); "
                                  f"{fix}, or quote it ('{raw}') if it is text")
    path.write_text("ipc_overrides:\n  010: {}\n")  # a key too
    with pytest.raises(ConfigError, match=re.escape(f"config file '{path}' line 2: 010 reads as the octal number 8")):
        load_yaml(path)
    fine = ["a=0", "b=10", "c='010'", "d=0x10", "e=0b11", "f=1_000", "g=0.5", "h=010.5", "i=-3", "j=1e-3", "k='1:20'"]
    assert apply_overrides({}, fine) == {"a": 0, "b": 10, "c": "010", "d": 16, "e": 3, "f": 1000, "g": 0.5,
                                         "h": 10.5, "i": -3, "j": 1e-3, "k": "1:20"}


def test_a_choice_yaml_reads_as_a_boolean_says_to_quote_it(tmp_path):
    """`intermediate_matching: off` reads as false, and the error named only the choices."""
    from ddkit.methods.mtt import MTTConfig

    with pytest.raises(ConfigError) as err:
        from_dict(MTTConfig, apply_overrides({}, ["intermediate_matching=off"]))
    assert str(err.value).endswith("intermediate_matching: False is not one of ['off', 'uniform', 'linear']; "
                                   "YAML reads off unquoted as false: quote it (--set \"intermediate_matching='off'\")")
    path = tmp_path / "c.yaml"
    path.write_text("intermediate_matching: off\n")
    with pytest.raises(ConfigError) as err:  # a file's: the key a --set would name is not known here
        contextvars.Context().run(lambda: from_dict(MTTConfig, load_yaml(path)))  # no --set read in it
    assert str(err.value).endswith("YAML reads off unquoted as false: quote it ('off'; on a command line --set "
                                   """"KEY='off'")""")
    assert from_dict(MTTConfig, apply_overrides({}, ["intermediate_matching='off'"])).intermediate_matching == "off"


def test_a_key_set_twice_on_one_line_is_refused(tmp_path):
    """The repeated-key check compared lines, so `{lr: 1, lr: 2}` on one line kept lr 2 without a word; a
    --set value was not checked at all (nor for an alias bomb)."""
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\ntrain: {lr: 1, lr: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"config file '{path}' sets 'lr' twice in one section (line 2); keep one of them"
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, ["train={lr: 1, lr: 2}"])
    assert str(err.value) == "override 'train={lr: 1, lr: 2}' sets 'lr' twice; keep one of them"
    with pytest.raises(ConfigError, match=r"^override 'a=&x \[\*x\]' nests or repeats values too deeply to read; "):
        apply_overrides({}, ["a=&x [*x]"])  # a list that holds itself


def test_roundtrip_and_hash_stable():
    cfg = from_dict(RunConfig, {"distill": {"ipc": 5}})
    again = from_dict(RunConfig, to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    assert config_hash(cfg) == config_hash(again)
    assert config_hash(cfg) != config_hash(from_dict(RunConfig, {"distill": {"ipc": 6}}))


def test_protocol_presets_and_label_mode_switch():
    p = resolve_protocol("dc-protocol")
    assert ((p.student, p.train.epochs, p.train.lr, p.train.batch_size, p.train.schedule)
            == ("convnet3", 300, 0.01, 256, "step"))
    soft = resolve_protocol("dc-protocol", {"label_mode": "teacher"})
    assert soft.loss == "kl"
    hard = resolve_protocol("edc", {"label_mode": "hard"})
    assert hard.loss == "ce" and hard.train.ema_decay == 0.99
    with pytest.raises(Exception, match="unknown protocol 'dc-protocl'; did you mean 'dc-protocol'"):
        resolve_protocol("dc-protocl")


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    bad.write_text("distill:\n  method: dm\n ipc: 3\n")  # where the syntax breaks, to find it in a long file
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 3, column 2 \("):
        load_yaml(bad)
    code = tmp_path / "code.yaml"
    code.write_text("a: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(code)


def test_yaml_refuses_a_key_set_twice_in_one_section(tmp_path):
    """YAML keeps the last of two equal keys, so an edit that added `lr:` to a section already holding one
    silently dropped the first; it is an error naming the key and both lines. Equal keys in different
    sections, and a `<<:` merge the section then overrides, are fine."""
    import re

    twice = tmp_path / "twice.yaml"
    twice.write_text("ipc: 10\nmethod:\n  name: dm\n  options: {iterations: 5}\n  name: dc\n")
    with pytest.raises(ConfigError,
                       match=re.escape(f"config file '{twice}' sets 'name' twice in one section (lines 3 and "
                                       "5); keep one of them")):
        load_yaml(twice)
    top = tmp_path / "top.yaml"
    top.write_text("ipc: 10\nseed: 1\nipc: 50\n")
    with pytest.raises(ConfigError, match="sets 'ipc' twice in one section \\(lines 1 and 3\\)"):
        config.load_yaml_with_base(top)
    fine = tmp_path / "fine.yaml"
    fine.write_text("a: {lr: 1}\nb: {lr: 2}\nbase_opts: &o {lr: 3, wd: 0}\nc:\n  <<: *o\n  lr: 4\n")
    assert load_yaml(fine) == {"a": {"lr": 1}, "b": {"lr": 2}, "base_opts": {"lr": 3, "wd": 0}, "c": {"lr": 4, "wd": 0}}


def test_base_file_keys_are_replaced_whole(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("a: 1\npool: {x: 1, y: 2}\nlist: [1, 2]\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\npool: {z: 3}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\nlist: [3]\nb: 2\n")
    assert config.load_yaml_with_base(tmp_path / "sub" / "leaf.yaml") == {"a": 1, "pool": {"z": 3}, "list": [3], "b": 2}
    assert config.load_yaml_with_base(tmp_path / "root.yaml") == load_yaml(tmp_path / "root.yaml")


def test_base_file_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        config.load_yaml_with_base(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\nx: 1\n")
    with pytest.raises(ConfigError, match=r"base file .*missing\.yaml.* not found; give a path relative"):
        config.load_yaml_with_base(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="base must be the path of a YAML file"):
        config.load_yaml_with_base(tmp_path / "d.yaml")


@pytest.mark.parametrize("path",
                         sorted(p for p in (REPO / "configs").rglob("*.yaml")
                                if (REPO / "configs" / "bench") not in p.parents),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path: Path):
    data = load_yaml(path)
    cfg = from_dict(RunConfig, data)
    for protocol in cfg.evaluate.protocols():
        assert protocol.train.epochs >= 1


def _per_method_configs():
    return sorted(p for p in (REPO / "configs" / "fashion-mnist").glob("*/ipc*.yaml") if p.parent.name != "random")


# method options where a per-method config follows the authors' code and the full tier keeps the method's defaults
# (which its recorded numbers were made with); each config's header says so
PER_METHOD_DEPARTURES = {
    "sre2l": {"augment": "none", "jitter": 4},  # SRe2L's CIFAR-100 recover_cifar.py: whole images, a roll in [0, 4]
}
# the same, at one IPC: CV-DD's recover scripts choose committees per IPC (QA 22h F5; the full tier keeps `random`)
PER_IPC_DEPARTURES = {("cvdd", 1): {"committee_choice": "best"}, ("cvdd", 10): {"committee_choice": "cycle"}}


@pytest.mark.parametrize("path", _per_method_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_per_method_configs_match_the_full_tiers(path: Path):
    """configs/fashion-mnist/<method>/ipc<N>.yaml say "the papers' settings (as in the full bench
    config)": their method options must be the bench entry's options with that IPC's ipc_options, and the
    documented departures (PER_METHOD_DEPARTURES)."""
    from ddkit.bench import load_bench_config
    from ddkit.evaluate.protocol import merge_overrides

    specs = {}
    for tier in ("matching", "decoupled"):
        bench = load_bench_config(REPO / f"configs/bench/fashion-mnist-{tier}.yaml")
        specs.update({m.key: (bench, m) for m in bench.methods if m.key != "random"})
    distill = load_yaml(path)["distill"]
    bench, spec = specs[distill["method"]]
    want = merge_overrides(merge_overrides(spec.options, spec.ipc_options.get(distill["ipc"], {})),
                           merge_overrides(PER_METHOD_DEPARTURES.get(distill["method"], {}),
                                           PER_IPC_DEPARTURES.get((distill["method"], distill["ipc"]), {})))
    # the bench's named teachers ("@c3") are the per-method configs' teacher folders
    if "extra_teachers" in want:
        want["extra_teachers"] = [f"runs/fashion-mnist/teachers/{t.lstrip('@')}" for t in want["extra_teachers"]]
    assert distill.get("options", {}) == want
    run = from_dict(RunConfig, load_yaml(path))
    assert run.evaluate.protocol == bench.protocol
    # the student is the tier's (its first, where it trains several)
    assert run.evaluate.protocols()[0].student == bench.students[0]


def _header(path: Path) -> str:
    """The leading comment of a YAML config, its lines joined by spaces."""
    lines = path.read_text().splitlines()
    return " ".join(line.lstrip("# ") for line in lines[:next(i for i, x in enumerate(lines) if not x.startswith("#"))])


@pytest.mark.parametrize("path", [p for p in _per_method_configs() if p.parent.name in ("mtt", "tesla", "ftd", "datm")],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_trajectory_configs_state_their_reduced_experts(path: Path):
    """QA 20c F3/F2: the "papers' settings" trajectory configs train fewer, shorter experts than the papers (and
    TESLA runs MTT's iterations); their headers say so, with the numbers the config holds."""
    buffer = load_yaml(path)["distill"]["options"]["buffer"]
    header = _header(path)
    assert f"{buffer['num_experts']} experts x {buffer['epochs']} epochs" in header
    assert ("100 x 100" if path.parent.name == "datm" else "100 x 50") in header
    assert "traj-e30-window" in header
    if path.parent.name == "tesla":
        assert "iterations" not in load_yaml(path)["distill"]["options"] and "defaults to 10000" in header
    bench = _header(REPO / "configs/bench/fashion-mnist-matching.yaml")
    assert "Experts: 50 x 30 epochs" in bench and "TESLA's distill.py defaults to 10000" in bench


@pytest.mark.parametrize("path", [p for p in _per_method_configs() if p.parent.name in ("edc", "gvbsm", "cvdd")],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_extra_teacher_commands_train_the_full_tiers_pool(path: Path):
    """QA 22h F2: the presets "as in" the full decoupled tier told users to train c3 and c4 with `ddkit teacher`
    commands that left out the pool's seeds (1 and 2), so both trained with seed 0: every setting those commands give
    (flags and CLI defaults) must be the bench's teacher_pool entry's."""
    import shlex

    from ddkit.bench import load_bench_config
    from ddkit.cli import _stage_config, build_parser

    pool = load_bench_config(REPO / "configs/bench/fashion-mnist-decoupled.yaml").teacher_pool
    commands = [line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#   ddkit teacher ")]
    made = {}
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        dataset, teacher = _stage_config(args, "teacher", TeacherConfig, {"model": "model", "seed": "seed",
                                                                         "epochs": "train.epochs"})
        assert dataset.name == "fashion-mnist"
        made[Path(args.out).name] = to_dict(teacher)
    assert made == {name: to_dict(cfg) for name, cfg in pool.items()}
    assert [Path(t).name for t in load_yaml(path)["distill"]["options"]["extra_teachers"]] == ["c3", "c4"]


@pytest.mark.parametrize("method", ["edc", "cvdd", "dc"])
@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_decoupled_and_dc_configs_name_their_evaluation_and_the_papers(method, ipc):
    """QA 22h F3/F4: the edc/cvdd presets evaluate with soft-kl on one online teacher and the dc presets with DSA's
    protocol, not as their papers; the headers say so and the override they give sets the paper's protocol (and for
    CV-DD adds label mode stored, which reads the set's committee soft labels)."""
    path = REPO / f"configs/fashion-mnist/{method}/ipc{ipc}.yaml"
    header = _header(path)
    ours = from_dict(RunConfig, load_yaml(path)).evaluate
    if method == "cvdd":
        overrides = re.search(r"add --set (evaluate\.protocol=cvdd) --set \"([^\"]+)\"", header).groups()
        assert "label mode `stored`" in header
        assert load_yaml(path)["distill"]["options"].get("soft_labels", "committee") == "committee"
    else:
        overrides = [re.search(r"add `--set (evaluate\.protocol=[a-z-]+)`", header).group(1)]
    theirs = from_dict(RunConfig, apply_overrides(load_yaml(path), list(overrides))).evaluate
    assert (ours.protocol, ours.label_modes) == ("dsa-protocol" if method == "dc" else "soft-kl",
                                                ["hard"] if method == "dc" else ["teacher"])
    p = ours.protocols()[0]
    if method == "dc":
        assert "1000 epochs with DSA" in header and (p.train.epochs, p.train.augment) == (1000, "dsa")
        q = theirs.protocols()[0]
        assert theirs.protocol == "dc-protocol" and (q.train.epochs, q.train.augment) == (300, "none")
        assert q.student == p.student == "convnet3-p3"
        return
    assert "soft-kl (KL at T 4, batch 64, no CutMix" in header
    assert (p.loss, p.temperature, p.train.batch_size, p.train.cutmix_prob, p.teacher_bn) == ("kl", 4.0, 64, 0.0,
                                                                                              "running")
    assert theirs.protocol == method
    q = {x.label_mode: x for x in theirs.protocols()}
    if method == "cvdd":
        assert sorted(q) == ["stored", "teacher"]
        assert (q["stored"].loss, q["stored"].temperature, q["stored"].train.batch_size, q["stored"].train.cutmix_prob,
                q["stored"].teacher_bn) == ("kl", 20.0, 16, 1.0, "batch")
    else:
        assert sorted(q) == ["teacher"] and (q["teacher"].loss, q["teacher"].train.batch_size) == ("mse_ce", 50)


@pytest.mark.parametrize("ipc, choice", [(1, "best"), (10, "cycle"), (50, "random")])
def test_cvdd_configs_choose_committees_as_the_authors_scripts(ipc, choice):
    """QA 22h F5: CV-DD's recover scripts take one best pair at IPC 1, every pair in turn at IPC 10 and a random
    pair at IPC 50; the "papers' settings" presets kept ddkit's `random` at every IPC without saying so."""
    from ddkit.methods import METHODS

    path = REPO / f"configs/fashion-mnist/cvdd/ipc{ipc}.yaml"
    options = from_dict(RunConfig, load_yaml(path)).distill.options
    assert from_dict(METHODS.get("cvdd").Config, options).committee_choice == choice
    said = "committee_choice: ddkit's default `random`" if ipc == 50 else f"committee_choice {choice} "
    assert said in _header(path)


def test_matching_cpu_header_states_shqs_expert_epochs():
    """QA 22h F6: the CPU matching tier's header said "1 expert epoch" for the MTT family, AST (shq) included,
    whose entry matches 2."""
    from ddkit.bench import load_bench_config

    path = REPO / "configs/bench/fashion-mnist-matching-cpu.yaml"
    epochs = {m.name: m.options["expert_epochs"] for m in load_bench_config(path).methods
              if m.name in ("mtt", "tesla", "ftd", "datm", "shq")}
    assert epochs == {"mtt": 1, "tesla": 1, "ftd": 1, "datm": 1, "shq": 2}
    assert "unroll 10 steps, 1 expert epoch (AST as shq: 2 expert epochs" in _header(path)


@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_datadam_configs_name_the_authors_evaluation(ipc):
    """QA 20c F4: DataDAM's code trains students 1800 epochs at batch 64, ddkit's configs evaluate with dsa-protocol;
    the headers (the config's and the full bench's) say so, and the override they give sets the authors' numbers."""
    path = REPO / f"configs/fashion-mnist/datadam/ipc{ipc}.yaml"
    header = _header(path)
    override = re.search(r'--set "([^"]+)"', header).group(1)
    theirs = from_dict(RunConfig, apply_overrides(load_yaml(path), [override])).evaluate.protocols()[0]
    ours = from_dict(RunConfig, load_yaml(path)).evaluate.protocols()[0]
    assert (ours.train.epochs, ours.train.batch_size) == (1000, 256)
    assert (theirs.train.epochs, theirs.train.batch_size, theirs.train.augment) == (1800, 64, "dsa")
    assert override in _header(REPO / "configs/bench/fashion-mnist-matching.yaml")


@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_per_method_sre2l_configs_recover_as_the_authors_small_image_script(ipc):
    """QA 18a F1: the per-method sre2l configs, "the papers' settings", ran ImageNet-1K's multi-crop (RandomResizedCrop
    0.08-1 + flip, no roll) on 28 px images; SRe2L's CIFAR-100 script (recover_cifar.py, recover_cifar.sh) optimises
    whole images, rolled by [0, 4] pixels, at lr 0.25, r_bn 0.01, 1000 iterations, 100 classes a batch."""
    from ddkit.methods import METHODS

    run = from_dict(RunConfig, load_yaml(REPO / f"configs/fashion-mnist/sre2l/ipc{ipc}.yaml"))
    cfg = from_dict(METHODS.get("sre2l").Config, run.distill.options)
    assert (cfg.augment, cfg.jitter, cfg.jitter_mode) == ("none", 4, "positive")
    assert (cfg.lr, cfg.r_stats, cfg.iterations, cfg.slots_per_batch) == (0.25, 0.01, 1000, 1)
    # the full tier keeps sre2l's defaults: its recorded numbers were made with them
    assert from_dict(METHODS.get("sre2l").Config, {}).augment == "rrc_flip"


def test_rded_fkd_config_trains_students_as_rdeds_evaluation():
    """QA 18a F3: configs/fashion-mnist/rded/ipc10-fkd.yaml, "RDED's recipe", trained with crops of scale 0.08-1, T 4,
    a cosine to 0 and batch 64. RDED (validation/main.py, argument.py; scripts/cifar10_*.sh: factor 1, 300 epochs):
    RandomResizedCrop(scale=(1/factor, 1)) + flip, CutMix, T 20, AdamW 1e-3 wd 0.01, batch 50 at IPC 10 of 10
    classes, lr factor 0.5 (1 + cos(pi e / (2 E))) per epoch e."""
    import math

    import torch
    from torchvision import transforms

    from ddkit.training import lr_factor

    run = from_dict(RunConfig, load_yaml(REPO / "configs/fashion-mnist/rded/ipc10-fkd.yaml"))
    (protocol,) = run.evaluate.protocols()
    assert (protocol.label_mode, protocol.loss, protocol.temperature) == ("fkd", "kl", 20.0)
    train = protocol.train
    assert (train.epochs, train.batch_size, train.optimizer, train.lr, train.weight_decay) == (300, 50, "adamw", 1e-3,
                                                                                                0.01)
    rded = [0.5 * (1 + math.cos(math.pi * e / train.epochs / 2)) for e in range(train.epochs)]
    assert [lr_factor(train, e) for e in range(train.epochs)] == pytest.approx(rded, abs=1e-12)
    assert lr_factor(train, train.epochs - 1) == pytest.approx(0.5, abs=0.01)
    # the stored views: whole images + flip, as RDED's crop at factor 1 (every box the whole 28x28 image), CutMix
    assert (run.relabel.augment, run.relabel.augment_options, run.relabel.cutmix_prob) == ("flip", {}, 1.0)
    assert run.distill.options.get("factor") is None  # ddkit's rded factor below 128 px: 1, as RDED's small scripts
    boxes = {transforms.RandomResizedCrop.get_params(torch.zeros(1, 28, 28), (1.0, 1.0), (3 / 4, 4 / 3))
             for _ in range(500)}
    assert boxes == {(0, 0, 28, 28)}
    # the protocol names the store's views, so its record says what the students trained on
    assert (train.augment, train.augment_options, train.cutmix_prob) == ("flip", {}, 1.0)


def _tier_method_configs(path: str) -> dict:
    """{(method key, ipc): the method's resolved Config} of a bench file."""
    from ddkit.bench import load_bench_config
    from ddkit.evaluate.protocol import merge_overrides
    from ddkit.methods import METHODS

    bench = load_bench_config(REPO / path)
    return {(m.key, ipc): from_dict(METHODS.get(m.name).Config, merge_overrides(m.options, m.ipc_options.get(ipc, {})))
            for m in bench.methods for ipc in bench.ipcs}


def test_full_matching_tier_takes_the_papers_settings():
    """QA 17b: the paper-scale tier ran DC from real images (the DC paper's Table 1: noise), DATM at IPC 50 with
    image lr 100 and 256-image batches (its config: 1000, all 500), FTD at IPC 10 from student lr 0.01 (Table 7:
    0.001) and at IPC 50 on alpha-0.3 experts (Table 7: 1), and MTT/TESLA/FTD at IPC 50 on 256-image batches (MTT's
    default: all). The per-method configs follow (test_per_method_configs_match_the_full_tiers)."""
    full = _tier_method_configs("configs/bench/fashion-mnist-matching.yaml")
    assert [full["dc", ipc].init for ipc in (1, 10, 50)] == ["noise"] * 3
    assert full["dsa", 10].init == "real"  # DSA's own README command: real
    assert (full["datm", 50].lr_img, full["datm", 50].batch_syn) == (1000.0, None)
    assert full["datm", 10].lr_img == 100.0
    assert all(full[m, 50].batch_syn is None for m in ("mtt", "tesla", "ftd", "datm"))
    assert [full["ftd", ipc].lr_teacher for ipc in (1, 10, 50)] == [0.01, 0.001, 0.01]
    assert [full["ftd", ipc].buffer.sam_alpha for ipc in (1, 10, 50)] == [0.3, 0.3, 1.0]
    assert full["ftd", 50].buffer.sam_rho == 0.01 and full["ftd", 50].buffer.sam_adaptive
    # the alpha-1 experts are a buffer of their own; IPC 1 and 10 share the preset's
    from ddkit.models.registry import model_config_hash  # the recipe part of the cached buffer's name

    assert model_config_hash(full["ftd", 1].buffer) == model_config_hash(full["ftd", 10].buffer) != model_config_hash(
        full["ftd", 50].buffer)


def _recover_batch(cfg, ipc: int, num_classes: int = 10) -> int:
    """Images in one optimised batch of a recover method's config: its class chunk times its slot group."""
    from ddkit.methods.statistics import _slot_groups, class_chunk

    return class_chunk(cfg, num_classes) * len(_slot_groups(cfg, ipc)[0])


def test_full_decoupled_tier_batches_gvbsm_as_its_code():
    """QA 18b F11: G-VBSM's recover code optimises batches of 100 images, class-major (2 classes x 50 slots at IPC
    50); the full tier and configs/fashion-mnist/gvbsm/ipc50.yaml ("the papers' settings") put all 10 classes x 50
    slots (500 images) in one. The per-method configs follow the tier (test_per_method_configs_match_the_full_tiers).
    EDC keeps ddkit's one image per class: 10 images, its CIFAR-10 script's --batch-size 10."""
    from ddkit.methods import METHODS

    full = _tier_method_configs("configs/bench/fashion-mnist-decoupled.yaml")
    assert [_recover_batch(full["gvbsm", ipc], ipc) for ipc in (1, 10, 50)] == [10, 100, 100]
    assert full["gvbsm", 50].class_batch == 2 and full["gvbsm", 10].class_batch is None
    assert [_recover_batch(full["edc", ipc], ipc) for ipc in (1, 10, 50)] == [10, 10, 10]
    shipped = from_dict(RunConfig, load_yaml(REPO / "configs/fashion-mnist/gvbsm/ipc50.yaml")).distill
    assert _recover_batch(from_dict(METHODS.get("gvbsm").Config, shipped.options), shipped.ipc) == 100


def test_edc_recipe_bench_says_what_its_edc_c10_row_runs():
    """QA 18b F9: the header called edc-c10 the authors' CIFAR-10 recover script with "global statistics only
    (alpha 1)", but the script's --category-aware "global" is alpha 0.5 and it runs without --flatness, while the
    row runs alpha 1 with the preset's flatness 0.25 (its recorded results stay: the header now says so)."""
    path = "configs/bench/fashion-mnist-edc-recipe-cpu.yaml"
    row = _tier_method_configs(path)["edc-c10", 1]
    assert (row.alpha, row.flatness_weight, row.init, row.iterations) == (1.0, 0.25, "real", 75)
    header = " ".join(line.lstrip("# ") for line in (REPO / path).read_text().splitlines() if line.startswith("#"))
    assert "global statistics only (alpha 1), where the script's `--category-aware \"global\"` matches" in header
    assert "(alpha 0.5, the preset's), and the preset's flatness term (flatness_weight 0.25), which the" in header
    assert "script leaves off (no --flatness)" in header


def test_learned_matching_tier_evaluates_trajectory_sets_as_their_papers():
    """The full tier trains every student at lr 0.01 with hard labels; its companion evaluates the trajectory
    sets at their learned lr and on their stored labels (DATM's learned logits) at temperature 1, with the full
    tier's method settings."""
    from ddkit.bench import load_bench_config

    bench = load_bench_config(REPO / "configs/bench/fashion-mnist-matching-learned.yaml")
    assert bench.label_modes == ["hard", "stored"] and bench.students == ["convnet3-p3"]
    for mode in bench.label_modes:
        protocol = bench.protocol_for("convnet3-p3", mode, ipc=10)
        assert protocol.learned_lr and protocol.temperature == 1.0 and protocol.train.augment == "dsa"
        assert protocol.train.epochs == 1000
    learned = _tier_method_configs("configs/bench/fashion-mnist-matching-learned.yaml")
    full = _tier_method_configs("configs/bench/fashion-mnist-matching.yaml")
    assert sorted({k for k, _ in learned}) == ["datm", "ftd", "mtt", "tesla"]
    for key, cfg in learned.items():
        want = to_dict(full[key])
        if key[0] == "tesla":
            want["soft_labels"] = "expert"
        assert to_dict(cfg) == want, key
    assert learned["datm", 10].learn_labels


def test_demo_config_matches_shipped_yaml():
    shipped = from_dict(RunConfig, load_yaml(REPO / "configs/fashion-mnist/demo.yaml"))
    demo = demo_config(out=shipped.out, device=shipped.device)
    # `ddkit run` on it writes where the demo does
    assert to_dict(demo) == to_dict(shipped) and shipped.out == "runs/demo"
    bf16 = demo_config(out=shipped.out, device=shipped.device, precision="bf16")  # `ddkit demo --precision bf16`
    assert bf16.teacher.train.precision == "bf16" and demo.teacher.train.precision == "fp32"
    assert resolve_protocol(bf16.evaluate.protocol, bf16.evaluate.overrides).train.precision == "bf16"
    assert bf16.evaluate.overrides["train"]["augment"] == "dsa"  # the demo's own override kept


def test_demo_pipeline_runs_scaled_down(tmp_path):
    """The demo's pipeline (teacher -> DM -> hard and teacher-soft evaluation -> report) end to end on
    generated data, with every loop cut to a step or two: the stages fit together as shipped."""
    from ddkit.pipeline import run

    demo = to_dict(demo_config(out=str(tmp_path / "demo"), device="cpu"))
    cfg = from_dict(RunConfig, apply_overrides(demo, [
        "dataset.name=synthetic", "teacher.train.epochs=1", "distill.ipc=2", "distill.options.iterations=2",
        "distill.options.batch_real=8", "evaluate.seeds=[0]", "evaluate.overrides.full_epochs=1",
        "evaluate.overrides.train.epochs=2"]))
    summary = run(cfg)
    from ddkit.data import load_dataset

    n_test = len(load_dataset(cfg.dataset).test)
    assert [e["config"]["label_mode"] for e in summary["evaluations"]] == ["hard", "teacher"]
    for e in summary["evaluations"]:
        assert set(e["results"]) == {"distilled", "random", "full"}
        for r in e["results"].values():  # one student each: a count of correct test images
            assert r["n"] == 1 and 0 <= r["mean"] <= 1
            assert r["mean"] * n_test == pytest.approx(round(r["mean"] * n_test), abs=1e-6)
    # the same set and students under the hard and the teacher labels: the labels changed the numbers
    assert summary["evaluations"][0]["results"]["distilled"] != summary["evaluations"][1]["results"]["distilled"]
    manifest = (tmp_path / "demo/distilled/manifest.json").read_text()
    assert '"method": "dm"' in manifest and '"ipc": 2' in manifest
    assert (tmp_path / "demo/report/distilled-grid.png").stat().st_size > 0


def test_added_fields_leave_hashes_alone_at_their_default():
    import dataclasses

    @dataclasses.dataclass
    class Old:
        a: int = config.field(1)

    @dataclasses.dataclass
    class New:
        a: int = config.field(1)
        b: str = config.field("same", added=True)
        c: list = config.field([], added=True)

    assert config_hash(New()) == config_hash(Old())  # an option added later does not re-key old artifacts
    assert to_dict(New()) == {"a": 1, "b": "same", "c": []}  # manifests still show every setting
    assert to_dict(New(), identity=True) == {"a": 1}
    assert to_dict(New(b="other", c=[2]), identity=True) == {"a": 1, "b": "other", "c": [2]}
    assert config_hash(New(b="other")) != config_hash(Old())
    nested = TrainConfig(precision="bf16")
    assert to_dict({"train": nested}, identity=True)["train"]["precision"] == "bf16"
    assert "precision" not in to_dict({"train": TrainConfig()}, identity=True)["train"]


def test_fixed_length_tuples_need_that_many_values():
    """rrc_flip's ratio is a (low, high) pair: one value used to crash its check with an IndexError."""
    from ddkit.data.augment import build_augment

    for bad in ([1.0], [0.5, 1.0, 2.0]):
        with pytest.raises(ConfigError, match=rf"augment_options.ratio: expected a list of 2 values, got \{bad!r}"):
            build_augment("rrc_flip", ratio=bad)
    with pytest.raises(ConfigError, match=r"augment_options.ratio\[1\]: expected a number, got 'x'"):
        build_augment("rrc_flip", ratio=[0.5, "x"])
    assert build_augment("rrc_flip", ratio=[0.5, 2]).ratio == (0.5, 2.0)


def test_config_files_that_are_not_utf8_text_or_are_folders(tmp_path):
    """A Latin-1 file, a PNG or a folder used to give a UnicodeDecodeError traceback or 'not found'."""
    import re

    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"# caf\xe9\ndataset: {name: synthetic}\n")
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    for path, byte in ((latin, "0xe9 at offset 5"), (png, "0x89 at offset 0")):
        with pytest.raises(ConfigError,
                           match=re.escape(f"config file '{path}' is not UTF-8 text (byte {byte}); save it as UTF-8")):
            load_yaml(path)
    (tmp_path / "child.yaml").write_text("base: latin.yaml\nout: x\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file '{latin}' is not UTF-8 text")):
        config.load_yaml_with_base(tmp_path / "child.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"config file '{latin}' is not UTF-8 text")):
        resolve_protocol(str(latin))
    with pytest.raises(ConfigError, match=re.escape(f"config file '{tmp_path}' is a folder; pass a YAML file")):
        load_yaml(tmp_path)
    (tmp_path / "sub.yaml").mkdir()
    (tmp_path / "dirbase.yaml").write_text("base: sub.yaml\n")
    with pytest.raises(ConfigError, match="sub.yaml' is a folder; pass a YAML file"):
        config.load_yaml_with_base(tmp_path / "dirbase.yaml")
    utf8 = tmp_path / "utf8.yaml"
    utf8.write_bytes("\ufeff# café\na: 1\n".encode())  # UTF-8, with a byte-order mark as some editors write it
    assert load_yaml(utf8) == {"a": 1}


def test_free_form_settings_are_recorded_in_one_key_order():
    """A set's manifest kept --set options in the order given: the same settings (same hash) written as
    different bytes. Method options and protocol overrides are now recorded with sorted keys."""
    from ddkit.pipeline import DistillConfig, EvalConfig

    one = DistillConfig(method="dm",
                        options={"lr_img": 0.5, "iterations": 2, "dsa_options": {"scale": 0.2, "crop": 0.1}})
    other = DistillConfig(method="dm",
                          options={"iterations": 2, "dsa_options": {"crop": 0.1, "scale": 0.2}, "lr_img": 0.5})
    assert json.dumps(to_dict(one)) == json.dumps(to_dict(other))
    assert (list(one.options) == ["dsa_options", "iterations", "lr_img"]
            and list(one.options["dsa_options"]) == ["crop", "scale"])
    assert config_hash(one) == config_hash(DistillConfig(method="dm", options={
        "lr_img": 0.5, "iterations": 2, "dsa_options": {"scale": 0.2, "crop": 0.1}}))
    ev = EvalConfig(overrides={"train": {"lr": 0.1, "epochs": 3}, "student": "tiny_convnet"})
    assert list(ev.overrides) == ["student", "train"] and list(ev.overrides["train"]) == ["epochs", "lr"]


def test_help_of_a_config_shows_its_fields_help():
    """help(TeacherConfig) showed the signature, not the per-field help texts kept in the fields' metadata."""
    import pydoc
    from dataclasses import dataclass

    from ddkit.config import Checked, field
    from ddkit.teacher import TeacherConfig

    assert TeacherConfig.__doc__.startswith("How to make a teacher.\n\n")
    assert TeacherConfig.__doc__.split("\n\n")[-1] == (
        "Attributes:\n"
        "    model (str, default 'convnet3'): registered model key (`ddkit list models`)\n"
        "    model_options (dict, default {}): keyword options for the model factory (e.g. width)\n"
        "    train (TrainConfig, default TrainConfig()): training recipe\n"
        "    seed (int, default 0): seed for initialisation, batch order and augmentation\n"
        "    checkpoint (str | None, default None): import these weights (safetensors or state-dict .pt) instead of "
        "training")
    shown = pydoc.render_doc(TeacherConfig, renderer=pydoc.plaintext)
    assert "    seed (int, default 0): seed for initialisation" in shown

    @dataclass
    class Mine(Checked):
        noise: float = field(0.0, help="std of the noise")
        steps: int = 3

    @dataclass
    class More(Mine):
        """More settings."""

        name: str = field("x", help="a name")

    assert Mine.__doc__ == ("Mine\n\nAttributes:\n    noise (float, default 0.0): std of the noise\n"
                            "    steps (int, default 3)")
    assert More.__doc__.endswith("Attributes:\n    noise (float, default 0.0): std of the noise\n"
                                 "    steps (int, default 3)\n    name (str, default 'x'): a name")
    assert More(noise=1).noise == 1.0  # still a checked dataclass


def _nested_aliases(levels: int) -> str:
    """`seeds:` as a YAML alias bomb: each level a list of ten aliases of the one before."""
    names = "abcdefghij"
    items = [f"&a [{', '.join(['x'] * 10)}]"] + [f"&{names[i]} [{', '.join([f'*{names[i - 1]}'] * 10)}]"
                                                  for i in range(1, levels)]
    return f"evaluate:\n  seeds: [{', '.join(items)}]\n"


def test_yaml_alias_bombs_are_refused_and_errors_echo_values_in_short(tmp_path):
    """A 1 KB file of 8 levels of nested aliases stood for 10^8 values, and its type error printed them all
    (580 MB, 2.8 GB of memory). Such a file is refused before it is built; an error echoes at most 200
    characters of a value; the anchors of the shipped configs (<<: *defaults) still load."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_nested_aliases(8))
    with pytest.raises(ConfigError) as err:
        load_yaml(bomb)
    assert str(err.value) == (f"config file '{bomb}' uses aliases that repeat 123,456,770 characters of values (at "
                              "most 1,000,000); write the values out, or use fewer aliases")
    loop = tmp_path / "loop.yaml"
    loop.write_text("seeds: &a [1, *a]\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(loop)
    assert str(err.value) == (f"config file '{loop}' uses an alias inside the value it names (a value that holds "
                              "itself); write the values out, or use fewer aliases")
    deep = tmp_path / "deep.yaml"
    deep.write_text("seeds: " + "[" * 3000 + "1" + "]" * 3000 + "\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(deep)
    assert str(err.value) == f"config file '{deep}' nests lists or mappings too deeply to read; flatten it"
    small = tmp_path / "small.yaml"  # 10^5 values: loads, and its type error is one short line
    small.write_text(_nested_aliases(5))
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, load_yaml(small))
    levels = [["x"] * 10]
    for _ in range(4):
        levels.append([levels[-1]] * 10)
    assert str(err.value) == "; ".join(f"evaluate.seeds[{i}]: expected an integer, got {config.short_repr(v)}"
                                       for i, v in enumerate(levels))
    assert str(err.value).endswith(f"got {str(levels[-1])[:197]}...") and len(str(err.value)) < 1200
    assert config.short_repr([1, (2,), {"a": None}, ()]) == "[1, (2,), {'a': None}, ()]"
    assert config.short_repr("a" * 300) == "'" + "a" * 196 + "..."
    shared = tmp_path / "shared.yaml"
    shared.write_text("a: &d {lr: 0.1, epochs: 2}\nb:\n  <<: *d\n  lr: 0.2\nc: *d\n")
    assert load_yaml(shared) == {"a": {"lr": 0.1, "epochs": 2}, "b": {"lr": 0.2, "epochs": 2},
                                 "c": {"lr": 0.1, "epochs": 2}}


def test_a_nested_configs_defaults_take_a_mapping_by_the_override_rule():
    """A mapping given for a nested config was merged into its defaults by a merge of its own, which also merged
    an option dict (``augment_options``) key by key: options of the default augmentation then applied to another.
    It is merged as every override layer is (``merge_overrides``): option dicts replaced whole, the rest by key."""
    import dataclasses

    @dataclasses.dataclass
    class Outer(config.Checked):
        train: TrainConfig = config.field(factory=lambda: TrainConfig(epochs=7, augment="rrc_flip",
                                                                      augment_options={"scale_min": 0.5}))

    given = {"train": {"augment": "crop_flip", "augment_options": {"pad": 2}}}
    for built in (from_dict(Outer, given), Outer(**given)):
        assert (built.train.epochs, built.train.augment, built.train.augment_options) == (7, "crop_flip", {"pad": 2})
