"""--set knob=value over any frozen dataclass, typed by its annotations."""

from dataclasses import dataclass
from typing import Literal

import pytest

from mclcbf_diag.errors import UserError
from mclcbf_diag.knobs import apply_overrides, changed, check_choices, to_dict


@dataclass(frozen=True)
class Knobs:
    mode: Literal["a", "b"] = "a"
    scale: float = 1.0
    count: int = 2
    flag: bool = False
    layers: tuple[int, ...] | None = None
    span: tuple[int, int] = (1, 5)
    heads: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        check_choices(self)


def test_each_annotation_parses():
    k = apply_overrides(Knobs(), ["mode=b", "scale=0.5", "count=7", "flag=true", "layers=1,4:6", "span=2:9",
                                  "heads=16.29,26.9"])
    assert k == Knobs("b", 0.5, 7, True, (1, 4, 5), (2, 9), ((16, 29), (26, 9)))
    assert apply_overrides(k, ["layers=none", "heads=none"]).layers is None
    assert changed(k, Knobs()) == {"mode": "b", "scale": 0.5, "count": 7, "flag": True, "layers": (1, 4, 5),
                                   "span": (2, 9), "heads": ((16, 29), (26, 9))}
    assert to_dict(k)["layers"] == [1, 4, 5]


def test_aliases_set_several_fields():
    @dataclass(frozen=True)
    class Two:
        tau_a: float = 0.1
        tau_b: float = 0.2

    assert apply_overrides(Two(), ["tau=0.7"], {"tau": ("tau_a", "tau_b")}) == Two(0.7, 0.7)


@pytest.mark.parametrize("item,message", [
    ("mode=c", "choose one of a, b"), ("scale=x", "not a number"), ("scale=nan", "not a number"),
    ("count=1.5", "not an integer"), ("flag=maybe", "yes/no"), ("nope=1", "unknown knob 'nope'"),
    ("scale", "has no '='"), ("layers=0:100000000000", "at most"), ("heads=16", "layer.head"),
    ("span=1,2,3", "needs 2 integers"), ("layers=,", "lists no integers"),
])
def test_bad_values_are_one_line(item, message):
    with pytest.raises(UserError, match=message) as info:
        apply_overrides(Knobs(), [item])
    assert "\n" not in str(info.value)


def test_each_annotation_reads_back_for_the_listing():
    """knob_rows: name, how --set reads the type, the value as --set takes it back, the field's help."""
    from mclcbf_diag.knobs import knob, knob_rows

    @dataclass(frozen=True)
    class Helped(Knobs):
        extra: float | None = knob(None, "a described knob")

    rows = {r[0]: r[1:] for r in knob_rows(Helped(heads=((16, 29), (26, 9)), flag=True))}
    assert rows == {"mode": ("a|b", "a", ""), "scale": ("float", "1.0", ""), "count": ("int", "2", ""),
                    "flag": ("true|false", "true", ""), "layers": ("ints (1,2,3 or a:b)|none", "none", ""),
                    "span": ("int,int", "1,5", ""), "heads": ("layer.head list|none", "16.29,26.9", ""),
                    "extra": ("float|none", "none", "a described knob")}
    # every value shown is one --set reads back as the same value
    k = Helped(heads=((16, 29), (26, 9)), layers=(1, 2), flag=True)
    back = apply_overrides(Helped(), [f"{n}={v}" for n, _, v, _ in knob_rows(k)])
    assert back == k
