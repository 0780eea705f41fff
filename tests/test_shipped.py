"""Where the embedded model and its POPE set live (mclcbf_diag.shipped): every path it names is there.

No figure of the model is pinned (the embedded model may be swapped); only the layout the
commands rely on.
"""

import json

import pytest

from mclcbf_diag import shipped
from mclcbf_diag.data import load_pope, resolve_image


def test_the_weights_folder_is_loadable_and_has_its_manifest():
    files = {p.name for p in shipped.WEIGHTS.iterdir()}
    assert {"config.json", "MANIFEST.sha256"} <= files
    assert any(name.endswith(".safetensors") for name in files)
    listed = {line.split()[-1].lstrip("*") for line in (shipped.WEIGHTS / "MANIFEST.sha256").read_text().splitlines()
              if line.strip()}
    assert listed <= files and any(name.endswith(".safetensors") for name in listed)
    assert json.loads((shipped.WEIGHTS / "config.json").read_text())["model_type"] == "llava"


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_each_split_file_exists_and_names_shipped_images(split):
    path = shipped.pope_file(split)
    assert path.parent == shipped.POPE and path.name == f"{shipped.POPE_PREFIX}_{split}.json"
    questions = load_pope(path)
    assert questions and {q.label for q in questions} <= {"yes", "no"}
    for q in questions[:50]:
        assert resolve_image(q, shipped.IMAGES).is_file()
