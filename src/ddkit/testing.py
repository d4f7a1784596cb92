"""The method contract, for checking a method of one's own (as scikit-learn's ``check_estimator``).

    import myplug  # registers "myherding"
    from ddkit.testing import check_method
    check_method("myherding")  # raises ContractError naming the first broken promise

On tiny generated data (``synthetic``: 4 classes of 1x16x16 images) and a tiny teacher trained for it
(``tiny_convnet``, no BatchNorm; ``data=`` and ``teacher=`` replace them), with the method's ``smoke_options`` (a
class attribute: options for a seconds-long run there, e.g. fewer iterations, ``stats: conv`` for a recover
method, which the BatchNorm-less teacher needs), :func:`check_output` checks shapes, finite pixels, the label range,
that neither the config nor the real data is mutated, that the same seed gives the same bytes (through the
``distill`` stage and the saved artifact), and that another seed gives another set; :func:`check_resume` checks that a
fit interrupted after its second iteration resumes to the uninterrupted result, from its checkpoints (rewriting
none of them before it reports an iteration past the interrupted one: a fit that ignores them starts over). The
class attributes ``uses_seed``, ``uses_ipc`` and ``resumable`` of :class:`ddkit.methods.Method` turn off the checks
that do not apply to a method; one with ``uses_teacher = False`` is fitted with no teacher, as ``distill`` fits
it. ddkit's own test suite runs both over every registered method.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path

import torch

from ddkit.determinism import stage_modes
from ddkit.errors import ConfigError, DDKitError

logger = logging.getLogger(__name__)

#: images per class of the checks
IPC = 2


class ContractError(DDKitError, AssertionError):
    """A method that breaks the contract (an AssertionError too, so that pytest reports a failed test)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ContractError(message)


def _resolve(method) -> tuple[str, type]:
    """(registry key, class) of a method given by key or by its registered class."""
    import ddkit.methods  # noqa: F401  (registers the built-in methods)
    from ddkit.methods import METHODS, Method

    if isinstance(method, str):
        return method, METHODS.get(method)
    keys = [k for k in METHODS.list() if METHODS.get(k) is method]
    if not isinstance(method, type) or not issubclass(method, Method) or not keys:
        raise DDKitError(f"check_method takes a registered method's key or class, got {method!r:.80}; register "
                         "the class with @METHODS.register('key') (ddkit.methods) first")
    return keys[0], method


def tiny_data():
    """The checks' data: ``synthetic`` with its defaults (4 classes, 24 train / 12 test 1x16x16 images each)."""
    from ddkit.data.base import load_dataset

    return load_dataset("synthetic")


def tiny_teacher(data, out: str | Path | None = None):
    """The checks' teacher: a ``tiny_convnet`` trained 6 epochs on ``data`` (seconds on a CPU) with
    ``TrainConfig(epochs=6, batch_size=32, lr=0.05)`` as it is (no augmentation, step schedule: not the teacher
    recipe that ``ddkit teacher`` merges these settings into, see :class:`~ddkit.teacher.TeacherConfig`)."""
    from ddkit.teacher import TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    cfg = TeacherConfig(model="tiny_convnet", model_options={}, train=TrainConfig(epochs=6, batch_size=32, lr=0.05))
    return train_teacher(data, cfg, out)


