"""What every distillation method shares: the registry, the output container and the fit context.

A method is one class in one file: a ``Config`` dataclass (derived from :class:`ddkit.config.Checked`,
so that one built in Python is type-checked as YAML is), ``__init__(cfg)`` that only stores it,
and ``fit(real, teachers, ctx) -> self`` that sets ``synthetic_``. Register it with
``@METHODS.register("key")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_args, get_type_hints

import torch

from ddkit.config import absent_key_hint, from_dict
from ddkit.data.base import DataBundle
from ddkit.determinism import global_rng, use_deterministic_cuda
from ddkit.errors import DataError, DDKitError
from ddkit.registry import Registry, is_ddkit


@dataclass
class SyntheticSet:
    """A method's output: pixel-space images, hard labels, optional soft-label logits, metadata.

    ``meta`` is written to the set's JSON manifest, so it holds JSON values only: finite numbers, strings,
    bools, None, lists and dicts of them with str keys (a tensor: ``.tolist()``; a NaN: None; ``source_index``:
    the indices of selected real training images); the pipeline refuses anything else before it writes."""

    images: torch.Tensor  # [N, C, H, W] uint8 (real pixels) or float32 in ~[0, 1]
    labels: torch.Tensor  # int64 [N]
    soft_labels: torch.Tensor | None = None  # [N, num_classes] logits
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitContext:
    """Run-time settings a method needs besides its own config."""

    ipc: int | None
    seed: int
    device: torch.device = torch.device("cpu")
    work_dir: Path | None = None  # for checkpoints that let an interrupted fit resume
    progress: Callable[[int, int, dict], None] | None = None
    # the config key of the method's options, which its errors name (a method run by another: a key inside its)
    options_key: str = "distill.options"
    # how the pipeline stores the set's images (distill.image_dtype): float32 or uint8
    image_dtype: str = "float32"

    def __post_init__(self) -> None:
        use_deterministic_cuda(self.device)

    def as_stored(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as the pipeline will store them (``image_dtype`` uint8: rounded to 8-bit pixels, dtype
        uint8): what a method that labels its own images (RDED, CV-DD) labels, so that the stored labels
        describe the stored images."""
        from ddkit.distilled import stored_pixels

        return stored_pixels(images, self.image_dtype)


