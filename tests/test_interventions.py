"""The registry (mclcbf_diag.interventions): names, resolve, register, as_intervention."""

import pytest

from mclcbf_diag import interventions as I
from mclcbf_diag.errors import UserError
from mclcbf_diag.interventions.base import Intervention
from mclcbf_diag.interventions.mclcbf.config import PRESETS


def test_every_builtin_resolves_to_its_named_class():
    reg = I.registry()
    assert set(I.BUILTIN) <= set(reg)
    for name, cls in reg.items():
        assert cls.name == name and issubclass(cls, Intervention)
        iv = I.resolve(name)
        assert type(iv) is cls and iv.knobs == next(iter(cls.presets.values()))


def test_resolve_errors_name_the_choices():
    with pytest.raises(UserError, match="unknown intervention 'nope'; choose one of mclcbf, "):
        I.resolve("nope")
    with pytest.raises(UserError, match="unknown preset 'nope' for knockout; valid presets: remove, double"):
        I.resolve("knockout", "nope")


def test_register_makes_a_user_class_resolvable():
    class Mine(Intervention):
        name = "test-mine"

    try:
        assert I.register(Mine) is Mine
        assert type(I.resolve("test-mine")) is Mine
    finally:
        I.registry().pop("test-mine", None)
    with pytest.raises(UserError):
        I.resolve("test-mine")


def test_as_intervention_wraps_a_barrier_config():
    cfg = PRESETS["seed-exp6"]
    iv = I.as_intervention(cfg)
    assert isinstance(iv, I.MCLCBF) and iv.knobs is cfg
    assert I.as_intervention(iv) is iv and I.as_intervention(None) is None
    with pytest.raises(TypeError, match="not dict"):
        I.as_intervention({})


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        I.Nope  # noqa: B018
