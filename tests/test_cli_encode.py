"""``llmembed-fast encode`` end to end on a tiny model (txt and jsonl inputs, quantized output, errors)."""

import json

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
    assert "--input line 3: invalid JSON" in capsys.readouterr().err
    # the output and the device are checked before the model loads (a missing model would fail later)
    good = tmp_path / "t.txt"
    good.write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "file.npy").write_bytes(b"x")
    for extra, msg in ((["--output", str(tmp_path / "file.npy" / "o")], "FileExistsError"),
                       (["--output", str(tmp_path / "o"), "--device", "foo"], "--device"),
                       (["--output", "."], "is a folder"),
                       (["--output", str(tmp_path) + "/"], "is a folder")):
        assert main(["encode", "--model", str(tmp_path / "no-model"), "--input", str(good), *extra]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["encode", "--model", str(tmp_path / "no-model"), "--input", str(good), "--output",
                 str(tmp_path / "new" / "sub" / "o")]) == 2
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
    assert main([*base, "--input", str(plain), "--output", str(tmp_path / "q8"), "--precision", "int8",
                 "--ranges", str(tmp_path / "ranges.npy")]) == 0
    want = quant.quantize(outs["plain"], "int8", ranges=ranges)
    np.testing.assert_array_equal(np.load(tmp_path / "q8.npy"), want)
    capsys.readouterr()
    np.save(tmp_path / "nan.npy", np.where(np.arange(ranges.size).reshape(ranges.shape) == 3, np.nan, ranges))
    np.save(tmp_path / "flip.npy", ranges[::-1])
    np.save(tmp_path / "ints.npy", np.ones(ranges.shape, np.int64))
    for extra, msg in ((["--precision", "binary", "--ranges", str(tmp_path / "ranges.npy")], "int8 / uint8"),
                       (["--precision", "int8", "--ranges", str(tmp_path / "plain.npy")], "[2, D]"),
                       (["--precision", "int8", "--ranges", str(tmp_path / "none.npy")], "cannot read"),
                       (["--precision", "int8", "--ranges", str(tmp_path / "nan.npy")], "must be finite"),
                       (["--precision", "uint8", "--ranges", str(tmp_path / "flip.npy")], "min > max"),
                       (["--precision", "int8", "--ranges", str(tmp_path / "ints.npy")], "must hold floats")):
        assert main([*base, "--input", str(plain), "--output", str(tmp_path / "x"), *extra]) == 2
        assert msg in capsys.readouterr().err
