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
    # the contrastive paths no GPU run has checked yet are checked first; what the budget drops is listed
    names = [c["name"] for c in data["checks"] if c["section"] == "contrastive"]
    assert any("triangles" in n for n in names[:3]) and any("gemm-logits" in n for n in names)
    assert isinstance(data["skipped"], list)


def test_gpu_suite_order_checks_and_partial_json(tmp_path):
    """--only runs sections in the order given, --checks limits the correctness part, and the JSON holds
    each section's timings as soon as the section ends."""
    out = tmp_path / "suite.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LLMEMBED_FAST_BACKEND": ""}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--smoke", "--budget-s", "120"]
    cmd += ["--json", str(out), "--only", "quant", "pooling", "--checks", "quant", "--weight", "quant=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[pooling] correctness skipped (--checks)" in proc.stdout
    data = json.loads(out.read_text())
    assert {c["section"] for c in data["checks"]} == {"quant"}
    sections = [t["section"] for t in data["timings"]]
    assert sections and sections[0] == "quant" and "pooling" in sections
    assert sections.index("pooling") > max(i for i, s in enumerate(sections) if s == "quant")


def test_a_crashing_case_keeps_the_records_before_it():
    """A section's case that raises (an OOM, a compile failure) leaves the records it yielded and one
    'skipped' record; the section goes on with its next case."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpu_sections.contrastive import _case

    def case():
        yield {"name": "first"}
        raise RuntimeError("boom")

    recs = list(_case("the case", case))
    assert recs[0] == {"name": "first"}
    assert recs[1]["name"] == "the case" and "RuntimeError: boom" in recs[1]["skipped"]


def test_weight_zero_env_record_and_atomic_json(tmp_path):
    """--weight NAME=0 on the only section left does not divide by zero; the env record says how the run
    was made; the JSON is written through a temporary file that is renamed over it (none left behind)."""
    out = tmp_path / "suite.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LLMEMBED_FAST_BACKEND": "", "LLMEMBED_FAST_X": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--smoke", "--budget-s", "60"]
    cmd += ["--json", str(out), "--only", "quant", "--checks", "--weight", "quant=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert not data["errors"] and not data["checks"]
    rec = data["env"]
    assert rec["argv"][-2:] == ["--weight", "quant=0"] and rec["knobs"]["LLMEMBED_FAST_X"] == "1"
    assert rec["python"] == sys.version.split()[0] and rec["llmembed_fast_commit"]
    assert os.listdir(tmp_path) == ["suite.json"]


def test_commit_from_env_without_git(tmp_path, monkeypatch):
    """A copy of the tree without .git (the GPU machine's) records the commit the caller passes."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_suite

    monkeypatch.setattr(gpu_suite, "ROOT", str(tmp_path))  # not a git checkout
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above it either
    monkeypatch.setenv("LLMEMBED_FAST_COMMIT", "abc123")
    assert gpu_suite._baseline_versions()["llmembed_fast_commit"] == "abc123 (from LLMEMBED_FAST_COMMIT)"


def test_quant_coalesced_failure_keeps_the_default_records(monkeypatch):
    """An exception in the opt-in coalesced Hamming scan (timing or check) is recorded beside the
    default kernel's figures instead of ending the section."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from types import SimpleNamespace

    import gpu_suite
    from gpu_sections import quant

    real = quant.hamming_topk

    def flaky(*a, **kw):
        if os.environ.get("LLMEMBED_FAST_HAMMING_COALESCED") == "1":
            raise RuntimeError("coalesced boom")
        return real(*a, **kw)

    monkeypatch.setattr(quant, "hamming_topk", flaky)
    # 20 s left: the coalesced records (>= 15 s) run, the compiled baselines and larger cases (> 20 s) do not
    ctx = SimpleNamespace(device=torch.device("cpu"), smoke=True, bandwidth_Bps=1e10, time_left=lambda: 20.0,
                          bench=lambda fn, **kw: (fn(), 1.0)[1])
    out = list(quant.timings(ctx))
    recs = [r for r in out if "ok" not in r]
    assert recs[0]["ours_ms"] == 1.0 and "coalesced" not in recs[0]["extra"]
    # the coalesced scan is checked, then timed, last (a CUDA fault there would poison every later call),
    # beside the default
    late = [r for r in out if "ok" in r]
    assert [r["name"] for r in out[-3:]] == [late[-1]["name"]] + [r["name"] for r in recs[-2:]]
    assert not late[-1]["ok"] and "coalesced boom" in late[-1]["detail"]
    coalesced = [r for r in recs if "coalesced" in r["name"]]
    assert [r["name"] for r in recs[-2:]] == [r["name"] for r in coalesced] and len(coalesced) == 2
    for r in coalesced:
        assert r["ours_ms"] is None and r["baselines"] == {"default scan": 1.0}
        assert "coalesced boom" in r["extra"]["coalesced"]
        assert "not measured" in gpu_suite._timing_line({**r, "section": "quant"})
    checks = list(quant.correctness(ctx))  # none of them runs the coalesced scan
    assert all(c["ok"] for c in checks) and len(checks) > 10
