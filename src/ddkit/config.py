"""Typed configuration: YAML presets -> dataclasses, strict keys, ``a.b=c`` overrides.

Every settings object in ddkit is a dataclass whose fields carry a docstring-like ``help`` in their
metadata and whose ``__post_init__`` validates values. :func:`from_dict` builds one from plain data
and reports *all* problems at once (unknown keys with a did-you-mean, wrong types); a config class
derived from :class:`Checked` applies the same type rules to a config constructed in Python. YAML
is read with ``yaml.safe_load``'s constructors only, so a config can never execute code; numbers are read as YAML 1.2
and JSON read them (``1e-5`` is a float).
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import numbers
import re
import shlex
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from ddkit.errors import ConfigError

T = TypeVar("T")


#: the largest float32: every float setting meets torch as a float32 (an optimizer's lr, a tensor's scale)
FLOAT32_MAX = 3.4028234663852886e38
SEED_LIMIT = 2**32  # seeds are offset and combined (seed * 1000 + i, ...) and must stay within int64


def field(default: Any = dataclasses.MISSING, *, help: str = "", factory: Any = None, added: bool = False,
          seed: bool = False, operational: bool = False, **kw: Any) -> Any:
    """A dataclass field with a ``help`` text; ``factory`` builds a (dataclass) default per instance.

    ``added``: a field added after configs were already hashed, whose default reproduces the
    behaviour from before it existed. :func:`config_hash` (and ``to_dict(..., identity=True)``)
    leave it out while it holds that default, so cached artifacts keep their keys.
    ``seed``: a seed or a list of seeds, each checked to lie in [0, 2^32) when a config is built.
    ``operational``: a setting that decides how a result is made, not what it is (how often checkpoints are
    written, where a cache lies); :func:`config_hash` (and ``to_dict(..., identity=True)``) hold it at its
    default, so another value keeps the artifact's key (and the default's key is the one it always had).
    """
    meta = {"help": help, "added": added, "seed": seed, "operational": operational}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta, **kw)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


#: how many characters of a value an error echoes: a YAML alias bomb printed whole ran to 580 MB
REPR_LIMIT = 200


def short_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters (ending ``...`` when cut), built only that far: the
    shared lists of a YAML alias bomb are never expanded whole."""
    text = ""
    for piece in _repr_pieces(value):
        text += piece
        if len(text) > limit:
            return text[: limit - 3] + "..."
    return text


