"""``llmembed-fast search``: build from .npy, save, reload, query, write results."""

import io
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("llmembed_fast._C", reason="C++ extension not built")
from llmembed_fast import quant  # noqa: E402
from llmembed_fast.bench.core import BenchContext, collect_cases  # noqa: E402
from llmembed_fast.cli import main  # noqa: E402


def test_search_cli_build_save_load_query(tmp_path, capsys):
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((200, 24)).astype(np.float32)
    queries = rng.standard_normal((4, 24)).astype(np.float32)
    np.save(tmp_path / "docs.npy", docs)
    np.save(tmp_path / "q.npy", queries)
    idx = tmp_path / "docs.lfidx"
    assert (
        main(
            [
                "search",
                str(tmp_path / "docs.npy"),
                str(tmp_path / "q.npy"),
                "-k",
                "5",
                "--rescore",
                "float",
                "--save-index",
                str(idx),
                "--output",
                str(tmp_path / "r.npz"),
            ]
        )
        == 0
    )
    r = np.load(tmp_path / "r.npz")
    want = quant.Index(24, "binary", "float").add(docs).search(queries, 5)
    np.testing.assert_array_equal(r["ids"], want[1])
    np.testing.assert_array_equal(r["scores"], want[0])
    assert (
        main(["search", str(idx), str(tmp_path / "q.npy"), "-k", "3", "--output", str(tmp_path / "r.json")])
        == 0
    )
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["ids"] == quant.Index(24, "binary", "float").add(docs).search(queries, 3)[1].tolist()
    assert "queries/s" in capsys.readouterr().out


