"""Every benchmark script runs end to end at a tiny size, so an upstream change cannot rot one.

The figures are not checked (benchmarks print ratios measured in one run; see the README's
performance section); only that each script finishes and prints its ratio line.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
HELPERS = {"seed_style.py", "options.py"}  # imported by the scripts, not run
TINY = {
    "trace_overhead.py": ["--repeats", "1"],
    "attribution.py": ["--repeats", "1"],
    "pope_throughput.py": ["--n", "2", "--batch-size", "2", "--repeats", "1"],
    # three kinds of path (an activation edit, auxiliary rows, a forward of its own at a preset): the script's code;
    # every intervention's pope path is tested in its own file
    "intervention_throughput.py": ["--n", "2", "--batch-size", "2", "--repeats", "1",
                                   "--only", "knockout,vcd,causalmm:language"],
    "real_width.py": ["--reduced", "--questions", "1", "--threads", "1", "--dtypes", "float32,bfloat16"],
    "gpu_7b.py": ["--dry-run"],
    "population_explain.py": ["--n", "2", "--batch-size", "2", "--k-max", "2", "--bisect-steps", "1"],
    "pope_stats.py": ["--n", "2", "--split", "adversarial", "--batch-size", "2", "--repeats", "1",
                      "--resamples", "200"],
}


def test_every_benchmark_has_a_tiny_run():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - HELPERS
    assert scripts == set(TINY), f"give each benchmark a tiny run in TINY: {sorted(scripts ^ set(TINY))}"


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_at_tiny_size(script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "error::FutureWarning"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *TINY[script]], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout, done.stdout[-2000:]
    assert "deprecated" not in (done.stdout + done.stderr).lower(), done.stderr[-2000:]


def test_a_saved_real_width_model_feeds_the_throughput_benchmark(tmp_path, capsys):
    """``real_width.py --save DIR`` keeps the model it builds, and ``intervention_throughput.py --model DIR`` times
    a method's cost against a bare forward on it (docs/performance.md measures the 7B's widths that way)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(script, *args):
        return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], env=env, capture_output=True,
                              text=True, timeout=300)

    saved = run("real_width.py", "--reduced", "--save", str(tmp_path / "model"))
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    # the refusal of a used folder, in this process (a subprocess spends its time importing, not refusing)
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_width_benchmark", BENCHMARKS / "real_width.py")
    real_width = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_width)
    assert real_width.main(["--reduced", "--save", str(tmp_path / "model")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    timed = run("intervention_throughput.py", "--model", str(tmp_path / "model"), "--n", "2", "--batch-size", "2",
                "--repeats", "1", "--only", "causalmm:language")
    assert timed.returncode == 0, timed.stderr[-3000:]
    assert "pope --intervention causalmm:language" in timed.stdout and "baseline answers equal" in timed.stdout
