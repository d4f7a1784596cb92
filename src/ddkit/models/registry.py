"""The model registry and ``create_model``.

Every entry of :data:`MODELS` is a factory ``factory(in_channels, num_classes, image_size, **options)``
that returns an ``nn.Module`` with the model contract:

- its weights are float32;
- ``model(x)`` takes a normalised float tensor ``[B, C, H, W]`` and returns logits ``[B, num_classes]``, in eval
  and in training mode;
- ``model.embed(x)`` returns the penultimate features ``[B, model.feature_dim]`` (the input of the
  final ``nn.Linear``), used by distribution-matching methods;
- weights come from the global torch RNG only, so ``torch.manual_seed(s)`` before creation fixes them.

A family can also accept names that are not registered one by one (``convnet4-w64-bn``): it adds a
*name parser* with :func:`register_name_parser` that maps such a name to a registered base name and
its options.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ddkit.config import config_hash, is_count
from ddkit.determinism import global_rng
from ddkit.errors import ConfigError, DDKitError
from ddkit.registry import Registry, origin, source_record

log = logging.getLogger(__name__)

ModelFactory = Callable[..., nn.Module]
NameParser = Callable[[str], tuple[str, dict[str, Any]] | None]

# Parsers for parameterised names; each returns (registered base name, options) or None when the
# name is not of its family, and raises DDKitError when the name is of its family but malformed.
_NAME_PARSERS: list[NameParser] = []

_POSITIONAL = ("in_channels", "num_classes", "image_size")


def _check_factory(name: str, factory: Any) -> None:
    """Refuse, when it is registered, a factory that :func:`create_model` cannot call with the three sizes, and a
    user's model under a name that a family of ddkit's builds from its pattern (``convnetd2-w8``), which it would
    shadow: ddkit's own artifacts of that name would then read as damaged."""
    if not callable(factory):
        raise DDKitError(f"model {name!r}: an object of type {type(factory).__name__} is not a factory; register a "
                         "function or class f(in_channels, num_classes, image_size, **options) that returns the "
                         "nn.Module")
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): its first call tells
        params = None
    if params is not None and not any(p.kind is p.VAR_POSITIONAL for p in params) and len(
            [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) < len(_POSITIONAL):
        raise DDKitError(f"model {name!r}: its factory {origin(factory)}{inspect.signature(factory)} cannot take the "
                         f"three sizes create_model passes; a model factory is f({', '.join(_POSITIONAL)}, **options), "
                         "its options keywords with defaults")
    if origin(factory).startswith("ddkit.") or name in MODELS:  # ddkit's own; a taken name: the Registry's message
        return
    for parser in _NAME_PARSERS:
        try:
            parsed = parser(name)
        except DDKitError:  # of a family's form but malformed: not a name ddkit builds
            continue
        if parsed is not None:
            base, options = parsed
            implied = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "its defaults"
            raise DDKitError(f"model {name!r} is a name ddkit's {base} family builds ({base} with {implied}); "
                             "register yours under another name")


MODELS: Registry[ModelFactory] = Registry("model", check=_check_factory)


def check_positive_int(what: str, value: Any) -> None:
    """DDKitError unless ``value`` is an int >= 1 (``what`` names it in the message)."""
    if not is_count(value):
        raise DDKitError(f"{what} must be a positive integer, got {value!r}")


def register_name_parser(parser: NameParser) -> NameParser:
    """Decorator: let ``create_model`` resolve a family's parameterised names with ``parser``."""
    _NAME_PARSERS.append(parser)
    return parser


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted, optionally filtered by a glob such as ``'convnet*'``."""
    return MODELS.list(pattern)


def model_options(factory: ModelFactory) -> dict[str, Any]:
    """The options a factory takes besides the three positional sizes, with their defaults."""
    params = inspect.signature(factory).parameters
    return {
        k: p.default
        for k, p in params.items()
        if k not in _POSITIONAL and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def resolve_model(name: str) -> tuple[ModelFactory, dict[str, Any]]:
    """Factory and name-implied options for ``name``; DDKitError with a suggestion if unknown."""
    if name in MODELS:
        return MODELS.get(name), {}
    for parser in _NAME_PARSERS:
        parsed = parser(name)
        if parsed is not None:
            base, options = parsed
            return MODELS.get(base), options
    return MODELS.get(name), {}  # raises "unknown model ...; did you mean ...?"


def create_model(
    name: str, in_channels: int, num_classes: int, image_size: int, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` for ``[in_channels, image_size, image_size]`` inputs and ``num_classes``.

    ``kwargs`` are the model's options (``convnet``: depth, width, norm, pooling, activation;
    ``resnet18_cifar``: width; ...). A name may fix some options (``convnet3-bn`` sets
    ``norm='batchnorm'``); an option passed explicitly wins over the one the name implies.
    Unknown names and unknown options raise :class:`DDKitError`.
    """
    for key, value in (
        ("in_channels", in_channels),
        ("num_classes", num_classes),
        ("image_size", image_size),
    ):
        check_positive_int(f"model {name!r}: {key}", value)
    factory, implied = resolve_model(name)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not takes_any:
        valid = sorted(model_options(factory))
        for key in kwargs:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise DDKitError(
                    f"model {name!r} has no option {key!r}; {hint}"
                    f"valid options: {', '.join(valid) if valid else 'none'}"
                )
    options = {**implied, **kwargs}
    try:
        model = factory(in_channels, num_classes, image_size, **options)
    except (TypeError, ValueError) as exc:  # a user's factory given a value it cannot take: one line, not a traceback
        if getattr(getattr(factory, "func", factory), "__module__", "").startswith("ddkit."):
            raise  # ddkit's own factories check their options' values (DDKitError): anything else is a bug
        log.info("building model %r failed:", name, exc_info=True)  # at INFO, which -v shows
        text = str(exc).strip()  # its first line, as DDKIT_PLUGINS' import error gives it (the rest: -v's traceback)
        raise DDKitError(f"model {name!r} cannot be built with options {options} ({type(exc).__name__}: "
                         f"{text.splitlines()[0] if text else ''}); check their values (model_options / "
                         "student_options; -v shows the traceback)") from None
    if not type(model).__module__.startswith("ddkit."):  # ddkit's own model classes are tested
        # the factory itself too: one registered anew under the same name (a re-run notebook cell) is checked again
        key = (name, factory, in_channels, num_classes, image_size, repr(sorted(kwargs.items())))
        try:
            checked = key in _CHECKED
        except TypeError:  # an unhashable factory: checked every time
            checked, key = False, None
        if not checked:
            check_contract(name, model, in_channels, num_classes, image_size)
            if key is not None:
                _CHECKED.add(key)
    return model


# user models (name, factory and settings) whose contract was checked in this process; holds the factories, which
# are small, so that one's identity is never another's
_CHECKED: set[tuple] = set()


class ContractError(DDKitError):
    """A user's model breaks the model contract: its code is at fault, not its options or an artifact."""


@contextlib.contextmanager
def state_kept(model: nn.Module) -> Iterator[None]:
    """Put back, after the block (a check's forward pass, also when it raises), every module's train/eval flag and
    buffers as they were: the buffer tensors themselves into the modules' ``_buffers`` (one the forward rebinds,
    ``self.seen = self.seen + 1``, and one it adds too) with their values (BatchNorm's running statistics, updated in
    place). Parameters are left alone; a lazy module's uninitialized buffers are left to the block, which materialises
    them (``torch.nn.parameter.is_lazy``)."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(m, dict(m._buffers), {k: b.detach().clone() for k, b in m._buffers.items()
                                      if b is not None and not torch.nn.parameter.is_lazy(b)})
               for m in model.modules()]
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was
        with torch.no_grad():
            for m, kept, values in buffers:
                m._buffers.clear()
                m._buffers.update(kept)
                for k, saved in values.items():
                    kept[k].copy_(saved)


def other_float_dtypes(tensors: Iterable[torch.Tensor]) -> list[str]:
    """The floating dtypes other than float32 among ``tensors`` (a model's weights), by name, sorted: what ddkit,
    which feeds and computes in float32, refuses in a model of the user's or a synthesis method's teacher."""
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors
                   if t.is_floating_point() and t.dtype != torch.float32})


def check_contract(name: str, model: Any, in_channels: int, num_classes: int, image_size: int) -> None:
    """DDKitError naming what model ``name`` (a user's factory) breaks of the model contract: float32 weights, checked
    with a batch of two zero images in eval mode and in training mode (which training runs: a model with auxiliary
    logits there fails it) without gradients, on the model's device, with the RNG forked, every module's train/eval
    flag and the buffers restored (:func:`state_kept`: BatchNorm's running statistics, a buffer the forward rebinds):
    weights, buffers and the RNG are left as they were, a lazy module's weights and buffers materialised (by the
    eval-mode pass, as its first forward would)."""
    rule = ("a model has float32 weights, maps [B, C, H, W] images to [B, num_classes] logits (in eval and training "
            "mode) and has embed(x) -> [B, feature_dim] and an integer feature_dim (README, Models)")

    def broken(problem: str) -> ContractError:
        return ContractError(f"model {name!r} does not keep ddkit's model contract: {problem}; {rule}")

    if not isinstance(model, nn.Module):
        raise broken(f"its factory returned a {type(model).__name__}, not an nn.Module")
    # ddkit feeds float32 images: every stage would fail on a dtype mismatch
    if dtypes := other_float_dtypes(model.parameters()):
        raise broken(f"its weights are {', '.join(dtypes)}, not float32 (return model.float() from its factory)")
    dim = getattr(model, "feature_dim", None)
    if not is_count(dim):
        raise broken(f"feature_dim is {dim!r}")
    if not callable(getattr(model, "embed", None)):
        raise broken("it has no embed(x) method")
    first = next(model.parameters(), None)
    x = torch.zeros(2, in_channels, image_size, image_size, device=first.device if first is not None else None)
    for training in (False, True):  # eval mode first: it materialises a lazy module's weights and buffers
        mode = " in training mode" if training else ""
        try:
            with state_kept(model), torch.no_grad(), global_rng():
                model.train(training)
                logits, features = model(x), model.embed(x)
        except Exception as exc:  # any failure of user code on the shape it was built for
            raise broken(f"it fails on [2, {in_channels}, {image_size}, {image_size}] images{mode} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        for what, out, want in (("model(x)", logits, [2, num_classes]), ("embed(x)", features, [2, dim])):
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            if shape != want:
                raise broken(f"{what} gives {shape} for 2 images{mode}, expected {want}")


def configured_model(keys: tuple[str, str], name: str, in_channels: int, num_classes: int, image_size: int,
                     options: dict[str, Any]) -> nn.Module:
    """:func:`create_model` for a model a config names: ``keys`` are the config keys of the name and of
    the options (``("teacher.model", "teacher.model_options")``), and an error names the one at fault."""
    try:
        resolve_model(name)
    except DDKitError as exc:
        raise ConfigError(f"{keys[0]}: {exc}") from None
    try:
        return create_model(name, in_channels, num_classes, image_size, **options)
    except DDKitError as exc:  # the name is known: its options are at fault, or the model's own code
        key = keys[0] if isinstance(exc, ContractError) else keys[1]
        raise ConfigError(f"{key}: {exc}") from None


def model_source(name: str) -> dict:
    """Where the factory of model ``name`` is defined (``module``: ``myplug.my_mlp``) and, for one from
    outside ddkit, the sha256 of its source; empty for a name no factory is registered under."""
    try:
        factory, _ = resolve_model(name)
    except DDKitError:  # refused where the model is built, with the suggestion
        return {}
    return {"module": origin(factory), **source_record(factory)}


def model_config_hash(cfg: Any) -> str:
    """The identity of what a config with a ``model`` key makes (a teacher, an expert buffer): the config's
    hash and, for a model from outside ddkit (a plugin), the sha256 of the model's source, so that an edited
    model trains anew instead of its old results being reused (ddkit's own models keep the config's hash)."""
    sha = model_source(cfg.model).get("source_sha256")
    return config_hash(cfg) if sha is None else config_hash([cfg, {"model_source": sha}])