def test_search_cli_errors(tmp_path, capsys):
    """User errors: ``error: ...`` on stderr, exit code 2, no traceback."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "bad.npy", np.zeros(5, np.float32))
    np.save(tmp_path / "nan.npy", np.full((5, 13), np.nan, np.float32))
    np.save(tmp_path / "docs.npy", rng.standard_normal((20, 13)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((2, 13)).astype(np.float32))
    (tmp_path / "junk.lfidx").write_bytes(b"not an index at all, just some bytes")
    docs, q, missing = str(tmp_path / "docs.npy"), str(tmp_path / "q.npy"), str(tmp_path / "no" / "dir")
    cases = [
        (["search", str(tmp_path / "bad.npy")], "2-D float"),
        (["search", str(tmp_path / "junk.lfidx")], "not a valid"),
        (["search", str(tmp_path / "nan.npy"), q, "-k", "2"], "must be finite"),
        (["search", str(tmp_path / "nan.npy"), q], "k must be in [1, 5]"),  # before the index is built
        (["search", docs, q, "--output", str(tmp_path / "no" / "o.npz")], "cannot write --output"),
        (["search", docs, q, "--output", missing + "/o.npz"], "cannot write --output"),
        (["search", docs, "--save-index", missing + "/x.lfidx"], "cannot write --save-index"),
        (["search", docs, q, "--precision", "int8", "--rescore", "int8"], 'needs precision="binary"'),
        (["search", docs, q, "-k", "21"], "k must be in"),
        (["search", str(tmp_path / "empty.npy")], "cannot read corpus"),  # a 0-byte file: EOFError
        (["search", docs, "--output", str(tmp_path / "o.npz")], "needs QUERIES"),
        (["search", str(tmp_path / "d.lfidx"), q, "--precision", "int8"], "--precision"),
        (["search", str(tmp_path / "d.lfidx"), q, "--rescore", "float"], "--rescore"),
        (["search", docs, str(tmp_path / "q.npz")], "must be a .npy file"),  # np.load gives an NpzFile
        (["search", str(tmp_path / "q.npz")], "must be a .npy file"),  # a .npz corpus: not "wrong magic"
        (["search", docs, str(tmp_path / "q.csv")], "is not a .npy file"),  # not numpy's pickle advice
        (["search", docs, q, "--precision", "int8", "--calibration", str(tmp_path / "q.npz")], ".npy file"),
    ]
    np.savez(tmp_path / "q.npz", q=rng.standard_normal((2, 13)).astype(np.float32))
    (tmp_path / "q.csv").write_text("0.1,0.2\n")
    (tmp_path / "empty.npy").write_bytes(b"")
    assert main(["search", docs, "--save-index", str(tmp_path / "d.lfidx")]) == 0
    for argv, msg in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and "Traceback" not in err, (argv, err)
    # the file numpy writes for --output without a suffix is the one reported
    capsys.readouterr()
    assert main(["search", docs, q, "--output", str(tmp_path / "hits")]) == 0
    assert f"wrote {tmp_path / 'hits.npz'}" in capsys.readouterr().out and (tmp_path / "hits.npz").exists()
    for flag, value in (
        ("--threads", "-1"),
        ("--threads", "0"),
        ("--threads", "x"),
        ("-k", "0"),
        ("--show", "-1"),
        ("--rescore-multiplier", "0"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["search", docs, q, flag, value])
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err
    for budget in ("0", "-5", "nan", "inf"):  # 0 gave an empty table, nan no budget at all
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--budget-s", budget])
        assert exc.value.code == 2 and "--budget-s" in capsys.readouterr().err


def test_search_cli_int8_default_rescore(tmp_path):
    """--precision int8 works with the default --rescore (none for int8, int8 for binary); explicit values
    keep working."""
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((60, 16)).astype(np.float32)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    np.save(tmp_path / "docs.npy", docs)
    np.save(tmp_path / "q.npy", queries)
    for extra, precision, rescore in (
        ([], "binary", "int8"),
        (["--precision", "int8"], "int8", None),
        (["--precision", "int8", "--rescore", "float"], "int8", "float"),
        (["--rescore", "none"], "binary", None),
    ):
        out = tmp_path / "r.npz"
        argv = [
            "search",
            str(tmp_path / "docs.npy"),
            str(tmp_path / "q.npy"),
            "-k",
            "4",
            "--output",
            str(out),
        ]
        assert main(argv + extra) == 0
        want = quant.Index(16, precision, rescore).add(docs).search(queries, 4)
        np.testing.assert_array_equal(np.load(out)["ids"], want[1])
        np.testing.assert_array_equal(np.load(out)["scores"], want[0])


def test_search_cli_index_detected_by_magic_and_big_endian_corpus(tmp_path):
    rng = np.random.default_rng(2)
    docs = rng.standard_normal((40, 12)).astype(np.float32)
    queries = rng.standard_normal((2, 12)).astype(np.float32)
    np.save(tmp_path / "docs_be.npy", docs.astype(">f4"))
    np.save(tmp_path / "q.npy", queries)
    saved = str(tmp_path / "index.npy")  # an index under a .npy name
    assert main(["search", str(tmp_path / "docs_be.npy"), "--save-index", saved]) == 0
    out = str(tmp_path / "r.json")
    assert main(["search", saved, str(tmp_path / "q.npy"), "-k", "3", "--output", out]) == 0
    want = quant.Index(12, "binary", "int8").add(docs).search(queries, 3)
    assert json.loads((tmp_path / "r.json").read_text())["ids"] == want[1].tolist()


def test_bench_cli_argument_errors(tmp_path, capsys):
    """bench: unknown groups, bad --threads / --device and unwritable --json / --plot folders exit 2 before
    anything runs."""
    assert main(["bench", "--only", "quantize"]) == 2
    assert "unknown group" in capsys.readouterr().err
    for argv in (["--threads", "0"], ["--device", "foo"]):
        with pytest.raises(SystemExit) as exc:
            main(["bench", *argv])
        assert exc.value.code == 2
        assert argv[0] in capsys.readouterr().err
    for flag in ("--json", "--plot"):
        assert main(["bench", "--smoke", "--only", "pooling", flag, str(tmp_path / "no" / "x")]) == 2
        assert flag in capsys.readouterr().err
    (tmp_path / "d.png").mkdir()
    t = str(tmp_path)
    # an existing folder, or a name ending in / (--plot wrote the hidden file "DIR/.png" for those)
    for flag, path in (("--json", t), ("--json", t + "/new/"), ("--plot", t + "/d.png"), ("--plot", t + "/"),
                       ("--plot", t + "/new/")):
        assert main(["bench", "--smoke", "--only", "pooling", flag, path]) == 2
        out, err = capsys.readouterr()
        assert err == f"error: {flag} {path!r} is a folder: give a file name\n" and "cases" not in out


def test_search_cli_queries_from_stdin(tmp_path, capsys, monkeypatch):
    """QUERIES ``-`` reads the .npy bytes from standard input (``... | llmembed-fast search docs.lfidx -``):
    the results of the file; junk, an empty input and a ``-`` corpus are errors naming what was read."""
    rng = np.random.default_rng(3)
    docs = rng.standard_normal((30, 16)).astype(np.float32)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    np.save(tmp_path / "docs.npy", docs)
    np.save(tmp_path / "q.npy", queries)
    docs_path = str(tmp_path / "docs.npy")

    def stdin(data: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))

    stdin((tmp_path / "q.npy").read_bytes())
    assert main(["search", docs_path, "-", "-k", "4", "--output", str(tmp_path / "pipe.npz")]) == 0
    assert (
        main(["search", docs_path, str(tmp_path / "q.npy"), "-k", "4", "--output", str(tmp_path / "f.npz")])
        == 0
    )
    pipe, file = np.load(tmp_path / "pipe.npz"), np.load(tmp_path / "f.npz")
    np.testing.assert_array_equal(pipe["ids"], file["ids"])
    np.testing.assert_array_equal(pipe["scores"], file["scores"])
    np.testing.assert_array_equal(
        pipe["ids"], quant.Index(16, "binary", "int8").add(docs).search(queries, 4)[1]
    )
    buf = io.BytesIO()
    np.savez(buf, q=queries)
    for data, msg in (
        (b"0.1,0.2\n", "queries - (standard input) is not a .npy file"),
        (b"", "cannot read queries - (standard input)"),
        (buf.getvalue(), "queries - (standard input) must be a .npy file (one array)"),
    ):
        stdin(data)
        capsys.readouterr()
        assert main(["search", docs_path, "-", "-k", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and "Traceback" not in err, err
    assert main(["search", "-", str(tmp_path / "q.npy")]) == 2
    assert "corpus -: standard input is for QUERIES only" in capsys.readouterr().err


# a child whose files cannot grow past 1 KiB: a write past it fails with EFBIG (SIGXFSZ ignored, not fatal)
LIMITED = ["bash", "-c", 'trap "" XFSZ; ulimit -f 1 && exec "$@"', "bash", sys.executable]


def test_search_cli_output_write_error_keeps_the_old_file(tmp_path):
    """search --output: a write error (a file size limit here, a full disk alike) is an error line, and the
    file is replaced atomically (an old one stays whole, no temporary is left)."""
    rng = np.random.default_rng(4)
    np.save(tmp_path / "docs.npy", rng.standard_normal((100, 8)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((50, 8)).astype(np.float32))
    out = tmp_path / "r.json"
    out.write_text("old")
    argv = [*LIMITED, "-m", "llmembed_fast", "search", str(tmp_path / "docs.npy"), str(tmp_path / "q.npy")]
    proc = subprocess.run([*argv, "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: cannot write --output {str(out)!r}: File too large\n" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["docs.npy", "q.npy", "r.json"]


def test_bench_cli_json_write_error(tmp_path):
    """bench --json: a write error is an error line (no traceback), the file is replaced atomically."""
    out = tmp_path / "b.json"
    out.write_text("old")
    code = (
        "import sys; from llmembed_fast.bench import core; from llmembed_fast.cli import main;"
        "core.collect_cases = lambda ctx: ([], []);"  # no cases: the run is not what is tested
        f"sys.exit(main(['bench', '--device', 'cpu', '--json', {str(out)!r}]))"
    )
    proc = subprocess.run([*LIMITED, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: cannot write --json {str(out)!r}: File too large\n" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["b.json"]


def test_bench_quant_on_cuda_says_why_it_runs_nothing(monkeypatch):
    """bench --only quant on a CUDA device (the default where there is one): no cases, and a note that says
    to give --device cpu and where the GPU figures come from."""
    ctx = BenchContext(device=torch.device("cuda"), smoke=True, only=("quant",))
    cases, notes = collect_cases(ctx)
    assert cases == [] and len(notes) == 1
    assert notes[0].startswith("quant: skipped (") and "--device cpu" in notes[0]
    assert "benchmarks/gpu_sections/quant.py" in notes[0]


def test_search_cli_checks_queries_and_outputs_before_building(tmp_path, capsys):
    """Bad QUERIES (not a .npy, wrong width) and a --save-index folder fail before the index is built."""
    rng = np.random.default_rng(5)
    np.save(tmp_path / "docs.npy", rng.standard_normal((20, 8)).astype(np.float32))
    np.save(tmp_path / "q6.npy", rng.standard_normal((2, 6)).astype(np.float32))
    (tmp_path / "q.csv").write_text("0.1,0.2\n")
    docs = str(tmp_path / "docs.npy")
    for argv, msg in (
        ([docs, str(tmp_path / "q.csv")], "is not a .npy file"),
        ([docs, str(tmp_path / "q6.npy")], "have 6 dimensions, the corpus 8: dimension mismatch"),
        ([docs, "--save-index", str(tmp_path)], f"--save-index {str(tmp_path)!r} is a folder"),
        ([docs, "--save-index", str(tmp_path / "sub") + "/"], "is a folder"),
        # a trailing separator is a folder for --output too (it wrote the hidden file "DIR/.npz")
        ([docs, str(tmp_path / "q.csv"), "--output", str(tmp_path) + "/"], "is a folder"),
        ([docs, str(tmp_path / "q.csv"), "--output", str(tmp_path / "new") + "/"], "is a folder"),
    ):
        assert main(["search", *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and msg in err, (argv, out, err)


def test_search_cli_queries_from_a_pipe_path(tmp_path, capsys):
    """QUERIES given as a pipe's path (/dev/stdin, <(zcat q.npy)) cannot be memory-mapped: read whole, the
    results of the file; a pipe as the corpus is an error saying to give a file."""
    rng = np.random.default_rng(6)
    np.save(tmp_path / "docs.npy", rng.standard_normal((30, 16)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((3, 16)).astype(np.float32))
    docs = str(tmp_path / "docs.npy")

    def pipe_path(data: bytes) -> tuple[str, int]:
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        return f"/dev/fd/{r}", r

    path, fd = pipe_path((tmp_path / "q.npy").read_bytes())
    try:
        assert main(["search", docs, path, "-k", "4", "--output", str(tmp_path / "pipe.npz")]) == 0
    finally:
        os.close(fd)
    assert main(["search", docs, str(tmp_path / "q.npy"), "-k", "4", "--output", str(tmp_path / "f")]) == 0
    pipe, file = np.load(tmp_path / "pipe.npz"), np.load(tmp_path / "f.npz")
    np.testing.assert_array_equal(pipe["ids"], file["ids"])
    np.testing.assert_array_equal(pipe["scores"], file["scores"])
    capsys.readouterr()
    path, fd = pipe_path((tmp_path / "docs.npy").read_bytes()[:1000])
    try:
        assert main(["search", path, str(tmp_path / "q.npy")]) == 2
    finally:
        os.close(fd)
    assert capsys.readouterr().err.startswith(f"error: corpus {path!r} is not a file")


@pytest.mark.parametrize("exc", [TypeError("bad argument"), ImportError("no module named foo")])
def test_bench_provider_that_raises(monkeypatch, capsys, exc):
    """A case provider that raises while building its cases: a missing optional dependency (ImportError) is a
    note, anything else a case that raised, so that bench exits 1 (a transformers API change once showed as
    'skipped' with exit 0)."""
    import sys
    import types

    from llmembed_fast.bench import core
    from llmembed_fast.cli import main

    def cases(ctx):
        raise exc

    monkeypatch.setitem(sys.modules, "llmembed_fast.bench.cases_zzbad", types.SimpleNamespace(cases=cases))
    monkeypatch.setattr(core, "discover_providers", lambda: ["cases_zzbad"])
    got, notes = collect_cases(BenchContext(device=torch.device("cpu"), smoke=True))
    if isinstance(exc, ImportError):
        assert got == [] and notes == ["zzbad: skipped (ImportError: no module named foo)"]
        assert main(["bench", "--device", "cpu", "--smoke"]) == 0
        return
    assert notes == [] and [(c.group, c.name) for c in got] == [("zzbad", "building the cases")]
    assert main(["bench", "--device", "cpu", "--smoke"]) == 1
    err = capsys.readouterr().err
    assert "error: 1 case(s) or baseline(s) raised: building the cases" in err
