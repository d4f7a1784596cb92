"""Teacher artifacts: train (resumable per epoch) or import, save, load, check against data."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import numbers
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddkit import distributed as ddist
from ddkit.artifacts import (
    MANIFEST,
    DescribesDataset,
    artifact_folder,
    atomic_dir,
    base_manifest,
    check_classes,
    check_normalisation,
    check_output_dir,
    folder_kind,
    hidden_path,
    load_failure,
    load_tensors,
    quiet_torch_load,
    read_json,
    read_manifest,
    recorded_path,
    save_tensors,
    work_name,
    write_json,
    writing,
)
from ddkit.config import Checked, as_config, config_hash, field, is_count, short_repr, summary_repr, to_dict
from ddkit.data.base import DataBundle, check_bundle, hash_rows, reorders_classes
from ddkit.determinism import global_rng, stage_modes
from ddkit.errors import ConfigError, DDKitError
from ddkit.models import configured_model, create_model
from ddkit.models.registry import ContractError, model_config_hash, model_source, state_kept
from ddkit.registry import own_source_sha256
from ddkit.training import (
    Diverged,
    NonFiniteOutputs,
    TrainConfig,
    accuracy,
    batchnorm_layers,
    check_teacher_logits,
    train_classifier,
)

log = logging.getLogger(__name__)
# held while a teacher's fingerprint is hashed again (Teacher._follow_weights): one lock for all teachers, as a
# lock held by each would keep them from being copied or pickled
_FOLLOWING = threading.Lock()

KIND = "teacher"
WEIGHTS = "model.safetensors"


def _teacher_train_defaults() -> TrainConfig:
    # A short SGD + cosine recipe with light augmentation: ~90% on Fashion-MNIST in a few epochs.
    return TrainConfig(epochs=20, batch_size=256, optimizer="sgd", lr=0.05, momentum=0.9,
                       weight_decay=5e-4, schedule="cosine", augment="crop_flip")


@dataclass
class TeacherConfig(Checked):
    """How to make a teacher.

    ``train`` defaults to the teacher's own recipe (SGD lr 0.05, cosine schedule, ``crop_flip`` augmentation, 20
    epochs), into which a YAML ``teacher: {train: {...}}`` section or ``--set teacher.train.X=...`` merges. A
    ``TrainConfig(...)`` passed here is taken as it is, with ``TrainConfig``'s own defaults (no augmentation, step
    schedule) for the fields it leaves out: another teacher than the YAML one. For the YAML teacher with a few
    changes, ``dataclasses.replace(TeacherConfig().train, epochs=4)`` or ``from_dict(TeacherConfig, {"train":
    {"epochs": 4}})``. With ``checkpoint`` (an import, which trains nothing) a ``train`` other than the teacher's
    recipe and a ``seed`` other than 0 are refused: they would be recorded as if they had made the teacher."""

    model: str = field("convnet3", help="registered model key (`ddkit list models`)")
    model_options: dict = field({}, help="keyword options for the model factory (e.g. width)")
    train: TrainConfig = field(factory=lambda: _teacher_train_defaults(), help="training recipe")
    seed: int = field(0, seed=True, help="seed for initialisation, batch order and augmentation")
    checkpoint: str | None = field(None,
                                   help="import these weights (safetensors or state-dict .pt) instead of training")

    def __post_init__(self) -> None:
        if self.checkpoint is not None and not self.checkpoint.strip():
            raise ConfigError("checkpoint is empty; give the weights file to import, or leave it out (null) to train")
        if self.checkpoint is not None and (trains := self._training_settings()):
            # an import trains nothing: the settings would be recorded in its manifest as if they had made it
            raise ConfigError(f"checkpoint imports a trained teacher, but {', '.join(trains)} "
                              f"{'sets' if len(trains) == 1 else 'set'} how one trains; drop "
                              f"{'it' if len(trains) == 1 else 'them'} (or drop checkpoint to train)")

    def _training_settings(self) -> list[str]:
        """The settings that differ from the defaults and only a training reads (``train.X=value``, ``seed=N``):
        a teacher's own recipe that a config merely carries (a run's ``teacher:`` section) is none."""
        default = to_dict(_teacher_train_defaults())
        trains = [f"train.{k}={short_repr(v)}" for k, v in to_dict(self.train).items() if v != default.get(k)]
        return trains + ([f"seed={self.seed}"] if self.seed != 0 else [])


#: what a teacher's manifest holds, by type, which the stages read (Teacher.load also checks its dataset's mean and std)
MANIFEST_FIELDS: dict[str, type] = {"model.name": str, "model.input_shape": list, "model.options": dict,
                                    "dataset.classes": list, "weights_sha": str}


class Teacher(DescribesDataset):
    """A trained classifier with the data description it was trained on.

    ``Teacher(model, manifest)`` takes a teacher artifact's manifest (:data:`MANIFEST_FIELDS`, and the dataset's
    ``mean`` and ``std``); a module of your own trained outside ddkit becomes one with :meth:`of_module`."""

    def __init__(self, model: nn.Module, manifest: dict[str, Any], path: Path | None = None) -> None:
        lacks, wrong, sequences, missing = [], [], {}, object()
        for key, kind in {**MANIFEST_FIELDS, "dataset.mean": list, "dataset.std": list}.items():
            value: Any = manifest if isinstance(manifest, dict) else {}
            for part in key.split("."):
                value = value.get(part, missing) if isinstance(value, dict) else missing
            if value is missing:
                lacks.append(key)
            elif kind is list and key != "dataset.classes":  # a DataBundle's mean, std and image shape are tuples
                if not (isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                                 for v in value)):
                    wrong.append(f"{key} must be a list of numbers, found {type(value).__name__} {short_repr(value)}")
                elif isinstance(value, tuple):
                    sequences[key] = list(value)
            elif not isinstance(value, kind) or isinstance(value, bool):
                wrong.append(f"{key} must be a {kind.__name__}, found {type(value).__name__} {short_repr(value)}")
        fix = ("make a teacher of a module of your own with Teacher.of_module(model, data), or load a teacher "
               "artifact with Teacher.load(DIR)")
        if lacks:  # every stage would fail on the first one it reads, with a KeyError
            raise DDKitError(f"Teacher(model, manifest): the manifest lacks {', '.join(lacks)}; {fix}")
        if wrong:
            raise DDKitError(f"Teacher(model, manifest): {'; '.join(wrong)}; {fix}")
        if sequences:  # as the stages read them (and as JSON saves them): lists
            manifest = {**manifest, **{part: {**manifest[part], **{key.split(".")[1]: value
                                                                   for key, value in sequences.items()
                                                                   if key.startswith(part + ".")}}
                                       for part in {key.split(".")[0] for key in sequences}}}
        self.model = model.eval()
        self.manifest = manifest
        self.path = path
        # the state of the weights that the manifest's weights_sha names (:func:`_weights_state`)
        self._hashed = _weights_state(self.model)

    def __repr__(self) -> str:  # a teacher of the caller's own module may hold only some of the fields
        accuracy = self.test_accuracy
        return summary_repr(self, model=(self.manifest.get("model") or {}).get("name") or type(self.model).__name__,
                            **self.dataset_facts(), test_accuracy=None if accuracy is None else round(accuracy, 4),
                            weights_sha=self.manifest.get("weights_sha"), path=recorded_path(self.path))

    @property
    def test_accuracy(self) -> float | None:
        return self.manifest.get("test_accuracy")

    @property
    def fingerprint(self) -> str:
        """The weights' sha (:func:`weights_sha`; an ensemble's: of its members' and their votes), which keys every
        cache, store and reuse check: the manifest's, hashed again once the weights changed in memory since (edited in
        place under ``torch.no_grad()``, an optimizer's steps, ``model.load_state_dict``, a module or parameter
        replaced, the model moved), which :func:`_weights_state` tells without reading them. An edit through a
        tensor's ``.data`` or a NumPy/DLPack view of it is one that PyTorch counts nowhere: edit under
        ``torch.no_grad()`` instead (``param.copy_(torch.from_numpy(array))``).

        A model of the user's own code (a plugin's, :func:`model_code`) adds the sha256 of that code, so that the
        statistics, labels, students and sets of a teacher are not reused once its model's code was edited; a
        teacher of ddkit's own models keeps the weights' sha alone."""
        self._follow_weights()
        if isinstance(self.model, _MeanLogits):  # its members' fingerprints hold their code
            return self.manifest["weights_sha"]
        return _with_code(self.manifest["weights_sha"], model_code(self.model, (self.manifest.get("model") or {}).get(
            "name")))

    def _follow_weights(self) -> None:
        """The manifest with the sha of the weights the model holds now (an ensemble's members' too), hashed again
        where they changed since it was taken."""
        state = _weights_state(self.model)
        if state is not None and state == self._hashed:
            return
        # one thread hashes; another that asks meanwhile waits for its sha instead of reading the old one
        with _FOLLOWING:
            state = _weights_state(self.model)
            if state is not None and state == self._hashed:
                return
            members = self.manifest.get("ensemble")
            if isinstance(self.model, _MeanLogits) and members:
                members = [{**m, "weights_sha": _with_code(weights_sha(model), model_code(model))}
                           for m, model in zip(members, self.model.members)]
                sha = _ensemble_sha(members)
            else:
                members, sha = None, weights_sha(self.model)
            if sha != self.manifest.get("weights_sha"):
                log.info("teacher %s: its weights changed in memory, now %s", self.manifest.get("weights_sha"), sha)
            # a new dict: a manifest shared with another teacher (one made from it) keeps naming that one's weights
            self.manifest = {**self.manifest, "weights_sha": sha, **({"ensemble": members} if members else {})}
            self._hashed = state  # last: the state says the manifest names these weights

    def made(self, recorded: Any) -> bool:
        """Whether the fingerprint ``recorded`` (by a set, label store or committee) names this teacher: its
        :attr:`fingerprint`, or, for what ddkit made before a plugin model's code entered it, its weights' sha alone."""
        return recorded in (self.fingerprint, self.manifest["weights_sha"])

    def record(self) -> dict[str, Any]:
        """How sets and reports name this teacher: its folder (absolute; None if never saved) and fingerprint."""
        return {"path": recorded_path(self.path),
                "weights_sha": self.fingerprint}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``: images normalised with the teacher's mean and std, as students see them."""
        return self.model(x)

    def to(self, device) -> Teacher:
        self.model.to(device)
        return self

    def check_compatible(self, data: DataBundle) -> None:
        """Fail unless ``data`` has the teacher's class names, order and image shape (an error names the
        teacher's folder, which tells an extra teacher or committee member from the main one)."""
        check_describes(self.manifest, self.path, data)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        if isinstance(self.model, _MeanLogits):  # Teacher.load builds one model: the members' weights would not fit
            raise DDKitError(f"cannot save a teacher ensemble as one teacher to {str(out)!r}; save each member "
                             "(member.save(DIR)) and make the ensemble again with teacher_ensemble([...], weights)")
        self._follow_weights()  # the manifest names the weights saved, also after an edit in memory
        with atomic_dir(out, kind=KIND) as tmp:
            save_tensors(tmp / WEIGHTS, self.model.state_dict())
            write_json(tmp / "manifest.json", self.manifest)
        self.path = out.absolute()  # records name it from any working folder (not resolved: links stay)
        return out

    @classmethod
    def of_module(cls, model: nn.Module, data: DataBundle, name: str | None = None) -> Teacher:
        """A teacher of a module of your own trained outside ddkit on ``data``: the same classes in that order, images
        of its shape normalised with its ``mean`` and ``std``, ``[B, num_classes]`` logits (checked on two zero images
        in eval mode, the module's state left as it was; the teacher puts it in eval mode). Its manifest describes
        ``data`` as an imported teacher's does (no test accuracy). ``name``: the model registered in
        :data:`~ddkit.models.MODELS` that builds the module, so that ``teacher.save(DIR)`` loads again
        (``Teacher.load``) once it is registered; without it, the module's class name, and such a saved teacher loads
        only where a model of that name builds it. Its fingerprint holds its class's source (:attr:`fingerprint`)."""
        check_bundle(data)
        if not isinstance(model, nn.Module):
            raise DDKitError(f"Teacher.of_module takes an nn.Module, got {type(model).__name__}; pass the trained "
                             "model")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with state_kept(model):  # in eval mode, as a teacher is used: a BatchNorm layer's statistics stay as they are
            check_teacher_logits(model.eval(), data.image_shape, data.num_classes, device)
        return cls(model, _manifest(model, data, TeacherConfig(model=name or type(model).__name__), None, []))

    @classmethod
    @stage_modes()
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Teacher:
        path = artifact_folder(path, KIND)  # the manifest's path names its folder, as read_manifest takes it
        manifest = read_manifest(path, KIND, require=MANIFEST_FIELDS)
        m = manifest["model"]
        shape = m["input_shape"]
        if len(shape) != 3 or not all(map(is_count, shape)):
            raise DDKitError(f"{str(path / MANIFEST)!r} holds model.input_shape {shape!r}, not [channels, "
                             "height, width]; the manifest is damaged: re-create the teacher artifact")
        check_normalisation(manifest, shape[0], path, KIND)
        check_classes(manifest["dataset"]["classes"], path, KIND)
        build = (m["name"], shape[0], len(manifest["dataset"]["classes"]), shape[-2])

        def cannot_build(exc: DDKitError) -> DDKitError:
            if isinstance(exc, ContractError):  # the user's code, not the artifact, is at fault
                return DDKitError(f"teacher {str(path)!r}: {exc}")
            made_by = _plugin_module(m.get("module"))
            own = ("" if not str(exc).startswith("unknown model") else
                   # a script run as `python script.py`: no other process imports it as __main__
                   "made by a script (module __main__), which another process cannot import: move the model's "
                   "registration into a module of its own, import that in the script, and import it first (CLI: name "
                   "it in DDKIT_PLUGINS); else " if made_by == "__main__" else
                   f"made by module {made_by}: import it first (CLI: set DDKIT_PLUGINS={made_by}); else "
                   if made_by else "a model of your own: import the module that registers it first (the CLI "
                   "imports those named in DDKIT_PLUGINS); else ")
            return DDKitError(f"{str(path / MANIFEST)!r} holds a model this ddkit cannot build "
                              f"({str(exc).split(';')[0]}); {own}the manifest is damaged or from another ddkit: "
                              "re-create the teacher artifact")

        try:
            want = _meta_state(*build, m["options"])
        except DDKitError as exc:  # an unknown model name
            raise cannot_build(exc) from None
        # the weights file's names and shapes first: a forged manifest must not make ddkit build a vast model
        _check_weights_header(path / WEIGHTS, want, m["name"])
        try:
            with global_rng():  # initial weights, replaced by the file's: the caller's and other threads' RNG kept
                model = create_model(*build, **m["options"])
        except DDKitError as exc:  # ConfigError too: an unknown name or option
            raise cannot_build(exc) from None
        except (RuntimeError, MemoryError) as exc:  # a model too large for memory
            raise DDKitError(f"{str(path / MANIFEST)!r} holds a model this ddkit cannot build ({type(exc).__name__}: "
                             f"{load_failure(exc)}); the manifest is damaged: re-create the teacher artifact") from None
        state = load_tensors(path / WEIGHTS, what="teacher weights")
        _load_strict(model, state, str(path / WEIGHTS), m["name"])
        # the fingerprint keys every cache, store and reuse check: weights that are not the manifest's are refused
        if weights_sha(model) != manifest["weights_sha"]:
            raise DDKitError(f"{str(path / WEIGHTS)!r} does not hold the weights its manifest names (weights_sha "
                             f"{manifest['weights_sha']}); the teacher artifact is damaged: re-create it")
        return cls(model.to(device), manifest, path.absolute())


