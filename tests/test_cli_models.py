"""``mclcbf-diag models``: the supported families and their checkpoints, fast, without torch."""

from cli_refusals import ran

from mclcbf_diag.cli.models import describe
from mclcbf_diag.models.families import FAMILIES


def test_models_lists_every_family_in_a_fresh_process_without_torch(tmp_path):
    runs = [ran(["models"], tmp_path) for _ in range(3)]
    status, out, _, torch_loaded = runs[0]
    assert status == 0 and not torch_loaded, out
    for family in FAMILIES:
        assert "\n".join(describe(family)) in out
        assert family.architecture in out and all(c in out for c in family.checked)
    assert "llava-hf/llava-1.5-7b-hf" in out
    assert min(took for *_, took, _ in runs) < 0.5  # seconds, as for `mclcbf-diag interventions`