@stage_modes()
def _fit(cls, key: str, data, teacher, seed: int = 0, work_dir: Path | None = None, progress=None):
    from ddkit.config import from_dict, to_dict
    from ddkit.methods import FitContext
    from ddkit.methods.base import fit_seeded
    from ddkit.pipeline import check_real_unchanged

    cfg = from_dict(cls.Config, dict(cls.smoke_options), f"{key}.smoke_options")
    before, data_before = copy.deepcopy(to_dict(cfg)), data.fingerprint
    ctx = FitContext(ipc=IPC if cls.uses_ipc else None, seed=seed, work_dir=work_dir, progress=progress)
    try:  # the teachers distill passes: none to a method that declares it reads none; seeded as distill seeds it
        method = fit_seeded(cls(cfg), data, [teacher] if cls.uses_teacher else [], ctx)
    except Exception as exc:
        if cls.uses_teacher or not _fits_with_teacher(cls, key, data, teacher, seed):
            if isinstance(exc, DDKitError) and not isinstance(exc, ContractError):  # it refuses the checks' run
                raise ContractError(
                    f"method {key!r} refuses the check's run with its smoke_options {dict(cls.smoke_options)} (tiny "
                    "data, and check_method's own tiny_convnet teacher, without BatchNorm, unless teacher= is given): "
                    f"{exc}; set the class attribute smoke_options to options that run there in seconds (e.g. "
                    "{'stats': 'conv', 'iterations': 4}, as sre2l's), or pass check_method a data= / teacher= it can "
                    "use"
                ) from exc
            raise
        raise ContractError(f"method {key!r} declares `uses_teacher = False`, so distill gives its fit no teacher, but "
                            f"it fails without one ({type(exc).__name__}: {exc}) and not with one; drop `uses_teacher "
                            "= False` from the class, or read no teacher in fit") from exc
    _require(to_dict(cfg) == before, f"method {key!r}: fit() mutated its config (from {before} to {to_dict(cfg)}); "
             "keep what it changes in the method (self), not in self.cfg")
    check_real_unchanged(key, data, data_before, ContractError)
    _require(getattr(method, "synthetic_", None) is not None,
             f"method {key!r}: fit() returned {type(method).__name__} without synthetic_; set self.synthetic_ "
             "and return self")
    return method.synthetic_


def _fits_with_teacher(cls, key: str, data, teacher, seed: int) -> bool:
    """Whether a fit of ``cls`` (that failed with no teacher) succeeds with ``teacher``: then it reads one."""
    from ddkit.config import from_dict
    from ddkit.methods import FitContext
    from ddkit.methods.base import fit_seeded

    cfg = from_dict(cls.Config, dict(cls.smoke_options), f"{key}.smoke_options")
    try:
        fit_seeded(cls(cfg), data, [teacher], FitContext(ipc=IPC if cls.uses_ipc else None, seed=seed))
    except Exception:  # it fails with a teacher too: its own error, not the contract's, is the one to report
        return False
    return True


def _same_soft_labels(a, b) -> bool:
    if (a.soft_labels is None) != (b.soft_labels is None):
        return False
    return a.soft_labels is None or (a.soft_labels.dtype == b.soft_labels.dtype
                                     and torch.equal(a.soft_labels, b.soft_labels))


def check_output(method, data=None, teacher=None, work_dir: str | Path | None = None) -> None:
    """Check what ``method`` (a key or a registered class) makes; raise :class:`ContractError` if it breaks the
    contract. ``data`` (a loaded DataBundle) and ``teacher`` default to :func:`tiny_data` and :func:`tiny_teacher`;
    ``work_dir``: where the distilled-set artifact is written (default: a temporary folder)."""
    key, cls = _resolve(method)
    _run(_check_output, key, cls, data, teacher, work_dir)


def _run(check, key: str, cls, data, teacher, work_dir: str | Path | None) -> None:
    """``check(key, cls, data, teacher, work_dir)`` with the defaults filled in (tiny data and teacher, a
    temporary work folder)."""
    data = tiny_data() if data is None else data
    teacher = tiny_teacher(data) if teacher is None else teacher
    with tempfile.TemporaryDirectory(prefix="ddkit-check-") as tmp:
        check(key, cls, data, teacher, Path(work_dir) if work_dir is not None else Path(tmp))


