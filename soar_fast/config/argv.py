"""Read the values users naturally type for `soar-fast train` flags before tyro parses them.

tyro wants `--use_ema` / `--no-use_ema`, an integer as `1000` and a tuple as separate words; users
of diffusers' scripts type `--use_ema true`, `--max_train_steps 1e3`, `--train_batch_size 8.0`,
`--model.lora_target_modules to_q,to_k` and `--mixed_precision fp32`. `normalize_train_argv`
rewrites exactly those forms (a boolean word after a boolean flag, an integral number for an int
field, commas in a tuple field, `fp32`/`no`-style precision words) and leaves everything else to
tyro, whose errors stay one line.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Sequence

__all__ = ["normalize_train_argv"]

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_PRECISION = {"fp32": "no", "float32": "no", "none": "no", "bfloat16": "bf16"}


def _kinds(cls: type) -> dict[str, str]:
    """flag -> 'bool' | 'int' | 'tuple' for every field of the config tree (`--section.field`, and
    `--field` where the field is exposed flat)."""
    out: dict[str, str] = {}
    for section, stype in typing.get_type_hints(cls, include_extras=True).items():
        if typing.get_origin(stype) is typing.Annotated:
            stype = typing.get_args(stype)[0]
        if not dataclasses.is_dataclass(stype):
            continue
        for name, hint in typing.get_type_hints(stype, include_extras=True).items():
            base, extras = hint, ()
            if typing.get_origin(hint) is typing.Annotated:
                base, *extras = typing.get_args(hint)
            args = typing.get_args(base)
            kind = ("bool" if base is bool else "int" if base is int
                    else "tuple" if typing.get_origin(base) is tuple or any(typing.get_origin(a) is tuple for a in args)
                    else "")
            if not kind:
                continue
            out[f"--{section}.{name}"] = kind
            if any("prefix_name=False" in repr(e) or getattr(e, "prefix_name", None) is False for e in extras):
                out[f"--{name}"] = kind
    return out


def normalize_train_argv(argv: Sequence[str], cls: type) -> list[str]:
    kinds, out, args, i = _kinds(cls), [], list(argv), 0
    while i < len(args):
        a = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        kind = kinds.get(a)
        if a in ("--mixed_precision", "--runtime.mixed_precision") and nxt is not None and nxt.lower() in _PRECISION:
            out += [a, _PRECISION[nxt.lower()]]
            i += 2
            continue
        if kind == "bool" and nxt is not None and nxt.lower() in _TRUE | _FALSE:
            section, _, field = a[2:].rpartition(".")
            out.append(a if nxt.lower() in _TRUE else f"--{section + '.' if section else ''}no-{field}")
            i += 2
            continue
        if kind == "int" and nxt is not None and _NUMBER.match(nxt) and float(nxt).is_integer():
            out += [a, str(int(float(nxt)))]
            i += 2
            continue
        if kind == "tuple" and nxt is not None and "," in nxt and not nxt.startswith("--"):
            out += [a, *[p for p in nxt.split(",") if p]]
            i += 2
            continue
        out.append(a)
        i += 1
    return out
