"""``mclcbf-diag interventions``: every registered intervention, its paper, presets and knobs; and the
``--help-knobs`` of the commands that take ``--intervention``.

Everything printed comes from the registry (:func:`mclcbf_diag.interventions.specs`): the knob
dataclasses, their ``help`` and the presets themselves, read without importing torch.
"""

from __future__ import annotations

from ..errors import UserError

MAX_VALUE = 48  # characters of a preset's knob value shown before it is cut (AD-HH's 20 heads)


def _short(text: str) -> str:
    if len(text) <= MAX_VALUE:
        return text
    return text[:MAX_VALUE].rsplit(",", 1)[0] + f",… ({text.count(',') + 1} entries)"


def describe(spec) -> list[str]:
    """The lines that show one intervention: summary, paper, presets (what each changes), knobs, aliases."""
    from ..interventions.catalog import preset_changes
    from ..knobs import knob_rows, show_value

    first = next(iter(spec.presets.values()))
    lines = [f"{spec.name}: {spec.summary}"]
    if spec.paper:
        lines.append(f"  paper: {spec.paper}")
    lines.append("  presets (--preset P; the first is the default):")
    width = max(len(n) for n in spec.presets)
    for name, same, changes in preset_changes(spec):
        text = (f"the same as {same}" if same else
                " ".join(f"{k}={_short(show_value(v))}" for k, v in changes) or "the knob defaults below")
        lines.append(f"    {name:<{width}}  {text}")
    rows = knob_rows(first)
    if rows:
        lines.append("  knobs (--set KNOB=VALUE):")
        w = [max(len(r[i]) for r in rows) for i in range(2)]
        dw = max(len(_short(r[2])) for r in rows)
        for name, kind, default, text in rows:
            lines.append(f"    {name:<{w[0]}}  {kind:<{w[1]}}  {_short(default):<{dw}}  {text}".rstrip())
    else:
        lines.append("  knobs: none")
    for alias, targets in spec.aliases.items():
        lines.append(f"  --set {alias}=V sets {', '.join(targets)}")
    return lines


def cmd_interventions(args) -> int:
    """All interventions, or ``--intervention NAME``'s (``--help-knobs`` of trace, explain, pope, attribute)."""
    from ..interventions import specs

    table = specs()
    name = getattr(args, "intervention", None)
    if name is not None and name not in table:
        raise UserError(f"unknown intervention {name!r}; choose one of {', '.join(table)} "
                        "(`mclcbf-diag interventions` lists them with their knobs)")
    if name is not None:
        print("\n".join(describe(table[name])))
        return 0
    print(f"{len(table)} interventions (--intervention NAME, --preset P, --set KNOB=VALUE on trace, explain, pope "
          "and attribute; `--intervention NAME --help-knobs` shows one):")
    for spec in table.values():
        print()
        print("\n".join(describe(spec)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("interventions", help="list every intervention with its paper, presets and knobs")
    p.add_argument("--intervention", default=None, metavar="NAME", help="show only this one")
    p.add_argument("--help-knobs", action="store_true", help="the same as without it (accepted for symmetry)")
    p.set_defaults(func=cmd_interventions)
