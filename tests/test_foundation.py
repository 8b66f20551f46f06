"""Backend dispatch, lf.info(), the extension door and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

import llmembed_fast as lf
from llmembed_fast import _dispatch, _ext, cli


def test_dispatch_rules(monkeypatch):
    cpu = torch.empty(2)
    monkeypatch.delenv("LLMEMBED_FAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch.select_backend(cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.select_backend(cpu) == ("triton" if _dispatch.triton_available() else "torch")
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    assert _dispatch.select_backend(cpu) == "torch"
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "TRITON")
    if _dispatch.triton_available():
        assert _dispatch.select_backend(cpu) == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _dispatch.select_backend(cpu)
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LLMEMBED_FAST_BACKEND"):
        _dispatch.select_backend(cpu)


def test_backends_agree_on_the_same_call(monkeypatch):
    hidden = torch.randn(3, 11, 20)
    mask = torch.rand(3, 11) > 0.2
    results = {}
    for be in ("torch", "triton") if _dispatch.triton_available() else ("torch",):
        monkeypatch.setenv("LLMEMBED_FAST_BACKEND", be)
        results[be] = lf.pool(hidden, mask, "weighted_mean", dims=[5, 20], normalize=True)
    if "triton" in results:
        for a, b in zip(results["torch"], results["triton"], strict=False):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_info_reports_versions_backends_and_extension():
    data = lf.info()
    assert data["llmembed_fast"] == lf.__version__
    assert data["versions"]["torch"] == torch.__version__
    assert set(data["backends"]) >= {"triton_available", "triton_interpreter", "cuda_available"}
    assert "flags" in data["cpu"]
    assert data["extension"]["built"] == (_ext.extension() is not None)
    json.dumps(data)  # serializable


def test_extension_door_names_the_build_command(monkeypatch):
    if _ext.extension() is not None:
        assert _ext.ops().pack_bits is not None
    monkeypatch.setattr(_ext, "_load", lambda: (None, "ImportError: not built"))
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        _ext.require("quantize")


def test_cli_info_and_help(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "llmembed_fast" in out and "backends" in out
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["llmembed_fast"] == lf.__version__
    proc = subprocess.run(
        [sys.executable, "-m", "llmembed_fast.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "bench" in proc.stdout


def test_cli_bench_runs_a_tiny_budget(tmp_path, monkeypatch, capsys):
    """The bench command collects the pooling cases and writes JSON (timing itself is not asserted)."""
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--only", "pooling", "--budget-s", "1", "--smoke", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["records"], "no bench records"
    assert all(r["group"] == "pooling" for r in data["records"])
    assert not any("error" in r for r in data["records"])


def test_cli_bench_fails_when_a_case_raises(tmp_path, monkeypatch, capsys):
    """--smoke "checks that every case runs": a case that raises is in the table and the JSON, and the exit
    status is 1 (it was 0, so a smoke run could not fail)."""
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "triton")  # cannot run on CPU tensors without the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--only", "contrastive", "--budget-s", "1", "--smoke", "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "raised" in err, err
    assert any("error" in r for r in json.loads(out.read_text())["records"])


def test_info_reports_a_backend_that_cannot_run(monkeypatch, tmp_path):
    """info() (and `llmembed-fast info`, and the bench JSON that embeds it) reports a forced backend that
    cannot run on CPU tensors, or a bad LLMEMBED_FAST_BACKEND, instead of raising."""
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "bogus")
    assert lf.info()["backends"]["default_for_cpu_tensors"].startswith("error: ")
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "triton")
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    assert lf.info()["backends"]["default_for_cpu_tensors"].startswith("error: ")
    assert cli.main(["info"]) == 0


def test_import_and_eager_calls_load_neither_dynamo_nor_triton():
    """``import llmembed_fast`` (every CLI call) stays at torch's own import cost, and so do eager calls of
    the ops: their compile guards import torch._dynamo (and through it triton, ~1 s) only when a compile
    traces them (at import it doubled the import time; on the first call it went into the CLI's timed
    search)."""
    code = (
        "import sys, torch, llmembed_fast as lf, llmembed_fast.quant as q, llmembed_fast.modules; "
        "print(sorted(m for m in ('torch._dynamo', 'triton', 'transformers') if m in sys.modules)); "
        "x = torch.randn(6, 16); c = q.quantize(x, 'ubinary'); q.hamming_topk(c, c, 2); "
        "q.int8_topk(x, q.quantize(x, 'int8'), q.calibrate(x), 2); "
        "lf.pool(x[None], torch.ones(1, 6), 'mean'); lf.contrastive_loss(x, x, temperature=0.1); "
        "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch paths, as users run
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["[]", "[]"], out.stdout + out.stderr


def test_a_bad_simd_cap_is_reported_not_ignored():
    if _ext.extension() is None:
        pytest.skip("the C++ extension is not built")
    code = "import llmembed_fast._ext as e; e.extension()"
    env = dict(__import__("os").environ, LLMEMBED_FAST_SIMD="AVX2")
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env
    )
    assert "LLMEMBED_FAST_SIMD='AVX2' is not one of" in out.stderr


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "llmembed_fast", "info", "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout)["llmembed_fast"] == lf.__version__


def test_sdist_needs_no_torch_and_a_wheel_build_says_why(tmp_path):
    """`python -m build --sdist` runs setup.py in an isolated environment without torch: the source archive
    (C++ sources included, by MANIFEST.in) is written anyway; building the extension without torch still stops
    with the message naming the fix."""
    import os
    import pathlib
    import tarfile

    root = pathlib.Path(__file__).resolve().parents[1]
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("no torch in this environment (test)")\n')
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    env.pop("LLMEMBED_FAST_NO_EXT", None)
    (tmp_path / "eggs").mkdir()
    sdist = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "egg_info",
            "--egg-base",
            str(tmp_path / "eggs"),
            "sdist",
            "-d",
            str(tmp_path / "dist"),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sdist.returncode == 0, sdist.stderr[-2000:]
    (archive,) = (tmp_path / "dist").glob("llmembed_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"setup.py", "csrc/core/hamming.cpp", "csrc/cuda/quant.cu", "CMakeLists.txt"} <= names
    wheel = subprocess.run(
        [sys.executable, "setup.py", "-q", "bdist_wheel", "-d", str(tmp_path / "dist")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wheel.returncode != 0
    assert (
        "needs torch" in wheel.stdout + wheel.stderr and "--no-build-isolation" in wheel.stdout + wheel.stderr
    )


def test_write_atomic_keeps_the_old_file_on_any_failure(tmp_path):
    """cli.write_atomic (encode, search and bench outputs): an interrupted or failed write leaves the old file
    whole and no temporary; a new file gets open()'s mode, a replaced one keeps its own."""
    import os
    import stat

    import numpy as np

    path = tmp_path / "f.npy"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)

    def half_then_ctrl_c(f):
        f.write(b"new, half written")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.write_atomic(str(path), half_then_ctrl_c)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.npy"]
    cli.write_atomic(str(path), lambda f: np.save(f, np.arange(4)))  # numpy writes through f.write
    np.testing.assert_array_equal(np.load(path), np.arange(4))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    cli.write_atomic(str(tmp_path / "new.json"), b"{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "new.json").read_bytes() == b"{}"
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o666 & ~mask


def test_missing_optional_dependencies_name_the_extra():
    """Without transformers / sentence-transformers, the entry points that need them raise an ImportError
    naming the extra to install (it was a bare ModuleNotFoundError from deep inside); the rest imports."""
    code = "\n".join([
        "import builtins",
        "real = builtins.__import__",
        "def fake(name, *a, **k):",
        "    top = name.split('.')[0]",
        "    if top in ('transformers', 'sentence_transformers'):",
        "        raise ModuleNotFoundError(f'No module named {top!r}', name=top)",
        "    return real(name, *a, **k)",
        "builtins.__import__ = fake",
        "import importlib, llmembed_fast as lf",
        "for f in (lambda: lf.LLMEmbedder.from_pretrained('x'),",
        "          lambda: importlib.import_module('llmembed_fast.integrations.hf_trainer'),",
        "          lambda: importlib.import_module('llmembed_fast.integrations.sentence_transformers')):",
        "    try:",
        "        f()",
        "    except ImportError as e:",
        "        print(type(e).__name__, '|', e)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout + out.stderr
    for line, extra in zip(lines, ("hf", "hf", "st"), strict=True):
        assert line.startswith("ImportError | ") and f"pip install 'llmembed-fast[{extra}]'" in line, line
    from llmembed_fast._deps import raise_missing

    def raised(exc):
        try:
            raise_missing(exc, "transformers", "hf", "x")
        except ImportError as e:
            return e

    absent = ModuleNotFoundError("No module named 'transformers'", name="transformers")
    assert "llmembed-fast[hf]" in str(raised(absent)) and raised(absent).__cause__ is absent
    sub = ModuleNotFoundError("No module named 'transformers.foo'", name="transformers.foo")
    assert raised(sub) is sub  # installed, another version: not "install it"
    broken = ImportError("cannot import name 'X' from 'transformers'")  # installed but broken: unchanged
    assert raised(broken) is broken
    unrelated = ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
    assert raised(unrelated) is unrelated
