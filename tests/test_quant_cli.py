"""``llmembed-fast search``: build from .npy, save, reload, query, write results."""

import json

import numpy as np
import pytest

pytest.importorskip("llmembed_fast._C", reason="C++ extension not built")
from llmembed_fast import quant  # noqa: E402
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


def test_search_cli_errors(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros(5, np.float32))
    with pytest.raises(SystemExit, match="2-D float"):
        main(["search", str(tmp_path / "bad.npy")])
    (tmp_path / "junk.lfidx").write_bytes(b"not an index at all, just some bytes")
    with pytest.raises(SystemExit, match="not a valid"):
        main(["search", str(tmp_path / "junk.lfidx")])
