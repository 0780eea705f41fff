"""The built-in interventions' specs (mclcbf_diag.interventions.catalog): one source for the classes and the
listing, every knob described, importable without torch."""

import subprocess
import sys
import typing

import pytest

from mclcbf_diag import interventions
from mclcbf_diag.interventions.catalog import SPECS, Spec, spec_of
from mclcbf_diag.knobs import knob_rows


def test_every_builtin_has_a_spec_in_the_registry_order():
    assert list(SPECS) == list(interventions.BUILTIN) == interventions.names()[:len(SPECS)]


@pytest.mark.parametrize("name", list(SPECS))
def test_each_class_takes_its_spec(name):
    cls = interventions.registry()[name]
    assert spec_of(cls) == SPECS[name]
    assert cls.presets is SPECS[name].presets and cls.Knobs is SPECS[name].Knobs  # the same objects, not copies
    assert isinstance(next(iter(cls.presets.values())), cls.Knobs)


@pytest.mark.parametrize("name", list(SPECS))
def test_every_knob_has_a_one_line_description_and_a_readable_type(name):
    spec = SPECS[name]
    assert spec.summary and "\n" not in spec.summary and "\n" not in spec.paper
    assert spec.paper or name == "knockout"  # the knockout is a probe, not a paper's method
    first = next(iter(spec.presets.values()))
    hints = typing.get_type_hints(spec.Knobs)
    for knob, kind, _, text in knob_rows(first):
        assert text and "\n" not in text and len(text) < 160, (name, knob)
        assert kind != getattr(hints[knob], "__name__", None) or hints[knob] in (int, float), (name, knob, kind)
    for alias, targets in spec.aliases.items():
        assert set(targets) <= set(hints), alias


def test_a_user_class_is_described_from_its_attributes():
    from mclcbf_diag.interventions import Intervention

    class Quiet(Intervention):
        """Do nothing, quietly.

        More text that the listing leaves out.
        """

        name = "quiet"

    spec = spec_of(Quiet)
    assert spec == Spec("quiet", "Do nothing, quietly.", "", Quiet.Knobs, dict(Quiet.presets), {})
    assert interventions.specs()["mclcbf"] == SPECS["mclcbf"]


def test_the_catalog_and_the_registry_names_load_without_torch():
    code = ("import sys\nfrom mclcbf_diag import interventions\nassert len(interventions.specs()) >= 8\n"
            "from mclcbf_diag.interventions.catalog import SPECS\nSPECS['pai'].Knobs(alpha=0.3)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
