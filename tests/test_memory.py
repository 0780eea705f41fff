"""mclcbf_diag.memory: freed memory reused (glibc), measured by the page faults of repeated attention-sized work."""

import subprocess
import sys

import pytest

from mclcbf_diag.memory import reuse_freed_memory

# An eager attention layer's large temporaries (scores and probabilities of 8 prompts × 8 heads × 600², 92 MiB
# each, above glibc's largest mmap threshold), made 10 times after 2 rounds of warm-up: the minor page faults.
SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from mclcbf_diag.memory import reuse_freed_memory
    assert reuse_freed_memory()
def layer():
    scores = torch.ones(8, 8, 600, 600)
    return float((scores.softmax(-1) @ torch.ones(600, 8)).sum())
for _ in range(2):
    layer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    layer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not reuse_freed_memory(), reason="the C library is not glibc: nothing to set")
def test_repeated_large_tensors_reuse_the_freed_pages():
    system = faults("system")
    assert system > 10 * 2 * 92 * 2**20 // 4096 // 2  # glibc's default: each round's pages mapped and zeroed afresh
    # kept: the freed pages serve the next rounds (a tensor that does not fit a freed block takes new ones, seen
    # at most once a run here)
    assert faults("reuse") < system / 3
