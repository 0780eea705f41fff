"""Knobs: an intervention's settings as a frozen dataclass, and ``--set knob=value`` for any of them.

Every intervention declares its settings as a frozen dataclass whose field annotations are
the whole specification: ``Literal[...]`` fields take one of their choices, ``float`` and
``int`` fields a number, ``tuple[int, ...]`` fields a list (``1,2,3`` or ``a:b``, stop
excluded), ``… | None`` fields also ``none``. :func:`apply_overrides` parses ``knob=value``
strings against those annotations; :func:`check_choices` validates a dataclass's Literal
fields (call it from ``__post_init__``). A field declared with :func:`knob` carries a one-line
description; :func:`knob_rows` reads name, type, default and description back for listings
(``mclcbf-diag interventions``). Nothing here knows any particular intervention.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

from .errors import UserError

MAX_LIST = 100_000  # an integer list longer than this is a typo (layers=0:100000000000), not a request


def check_choices(obj) -> None:
    """UserError when a ``Literal`` field of dataclass ``obj`` holds a value outside its choices."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints[f.name]
        if typing.get_origin(hint) is Literal and getattr(obj, f.name) not in typing.get_args(hint):
            raise UserError(f"{f.name}={getattr(obj, f.name)!r} is not valid; choose one of "
                            f"{', '.join(map(str, typing.get_args(hint)))}")


def _parse_int(text: str, knob: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UserError(f"{knob}: {text.strip()!r} is not an integer") from None


def _parse_ints(text: str, knob: str) -> tuple[int, ...]:
    """'1,2,3' or 'a:b' (python-style, stop excluded), or a mix: '1,4:7'."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            a, _, b = part.partition(":")
            lo, hi = _parse_int(a, knob), _parse_int(b, knob)
            if hi - lo > MAX_LIST:
                raise UserError(f"{knob}={text!r} spans {hi - lo} values; give a range of at most {MAX_LIST}")
            out.extend(range(lo, hi))
        else:
            out.append(_parse_int(part, knob))
    return tuple(out)


def _parse_value(knob: str, text: str, hint) -> object:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if text not in args:
            raise UserError(f"{knob}={text!r} is not valid; choose one of {', '.join(map(str, args))}")
        return text
    if hint is float:
        try:
            v = float(text)
        except ValueError:
            raise UserError(f"{knob}={text!r} is not a number") from None
        if math.isnan(v):
            raise UserError(f"{knob}={text!r} is not a number")
        return v
    if hint is int:
        return _parse_int(text, knob)
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f"{knob}={text!r} is not a yes/no value; write true or false")
        return text.lower() in ("true", "1", "yes")
    if type(None) in args:  # X | None
        if text.strip().lower() in ("", "none", "auto"):
            return None
        inner = next(a for a in args if a is not type(None))
        return _parse_value(knob, text, inner)
    if origin is tuple and args and typing.get_origin(args[0]) is tuple:  # (layer, head) pairs: 16.29,26.9
        pairs = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            a, dot, b = part.partition(".")
            if not dot:
                raise UserError(f"{knob}={text!r}: write pairs as layer.head, e.g. {knob}=16.29,26.9")
            pairs.append((_parse_int(a, knob), _parse_int(b, knob)))
        if not pairs:
            raise UserError(f"{knob}={text!r} lists no pairs; e.g. {knob}=16.29,26.9")
        return tuple(pairs)
    if origin is tuple:
        vals = _parse_ints(text, knob)
        if args and args[-1] is not Ellipsis:
            if ":" in text and len(args) == 2 and "," not in text:
                a, _, b = text.partition(":")
                vals = (_parse_int(a, knob), _parse_int(b, knob))
            if len(vals) != len(args):
                raise UserError(f"{knob}={text!r} needs {len(args)} integers, e.g. {knob}=5,581")
        elif not vals:
            raise UserError(f"{knob}={text!r} lists no integers; e.g. {knob}=10,11,12 or {knob}=10:28")
        return vals
    raise TypeError(f"no parser for knob {knob} of type {hint}")  # programming error


def apply_overrides(knobs, overrides, aliases: dict[str, tuple[str, ...]] | None = None):
    """``knobs`` (a frozen dataclass) with ``knob=value`` strings applied.

    Args:
        knobs: the knobs (a frozen dataclass; its type hints parse the values).
        overrides: ``knob=value`` strings, applied in order.
        aliases: maps a short name to several fields it sets at once (``tau`` → both phases); None: none.

    Returns:
        A copy of ``knobs`` with the overrides applied.

    Raises:
        UserError: an unknown knob (the message names the valid ones), a missing ``=`` or a bad value.
    """
    hints = typing.get_type_hints(type(knobs))
    aliases = aliases or {}
    valid = sorted([*hints, *aliases])
    changes: dict[str, object] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} has no '='; write knob=value, e.g. {valid[0]}=…")
        knob, _, text = item.partition("=")
        knob, text = knob.strip(), text.strip()
        targets = aliases.get(knob, (knob,))
        if targets[0] not in hints:
            raise UserError(f"unknown knob {knob!r}; valid knobs: {', '.join(valid)}")
        value = _parse_value(knob, text, hints[targets[0]])
        for t in targets:
            changes[t] = value
    return dataclasses.replace(knobs, **changes)


def to_dict(knobs) -> dict:
    """A dataclass's fields as JSON-ready values (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(knobs).items()}


def changed(knobs, reference) -> dict:
    """The fields of ``knobs`` that differ from ``reference`` (same dataclass type)."""
    a, b = dataclasses.asdict(knobs), dataclasses.asdict(reference)
    return {k: v for k, v in a.items() if b[k] != v}


def knob(default, help: str):
    """A dataclass field with ``default`` and a one-line description (``metadata["help"]``)."""
    return dataclasses.field(default=default, metadata={"help": help})


def type_text(hint) -> str:
    """How ``--set`` reads a field of type ``hint``, in a few words (``float|none``, ``ints (1,2 or a:b)``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(map(str, args))
    if hint in (float, int):
        return hint.__name__
    if hint is bool:
        return "true|false"
    if type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return f"{type_text(inner)}|none"
    if origin is tuple and args and typing.get_origin(args[0]) is tuple:
        return "layer.head list"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return ",".join("int" for _ in args)
    if origin is tuple:
        return "ints (1,2,3 or a:b)"
    return getattr(hint, "__name__", str(hint))


def show_value(value) -> str:
    """A knob value as ``--set`` would take it back (``none``, ``1,2,3``, ``16.29,26.9``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(".".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def knob_rows(knobs) -> list[tuple[str, str, str, str]]:
    """``(name, type, value, description)`` per field of the knobs instance ``knobs`` (description: the
    field's ``metadata["help"]``, empty when it has none)."""
    hints = typing.get_type_hints(type(knobs))
    return [(f.name, type_text(hints[f.name]), show_value(getattr(knobs, f.name)), f.metadata.get("help", ""))
            for f in dataclasses.fields(knobs)]