def _check_output(key: str, cls, data, teacher, work_dir: Path) -> None:
    import ddkit
    from ddkit.config import from_dict
    from ddkit.data.base import DatasetConfig
    from ddkit.pipeline import DistillConfig, distill, own_labels_clash

    out = _fit(cls, key, data, teacher)
    if cls.uses_ipc:
        n, counts = IPC * data.num_classes, [IPC] * data.num_classes
    else:  # every training image, as `full`
        n, counts = len(data.train), data.train.class_counts(data.num_classes).tolist()
    shape = (n, *data.image_shape)
    _require(tuple(out.images.shape) == shape,
             f"method {key!r} made images of shape {tuple(out.images.shape)}; expected {shape} "
             f"({'ipc ' + str(IPC) + ' x ' + str(data.num_classes) + ' classes' if cls.uses_ipc else 'every image'})")
    _require(out.images.dtype in (torch.uint8, torch.float32),
             f"method {key!r} made images of dtype {out.images.dtype}; give uint8 0..255 or float32 0..1 pixels")
    _require(bool(torch.isfinite(out.images.float()).all()), f"method {key!r} made images with NaN or inf pixels")
    _require(out.labels.dtype == torch.int64 and tuple(out.labels.shape) == (n,),
             f"method {key!r} made labels of shape {tuple(out.labels.shape)} ({out.labels.dtype}); expected ({n},) "
             "int64 class indices")
    bad = out.labels[(out.labels < 0) | (out.labels >= data.num_classes)]
    _require(len(bad) == 0, f"method {key!r} made label {int(bad[0]) if len(bad) else 0}, outside "
             f"0..{data.num_classes - 1} for {data.num_classes} classes")
    got = torch.bincount(out.labels, minlength=data.num_classes).tolist()
    _require(got == counts, f"method {key!r} made {got} images per class; expected {counts}")
    if out.soft_labels is not None:
        _require(tuple(out.soft_labels.shape) == (n, data.num_classes)
                 and bool(torch.isfinite(out.soft_labels).all()),
                 f"method {key!r} made soft labels of shape {tuple(out.soft_labels.shape)} (or not finite); "
                 f"expected finite logits of shape ({n}, {data.num_classes})")
    if cls.uses_seed:  # a method that ignores ctx.seed makes one set for every seed
        other = _fit(cls, key, data, teacher, seed=1)
        _require(not torch.equal(out.images, other.images),
                 f"method {key!r} made the same images with seed 0 and seed 1; draw its randomness from ctx.seed, "
                 "or set `uses_seed = False` on the class if it is deterministic (herding)")
    # same seed, same result, and the artifact round-trip: a second run, through the distill stage with seed 0,
    # gives the first run's images, labels and soft labels, and so does the set loaded back from disk (a lossy
    # save or load changes them)
    dataset_cfg = None if data.config is not None else DatasetConfig(name=data.name)
    options = dict(cls.smoke_options)
    ds = distill(data, DistillConfig(method=key, ipc=IPC if cls.uses_ipc else None, options=options),
                 dataset_cfg, work_dir / "art", teacher)
    loaded = ddkit.load(work_dir / "art")
    _require(loaded.method == key, f"method {key!r}: the saved set names method {loaded.method!r}")
    for what, got_set in (("a second run with the same seed", ds), ("the set saved and loaded back", loaded)):
        _require(torch.equal(got_set.images, out.images) and torch.equal(got_set.labels, out.labels)
                 and _same_soft_labels(out, got_set),
                 f"method {key!r}: {what} differs from the first run with seed 0; draw all randomness from "
                 "ctx.seed (a torch.Generator), never from global state or the clock")
    # a method that labels its images itself says so (ddkit run and bench read it before the fit), and refuses the
    # pipeline's teacher logits over them
    smoke_cfg = from_dict(cls.Config, dict(cls.smoke_options))
    own = cls.own_soft_labels(smoke_cfg)
    _require(out.soft_labels is None or cls.stores_soft_labels(smoke_cfg),
             f"method {key!r} made soft labels, but its class does not declare them: override the classmethod "
             "own_soft_labels(cls, cfg) to return the option that makes them ('<option>: <value>', or 'always'), "
             "so that ddkit run and bench take them for label mode stored and never overwrite them")
    if own is not None:
        _require(out.soft_labels is not None, f"method {key!r} says {own} makes soft labels but made none")
        want = own_labels_clash(key, cls, own)
        try:
            distill(data, DistillConfig(method=key, ipc=IPC, soft_labels=True, options=options), dataset_cfg,
                    work_dir / "own", teacher)
        except ConfigError as exc:
            _require(want in str(exc), f"method {key!r}: distill with soft_labels refused with {exc}; expected "
                     f"a message with {want!r}")
        else:
            raise ContractError(f"method {key!r} labels its images itself ({own}), yet distill with "
                                "soft_labels=True did not refuse to overwrite them")
        _require(not (work_dir / "own").exists(), f"method {key!r}: a refused distill left {work_dir / 'own'}")


