"""``mclcbf-diag models``: the model families the adapter knows, and which checkpoints each covers.

Printed from :data:`mclcbf_diag.models.families.FAMILIES`, the table the adapter itself is built
from, without importing torch or transformers.
"""

from __future__ import annotations


def describe(family) -> list[str]:
    lines = [f"{family.name}: {family.architecture} (config.json model_type {family.model_type!r})",
             f"  layout       {family.layout}"]
    lines += [f"  {'checked on' if i == 0 else '':<11}  {c}" for i, c in enumerate(family.checked)]
    lines.append(f"  also covers  {family.covers}")
    if family.not_covered:
        lines.append(f"  not covered  {family.not_covered}")
    return lines


def cmd_models(args) -> int:
    from ..models.families import FAMILIES

    print(f"{len(FAMILIES)} supported model famil{'y' if len(FAMILIES) == 1 else 'ies'} "
          "(--model DIR or a cached hub id; default: the embedded model):")
    for family in FAMILIES:
        print()
        print("\n".join(describe(family)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the supported model families and the checkpoints they cover")
    p.set_defaults(func=cmd_models)