def check_describes(manifest: dict[str, Any], path: Path | None, data: DataBundle) -> None:
    """Fail unless ``data`` has the class names, order and image shape of the teacher whose manifest is
    ``manifest`` (:meth:`Teacher.check_compatible`; ``path``: its folder, named in the error)."""
    mine = list(manifest["dataset"]["classes"])
    who = f"teacher {str(path)!r}" if path is not None else "teacher"
    if len(mine) != data.num_classes:
        raise DDKitError(
            f"{who} has {len(mine)} classes but dataset {data.name!r} has {data.num_classes}; "
            "use a teacher trained on this dataset"
        )
    if sorted(mine) != sorted(data.classes):  # other names: no order of this data's classes fits
        raise DDKitError(f"{who} classes {mine} differ from dataset {data.name!r}'s {list(data.classes)}; use a "
                         "teacher trained on this data")
    if mine != list(data.classes):
        diff = next(i for i, (a, b) in enumerate(zip(mine, data.classes)) if a != b)
        raise DDKitError(
            f"{who} class order differs from dataset {data.name!r} at index {diff} "
            f"({mine[diff]!r} vs {data.classes[diff]!r}); "
            + ("pass dataset.classes in the teacher's order" if reorders_classes(data) else
               "re-order the labels and 'classes' in the data, or train a teacher on this data")
        )
    shape = list(manifest["model"]["input_shape"])
    if shape[0] != data.image_shape[0]:
        raise DDKitError(f"{who} expects {shape[0]}-channel images but dataset {data.name!r} has "
                         f"{data.image_shape[0]}-channel ones (grayscale vs colour); use a teacher trained on "
                         "this data")
    if shape != list(data.image_shape):
        raise DDKitError(
            f"{who} expects images {shape} but dataset {data.name!r} has {list(data.image_shape)}; "
            "use the same image size"
        )