def summary_repr(obj: Any, **facts: Any) -> str:
    """A one-line repr of ``obj`` from its key ``facts``: a tensor by dtype and shape (``uint8[8, 1, 16, 16]``, never
    its values), anything else as :func:`short_repr` gives it; None left out."""
    parts = []
    for key, value in facts.items():
        if value is None:
            continue
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            text = f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
        else:
            text = short_repr(value, 80)
        parts.append(f"{key}={text}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def _repr_pieces(value: Any) -> Iterator[str]:
    """``repr(value)`` piece by piece, lists, tuples and dicts an item at a time."""
    if isinstance(value, (list, tuple, dict)) and type(value) in (list, tuple, dict):
        ends = {list: "[]", tuple: "()", dict: "{}"}[type(value)]
        yield ends[0]
        for i, item in enumerate(value.items() if isinstance(value, dict) else value):
            if i:
                yield ", "
            if isinstance(value, dict):
                yield from _repr_pieces(item[0])
                yield ": "
                item = item[1]
            yield from _repr_pieces(item)
        if isinstance(value, tuple) and len(value) == 1:
            yield ","
        yield ends[1]
    else:
        yield repr(value)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: report X's own errors (e.g. unknown nested keys)
            return _convert(value, real[0], where, errors)
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _convert(value, arg, where, sub)
            if not sub:
                return out
        shaped = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(shaped) == 1:  # a mapping meant as that dataclass: say what is wrong in it
            return _convert(value, shaped[0], where, errors)
        errors.append(f"{where}: expected {_type_name(tp)}, got {short_repr(value)}")
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            text = str(value) if isinstance(value, (str, int, float)) else ""  # not a (shared, vast) list spelled out
            close = difflib.get_close_matches(text, [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no unquoted as true/false
                words = [c for c in choices if isinstance(c, str) and c.lower() in _BOOL_WORDS[value]]
                typed = _set_text(where, value)
                if words and typed is not None and typed.key is not None:  # the whole --set value: its key is known
                    hint = (f"; YAML reads {typed.text} unquoted as {str(value).lower()}: quote it "
                            f"(--set {_set_as_text(typed.key, words[0])})")
                elif words:
                    hint = (f"; YAML reads {words[0]} unquoted as {str(value).lower()}: quote it ('{words[0]}'; "
                            f"""on a command line --set "KEY='{words[0]}'")""")
            errors.append(f"{where}: {short_repr(value)} is not one of {list(choices)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping for {tp.__name__}, got {short_repr(value)}")
            return value
        return _build(tp, value, where, errors)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list, got {short_repr(value)}")
            return value
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: exactly these items
            if len(value) != len(args):
                errors.append(f"{where}: expected a list of {len(args)} values, got {short_repr(value)}")
                return value
            return tuple(_convert(v, a, f"{where}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {short_repr(value)}")
            return value
        args = get_args(tp)
        if not args:
            return plain_numbers(value)
        key_tp, value_tp = args
        out = {}
        given: dict[Any, Any] = {}  # each key of out as value spelled it
        for k, v in value.items():
            spelled = k
            if key_tp is int and isinstance(k, str) and _INT_TEXT.fullmatch(k.strip()):
                k = int(k)  # text: `--set ipc_overrides.10.train.epochs=3` with no 10: entry yet
            elif key_tp is int and isinstance(k, numbers.Integral) and not isinstance(k, bool):
                k = int(k)  # numpy's
            if key_tp in (int, str) and (isinstance(k, bool) or not isinstance(k, key_tp)):
                errors.append(f"{where}: key {short_repr(k)} must be {'an integer' if key_tp is int else 'a string'}")
                continue
            if k in given:  # 10 and "10", "+10" and "010": one would silently replace the other
                errors.append(f"{where}: keys {short_repr(given[k])} and {short_repr(spelled)} both mean {k}; "
                              "keep one of them")
                continue
            given[k] = spelled
            out[k] = _convert(v, value_tp, f"{where}.{k}", errors)
        return out
    if tp is float:  # any real number but a bool (numpy's too), stored as a Python float; text is refused
        if isinstance(value, str) and _YAML11_FLOAT_TEXT.fullmatch(value):
            # what YAML 1.1 left as text ("1e-1"), as ddkit before 2026-12-07 read and recorded it: its records load
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            errors.append(f"{where}: expected a number, got {short_repr(value)}")
            return value
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float (1e400 spelled out)
            number = math.inf
        if not math.isfinite(number):
            errors.append(f"{where}: expected a finite number, got {short_repr(value)}")
        elif abs(number) > FLOAT32_MAX:  # torch takes lr, weight_decay, ... as float32: it would overflow there
            errors.append(f"{where}: {short_repr(value)} is beyond float32's range, in which torch computes; "
                          f"expected a number within +-{FLOAT32_MAX:.4g}")
        return number
    if tp is int:  # any integer but a bool (numpy's too), stored as a Python int
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            errors.append(f"{where}: expected an integer, got {short_repr(value)}")
            return value
        return value if type(value) is int else int(value)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true or false, got {short_repr(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {short_repr(value)}{_unquoted_hint(value, where)}")
        return value
    return value


def _unquoted_hint(value: Any, where: str = "") -> str:
    """For a string field (at ``where``): the fix when YAML 1.1 read an unquoted word as a boolean (``yes``, ``on``), a
    date (``2024-01-01``) or a number (``1e3``, ``10``). A ``--set`` value's text is known (:data:`_SET_TEXTS`): the
    fix quotes it as typed; a file's number keeps no text, so the fix asks for the text meant, not the number read."""
    if isinstance(value, bool):
        what, text = f"{'/'.join(_BOOL_WORDS[value])} unquoted as {str(value).lower()}", _BOOL_WORDS[value][1]
    elif isinstance(value, datetime.date):
        what, text = f"{value.isoformat()} unquoted as a date", value.isoformat()
    elif isinstance(value, numbers.Real):
        what, text = "an unquoted number as a number", None
    else:
        return ""
    typed = _set_text(where, value)
    if typed is not None:
        if typed.key is not None:  # the whole --set value
            return f"; YAML reads {what}: quote it (--set {_set_as_text(typed.key, typed.text)})"
        return f"; YAML reads {what}: quote it in the --set value ('{typed.text}')"
    if text is None:  # YAML keeps no text of a number: 1e3 and 1000.0 both read 1000.0
        return f"; YAML reads {what} ({short_repr(plain_numbers(value))} is the number read, not the text written): " \
               "quote the text as you meant it"
    return f"; YAML reads {what}: quote the text ('{text}'; on a command line --set \"KEY='{text}'\")"


class _Typed(typing.NamedTuple):
    """A scalar of a ``--set`` value that YAML read as no text: its ``value``, its ``text`` as typed, and the override's
    key when it is the whole value (None: inside a list or mapping)."""

    value: Any
    text: str
    key: str | None


#: the scalars the last :func:`apply_overrides` call read as no text (a number, a boolean, a date), by the config path
#: they set (``out``, ``methods[0].label``): a text field given one is told to quote the text as typed. Each call
#: replaces them (not :func:`load_yaml`: a protocol file is read after the --set values that override it); one is
#: matched by identity, so only the interpreter's shared objects (``True``, ``3``) given at the same path after the
#: last call could be taken for its --set's, whose fix then still names that key
_SET_TEXTS: contextvars.ContextVar[dict[str, _Typed] | None] = contextvars.ContextVar("ddkit_set_texts", default=None)


def _set_text(where: str, value: Any) -> _Typed | None:
    """How the last :func:`apply_overrides` call was given ``value``, found at config path ``where``; None when no
    ``--set`` of it gave it (a file, a Python argument)."""
    typed = (_SET_TEXTS.get() or {}).get(where)
    # the very object the --set made (every layer passes values on as they are): a file's 1000.0 is another one
    return typed if typed is not None and typed.value is value else None


def _typed_scalars(raw: str, value: Any, key: str) -> dict[str, _Typed]:
    """The scalars of ``value`` (``raw`` read as YAML, a ``--set`` value for ``key``) that are no text, by path."""
    if isinstance(value, str):
        return {}
    if not isinstance(value, (dict, list)):
        return {key: _Typed(value, raw.strip(), key)}
    loader = _UniqueKeyLoader(raw)
    out: dict[str, _Typed] = {}

    def walk(node: yaml.Node, value: Any, path: str) -> None:
        if isinstance(node, yaml.ScalarNode):
            if not isinstance(value, str):
                out[path] = _Typed(value, node.value, None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(value, list):
            for i, (child, item) in enumerate(zip(node.value, value)):
                walk(child, item, f"{path}[{i}]")
        elif isinstance(node, yaml.MappingNode) and isinstance(value, dict):
            for key_node, child in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    k = loader.construct_object(key_node)
                    if isinstance(k, (str, int)) and k in value:
                        walk(child, value[k], f"{path}.{k}")

    try:
        walk(loader.get_single_node(), value, key)
    finally:
        loader.dispose()
    return out


def plain_numbers(value: Any) -> Any:
    """``value`` (a free-form dict or list of settings, nested) with numpy's integers and floats as Python's
    ``int`` and ``float``, which JSON writes and hashes as it does the Python number."""
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_numbers(v) for v in value) if type(value) in (list, tuple) else value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # not a numbers.Real
        return bool(value)
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def typed_numbers(given: Any, typed: Any) -> Any:
    """``given`` (settings as written, nested) with each number replaced by the number its config field
    made of it (``typed``: the resolved config as a dict): ``1`` for a float field becomes ``1.0``, so that
    ``lr: 1`` and ``lr: 1.0`` record and hash alike, as typed fields do. Keys ``given`` leaves out stay
    out, and nothing but numbers changes: settings written as they resolve keep their hashes."""
    if isinstance(given, dict) and isinstance(typed, dict):
        return {k: typed_numbers(v, typed[k]) if k in typed else v for k, v in given.items()}
    if isinstance(given, list) and isinstance(typed, (list, tuple)) and len(given) == len(typed):
        return [typed_numbers(g, t) for g, t in zip(given, typed)]
    number = isinstance(given, numbers.Real) and not isinstance(given, bool)
    if number and isinstance(typed, numbers.Real) and not isinstance(typed, bool) and given == typed:
        return typed
    return given


#: the words YAML 1.1 reads, unquoted, as each boolean
_BOOL_WORDS = {True: ("on", "yes", "y", "true"), False: ("off", "no", "n", "false")}
#: a number in exponent form without a dot or without a signed exponent ("1e-1", "5E3"), which YAML 1.1 reads as
#: text: ddkit before 2026-12-07 took it as the number and recorded it as the text
_YAML11_FLOAT_TEXT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")
#: an integer as text, e.g. a ``--set`` path's "10" or a JSON record's key
_INT_TEXT = re.compile(r"[+-]?\d+")


#: explanations of a key that a config class lacks but others take: ``hint(cls, key)`` gives a text or None. The
#: first text replaces the did-you-mean (e.g. a plug-in option given to a method without it names the methods that
#: take it, see :data:`ddkit.methods.base.PLUGIN_OPTIONS`); register one with :func:`absent_key_hint`
_ABSENT_KEY_HINTS: list[Callable[[type, str], str | None]] = []


def absent_key_hint(hint: Callable[[type, str], str | None]) -> Callable[[type, str], str | None]:
    """Register ``hint(cls, key)``, asked (before the did-you-mean) for every key ``key`` that config class ``cls``
    lacks; its text, when not None, is the error (after the key's path). Usable as a decorator."""
    if hint not in _ABSENT_KEY_HINTS:
        _ABSENT_KEY_HINTS.append(hint)
    return hint


def _absent_key(cls: type, key: Any, path: str) -> str | None:
    if not isinstance(key, str):
        return None
    for hint in _ABSENT_KEY_HINTS:
        if (text := hint(cls, key)) is not None:
            return f"{path}: {text}"
    return None


def _build(cls: type[T], data: dict[str, Any], where: str, errors: list[str]) -> T:
    fields = _init_fields(cls)
    kwargs: dict[str, Any] = {}
    listed = False  # the valid keys, said once per section
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            if (absent := _absent_key(cls, key, path)) is not None:
                errors.append(absent)
                continue
            errors.append(_unknown_key(key, path, where, list(fields), listed))
            listed = listed or " valid keys: " in errors[-1]
            continue
        f, tp, seed = fields[key]
        default = field_default(f)
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = merge_overrides(to_dict(default), value)
        kwargs[key] = _convert(value, tp, path, errors)
        if seed:
            _check_seeds(kwargs[key], path, errors)
    missing = [
        n for n, (f, _, _) in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in missing:
        errors.append(f"missing required config key {(where + '.' if where else '') + name!r}")
    if errors:
        return None  # type: ignore[return-value]
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # a message that starts with one of cls's fields ("augment: ...", "lr must ...") gets its key
        msg = str(exc)
        parts = msg.split("; ")  # several problems at once: each that starts with a field gets its key

        def named(part: str) -> bool:
            return re.split(r"[\s:.,]", part, maxsplit=1)[0] in fields

        if where and named(parts[0]):
            errors.append("; ".join(f"{where}.{p}" if named(p) else p for p in parts))
        else:
            errors.append(f"{where + ': ' if where else ''}{msg}")
        return None  # type: ignore[return-value]


def _unknown_key(key: Any, path: str, where: str, fields: list[str], listed: bool = False) -> str:
    """The error for ``key`` (at ``path``), which names none of ``fields``: a did-you-mean, else the valid keys
    (``listed``: said already for this section, so pointed to). A key YAML read as no string (``2:``, ``~:``,
    ``on:``, which YAML 1.1 reads as true) gets the quoting fix; a long key is cut as values are."""
    if not isinstance(key, str):
        if isinstance(key, bool):
            spelled, what = "/".join(_BOOL_WORDS[key]), str(key).lower()
        elif key is None:
            spelled, what = "~ (or null)", "null"
        else:
            spelled, what = short_repr(key, 40), "a number" if isinstance(key, numbers.Real) else type(key).__name__
        return (f"unknown config key {short_repr(path)}: YAML reads {spelled} unquoted as {what}, not a name; "
                "quote the key if a name was meant")
    close = difflib.get_close_matches(key, fields, n=1)
    hint = (f"did you mean {close[0]!r}?" if close
            else f"{where or 'this section'} takes no settings; remove {short_repr(path)}" if not fields
            else f"{where or 'this section'} takes the keys listed above" if listed
            else f"valid keys: {', '.join(fields)}")
    return f"unknown config key {short_repr(path)}; {hint}"


def keyed(key: str, e: Exception) -> ConfigError:
    """``e`` as a ConfigError that starts with the config ``key`` it is about (``relabel.augment: ...``);
    a message that names a field below the key's last part (``augment_options.scale_min: ...``) gets the
    key's parents."""
    msg = str(e)
    if msg.startswith(key):
        return ConfigError(msg)
    parent, _, leaf = key.rpartition(".")
    if parent and (msg.startswith(f"{leaf}.") or msg.startswith(f"{leaf}:")):
        return ConfigError(f"{parent}.{msg}")
    return ConfigError(f"{key}: {msg}")


#: the instance attribute that marks a :class:`Checked` config as built: assignments are checked from then on
_BUILT = "_ddkit_built"


class Checked:
    """Base of the config dataclasses: a config constructed in Python (``DistillConfig(ipc="2")``) has
    its fields checked against their types as :func:`from_dict` checks YAML, before its own
    ``__post_init__`` runs; a wrong type is a :class:`ConfigError` naming the field (see
    :func:`check_fields`). A subclass's ``__post_init__`` needs no ``super()`` call for this.
    A field assigned once the config is built (``cfg.ipc = 2``) passes the constructor's checks too:
    the same :class:`ConfigError` for ``cfg.ipc = "2"`` or a combination ``__post_init__`` refuses,
    and the config keeps its old value; a name that is no field (``cfg.ipcs = 4``) is the unknown-key error of
    :func:`from_dict` (names starting with ``_`` are free)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__doc__ = _with_attributes(cls)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_checks_fields", False):
            return

        def __post_init__(self: Any) -> None:
            outermost = type(self).__post_init__ is __post_init__  # a subclass's wrapper checks and marks itself
            if outermost:
                check_fields(self)
            own(self)
            if outermost:
                object.__setattr__(self, _BUILT, True)

        __post_init__._checks_fields = True  # type: ignore[attr-defined]
        __post_init__.__doc__ = own.__doc__
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, _BUILT, True)

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get(_BUILT):
            fields = _init_fields(type(self))
            if name in fields:
                # built: the config as the constructor would make it with this value (types, ranges, combinations),
                # from which the value is taken as the constructor stores it (a float for an int given, ...)
                value = getattr(dataclasses.replace(self, **{name: value}), name)  # type: ignore[type-var]
            elif not name.startswith("_") and not hasattr(type(self), name):
                # a misspelt field (cfg.ipcs = 4) would be a new attribute that nothing reads
                raise ConfigError(_unknown_key(name, name, type(self).__name__, list(fields)))
        object.__setattr__(self, name, value)


def _with_attributes(cls: type) -> str | None:
    """``cls.__doc__`` with an "Attributes" section listing each field's type, default and help text, so that
    ``help(SomeConfig)`` shows them. Called as the class is made, before ``@dataclass`` turns its fields into
    dataclass fields: those of base configs are read from them, its own from its annotations and ``field()``s."""
    rows: dict[str, tuple[str, str, str]] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            for f in dataclasses.fields(base):
                rows[f.name] = (_annotation(f.type), _default_text(f), f.metadata.get("help", ""))
    for name, hint in cls.__dict__.get("__annotations__", {}).items():
        if "ClassVar" in str(hint) or "InitVar" in str(hint):
            continue
        value = cls.__dict__.get(name, dataclasses.MISSING)
        if isinstance(value, dataclasses.Field):
            rows[name] = (_annotation(hint), _default_text(value), value.metadata.get("help", ""))
        else:
            rows[name] = (_annotation(hint), "required" if value is dataclasses.MISSING else f"default {value!r}", "")
    if not rows:
        return cls.__doc__
    lines = [f"    {name} ({tp}, {default}){': ' + text if text else ''}" for name, (tp, default, text) in rows.items()]
    return f"{(cls.__doc__ or cls.__name__).rstrip()}\n\nAttributes:\n" + "\n".join(lines)


def _annotation(hint: Any) -> str:
    return hint if isinstance(hint, str) else _type_name(hint)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"default {f.default!r}"
    if f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default_factory()
    return f"default {type(value).__name__}()" if dataclasses.is_dataclass(value) else f"default {value!r}"


def _init_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any, bool]]:
    """The fields ``cls.__init__`` sets, by name: (field, type hint, holds seeds) (cached per class)."""
    spec = _INIT_FIELDS.get(cls)
    if spec is None:
        hints = get_type_hints(cls)
        spec = _INIT_FIELDS[cls] = {f.name: (f, hints[f.name], bool(f.metadata.get("seed")))
                                    for f in dataclasses.fields(cls) if f.init}
    return spec


_INIT_FIELDS: dict[type, dict[str, tuple[dataclasses.Field, Any, bool]]] = {}


def check_fields(obj: Any) -> None:
    """Check the fields of the constructed dataclass ``obj`` against their type hints with the rules
    of :func:`from_dict` (a bool is no int, a string no number, seeds in range), raising one
    :class:`ConfigError` that names every wrong field. A value is stored as from_dict would store it
    (an int in a float field as a float, a list for a fixed-length tuple as a tuple, a mapping given
    for a nested config as that config), so a config built in Python has the hash of its YAML twin."""
    cls = type(obj)
    errors: list[str] = []
    for field, tp, seed in _init_fields(cls).values():
        name = field.name
        value = getattr(obj, name)
        where = f"{cls.__name__}.{name}"
        if isinstance(value, dict):  # on the field's own default, as from_dict does (TeacherConfig.train)
            default = field_default(field)
            if dataclasses.is_dataclass(default):
                value = merge_overrides(to_dict(default), value)
        out = _convert(value, tp, where, errors)
        if seed:
            _check_seeds(out, where, errors)
        if out is not value and not errors:
            object.__setattr__(obj, name, out)  # frozen dataclasses too
    if errors:
        raise ConfigError("; ".join(errors))


def is_count(value: Any, low: int = 1) -> bool:
    """Whether ``value`` is an integer (a bool is not) of at least ``low``: the one check of the counts,
    sizes and epochs that arrive untyped (manifests, options, library arguments)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_seeds(value: Any, where: str, errors: list[str]) -> None:
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v < SEED_LIMIT:
            errors.append(f"{where}: seeds must lie in [0, 2^32), got {v}")
    if isinstance(value, (list, tuple)) and len(set(map(repr, value))) != len(value):
        errors.append(f"{where}: {list(value)} repeats a seed (the same run twice would inflate n); give "
                      "distinct seeds")


def seed_list(value: Any, what: str = "seeds") -> list[int]:
    """``value`` as a list of distinct seeds (integers in [0, 2^32); numpy or torch integers are
    taken), for library calls that take seeds; anything else is one :class:`ConfigError`."""
    import operator

    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{what} must be a list of integers such as [0, 1, 2], got {short_repr(value)}")
    seeds = []
    for v in value:
        try:
            if isinstance(v, bool):
                raise TypeError
            seeds.append(operator.index(v))
        except TypeError:
            raise ConfigError(f"{what} must be integers, got {short_repr(v)} in {short_repr(value)}") from None
    errors: list[str] = []
    _check_seeds(seeds, what, errors)
    if errors:
        raise ConfigError("; ".join(errors))
    return seeds


def sorted_seeds(value: Any, what: str = "seeds") -> list[int]:
    """``value`` as :func:`seed_list` takes it, in ascending order: the one order in which every config and
    stage keeps student seeds, so that an evaluation (its per-seed order, the full-data reference's smallest
    seeds) is the same however the seeds are written."""
    return sorted(seed_list(value, what))


# option dicts of a chosen component: an override gives the whole dict (``{}`` clears it), since
# options merged from another augmentation or model would not apply to the new one
WHOLE_DICTS = ("augment_options", "student_options", "model_options")


def merge_overrides(base: dict, over: dict) -> dict:
    """``base`` updated by ``over``, recursing into nested dicts except the option dicts of
    :data:`WHOLE_DICTS`, which ``over`` replaces whole (neither input is modified); a key of ``over`` that spells an
    integer key of ``base`` the other way (``2`` and ``"2"``) is that key. The one rule of every
    override layer: protocol overrides on a preset, a bench's ``ipc_overrides``, ``--set KEY={...}``, and a
    mapping given for a nested config on that config's defaults (``teacher: {train: {epochs: 4}}``)."""
    out = dict(base)
    for k, v in over.items():
        k = _existing_key(base, k)  # {2: ...} over a JSON record's "2": that entry, not a second one for 2
        deep = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in WHOLE_DICTS
        out[k] = merge_overrides(out[k], v) if deep else v
    return out


def record_kind(data: Any) -> str | None:
    """The ``kind`` of a record ddkit wrote (a manifest.json, a bench's config.json: a ``kind`` text beside a
    ``schema_version``), None for anything else, such as a config's settings."""
    if isinstance(data, dict) and isinstance(data.get("kind"), str) and "schema_version" in data:
        return data["kind"]
    return None


#: the records whose ``config`` is one section of a one-stage command's config file, and that section
_RECORD_SECTION = {"teacher": "teacher", "expert-buffer": "experts"}


def refuse_record(data: Any, cls: type | None = None, section: str | None = None, read: bool = False) -> None:
    """Refuse in one line a record ddkit wrote (:func:`record_kind`: a manifest.json, an evaluation's JSON, a bench's
    wrapped config.json) given where a config of ``cls`` is expected: every key of it would be unknown. ``section``:
    the section of a one-stage command's config file (``teacher``) that its ``config`` would fill; ``read``: the
    record was given as the data read from it (a library call's dict), not as a file."""
    kind = record_kind(data)
    if kind is None or (cls is not None and "kind" in {f.name for f in dataclasses.fields(cls)}):
        return
    config = data.get("config")
    if not isinstance(config, dict):
        held = "it holds no `config` to pass"
    elif section is None:
        held = "its settings are under its `config` key: " + ("pass that mapping (record['config'])" if read else
                                                              "write that mapping to a file and pass it")
    elif section in config:
        keep = [k for k in ("dataset", section) if k in config]
        if set(config) <= set(keep):  # what a one-stage command recorded: the file it takes
            held = "its settings are under its `config` key: write that mapping to a file and pass it"
        else:  # a stage of `ddkit run`, which records the run's whole config: the command refuses its other sections
            held = "its `config` key holds the config of the `ddkit run` that made it: write its " + \
                   " and ".join(f"`{k}:`" for k in keep) + " section" + "s" * (len(keep) > 1) + \
                   " to a file and pass it (or pass the whole mapping to `ddkit run` to repeat the run)"
    elif _RECORD_SECTION.get(kind) == section:  # a teacher's manifest: its config is the file's teacher: section
        dataset = ", its `dataset_config` as its `dataset:` section," if isinstance(data.get("dataset_config"),
                                                                                        dict) else ""
        held = f"its settings are under its `config` key: write that mapping to a file as its `{section}:` " \
               f"section{dataset} and pass it"
    else:
        held = f"it holds no `{section}:` settings to pass"
    raise ConfigError(f"this is a ddkit {short_repr(kind, 40)} record, not a config; {held}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; raises ConfigError listing every problem."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of settings, got {short_repr(data)}")
    if not where:
        refuse_record(data, cls)
    errors: list[str] = []
    obj = _build(cls, dict(data or {}), where, errors)
    if errors:
        raise ConfigError("; ".join(errors))
    return obj


def as_config(cls: type[T], value: Any, where: str = "") -> T:
    """The argument ``cfg`` of a library call as a ``cls``: a ``cls`` itself, or a mapping of its settings
    built with :func:`from_dict` (checked as a YAML config is; ``where``: its section's name in a run config,
    which errors name); anything else is one :class:`ConfigError`."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return from_dict(cls, dict(value), where)
    raise ConfigError(f"cfg must be a {cls.__name__} or a dict of its settings, got {type(value).__name__} "
                      f"{short_repr(value, 80)}")


def field_default(f: dataclasses.Field) -> Any:
    """The default of dataclass field ``f`` (a fresh one from its factory), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def operational_defaults(cls: type) -> dict[str, Any]:
    """The fields of dataclass ``cls`` declared ``operational`` (see :func:`field`), each with its default in
    ``cls`` (a subclass's own default where it sets one)."""
    return {f.name: field_default(f) for f in dataclasses.fields(cls) if f.metadata.get("operational")}


def _at_added_default(obj: Any, f: dataclasses.Field) -> bool:
    if not f.metadata.get("added") or (default := field_default(f)) is dataclasses.MISSING:
        return False
    return to_dict(getattr(obj, f.name)) == to_dict(default)


def _identity_value(obj: Any, f: dataclasses.Field) -> Any:
    """Field ``f`` of ``obj`` as its identity holds it: an ``operational`` one at its default."""
    if f.metadata.get("operational") and (default := field_default(f)) is not dataclasses.MISSING:
        return to_dict(default, True)
    return to_dict(getattr(obj, f.name), True)


def to_dict(obj: Any, identity: bool = False) -> Any:
    """A dataclass (nested) as plain JSON/YAML-serialisable data.

    ``identity``: what decides results, for hashing -- fields declared ``added`` (see :func:`field`)
    are left out while they hold their default, fields declared ``operational`` are held at their default."""
    if dataclasses.is_dataclass(obj):
        if identity:
            return {f.name: _identity_value(obj, f) for f in dataclasses.fields(obj) if not _at_added_default(obj, f)}
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, identity) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, identity) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def sorted_keys(value: Any) -> Any:
    """``value`` with the keys of its (nested) string-keyed dicts in sorted order: free-form settings
    given in another order (``--set b=1 --set a=2``) are then recorded byte for byte alike."""
    if isinstance(value, dict):
        items = ((k, sorted_keys(v)) for k, v in value.items())
        return dict(sorted(items) if all(isinstance(k, str) for k in value) else items)
    if isinstance(value, list):
        return [sorted_keys(v) for v in value]
    return value


def config_hash(obj: Any) -> str:
    """A short, stable hash of a config (dataclass or plain data), over ``to_dict(obj, identity=True)``."""
    blob = json.dumps(to_dict(obj, identity=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _RepeatedKey(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


#: the merge key ``<<`` among a mapping's keys (a quoted "<<" is a plain key)
_MERGE_KEY = object()


class _MergeList(Exception):
    """``<<: [*a, *b]``: the YAML merge-key spec lets the first mapping win, PyYAML the last."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line

    advice = ("merges a list of mappings (<<: [*a, *b]), where the YAML spec lets the first win and PyYAML the "
              "last; merge one mapping (<<: *a) and write the settings of the others out")


class _Expanded(Exception):
    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size  # None: an alias inside the node it names


class _Surprising(Exception):
    """A YAML 1.1 number unlike the decimal it looks like (``010`` is octal 8, ``1:20`` base-60 80), where
    ``--seeds 010``, JSON and Python's ``int()`` read 10 or refuse."""

    def __init__(self, text: str, value: Any, line: int) -> None:
        super().__init__(text)
        self.text, self.value, self.line = text, value, line

    def advice(self, key: str | None = None) -> str:
        """What the number reads as and the fix; ``key``: a ``--set`` of this value alone, whose quotes the shell
        would strip unless the whole override is quoted."""
        if ":" in self.text:
            what, fix = "base-60", "write the number in decimal"
        else:
            what, fix = "octal", f"write the decimal number {int(self.text.replace('_', ''), 10)}"
        quoted = f"'{self.text}'" if key is None else '--set "' + f"{key}='{self.text}'" + '"'
        return f"{self.text} reads as the {what} number {self.value} (YAML 1.1); {fix}, or quote it ({quoted}) " \
               "if it is text"


#: how much YAML aliases (``*name``, ``<<: *name``) may add to a config, in characters of the values they
#: repeat: far above what the shipped configs' anchors of shared settings add (a few thousand), far below
#: an alias bomb's (a 1 KB file of nested aliases stood for 10^8 values and a 580 MB error message)
ALIAS_EXPANSION = 1_000_000


def _alias_expansion(root: yaml.Node) -> int:
    """How many characters (scalar values; 1 per list or mapping) the aliases in ``root`` repeat:
    the size of the document with every alias written out, less its size as written."""
    sizes: dict[int, int] = {}
    own = 0

    def size(node: yaml.Node) -> int:
        nonlocal own
        if id(node) in sizes:
            if sizes[id(node)] < 0:
                raise _Expanded(None)
            return sizes[id(node)]
        sizes[id(node)] = -1  # being sized: met again below, the node holds itself
        if isinstance(node, yaml.ScalarNode):
            n = weight = max(1, len(node.value))
        elif isinstance(node, yaml.SequenceNode):
            n, weight = 1 + sum(size(child) for child in node.value), 1
        else:
            n, weight = 1 + sum(size(k) + size(v) for k, v in node.value), 1
        sizes[id(node)] = n
        own += weight
        return n

    return size(root) - own


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a mapping setting one key twice: YAML's last-one-wins would
    silently drop the setting written first (an edit that added a key the file already had), and a
    document whose aliases repeat more than :data:`ALIAS_EXPANSION` characters (an alias bomb)."""

    def construct_document(self, node: yaml.Node) -> Any:
        added = _alias_expansion(node)
        if added > ALIAS_EXPANSION:
            raise _Expanded(added)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` brings defaults the file may override
                if isinstance(value_node, yaml.SequenceNode):
                    raise _MergeList(key_node.start_mark.line + 1)
                first = seen.setdefault(_MERGE_KEY, key_node.start_mark)  # twice: the second would silently win
                if first.index != key_node.start_mark.index:
                    raise _RepeatedKey("<<", first.line + 1, key_node.start_mark.line + 1)
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: safe_load's own error names it
                continue
            if first.index != key_node.start_mark.index:  # by position: `{x: 1, x: 2}` repeats x on one line
                raise _RepeatedKey(key, first.line + 1, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = super().construct_yaml_int(node)
        digits = node.value.replace("_", "").lstrip("+-")
        if ":" in digits or (len(digits) > 1 and digits[0] == "0" and digits[1] not in "bx"):  # not 0b101, 0x1f
            raise _Surprising(node.value, value, node.start_mark.line + 1)
        return value

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        value = super().construct_yaml_float(node)
        if ":" in node.value:
            raise _Surprising(node.value, value, node.start_mark.line + 1)
        return value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
# Numbers as YAML 1.2 and JSON read them: YAML 1.1 reads 1e-5, 1E5 and 1.0e5 (an exponent without a dot, or without
# a sign) as text, and JSON writes every float below 1e-4 as 1e-05, so a run's own config.json would not read back
# (checked after YAML 1.1's own patterns: 1_000.5 and .5 stay floats, 10 an int)
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                       re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                       list("-+0123456789."))
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_yaml_float)


def _yaml_problem(exc: yaml.YAMLError, line: bool = True) -> tuple[str, str]:
    """Where PyYAML's ``exc`` happened (`` at line L, column C``; ``line``: False for one line of text, which
    names only the column) and what it is: the problem ("found character '\\t' that cannot start any token"),
    then where PyYAML was ("while scanning ...")."""
    mark = getattr(exc, "problem_mark", None)
    at = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}" if line else \
        f" at column {mark.column + 1}"
    what = "; ".join(p for p in (getattr(exc, "problem", None), getattr(exc, "context", None)) if p) or \
        str(exc).splitlines()[0]
    return at, what


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass a YAML file (see configs/)")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass an existing YAML file (see configs/)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")  # not the locale's encoding: a config reads the same everywhere
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                          f"{exc.start}); save it as UTF-8, or pass the YAML file meant (see configs/)") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # safe_load's constructors, plus the repeated-key check
    except yaml.YAMLError as exc:
        at, what = _yaml_problem(exc)
        fix = "indent with spaces, not tabs" if "'\\t'" in what else "fix the syntax"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at} ({what}); {fix}") from None
    except _Expanded as exc:
        what = ("an alias inside the value it names (a value that holds itself)" if exc.size is None else
                f"aliases that repeat {exc.size:,} characters of values (at most {ALIAS_EXPANSION:,})")
        raise ConfigError(f"config file {str(path)!r} uses {what}; write the values out, or use fewer "
                          "aliases") from None
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r} nests lists or mappings too deeply to read; "
                          "flatten it") from None
    except _RepeatedKey as exc:
        lines = f"line {exc.first}" if exc.first == exc.again else f"lines {exc.first} and {exc.again}"
        raise ConfigError(f"config file {str(path)!r} sets {short_repr(exc.key)} twice in one section ({lines}); "
                          "keep one of them") from None
    except _Surprising as exc:
        raise ConfigError(f"config file {str(path)!r} line {exc.line}: {exc.advice()}") from None
    except _MergeList as exc:
        raise ConfigError(f"config file {str(path)!r} line {exc.line} {exc.advice}") from None
    if data is None:
        raise ConfigError(f"config file {str(path)!r} is empty; write the settings to change (see configs/ "
                          "for examples)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_yaml_with_base(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping whose top-level ``base: other.yaml`` (a path relative to this file) is resolved.

    The base file is loaded the same way (it may name its own base), then every top-level key this
    file sets replaces the base's value whole: a file states only what differs from its base, and
    what it states is exactly what it gets (a mapping such as ``teacher_pool`` is not merged).
    """
    path = Path(path)
    data = load_yaml(path)
    if "base" not in data:
        return data
    ref = data.pop("base")
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"config file {str(path)!r}: base must be the path of a YAML file, got {short_repr(ref)}")
    base_path = path.parent / ref
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        raise ConfigError(f"config file {str(path)!r}: base {ref!r} leads back to itself; remove the loop")
    if not base_path.exists():  # a folder is named as one by load_yaml
        raise ConfigError(f"config file {str(path)!r}: base file {str(base_path)!r} not found; "
                          "give a path relative to this file's folder")
    return {**load_yaml_with_base(base_path, chain), **data}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to nested plain data, in place. The value is read as YAML with the
    checks of a config file: a YAML syntax error (``{epochs: 3``, ``[a``), a key set twice, an alias bomb or a
    YAML 1.1 number such as ``010`` is refused.
    A mapping (``a.b={c: 1}``) merges into the one ``data`` holds there key by key, as :func:`merge_overrides`
    merges every other layer: the settings the mapping leaves out keep their values (an option dict of
    :data:`WHOLE_DICTS` is replaced whole); ``a.b={}`` empties it."""
    texts: dict[str, _Typed] = {}
    _SET_TEXTS.set(texts)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw != "" else ""
        except yaml.YAMLError as exc:  # `{epochs: 3` as text would be refused as no mapping, `[a` made a folder `[a`
            at, what = _yaml_problem(exc, line="\n" in raw)
            raise ConfigError(f"override {item!r}: the value is not valid YAML{at} ({what}); fix the syntax, or quote "
                              f"it to pass it as text (--set {_set_as_text(key, raw)})") from None
        except _Surprising as exc:
            whole = raw.strip() == exc.text  # the value alone: the shell form of its quotes
            raise ConfigError(f"override {item!r}: {exc.advice(key.strip() if whole else None)}") from None
        except _RepeatedKey as exc:
            raise ConfigError(f"override {item!r} sets {short_repr(exc.key)} twice; keep one of them") from None
        except _MergeList as exc:
            raise ConfigError(f"override {item!r} {exc.advice}") from None
        except (_Expanded, RecursionError):
            raise ConfigError(f"override {item!r} nests or repeats values too deeply to read; write the values "
                              "out") from None
        comment = _comment(raw)
        if comment is not None:  # `out=exp #2` went to exp: one shell word, so the comment is text meant
            raise ConfigError(f"override {item!r}: YAML reads {comment!r} as a comment and drops it; quote the value "
                              f"to keep it as text (--set {_set_as_text(key, raw)})")
        path = key.strip()  # a later override of a key is the one its fields are given by
        texts = {p: t for p, t in texts.items() if not (p == path or p.startswith((path + ".", path + "[")))}
        texts.update(_typed_scalars(raw, value, path))
        _SET_TEXTS.set(texts)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            at = _existing_key(node, part)
            nxt = node.get(at)
            if nxt is None:
                nxt = node[at] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        leaf = _existing_key(node, parts[-1])
        # a mapping merges into the one there key by key; {} empties it (a section back to its defaults, a method's
        # options to none: the one way to drop settings a file or an earlier --set gave)
        node[leaf] = value if value == {} else merge_overrides(node, {leaf: value})[leaf]
    return data


def _set_as_text(key: str, raw: str) -> str:
    """``--set KEY=RAW`` with RAW quoted as YAML text, quoted for a shell: the override that passes RAW as text."""
    text = f"{key.strip()}='" + raw.replace("'", "''") + "'"  # YAML's quoting of text
    return f'"{text}"' if not re.search(r'["$`\\!]', text) else shlex.quote(text)


def _comment(text: str) -> str | None:
    """The first YAML comment in ``text`` (a ``#`` after a space or at the start, outside quotes, to the end of its
    line), or None; ``text`` is valid YAML. ``a#b`` holds none: YAML reads it as text."""
    if "#" not in text:
        return None
    spans = [(t.start_mark.index, t.end_mark.index) for t in yaml.scan(text, Loader=yaml.SafeLoader)]
    for at in (i for i, ch in enumerate(text) if ch == "#"):
        if not any(start <= at < end for start, end in spans):  # in no token: the scanner skipped it as a comment
            return text[at:].split("\n", 1)[0]
    return None


def _existing_key(node: dict[Any, Any], key: Any) -> Any:
    """The key of ``node`` that ``key`` (a path part, or a key of a mapping merged into ``node``) names: ``key``
    itself, or the key that spells the same integer, one of them as an integer and the other as text
    (``ipc_overrides.10`` reaches the YAML's ``10:``, and ``ipc_overrides={10: ...}`` a JSON record's ``"10"``, to
    change the entry's settings, not to add a second entry for IPC 10)."""
    if key in node:
        return key
    number = _int_key(key)
    if number is not None:
        for k in node:
            if _int_key(k) == number and (type(k) is int) != (type(key) is int):
                return k
    return key


def _int_key(key: Any) -> int | None:
    """The integer ``key`` is (an int, not a bool) or spells (``"10"``, ``"+10"``), else None."""
    if type(key) is int:
        return key
    return int(key) if isinstance(key, str) and _INT_TEXT.fullmatch(key.strip()) else None


def _choices_or_type(tp: Any) -> str:
    """A Literal's choices (``real | noise``), or the type's name."""
    if get_origin(tp) is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    return _type_name(tp)


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field of a config dataclass."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (default := field_default(f)) is dataclasses.MISSING:
            default = "<required>"
        rows.append((f.name, _choices_or_type(hints[f.name]), to_dict(default), f.metadata.get("help", "")))
    return rows
