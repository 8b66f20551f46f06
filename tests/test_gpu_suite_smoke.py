"""benchmarks/gpu_suite.py runs end to end on CPU (--smoke: tiny shapes through the Triton interpreter), so a
broken section shows here rather than on a GPU machine's scarce time."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LLMEMBED_FAST_BACKEND": ""}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "gpu_suite.py"),
            "--smoke",
            "--budget-s",
            "240",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["checks"] and all(c["ok"] for c in data["checks"])
    assert {c["section"] for c in data["checks"]} >= {"pooling"}
    assert data["timings"] and not data["errors"]
