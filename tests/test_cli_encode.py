"""``llmembed-fast encode`` end to end on a tiny model (txt and jsonl inputs, quantized output, errors)."""

import io
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from tiny_models import cached_tiny_model_dir

import llmembed_fast as lf
from llmembed_fast.cli import main

TEXTS = ["hello world", "", "the cat sat on the river bank", "money"]


@pytest.fixture(autouse=True)
def _torch_head(monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")


def test_cli_encode_txt_and_jsonl(tmp_path, capsys):
    model = cached_tiny_model_dir("qwen2")
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS) + "\n", encoding="utf-8")
    assert (
        main(
            [
                "encode",
                "--model",
                model,
                "--input",
                str(txt),
                "--output",
                str(tmp_path / "a.npy"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "encoded 4 texts" in capsys.readouterr().out
    assert (
        main(
            [
                "encode",
                "--model",
                model,
                "--input",
                str(jsonl),
                "--field",
                "body",
                "--output",
                str(tmp_path / "b.npy"),
                "--device",
                "cpu",
                "--precision",
                "ubinary",
                "--no-progress",
            ]
        )
        == 0
    )
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    want = lf.LLMEmbedder.from_pretrained(model, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(a, want, atol=2e-6, rtol=0)
    assert b.dtype == np.uint8 and b.shape == (4, 8)
    np.testing.assert_array_equal(np.unpackbits(b, axis=1).astype(bool), want > 0)


def test_cli_encode_errors(tmp_path, capsys):
    assert (
        main(
            [
                "encode",
                "--model",
                "x",
                "--input",
                str(tmp_path / "missing.txt"),
                "--output",
                str(tmp_path / "o.npy"),
            ]
        )
        == 2
    )
    assert "--input" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": "x"}\n', encoding="utf-8")
    assert main(["encode", "--model", "x", "--input", str(bad), "--output", str(tmp_path / "o.npy")]) == 2
    assert "--field" in capsys.readouterr().err
    bad.write_text('"a"\n"b"\n{"text": "c" "d"}\n', encoding="utf-8")
    assert main(["encode", "--model", "x", "--input", str(bad), "--output", str(tmp_path / "o.npy")]) == 2
    assert f"--input {str(bad)!r} line 3: invalid JSON" in capsys.readouterr().err
    # the output and the device are checked before the model loads (a missing model would fail later)
    good = tmp_path / "t.txt"
    good.write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "file.npy").write_bytes(b"x")
    for extra, msg in (
        (["--output", str(tmp_path / "file.npy" / "o")], "FileExistsError"),
        (["--output", str(tmp_path / "o"), "--device", "foo"], "--device"),
        (["--output", "."], "is a folder"),
        (["--output", str(tmp_path) + "/"], "is a folder"),
    ):
        assert main(["encode", "--model", str(tmp_path / "no-model"), "--input", str(good), *extra]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert (
        main(
            [
                "encode",
                "--model",
                str(tmp_path / "no-model"),
                "--input",
                str(good),
                "--output",
                str(tmp_path / "new" / "sub" / "o"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "new").exists()  # a failed run leaves no empty folders behind
    # lines end at \n only: a lone \r is text (universal newlines split there and shifted later rows)
    crlf = tmp_path / "cr.txt"
    crlf.write_bytes(b"first\rstill first\r\nsecond\n")
    from llmembed_fast.cli_encode import read_texts

    assert read_texts(str(crlf)) == ["first\rstill first", "second"]
    (tmp_path / "latin.txt").write_bytes(b"ok\nfine\ncaf\xe9\n")
    assert main(["encode", "--model", "x", "--input", str(tmp_path / "latin.txt"), "--output", "o"]) == 2
    assert "line 3, column 4: not UTF-8 (byte 0xe9)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["encode", "--model", "x", "--input", "y", "--output", "z", "--precision", "int4"])


def test_cli_encode_model_errors_and_output_suffix(tmp_path, capsys):
    txt = tmp_path / "texts.txt"
    txt.write_text("hello world\nmoney\n", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    for model in (str(tmp_path / "no-such-model"), str(tmp_path / "empty")):
        argv = ["encode", "--model", model, "--input", str(txt), "--output", str(tmp_path / "o.npy")]
        assert main(argv + ["--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "path_or_id" in err and "Traceback" not in err
    model = cached_tiny_model_dir("qwen2")
    argv = ["encode", "--model", model, "--input", str(txt), "--device", "cpu", "--no-progress"]
    assert main(argv + ["--output", str(tmp_path / "o.npy"), "--dims", "1000"]) == 2  # a ValueError
    assert "dims" in capsys.readouterr().err
    assert main(argv + ["--output", str(tmp_path / "emb")]) == 0  # np.save appends .npy: say so
    assert f"-> {tmp_path / 'emb.npy'} " in capsys.readouterr().out
    assert np.load(tmp_path / "emb.npy").shape == (2, 64)


def test_cli_encode_bom_and_shared_ranges(tmp_path, capsys):
    """A UTF-8 byte-order mark is not part of the first text (.txt and .jsonl); --ranges quantizes int8 with
    given ranges, so separately encoded files share one scale."""
    from llmembed_fast import quant

    model = cached_tiny_model_dir("qwen2")
    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    bom.write_text("\n".join(TEXTS) + "\n", encoding="utf-8-sig")
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_text("\n".join(json.dumps(t) for t in TEXTS) + "\n", encoding="utf-8-sig")
    array = tmp_path / "arr.json"  # a .json array (it was read as lines of text)
    array.write_text(json.dumps([{"text": t} for t in TEXTS], indent=1), encoding="utf-8")
    base = ["encode", "--model", model, "--device", "cpu", "--no-progress"]
    outs = {}
    for name, src in (("plain", plain), ("bom", bom), ("jsonl", jsonl), ("json", array)):
        assert main([*base, "--input", str(src), "--output", str(tmp_path / name)]) == 0
        outs[name] = np.load(tmp_path / f"{name}.npy")
    np.testing.assert_array_equal(outs["bom"], outs["plain"])
    np.testing.assert_array_equal(outs["jsonl"], outs["plain"])
    np.testing.assert_array_equal(outs["json"], outs["plain"])
    ranges = quant.calibrate(outs["plain"] * 2)
    np.save(tmp_path / "ranges.npy", ranges)
    assert (
        main(
            [
                *base,
                "--input",
                str(plain),
                "--output",
                str(tmp_path / "q8"),
                "--precision",
                "int8",
                "--ranges",
                str(tmp_path / "ranges.npy"),
            ]
        )
        == 0
    )
    want = quant.quantize(outs["plain"], "int8", ranges=ranges)
    np.testing.assert_array_equal(np.load(tmp_path / "q8.npy"), want)
    capsys.readouterr()
    np.save(tmp_path / "nan.npy", np.where(np.arange(ranges.size).reshape(ranges.shape) == 3, np.nan, ranges))
    np.save(tmp_path / "flip.npy", ranges[::-1])
    np.save(tmp_path / "ints.npy", np.ones(ranges.shape, np.int64))
    for extra, msg in (
        (["--precision", "binary", "--ranges", str(tmp_path / "ranges.npy")], "int8 / uint8"),
        (["--precision", "int8", "--ranges", str(tmp_path / "plain.npy")], "[2, D]"),
        (["--precision", "int8", "--ranges", str(tmp_path / "none.npy")], "cannot read"),
        (["--precision", "int8", "--ranges", str(tmp_path / "nan.npy")], "must be finite"),
        (["--precision", "uint8", "--ranges", str(tmp_path / "flip.npy")], "min > max"),
        (["--precision", "int8", "--ranges", str(tmp_path / "ints.npy")], "must hold floats"),
    ):
        assert main([*base, "--input", str(plain), "--output", str(tmp_path / "x"), *extra]) == 2
        assert msg in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("a single text\n", encoding="utf-8")
    # one text cannot calibrate its own int8 ranges (every code would be the same): refused before loading
    assert main([*base, "--input", str(one), "--output", str(tmp_path / "x1"), "--precision", "uint8"]) == 2
    assert "one text cannot calibrate its own ranges" in capsys.readouterr().err
    assert not (tmp_path / "x1.npy").exists()
    ok = [*base, "--input", str(one), "--output", str(tmp_path / "x1"), "--precision", "int8"]
    assert main([*ok, "--ranges", str(tmp_path / "ranges.npy")]) == 0


def _stdin(monkeypatch, data: bytes) -> None:
    """Standard input holding ``data`` (read through .buffer, as the CLI reads it)."""
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))


def test_cli_encode_stdin_txt_like_a_file(tmp_path, capsys, monkeypatch):
    """``--input -`` reads standard input as a .txt file is read: UTF-8 bytes, a byte-order mark dropped,
    lines ending at \\n (CRLF stripped, a lone \\r kept), the same errors naming --input."""
    from llmembed_fast.cli_encode import read_texts

    model = cached_tiny_model_dir("qwen2")
    data = ("\n".join(TEXTS) + "\n").encode("utf-8-sig").replace(b"\n", b"\r\n")
    src = tmp_path / "bom_crlf.txt"
    src.write_bytes(data)
    base = ["encode", "--model", model, "--device", "cpu", "--no-progress"]
    assert main([*base, "--input", str(src), "--output", str(tmp_path / "file")]) == 0
    _stdin(monkeypatch, data)
    assert main([*base, "--input", "-", "--output", str(tmp_path / "pipe")]) == 0
    assert "encoded 4 texts" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "pipe.npy"), np.load(tmp_path / "file.npy"))
    want = lf.LLMEmbedder.from_pretrained(model, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(np.load(tmp_path / "pipe.npy"), want, atol=2e-6, rtol=0)
    # the reader itself: the same texts from the file and from standard input
    raw = b"\xef\xbb\xbfcaf\xc3\xa9\rstill first\r\nsecond\n\nlast"
    (tmp_path / "raw.txt").write_bytes(raw)
    _stdin(monkeypatch, raw)
    assert (
        read_texts("-")
        == read_texts(str(tmp_path / "raw.txt"))
        == ["café\rstill first", "second", "", "last"]
    )
    # not UTF-8: the file's message, by line and column
    bad = b"ok\nfine\ncaf\xe9\n"
    (tmp_path / "latin.txt").write_bytes(bad)
    capsys.readouterr()
    assert main(["encode", "--model", "x", "--input", str(tmp_path / "latin.txt"), "--output", "o"]) == 2
    file_err = capsys.readouterr().err
    _stdin(monkeypatch, bad)
    assert main(["encode", "--model", "x", "--input", "-", "--output", "o"]) == 2
    err = capsys.readouterr().err
    assert "error: --input - (standard input) line 3, column 4: not UTF-8 (byte 0xe9)" in err
    assert err.replace("- (standard input)", repr(str(tmp_path / "latin.txt"))) == file_err
    # empty: an error, as for an empty file (nothing to encode, no model loaded)
    (tmp_path / "empty.txt").write_bytes(b"")
    assert main(["encode", "--model", "x", "--input", str(tmp_path / "empty.txt"), "--output", "o"]) == 2
    assert "holds no texts" in capsys.readouterr().err
    _stdin(monkeypatch, b"")
    assert main(["encode", "--model", "x", "--input", "-", "--output", "o"]) == 2
    assert "error: --input - (standard input) holds no texts" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", None)  # started with stdin closed (<&-)
    assert main(["encode", "--model", "x", "--input", "-", "--output", "o"]) == 2
    assert "--input -: there is no standard input" in capsys.readouterr().err


def test_cli_encode_stdin_jsonl_json_and_input_format(tmp_path, capsys, monkeypatch):
    """--input-format reads standard input as jsonl / json (with --field) and overrides a file's suffix; a
    bad value is an argument error naming --input-format."""
    from llmembed_fast.cli_encode import read_texts

    model = cached_tiny_model_dir("qwen2")
    base = ["encode", "--model", model, "--device", "cpu", "--no-progress"]
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    assert main([*base, "--input", str(plain), "--output", str(tmp_path / "plain")]) == 0
    want = np.load(tmp_path / "plain.npy")
    jsonl = "\n".join(json.dumps({"body": t}) for t in TEXTS).encode() + b"\n"
    _stdin(monkeypatch, jsonl)
    argv = [
        *base,
        "--input",
        "-",
        "--input-format",
        "jsonl",
        "--field",
        "body",
        "--output",
        str(tmp_path / "a"),
    ]
    assert main(argv) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), want)
    _stdin(monkeypatch, json.dumps([{"body": t} for t in TEXTS]).encode("utf-8-sig"))
    argv[argv.index("jsonl")] = "json"
    assert main(argv) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), want)
    # a misleading suffix: jsonl lines in a .txt, text lines in a .json
    (tmp_path / "lines.txt").write_bytes(jsonl)
    assert read_texts(str(tmp_path / "lines.txt"), "body", "jsonl") == TEXTS
    assert read_texts(str(tmp_path / "lines.txt"), "body")[0] == '{"body": "hello world"}'  # by suffix: txt
    (tmp_path / "plain.json").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    assert read_texts(str(tmp_path / "plain.json"), fmt="txt") == TEXTS
    argv = [*base, "--input", str(tmp_path / "lines.txt"), "--input-format", "jsonl", "--field", "body"]
    assert main([*argv, "--output", str(tmp_path / "b")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), want)
    capsys.readouterr()
    # errors name the argument; without --field the jsonl objects lack "text"
    _stdin(monkeypatch, jsonl)
    assert main(["encode", "--model", "x", "--input", "-", "--input-format", "jsonl", "--output", "o"]) == 2
    assert "--input - (standard input) line 1: no field 'text' (use --field)" in capsys.readouterr().err
    _stdin(monkeypatch, b"[1, 2")
    assert main(["encode", "--model", "x", "--input", "-", "--input-format", "json", "--output", "o"]) == 2
    assert "--input - (standard input): invalid JSON" in capsys.readouterr().err
    for fmt in ("xml", "JSONL", ""):
        with pytest.raises(SystemExit) as exc:
            main(["encode", "--model", "x", "--input", "-", "--input-format", fmt, "--output", "o"])
        assert exc.value.code == 2
        assert "argument --input-format: invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--input-format: expected one of txt, jsonl, json, got 'xml'"):
        read_texts(str(plain), fmt="xml")


def test_cli_encode_stdin_pipe_ignores_the_locale(tmp_path):
    """A real pipe into ``python -m llmembed_fast`` under a C / latin-1 locale: the bytes are read as UTF-8
    (café stays café), as from a file."""
    model = cached_tiny_model_dir("qwen2")
    texts = ["café au lait", "naïve – ünïcödé", "plain"]
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": "latin-1", "PYTHONUTF8": "0"}
    out = tmp_path / "pipe.npy"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmembed_fast",
            "encode",
            "--model",
            model,
            "--input",
            "-",
            "--output",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ],
        input=("\n".join(texts) + "\n").encode("utf-8"),
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert b"encoded 3 texts" in proc.stdout
    want = lf.LLMEmbedder.from_pretrained(model, device="cpu").encode(texts)
    np.testing.assert_allclose(np.load(out), want, atol=2e-6, rtol=0)


def test_cli_encode_output_dash_writes_the_npy_to_stdout(tmp_path, capsys, monkeypatch):
    """``--output -`` writes the .npy bytes to standard output (so encode pipes into ``search INDEX -``) and
    the status line to stderr; nothing else reaches stdout."""
    model = cached_tiny_model_dir("qwen2")
    src = tmp_path / "t.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    base = ["encode", "--model", model, "--device", "cpu", "--no-progress", "--input", str(src)]
    assert main([*base, "--output", str(tmp_path / "file.npy")]) == 0
    capsys.readouterr()
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", out)
    assert main([*base, "--output", "-", "--precision", "float32"]) == 0
    out.flush()
    got = np.load(io.BytesIO(out.buffer.getvalue()), allow_pickle=False)
    np.testing.assert_array_equal(got, np.load(tmp_path / "file.npy"))
    assert "encoded 4 texts -> standard output" in capsys.readouterr().err
    assert not (tmp_path / "-.npy").exists() and not os.path.exists("-.npy")


def test_cli_encode_write_error_keeps_the_old_file(tmp_path):
    """A write error (here a 1 KiB file size limit, a full disk alike) is an error, not a truncated file
    reported as written; the output is replaced atomically: an old file stays whole, no temporary is left."""
    src = tmp_path / "t.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    keep = tmp_path / "keep.npy"
    np.save(keep, np.arange(3.0))
    limited = ["bash", "-c", 'trap "" XFSZ; ulimit -f 1 && exec "$@"', "bash"]  # 1 KiB; EFBIG, not SIGXFSZ
    argv = [sys.executable, "-m", "llmembed_fast", "encode", "--model", cached_tiny_model_dir("qwen2")]
    argv += ["--input", str(src), "--output", str(keep), "--device", "cpu", "--no-progress"]
    proc = subprocess.run([*limited, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: cannot write --output {str(keep)!r}: File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    np.testing.assert_array_equal(np.load(keep), np.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["keep.npy", "t.txt"]


def test_cli_encode_output_dash_broken_pipe_exits_quietly(tmp_path, capsys, monkeypatch):
    """``--output - | head -c 10``: the reader left; encode exits quietly as ``info | head`` does (exit code
    1, no error line)."""
    src = tmp_path / "t.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")

    class Gone(io.RawIOBase):
        def write(self, b):
            raise BrokenPipeError(32, "Broken pipe")

    fd = os.open(os.devnull, os.O_WRONLY)  # main points the dead stdout's descriptor at devnull
    try:
        monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(buffer=Gone(), fileno=lambda: fd))
        base = ["encode", "--model", cached_tiny_model_dir("qwen2"), "--device", "cpu", "--no-progress"]
        assert main([*base, "--input", str(src), "--output", "-"]) == 1
        assert capsys.readouterr().err == ""
    finally:
        os.close(fd)


def test_cli_encode_output_dash_with_stdout_closed(tmp_path, capsys, monkeypatch):
    """``--output -`` with standard output closed (``>&-``): an error before the model loads."""
    src = tmp_path / "t.txt"
    src.write_text("a\n", encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["encode", "--model", "no-model", "--input", str(src), "--output", "-"]) == 2
    assert capsys.readouterr().err == (
        "error: --output -: there is no standard output to write (started with it closed)\n"
    )


def test_cli_encode_deep_json_is_invalid_json(tmp_path, capsys):
    """JSON nested past the parser's depth (RecursionError) is reported as invalid JSON naming the source."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "d.json").write_text(deep)
    (tmp_path / "d.jsonl").write_text('"ok"\n' + deep + "\n")
    for name, where in (("d.json", ":"), ("d.jsonl", " line 2:")):
        path = str(tmp_path / name)
        assert main(["encode", "--model", "x", "--input", path, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --input {path!r}{where} invalid JSON (nested too deeply)"), err


def test_cli_encode_bad_model_folder(tmp_path, capsys):
    """A corrupt or invalid --model folder (truncated weights, a bad config value) is one error line naming
    --model, whatever the loader raises."""
    import shutil

    model = cached_tiny_model_dir("qwen2")
    torn, bad = tmp_path / "torn", tmp_path / "bad"
    shutil.copytree(model, torn)
    shutil.copytree(model, bad)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": "x"}))
    src = tmp_path / "t.txt"
    src.write_text("a\n", encoding="utf-8")
    for m in (torn, bad):
        assert main(["encode", "--model", str(m), "--input", str(src), "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot load --model {m}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o.npy").exists()


def test_cli_encode_input_from_a_pipe_path(tmp_path, capsys):
    """--input /dev/stdin or <(zcat f) (a pipe named by a path) is read like a file; a folder is an error."""
    from llmembed_fast.cli_encode import read_texts

    for data, fmt, want in ((b"a\nb\n", None, ["a", "b"]), (b'["x", "y"]', "json", ["x", "y"])):
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        try:
            assert read_texts(f"/dev/fd/{r}", fmt=fmt) == want
        finally:
            os.close(r)
    assert main(["encode", "--model", "x", "--input", str(tmp_path), "--output", "o"]) == 2
    assert f"--input {str(tmp_path)!r} is a folder" in capsys.readouterr().err


def test_cli_encode_no_progress_hides_the_loading_bar(tmp_path, capsys):
    """--no-progress turns transformers' weight-loading bar off too, and back on after."""
    from transformers.utils import logging as hf_logging

    src = tmp_path / "t.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    argv = ["encode", "--model", cached_tiny_model_dir("qwen2"), "--device", "cpu", "--input", str(src)]
    assert hf_logging.is_progress_bar_enabled()
    assert main([*argv, "--output", str(tmp_path / "a"), "--no-progress"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_cli_ctrl_c_says_interrupted(tmp_path, capsys, monkeypatch):
    """Ctrl-C: ``interrupted`` on stderr, exit code 130, no traceback."""
    import llmembed_fast.cli_encode as cli_encode

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    src = tmp_path / "t.txt"
    src.write_text("a\n", encoding="utf-8")
    monkeypatch.setattr(cli_encode, "_encode", interrupt)
    try:
        rc = main(["encode", "--model", "x", "--input", str(src), "--output", str(tmp_path / "o")])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped cli.main")
    assert rc == 130 and capsys.readouterr().err == "interrupted\n"