def check_teacher_artifact(path: str | Path, data: DataBundle) -> None:
    """Fail unless the teacher artifact at ``path`` is one and describes ``data`` (:func:`check_describes`),
    from its manifest alone: its weights are not read (an extra teacher is checked before any stage runs)."""
    path = artifact_folder(path, KIND)
    manifest = read_manifest(path, KIND, require={"model.input_shape": list, "dataset.classes": list})
    check_describes(manifest, path.absolute(), data)


def _meta_state(name: str, in_channels: int, num_classes: int, image_size: int,
                options: dict) -> dict[str, tuple[list[int], torch.dtype]] | None:
    """Names, shapes and dtypes of the state dict of model ``name``, built on the meta device (no memory, no
    initialisation); None where its factory cannot build it there (or refuses the settings: :func:`create_model`
    then names the problem)."""
    from ddkit.models.registry import resolve_model

    factory, implied = resolve_model(name)  # an unknown name: DDKitError
    try:
        with torch.device("meta"):
            model = factory(in_channels, num_classes, image_size, **{**implied, **options})
        return {k: (list(v.shape), v.dtype) for k, v in model.state_dict().items()}
    except Exception:  # any failure of the factory's own code: left to the real build, which reports it
        return None


def _check_weights_header(path: Path, want: dict[str, tuple[list[int], torch.dtype]] | None, name: str) -> None:
    """Refuse a weights file whose tensor names, shapes or dtypes (read from its header, no data) differ from
    ``want`` (:func:`_meta_state`); nothing is checked where ``want`` is None."""
    from safetensors import SafetensorError, safe_open

    if want is None:
        return
    if not path.is_file():
        raise DDKitError(f"teacher weights {str(path)!r} not found; the artifact is incomplete, re-create it")
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
            held = {k: (list(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DDKitError(f"teacher weights {str(path)!r} is corrupt ({str(exc).splitlines()[0]}); re-create "
                         "it") from None
    missing, unexpected = sorted(set(want) - set(held)), sorted(set(held) - set(want))
    wrong = [k for k in want if k in held and (held[k][0] != want[k][0] or held[k][1] != _SAFETENSORS_DTYPES.get(
        want[k][1]))]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}"] if missing else []
        parts += [f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"] if unexpected else []
        if wrong:
            k = wrong[0]
            parts.append(f"{k!r} is {held[k][1]} {held[k][0]}, the model's {_SAFETENSORS_DTYPES.get(want[k][1])} "
                         f"{want[k][0]}")
        raise DDKitError(f"teacher weights {str(path)!r} do not match its manifest's model {name!r} "
                         f"({'; '.join(parts)}); the teacher artifact is damaged: re-create it")


#: torch dtypes as a safetensors header names them
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def model_code(model: nn.Module, name: Any = None) -> list[str]:
    """The sha256 of the user's own code that ``model`` runs (:func:`~ddkit.registry.source_sha256`): the factory
    registered as ``name`` (its manifest's model, when a plugin's) and the class of ``model`` when outside ddkit, the
    standard library and installed packages. Empty for ddkit's own models."""
    found = _factory_code(name)
    if (sha := own_source_sha256(type(model))) and sha not in found:
        found.append(sha)
    return found


def _factory_code(name: Any) -> list[str]:
    """The source sha256 of the factory registered as model ``name`` when a plugin's (:func:`model_source`)."""
    sha = model_source(name).get("source_sha256") if isinstance(name, str) else None
    return [sha] if sha else []


def recorded_fingerprint(manifest: dict[str, Any]) -> str:
    """The fingerprint of the teacher whose manifest is ``manifest``, from the manifest alone (its weights are not
    read): the weights' sha with the source of the factory of a plugin's model as it is now (not its class's, which
    needs the model built); the weights' sha alone for ddkit's own models."""
    model = manifest.get("model")
    return _with_code(manifest["weights_sha"], _factory_code(model.get("name") if isinstance(model, dict) else None))


def _with_code(sha: str, code: list[str]) -> str:
    """A teacher's fingerprint from its weights' ``sha`` and its model's ``code`` (:func:`model_code`): ``sha`` itself
    without any."""
    return sha if not code else hashlib.sha256(" ".join([sha, *code]).encode()).hexdigest()[:16]


def _plugin_module(recorded: Any) -> str | None:
    """The module a manifest's ``module`` entry (``myplug.my_mlp``) names, unless ddkit's own or not one."""
    if not isinstance(recorded, str) or "." not in recorded or recorded.split(".")[0] == "ddkit":
        return None
    return recorded.rsplit(".", 1)[0]


class _MeanLogits(nn.Module):
    """Weighted mean of the logits of several models (a teacher ensemble)."""

    def __init__(self, models: list[nn.Module], weights: list[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        self.weights = list(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for w, m in zip(self.weights, self.members):
            z = w * m(x)
            out = z if out is None else out + z
        return out


def as_teacher(teacher: Teacher | str | Path | None, device: str | torch.device = "cpu") -> Teacher | None:
    """``teacher`` as library functions take it: a :class:`Teacher` as it is, the path (str or Path) of
    a teacher artifact loaded onto ``device``, None as None; anything else is refused in one line."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, (str, os.PathLike)):
        return Teacher.load(teacher, device)
    if isinstance(teacher, nn.Module):  # its repr spans many lines
        raise DDKitError(f"teacher must be a Teacher or the folder path (str or Path) of a teacher artifact, got a "
                         f"module ({type(teacher).__name__}); make a teacher of it with Teacher.of_module(model, data)")
    raise DDKitError(f"teacher must be a Teacher or the folder path (str or Path) of a teacher artifact, got "
                     f"{type(teacher).__name__} {teacher!r}; pass the teacher's folder or Teacher.load(folder)")


def teacher_ensemble(teachers: list[Teacher], weights: list[float] | None = None) -> Teacher:
    """One teacher whose logits are the weighted mean of ``teachers``' (equal weights by default).

    Used for online or stored soft labels from several teachers (EDC's CIFAR recipe, CV-DD's
    committee). Every member must describe the same dataset (classes in order, image shape); the
    ensemble's fingerprint hashes the members' fingerprints and weights.
    """
    if not teachers:
        raise DDKitError("a teacher ensemble needs at least one teacher")
    weights = list(weights) if weights is not None else [1.0 / len(teachers)] * len(teachers)
    if len(weights) != len(teachers) or abs(sum(weights) - 1.0) > 1e-6 or min(weights) < 0:
        raise DDKitError(f"ensemble weights {weights} must be {len(teachers)} non-negative numbers summing to 1")
    first = teachers[0]
    for t in teachers[1:]:
        if t.classes != first.classes or t.manifest["model"]["input_shape"] != first.manifest["model"]["input_shape"]:
            raise DDKitError(f"teacher {str(t.path)!r} was trained on other classes or image sizes than "
                             f"{str(first.path)!r}; an ensemble needs teachers of the same dataset")
    members = [{"path": recorded_path(t.path), "weights_sha": t.fingerprint, "weight": w}
               for t, w in zip(teachers, weights)]
    manifest = {**first.manifest, "weights_sha": _ensemble_sha(members), "test_accuracy": None, "ensemble": members}
    return Teacher(_MeanLogits([t.model for t in teachers], weights), manifest, first.path)


def _ensemble_sha(members: list[dict[str, Any]]) -> str:
    """The fingerprint of the ensemble of ``members`` (``weights_sha``, ``weight``): a hash of their shas and votes,
    by weights, not paths (the same teachers copied elsewhere are the same ensemble); one member's own sha."""
    if len(members) == 1:
        return members[0]["weights_sha"]
    identity = [{k: m[k] for k in ("weights_sha", "weight")} for m in members]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _weights_state(model: nn.Module) -> tuple | None:
    """What tells, without reading them, that ``model``'s weights changed: each parameter's and buffer's object,
    storage and version counter (which every in-place change under autograd's eye bumps); None where a tensor made
    under ``torch.inference_mode()`` keeps no counter (its fingerprint is then hashed at every call). About 0.2 ms for
    a ResNet-18's 122 tensors, where hashing them takes 27 ms."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


def weights_sha(model: nn.Module) -> str:
    """sha256 (16 hex digits) over a model's state dict, names and raw bytes (any dtype): a teacher's fingerprint
    (with its model's code for a plugin's, :attr:`Teacher.fingerprint`)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        hash_rows(h, v.detach().cpu().reshape(-1))  # 1-d: scalars (num_batches_tracked) too
    return h.hexdigest()[:16]


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str, name: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k!r} is {tuple(state[k].shape)}, model wants {tuple(own[k].shape)}")
        raise DDKitError(
            f"checkpoint {where} does not fit model {name!r} ({'; '.join(parts)}); "
            "choose the model the checkpoint was trained with"
        )
    for k, v in own.items():  # load_state_dict would cast integers into float weights and copy NaN without a word
        if v.is_floating_point() and not state[k].is_floating_point():
            raise DDKitError(f"checkpoint {where} holds {k!r} as {state[k].dtype}, model {name!r} wants floating point "
                             "weights; save model.state_dict() of the trained model")
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise DDKitError(f"checkpoint {where} holds NaN or infinite values in {k!r}; the training that saved it "
                             "diverged, use an earlier or a re-trained checkpoint")
    model.load_state_dict(state, strict=True)


def teacher_hash(cfg: TeacherConfig) -> str:
    """A teacher's identity: its config and, for a model from outside ddkit (a plugin), the sha256 of
    the model's source, so that an edited model is trained again instead of reused (ddkit's own keep
    their keys: the config's hash alone)."""
    return model_config_hash(cfg)


def _manifest(model: nn.Module, data: DataBundle, cfg: TeacherConfig, acc: float | None, history: list) -> dict:
    manifest = base_manifest(KIND, to_dict(cfg), cfg.seed)
    manifest.update(
        {
            "model": {"name": cfg.model, "options": dict(cfg.model_options), "input_shape": list(data.image_shape),
                      **model_source(cfg.model)},
            "dataset": data.describe(),
            "dataset_config": data.config_record(),  # not in teachers made before 2026-12-07
            "test_accuracy": acc,
            "history": history,
            "weights_sha": weights_sha(model),
            "config_hash": teacher_hash(cfg),
        }
    )
    return manifest


def _build(cfg: TeacherConfig, data: DataBundle, key: str = "teacher") -> nn.Module:
    """``cfg``'s model for ``data``, drawn from the global generator: call it inside ``global_rng(cfg.seed)``
    (:func:`~ddkit.determinism.global_rng`); errors name ``key``'s model settings."""
    c, h, _ = data.image_shape
    return configured_model((f"{key}.model", f"{key}.model_options"), cfg.model, c, data.num_classes, h,
                            cfg.model_options)


def check_teacher(cfg: TeacherConfig, data: DataBundle, key: str = "teacher") -> None:
    """Build ``cfg``'s model once for ``data`` (leaving the global random state alone) and load an
    imported ``checkpoint`` into it: a bad model, option or checkpoint fails before any stage runs,
    naming the config key (``key``: where the config holds ``cfg``)."""
    with global_rng(cfg.seed):
        model = _build(cfg, data, key)
    if cfg.checkpoint:
        try:
            _load_strict(model, _read_checkpoint(Path(cfg.checkpoint), keep=True), cfg.checkpoint, cfg.model)
        except DDKitError as exc:
            raise ConfigError(f"{key}.checkpoint: {exc}") from None


@stage_modes()
def train_teacher(
    data: DataBundle,
    cfg: TeacherConfig | dict,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, dict], None] | None = None,
) -> Teacher:
    """Train a teacher on ``data.train`` and (if ``out``) save it as an artifact (``cfg``: a
    :class:`TeacherConfig` or a dict of its settings).

    Resumable: a per-epoch checkpoint lives next to ``out`` (``.<name>.resume-<config hash>.pt``)
    until the artifact is written; a re-run with another number of torchrun processes starts afresh. A
    second call training into the same ``out`` meanwhile is refused (:class:`~ddkit.artifacts.OutputBusy`).
    Under torchrun the training is data-parallel.
    """
    check_bundle(data)
    cfg = as_config(TeacherConfig, cfg, "teacher")
    device = ddist.resolve_device(device)
    ddist.agree_settings({"teacher": cfg, "dataset": [data.fingerprint, data.normalisation]})
    if out is None:
        return _train_or_import(data, cfg, out, device, progress)
    check_output_dir(Path(out), KIND)  # a folder we may not replace fails now, not after the training
    # another teacher trained into this --out would replace this one's under it: it refuses at once, as distill's
    lock = hidden_path(Path(out), ".work")
    with writing(lock, out):
        teacher = _train_or_import(data, cfg, out, device, progress)
        if ddist.current().is_main:  # the lock folder a killed run left
            with contextlib.suppress(OSError):
                lock.rmdir()
    return teacher


def _train_or_import(data: DataBundle, cfg: TeacherConfig, out: str | Path | None, device: torch.device,
                     progress: Callable[[int, int, dict], None] | None) -> Teacher:
    if cfg.checkpoint:
        return import_teacher(data, cfg, out, device)
    # the initial weights and the training's dropout masks come from cfg.seed: one span under global_rng
    with global_rng(cfg.seed, device):
        return _train(data, cfg, out, device, progress, ddist.current())


def _train(data: DataBundle, cfg: TeacherConfig, out: str | Path | None, device: torch.device,
           progress: Callable[[int, int, dict], None] | None, info: ddist.DistInfo) -> Teacher:
    """:func:`train_teacher`'s training, inside ``global_rng(cfg.seed, device)``."""
    model = _build(cfg, data)
    state_path = None
    if out is not None:
        out = Path(out)
        state_path = _resume_path(out, cfg, data)
        if info.is_main:  # as distill's: another setting's checkpoint cannot be resumed here, and would stay for good
            for stale in out.parent.glob(f".{glob.escape(work_name(out.name))}.resume-*.pt"):
                if stale != state_path:
                    log.info("discarding %s: the checkpoint of a teacher with other settings or another number "
                             "of processes", stale.name)
                    stale.unlink(missing_ok=True)
    log.info("training teacher %s on %s (%d images, %d epochs)", cfg.model, data.name, len(data.train),
             cfg.train.epochs)
    try:
        result = train_classifier(
            model, data.train, data.mean, data.std, cfg.train, seed=cfg.seed, device=device, test=data.test,
            distributed=info.enabled, state_path=state_path, eval_every=5, progress=progress, stop_if_diverged=True,
            settings="teacher.train",
        )
        model = result.model.cpu()
        if not all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point()):
            # the returned model may be the EMA copy, and buffers (BatchNorm) are not checked per epoch
            raise Diverged(cfg.train.epochs, cfg.train.epochs)
    except (Diverged, NonFiniteOutputs) as exc:
        if state_path is not None and info.is_main:  # the same settings fail again: nothing to resume
            with contextlib.suppress(FileNotFoundError):
                state_path.unlink()
        # NonFiniteOutputs: finite weights (else Diverged), so weights so large that the outputs overflow (the lr
        # again) or, in a model with BatchNorm, also BatchNorm statistics of too few images
        fix = f"lower teacher.train.lr (now {cfg.train.lr:g})"
        if isinstance(exc, NonFiniteOutputs) and batchnorm_layers(model):
            fix += f", or train it on more images or epochs, or pick a model without BatchNorm (now {cfg.model!r})"
        what = f"teacher {exc}" if isinstance(exc, Diverged) else f"teacher: {exc}"  # "teacher training diverged ..."
        raise DDKitError(f"{what}; nothing was saved: {fix}") from None
    teacher = Teacher(model, _manifest(model, data, cfg, result.test_accuracy, result.history))
    log.info("teacher test accuracy %.4f", result.test_accuracy)
    if out is not None:
        if info.is_main:
            teacher.save(out)
            if state_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    state_path.unlink()
        ddist.barrier()
        teacher.path = Path(out).absolute()
    return teacher


def _resume_path(out: Path, cfg: TeacherConfig, data: DataBundle) -> Path:
    """The per-epoch checkpoint of a teacher being trained into ``out`` with ``cfg`` on ``data`` by this
    number of processes (a single process's keeps its name from before the number was counted)."""
    parts = [cfg, data.fingerprint, data.normalisation]
    world = ddist.current().world_size
    if world > 1:  # as a recover method's: the number of ranks changes the training (BatchNorm, summation order)
        parts.append({"world": world})
    if sha := model_source(cfg.model).get("source_sha256"):  # a plugin model's edit does not resume the old one
        parts.append(sha)
    return hidden_path(out, f".resume-{config_hash(parts)}.pt")


def saved_teacher(data: DataBundle, cfg: TeacherConfig, out: str | Path,
                  device: str | torch.device = "cpu") -> Teacher | None:
    """The teacher at ``out`` if ``cfg`` trained it on ``data`` (same pixels and normalisation); else
    None. An imported checkpoint never counts: its config names the file, not the weights in it, so
    it is read again (cheap). A checkpoint of this training that a kill between the save and its
    removal left beside ``out`` is removed. A damaged teacher there is None, with a warning."""
    out = Path(out)
    manifest = out / MANIFEST
    try:
        found = read_json(manifest) if manifest.is_file() else {}
        if (cfg.checkpoint or found.get("config_hash") != teacher_hash(cfg)
                or not data.matches(found.get("dataset", {}))):
            return None
        teacher = Teacher.load(out, device)
    except DDKitError as e:  # damaged: trained again (train_teacher refuses a folder it may not replace)
        log.warning("%s; training the teacher again", str(e).split(";")[0])
        return None
    if ddist.current().is_main:
        _resume_path(out, cfg, data).unlink(missing_ok=True)
    return teacher


# the checkpoint check_teacher last read, for the import that follows it (a checkpoint is read once)
_CHECKED: dict[tuple, dict[str, torch.Tensor]] = {}


def _read_checkpoint(path: Path, keep: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict in a user's checkpoint file. ``keep``: hold it for the next read of the same
    unchanged file (path, size and modification time), which takes it (check_teacher, then the import)."""
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), *((stat.st_size, stat.st_mtime_ns) if stat is not None else ()))
    if key in _CHECKED:
        return _CHECKED[key] if keep else _CHECKED.pop(key)
    state = _read_checkpoint_file(path)
    if keep:
        _CHECKED.clear()
        _CHECKED[key] = state
    return state


def _read_checkpoint_file(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        if folder_kind(path) == KIND:
            raise DDKitError(f"checkpoint {str(path)!r} is a ddkit teacher folder, which needs no import; pass it as "
                             "--teacher where a command takes one (or import its model.safetensors)")
        raise DDKitError(f"checkpoint {str(path)!r} is a folder; give the weights file in it (a state_dict .pt/.pth or "
                         ".safetensors)")
    if not path.is_file():
        raise DDKitError(f"checkpoint {str(path)!r} not found; check --checkpoint (teacher.checkpoint in a config)")
    if path.suffix == ".safetensors":
        return {k.removeprefix("module."): v for k, v in load_tensors(path, what="checkpoint").items()}
    try:
        obj = quiet_torch_load(path)
    except Exception as exc:
        raise DDKitError(
            f"checkpoint {str(path)!r} cannot be read safely ({load_failure(exc)}); "
            "save a plain state_dict or safetensors file"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise DDKitError(f"checkpoint {str(path)!r} is not a state_dict (parameter names to tensors); save "
                         "model.state_dict()")
    return {k.removeprefix("module."): v for k, v in obj.items()}


@stage_modes()
def import_teacher(data: DataBundle, cfg: TeacherConfig, out: str | Path | None = None, device="cpu") -> Teacher:
    """Wrap a user checkpoint (strictly loaded into ``cfg.model``) as a teacher artifact. Under
    torchrun every rank calls it (rank 0 saves ``out``, the others wait for it at a barrier)."""
    path = Path(cfg.checkpoint)
    state = _read_checkpoint(path)
    with global_rng(cfg.seed):  # initial weights, replaced by the checkpoint's
        model = _build(cfg, data)
    _load_strict(model, state, str(path), cfg.model)
    model.to(device)
    try:
        acc = accuracy(model, data.test, data.mean, data.std, device, nonfinite="raise")
    except NonFiniteOutputs as exc:
        raise DDKitError(f"checkpoint {path}: {exc}; nothing was saved: check that it is the trained model's "
                         f"state_dict for model {cfg.model!r}") from None
    # the checkpoint named from any folder (recorded_path), as the import of the recorded config reads it
    recorded = dataclasses.replace(cfg, checkpoint=recorded_path(path))
    teacher = Teacher(model.cpu(), _manifest(model, data, recorded, acc, []))
    teacher.manifest["imported_from"] = recorded.checkpoint
    if out is not None:  # as train_teacher: rank 0 writes it, and no rank goes on before it is there
        if ddist.current().is_main:
            teacher.save(out)
        ddist.barrier()
        teacher.path = Path(out).absolute()
    return teacher
