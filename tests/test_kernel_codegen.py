"""The shipped contrastive tile configs compile for sm_90a without register spills (ptxas report, no GPU:
benchmarks/kernel_codegen.py). Runs in a subprocess because this test session interprets the kernels."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_configs_do_not_spill():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import kernel_codegen
    finally:
        sys.path.pop(0)
    if kernel_codegen.ptxas_path() is None:
        pytest.skip("no ptxas: the Triton wheel has no NVIDIA backend binaries")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_codegen.py"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("\n") >= 19, proc.stdout  # header + 18 configs
