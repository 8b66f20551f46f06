"""llmembed_fast._matmul: products with a float32 result from low-precision operands, against float64."""

import pytest
import torch

from llmembed_fast._matmul import addmm_acc, mm_f32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("piece", [1 << 24, 5])  # one product, or row pieces of 5 elements (one row each)
def test_addmm_acc_into_strided_view(dtype, piece):
    g = torch.Generator().manual_seed(int(piece) + 7)
    a = torch.randn(13, 29, generator=g).to(dtype)
    b = torch.randn(29, 6, generator=g).to(dtype)
    base = torch.randn(13, 11, generator=g)
    out = base.clone()
    addmm_acc(out[:, 3:9], a, b, piece_elements=piece)  # a column slice: strides (11, 1)
    want = base.double().clone()
    want[:, 3:9] += a.double() @ b.double()
    tol = 1e-5 if dtype == torch.float32 else 5e-2  # fp16/bf16 products on CPU round to the operand dtype
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    # nothing else written
    assert torch.equal(out[:, :3], base[:, :3]) and torch.equal(out[:, 9:], base[:, 9:])


def test_mm_f32_dtype():
    a = torch.randn(4, 3).bfloat16()
    out = mm_f32(a, a.T, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (4, 4)


_TF32_SCRIPT = r"""
import torch
from llmembed_fast import _matmul
torch.cuda.is_available = lambda: True  # the flags are plain settings; no GPU is touched
m = torch.backends.cuda.matmul
torch.backends.fp32_precision = "tf32"  # the new API, as TrainingArguments(tf32=True) sets it
try:
    m.allow_tf32
    raise SystemExit("this torch still reads the legacy flag after the new API: nothing to check")
except RuntimeError:
    pass
with _matmul.tf32(False):
    assert m.fp32_precision == "ieee"
assert m.fp32_precision == "tf32"
with _matmul.tf32(True):
    assert m.fp32_precision == "tf32"
print("ok")
"""


def test_tf32_follows_the_api_in_use():
    """Reading allow_tf32 after fp32_precision was set raises in torch >= 2.9: tf32() must not read it then
    (run in a subprocess: the mix of APIs cannot be undone in a process)."""
    import subprocess
    import sys

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    proc = subprocess.run([sys.executable, "-c", _TF32_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_tf32_legacy_flag_toggled_and_restored(monkeypatch):
    from llmembed_fast import _matmul

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # plain settings; no GPU is touched
    m = torch.backends.cuda.matmul
    prev = m.allow_tf32
    for enabled in (True, False):
        with _matmul.tf32(enabled):
            assert m.allow_tf32 is enabled
        assert m.allow_tf32 is prev


_LEGACY_SCRIPT = r"""
import torch
from llmembed_fast import _matmul
torch.cuda.is_available = lambda: True  # the flags are plain settings; no GPU is touched
m = torch.backends.cuda.matmul
before = m.fp32_precision
with _matmul.tf32(True):
    pass
assert m.fp32_precision == before, (m.fp32_precision, before)
torch.backends.fp32_precision = "tf32"  # a later global setting still reaches matmul (inherit)
assert m.fp32_precision in ("none", "tf32"), m.fp32_precision
print("ok")
"""


def test_tf32_legacy_flag_leaves_fp32_precision_as_it_was():
    """Restoring through the legacy allow_tf32 setter left matmul.fp32_precision at "ieee" instead of the
    caller's "none" (inherit), so a later global fp32_precision no longer reached matmul (subprocess: the
    settings cannot be undone in a process)."""
    import subprocess
    import sys

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    proc = subprocess.run([sys.executable, "-c", _LEGACY_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_out_dtype_refusal_is_remembered_per_key():
    """A torch that refuses out_dtype for a dtype pair (RuntimeError) is asked once per key, not on every
    product (each refused call costs an exception, and timings would measure the fallback unannounced);
    OOM propagates and marks nothing."""
    from llmembed_fast._matmul import _try_once

    calls, ok = [], {}

    def refuse():
        calls.append(1)
        raise RuntimeError("self and mat2 must have the same dtype")

    assert _try_once(ok, ("cuda", torch.bfloat16), refuse) is None
    assert _try_once(ok, ("cuda", torch.bfloat16), refuse) is None
    assert len(calls) == 1 and ok == {("cuda", torch.bfloat16): False}
    assert _try_once(ok, ("cuda", torch.float16), lambda: calls.append(2) or "ran") == "ran"  # still tried
    assert calls == [1, 2]

    def oom():
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        _try_once(ok, ("cuda", torch.float32), oom)
    assert ("cuda", torch.float32) not in ok


def test_paths_counted():
    from llmembed_fast import _matmul

    before = dict(_matmul.PATHS)
    a = torch.randn(4, 3, dtype=torch.bfloat16)
    out = torch.zeros(4, 2)
    addmm_acc(out, a, torch.randn(3, 2, dtype=torch.bfloat16))
    assert _matmul.PATHS["addmm pieces"] == before.get("addmm pieces", 0) + 1  # CPU: pieces
    assert _matmul.PATHS["mm then convert"] == before.get("mm then convert", 0) + 1
