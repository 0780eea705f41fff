"""Progress bars (mclcbf_diag.progress): the notebook widget only when ipywidgets exists; TQDM_DISABLE works."""

import importlib
import importlib.util
import os
import subprocess
import sys

import tqdm.auto
import tqdm.std

from mclcbf_diag import progress


def test_the_bar_class_follows_ipywidgets(monkeypatch):
    real = importlib.util.find_spec
    try:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name,
                                                                                                                 *a))
        assert importlib.reload(progress).tqdm is tqdm.std.tqdm  # no widgets: plain text, no IProgress warning
        monkeypatch.setattr(importlib.util, "find_spec", lambda name,
                            *a: object() if name == "ipywidgets" else real(name, *a))
        assert importlib.reload(progress).tqdm is tqdm.auto.tqdm
    finally:
        monkeypatch.undo()
        importlib.reload(progress)


def test_tqdm_disable_turns_every_bar_off():
    """tqdm reads TQDM_* when it is imported, so this runs in a fresh process."""
    code = ("from mclcbf_diag.progress import tqdm\nbar = tqdm(range(3))\n"
            "print(bar.disable, list(bar))")
    for env, disabled in (({"TQDM_DISABLE": "1"}, "True"), ({}, "False")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                              env={**{k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}, **env})
        assert proc.stdout.strip() == f"{disabled} [0, 1, 2]"
        assert ("0/3" in proc.stderr) == (disabled == "False")