class Method:
    """Base class of a distillation method: a dataclass ``Config``, ``__init__(cfg)`` that stores it (a
    mapping is built into the Config), and ``fit(real, teachers, ctx) -> self`` that sets ``synthetic_``.
    The class attributes below tell the pipeline and the contract (:func:`ddkit.testing.check_method`) what
    the method needs and promises.

    A method whose ``synthetic_`` holds soft labels of its own (learned, expert or committee logits) says so in
    :meth:`own_soft_labels`: ``ddkit run`` and ``bench`` then evaluate its sets in label mode ``stored`` with
    those labels, and refuse ``distill.soft_labels`` (the teacher's logits), which would replace them.
    Undeclared, such labels are refused under ``distill.soft_labels`` after the fit, and the contract fails."""

    Config: ClassVar[type]
    needs_teacher: ClassVar[bool] = False
    # whether fit may read the teachers it is given (a method that needs one does). False: its sets are the same
    # whichever teacher a run has, so fit gets none and the set's identity leaves the teacher out (`ddkit run` and
    # `bench` reuse the set when only the teacher, or a bench's label modes, change; distill.soft_labels, which
    # stores the teacher's logits, puts it back)
    uses_teacher: ClassVar[bool] = True
    # whether its sets record a learned student lr (meta.syn_lr) that protocols with learned_lr train with
    learns_lr: ClassVar[bool] = False
    # options for a seconds-long run on tiny data (the contract test and `--quick` benchmarks)
    smoke_options: ClassVar[dict[str, Any]] = {}
    # the contract (ddkit.testing.check_method) checks what these three promise:
    # whether another ctx.seed gives another set (False for a deterministic method: herding, k-center, full)
    uses_seed: ClassVar[bool] = True
    # whether it makes ctx.ipc images per class (False: it ignores ipc, as full keeps every training image)
    uses_ipc: ClassVar[bool] = True
    # whether an interrupted fit resumes to the uninterrupted result: it reports each iteration through
    # ctx.progress and checkpoints to ctx.work_dir (False for a one-pass method: random, herding, full)
    resumable: ClassVar[bool] = True
    # bump when a change alters the output for the same options (a new default, a fixed bug): cached
    # distilled sets of this method (and every evaluation of them) are then made again, others are kept
    # (a method from outside ddkit needs no bump: the sha256 of its module's source counts as well)
    revision: ClassVar[int] = 0
    # whether ipc must not exceed the smallest class's training images (the pipeline checks it before
    # fit); False for a method that may make more images per class than the data holds
    ipc_within_class_size: ClassVar[bool] = True
    # None on the ranks of a torchrun job but rank 0 when the method gathers its set on rank 0 alone (the
    # pipeline builds and saves it there, and the other ranks read the saved artifact)
    synthetic_: SyntheticSet | None

    def __init__(self, cfg) -> None:
        # a mapping of options ({"space": "pixels"}) is built into the Config, checked as YAML is
        self.cfg = from_dict(self.Config, dict(cfg), "options") if isinstance(cfg, Mapping) else cfg

    @classmethod
    def identity_tags(cls, options: dict) -> dict:
        """What else identifies a set made with ``options`` (the method's options as given) when a
        change altered only some option combinations' output (``revision`` would remake them all)."""
        return {}

    @classmethod
    def data_identity_tags(cls, options: dict, num_classes: int) -> dict:
        """Like :meth:`identity_tags`, for a change that altered the output only on some data (e.g. beyond
        100 classes): what else identifies a set made with ``options`` from data of ``num_classes`` classes."""
        return {}

    @classmethod
    def own_soft_labels(cls, cfg) -> str | None:
        """Whether this method, with ``cfg`` (its Config), labels its images itself (learned, expert or committee
        logits, in ``synthetic_.soft_labels``): the option that makes it do so as ``"<option>: <value>"``
        (``"learn_labels: true"``), ``"always"`` for a method that always does, or None (the default: it makes
        none). Errors name the option; the pipeline's ``soft_labels`` (the teacher's logits) would overwrite
        the labels, so it is refused for them, and label mode ``stored`` takes them in ``ddkit run`` / ``bench``.
        E.g. ``return "soft_labels: true" if cfg.soft_labels else None``."""
        return None

    @classmethod
    def stores_soft_labels(cls, cfg) -> bool:
        """Whether the sets this method makes with ``cfg`` hold soft labels without the pipeline's
        ``soft_labels``: its own (:meth:`own_soft_labels`), or teacher logits it stores itself (RDED)."""
        return cls.own_soft_labels(cfg) is not None

    @classmethod
    def own_soft_labels_off(cls, own: str) -> str | None:
        """The setting that turns off the method's own labels that ``own`` (from :meth:`own_soft_labels`)
        names: ``"<option>: false"`` for a switch, ``"<option>: none"`` for a choice that has none; None for a
        method that always makes them (``own`` names no option)."""
        if ":" not in own:
            return None
        option = own.split(":")[0].strip()
        hint = get_type_hints(cls.Config).get(option)
        if hint is bool:
            return f"{option}: false"
        if "none" in get_args(hint):
            return f"{option}: none"
        return f"{option} to a value that leaves the labels to the pipeline"

    def fit(self, real: DataBundle, teachers: list, ctx: FitContext) -> Method:  # pragma: no cover
        raise NotImplementedError


