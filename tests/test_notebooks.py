"""The notebooks in notebooks/ run top to bottom without errors, and are committed clean.

Each notebook executes with nbclient in a kernel that runs *this* interpreter (a private
``python3`` kernelspec written for the test session, so a fresh CI machine needs nothing
beyond ``pip install -e .[test]``), with the notebooks folder as working directory, offline
and single-threaded. Notebook 04 needs a GPU and the cached 7B checkpoint; without them its
guards skip the heavy cells, which is what runs here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")
nbconvert = pytest.importorskip("nbconvert")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_quick_start", "02_why_theta_does_not_flip", "03_pope_sweep", "04_llava_7b_on_gpu", "05_attribution"]
# Values the run here gives a notebook's "parameters" cell (papermill's convention): the same cells over fewer
# questions, for CI time (03: 6 per split, not 20; its first 20 of each split hold no wrong baseline answer either).
PARAMETERS = {"03_pope_sweep": {"PER_SPLIT": 6}}


def with_parameters(nb, values: dict):
    """``nb`` with each ``NAME = ...`` line of its cell tagged "parameters" set to ``values[NAME]``."""
    if not values:
        return nb
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "one cell tagged 'parameters' takes the values"
    for key, value in values.items():
        new = re.sub(rf"^{key} = .*$", f"{key} = {value!r}", cells[0].source, count=1, flags=re.M)
        assert new != cells[0].source, f"the parameters cell sets no {key}"
        cells[0].source = new
    return nb


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A ``python3`` kernelspec that launches sys.executable, first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    kernelspec.write_kernel_spec(root / "kernels" / "python3")
    return root


@pytest.fixture
def notebook_env(kernel_dir, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet the kernel's debugger warning
    monkeypatch.setenv("TQDM_DISABLE", "1")


def test_all_notebooks_present():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
    raw = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))
    nb = nbformat.reads(json.dumps(raw), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"code cell {i} has outputs: strip them before committing"
        assert cell.get("execution_count") is None, f"code cell {i} has an execution count: strip it"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, notebook_env):
    nb = with_parameters(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4), PARAMETERS.get(name, {}))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=240, startup_timeout=120,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:  # names the cell and shows its traceback
        pytest.fail(f"{name}.ipynb failed:\n{exc}", pytrace=False)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    warnings = [o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not [w for w in warnings if "Warning" in w], warnings  # e.g. tqdm's "IProgress not found"
    # Every figure shows in an nbconvert HTML export too, offline: plotly.js inline, no CDN.
    figures = sum("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)
    html = nbconvert.HTMLExporter().from_notebook_node(nb)[0]
    assert html.count('class="plotly-graph-div"') == figures
    assert not re.search(r'<script[^>]*src="https?://[^"]*plot', html), "plotly.js must be inline, not from a CDN"
    if figures:
        assert "PlotlyConfig" in html or "plotly.js v" in html  # the library itself is in the page
    if name in ("01_quick_start", "02_why_theta_does_not_flip", "03_pope_sweep"):
        assert figures > 0
    if name == "04_llava_7b_on_gpu":
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                       if o.get("output_type") == "stream")
        import torch

        if not torch.cuda.is_available():
            assert "skipped: no CUDA GPU" in text  # the guards ran, and said why
