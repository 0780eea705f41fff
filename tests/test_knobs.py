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