def fit_seeded(method: Method, real: DataBundle, teachers: list, ctx: FitContext) -> Method:
    """``method.fit(real, teachers, ctx)`` with torch's global generators (the CPU's and ``ctx.device``'s) seeded
    with ``ctx.seed`` for its span (:func:`~ddkit.determinism.global_rng`), as the other stages seed theirs: a method
    drawing from them (``torch.rand`` without a generator, a network's initial weights or dropout) makes the same set
    for the same seed; the caller's generator states come back after. Its fit holds them for its whole span (one
    thread at a time, so that stages in other threads give the numbers they give alone): it must not wait for a ddkit
    stage it hands to another thread, which would never start. ddkit's own methods (not a subclass of yours) fit as
    they are: what they draw comes from generators of their own, and their few draws from the global ones (a
    network's initial weights) hold :func:`~ddkit.determinism.global_rng` themselves, so their sets are the same
    either way and distils in several threads run side by side."""
    if is_ddkit(type(method)):
        return method.fit(real, teachers, ctx)
    with global_rng(ctx.seed, ctx.device):
        return method.fit(real, teachers, ctx)


def _check_method(name: str, obj: object) -> None:
    """METHODS refuses what the pipeline cannot run: not a Method subclass, or no dataclass Config."""
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise DDKitError(f"method {name!r}: {getattr(obj, '__qualname__', type(obj).__name__)} is not a subclass of "
                         "ddkit.methods.Method; derive it from Method (class X(Method): ...)")
    if not dataclasses.is_dataclass(getattr(obj, "Config", None)):
        raise DDKitError(f"method {name!r}: {obj.__qualname__} has no dataclass Config; give it one (a "
                         "@dataclass class deriving from ddkit.config.Checked, even without fields) as "
                         "`Config = ...` or a nested class")
    if obj.needs_teacher and not obj.uses_teacher:
        raise DDKitError(f"method {name!r}: {obj.__qualname__} sets needs_teacher = True and uses_teacher = False; a "
                         "method that needs a teacher reads it: drop uses_teacher = False")


METHODS: Registry[type[Method]] = Registry("method", check=_check_method)

#: options that several methods take as a plug-in, with the paper that adds it. A method without one refuses it
#: naming the methods that take it, rather than as an unknown key that reads like a typo.
PLUGIN_OPTIONS = {"flip_plugin": "FYI"}


@absent_key_hint
def _plugin_option_hint(cls: type, key: str) -> str | None:
    """For a :data:`PLUGIN_OPTIONS` key that method Config ``cls`` lacks: which methods take it."""
    if key not in PLUGIN_OPTIONS:
        return None
    mine = [name for name in METHODS.list() if METHODS.get(name).Config is cls]
    if not mine:  # not a method's Config
        return None
    takers = [name for name in METHODS.list()
              if key in {f.name for f in dataclasses.fields(METHODS.get(name).Config)}]
    return (f"{key} ({PLUGIN_OPTIONS[key]}) is supported by {', '.join(takers) or 'no registered method'}; "
            f"{' and '.join(mine)} does not take it: remove the key, or use one of those methods")


def check_ipc(real: DataBundle, ipc: int | None) -> int:
    """Validate IPC against the smallest class of the training set."""
    if ipc is None or ipc < 1:
        raise DataError(f"ipc must be a positive integer, got {ipc!r}; pass --ipc N")
    real.check_train_classes()  # loaded data is checked already; data built by hand is checked here
    counts = real.train.class_counts(real.num_classes)
    smallest = int(counts.min())
    if ipc > smallest:
        c = int(counts.argmin())
        per_class = real.config.train_per_class if real.config is not None else None
        # the subset, not the data, is what limits it: say so (the class itself may have thousands)
        after, fix = ((f" after dataset.train_per_class={per_class}", "raise dataset.train_per_class or use")
                      if per_class == smallest else ("", "use"))
        raise DataError(
            f"ipc {ipc} is larger than the smallest class ({real.classes[c]!r} has {smallest} training "
            f"images{after}); {fix} an ipc of {smallest} or less (--ipc, or ipc / ipcs in a config)"
        )
    return ipc
