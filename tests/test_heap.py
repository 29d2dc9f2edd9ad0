"""The heap policy a model sets (runtime/heap.py): a chunk's large tensors reuse freed memory, and
larger ones (the attention's, which grow with the context) go back to the system. Each case runs in a
fresh process: the policy is the process's, and blocks an earlier case freed would serve a later one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FILLS = """
import json, resource, sys
import torch
from gemma4.runtime import heap

def faults_filling(values):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(values).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

took = heap.reuse_blocks_up_to(int(sys.argv[1]))
print(json.dumps({"took": took, "faults": [faults_filling(16 << 20) for _ in range(6)]}))
"""
MB = 1 << 20


def fills_of_64_mb(limit: int) -> list[int]:
    """Minor page faults of six fresh fp32 64 MB tensors made, filled and freed in turn, under the policy."""
    out = subprocess.run([sys.executable, "-c", FILLS, str(limit)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    if not report["took"]:
        pytest.skip("this C library has no mallopt")
    return report["faults"]


def test_a_freed_large_block_comes_back_without_page_faults():
    """64 MB, above glibc's default mmap threshold: fresh pages fault in 4 KB at a time (16,384 of them)
    every time, unless the heap keeps the block; with the limit at its size, fills soon fault in almost
    none (a 26B-A4B prompt chunk's routed rows are 46 MB, made and freed at every layer)."""
    assert fills_of_64_mb(64 * MB)[-1] < 1_000


def test_a_block_above_the_limit_goes_back_to_the_system():
    """Above the limit a block is mapped fresh each time and every page faults again: the heap keeps no
    hole of its size that the next, larger one would not fit."""
    assert min(fills_of_64_mb(16 * MB)[1:]) > 15_000
