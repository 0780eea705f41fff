"""The supported model families (mclcbf_diag.models.families): the adapter table is built from them."""

import json
import subprocess
import sys

from mclcbf_diag import shipped
from mclcbf_diag.models.families import FAMILIES


def test_every_family_has_an_adapter_and_every_adapter_a_family():
    from mclcbf_diag.models.adapter import ADAPTERS, LLAVA

    assert list(ADAPTERS) == [f.architecture for f in FAMILIES]
    assert ADAPTERS["LlavaForConditionalGeneration"] is LLAVA
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)


def test_the_embedded_model_is_a_listed_family():
    cfg = json.loads((shipped.WEIGHTS / "config.json").read_text(encoding="utf-8"))
    family = next(f for f in FAMILIES if f.architecture in cfg["architectures"])
    assert family.model_type == cfg["model_type"]
    assert any("embedded" in c for c in family.checked)


def test_families_load_without_torch():
    code = "import sys\nfrom mclcbf_diag.models.families import FAMILIES\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