def check_resume(method, data=None, teacher=None, work_dir: str | Path | None = None) -> None:
    """Check that ``method``, stopped (KeyboardInterrupt) in its second iteration, resumes from the checkpoints it
    wrote to ``ctx.work_dir`` to the images of an uninterrupted fit; a method with ``resumable = False`` passes.
    A resumed fit that writes any of those files again before it reports an iteration past the interrupted one
    (``ctx.progress``) started over, and fails: it may report the iterations it restored, as rded its classes.
    Arguments as :func:`check_output`'s; ``work_dir`` holds the checkpoints."""
    key, cls = _resolve(method)
    if cls.resumable:
        _run(_check_resume, key, cls, data, teacher, work_dir)


def _check_resume(key: str, cls, data, teacher, work_dir: Path) -> None:
    straight = _fit(cls, key, data, teacher)
    calls = []

    def kill(step, total, record):
        if any(k.endswith("_pass") for k in record):  # a one-off pass (statistics, experts), not an iteration
            return
        calls.append(step)
        if len(calls) == 2:
            raise KeyboardInterrupt

    work = work_dir / "work"
    try:
        _fit(cls, key, data, teacher, work_dir=work, progress=kill)
    except KeyboardInterrupt:
        pass
    else:
        raise ContractError(
            f"method {key!r} is marked resumable but called ctx.progress {len(calls)} time(s) outside one-off passes, "
            "so it was never interrupted: call ctx.progress(step, total, record) once per iteration and checkpoint "
            "to ctx.work_dir (ddkit.methods.common.Checkpoint), or set `resumable = False` on the class")
    _require(work.is_dir() and any(work.iterdir()),
             f"method {key!r} is marked resumable but wrote no checkpoint to ctx.work_dir before it was interrupted "
             "in its 2nd iteration; save its state there (ddkit.methods.common.Checkpoint), or set "
             "`resumable = False` on the class")
    for path in work.rglob("*"):  # an old time, which any rewrite changes (one within a clock tick of the save too)
        if path.is_file():
            os.utime(path, ns=(path.stat().st_atime_ns, 0))
    left = _files(work)
    restarted = []

    def watch(step, total, record):  # an iteration up to the interrupted one that rewrites a checkpoint: redone
        if not restarted and step <= calls[-1] and not any(k.endswith("_pass") for k in record):
            restarted.extend((step, name) for name, stat in left.items() if _files(work).get(name) != stat)

    resumed = _fit(cls, key, data, teacher, work_dir=work, progress=watch)
    if restarted:
        step, name = restarted[0]
        raise ContractError(f"method {key!r}: resumed after an interruption in iteration {calls[-1]}, it wrote {name} "
                            f"in ctx.work_dir again by iteration {step}: it started over instead of resuming from its "
                            "checkpoint; load the checkpoint at the start of fit (Checkpoint.load) and continue after "
                            "its step")
    _require(torch.equal(straight.images, resumed.images),
             f"method {key!r}: resumed after an interruption, it made other images than an uninterrupted fit; "
             "restore all its state (images, optimiser, random generators, step) from its checkpoint")


def _files(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each file under ``folder`` (its path relative to it) with what a rewrite changes: inode, size, mtime."""
    return {str(p.relative_to(folder)): (st.st_ino, st.st_size, st.st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and (st := p.stat())}


def check_method(method, data=None, teacher=None, work_dir: str | Path | None = None) -> None:
    """:func:`check_output` and :func:`check_resume` for ``method`` (a registered key or class), on one tiny
    teacher; raise :class:`ContractError` naming the first broken promise and its fix, return None if it keeps
    them all."""
    key, cls = _resolve(method)
    data = tiny_data() if data is None else data
    teacher = tiny_teacher(data) if teacher is None else teacher
    with tempfile.TemporaryDirectory(prefix="ddkit-check-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        _check_output(key, cls, data, teacher, root / "output")
        if cls.resumable:
            _check_resume(key, cls, data, teacher, root / "resume")
    logger.info("method %r keeps the contract", key)
