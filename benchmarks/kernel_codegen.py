"""Registers and spills of the contrastive kernels' shipped tile configs, compiled for sm_90a without a GPU.

Triton compiles ahead of time for any target and ships ``ptxas``; ``ptxas -v`` on the PTX tells how many
registers a config uses and how many bytes per thread it spills to local memory. A config that spills runs
its inner loop through memory (the Matryoshka gradient kernel spilled 1.2 KB per thread before it was
restructured), so this is the CPU-side check of GPU code generation: run it after changing a kernel or a
config. Timing still needs a GPU (``benchmarks/gpu_suite.py``).

    python benchmarks/kernel_codegen.py            # bf16: one dim or five (both loops) x plain/cols/tri
    python benchmarks/kernel_codegen.py --all      # float32 too
    python benchmarks/kernel_codegen.py --check    # exit 1 if a config spills more than 32 B/thread
    python benchmarks/kernel_codegen.py --pooling  # the pooling kernels' autotune configs (a report)

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Integer arguments that real launches pass as multiples of 16 (Triton specializes on it); the rest are i32.
_DIV16_INTS = {
    "M", "NC", "Mc", "r0", "cols_per_split", "ncol", "stride_x", "stride_y", "stride_sk", "stride_sm",
    "stride_hk", "stride_hm", *(f"b{i}" for i in range(9)),
}  # fmt: skip
_TRITON_DTYPE = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


# The tile configs were chosen from ptxas reports and H200 timings with this Triton (the GPU machine's);
# another Triton's code generation may spill differently (3.9: the forward's 128 x 128 column config, 44 B).
TUNED_TRITON = "3.6"


def triton_is_tuned_version() -> bool:
    import triton

    return triton.__version__.split("+")[0].rsplit(".", 1)[0] == TUNED_TRITON


def ptxas_path() -> str | None:
    """The ptxas Triton itself uses for sm_90 (Triton 3.9 ships two: its ``ptxas`` is CUDA 12.9's, which
    rejects the PTX 9.x it emits, and ``ptxas-blackwell`` is the one it runs), else one on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - no NVIDIA backend, or a Triton without this helper
        pass
    import triton

    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return here if os.path.exists(here) else shutil.which("ptxas")


def _signature(fn, pointer_types: dict[str, str], constexprs: dict):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in _DIV16_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_stats(fn, pointer_types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    """Compile ``fn`` for sm_90a and read ptxas's report: {"registers", "spill_stores", "spill_loads"}
    (bytes per thread)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = _signature(fn, pointer_types, constexprs)
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run(
            [ptxas_path(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas output:\n{out}")
    stores, loads = int(spill.group(1)), int(spill.group(2))
    return {"registers": int(regs.group(1)), "spill_stores": stores, "spill_loads": loads}


# Matryoshka bounds of the cases: K = 5 is the suite's matryoshka5 at D = 1024 (single-loop aligned); "ranges"
# forces the one-loop-per-range path that unaligned bounds take.
BOUNDS = {1: (0, 1024), 5: (0, 64, 128, 256, 512, 1024)}


def contrastive_case(kernel: str, dtype, K: int, mode: str, loop: str = "auto", D: int = 1024,
                     pre_s: bool = False):
    """(kernel fn, pointer types, constexprs, config) of the contrastive kernel the launcher would run.
    ``mode``: "plain", "cols" (the fused symmetric term) or "tri" (a same-tower triangle); ``loop``:
    "auto" (what the launcher picks for ``BOUNDS[K]``) or "ranges" (one loop per Matryoshka range);
    ``pre_s``: the cuBLAS-logits mode (``LLMEMBED_FAST_CONTRASTIVE_LOGITS=gemm``), logits read from memory."""
    import triton

    from triton_kernels import contrastive as C

    cfg, single = C.launch_config(dtype, D, BOUNDS[K], kernel, mode == "cols", mode == "tri", pre_s)
    if loop == "ranges":
        cfg = C._config(dtype, D, K, kernel, cols=mode != "plain", tri=mode == "tri", pre_s=pre_s)
        single = False
    x_t = _TRITON_DTYPE[str(dtype).removeprefix("torch.")]
    h_t = _TRITON_DTYPE[str(C.grad_dtype(dtype)).removeprefix("torch.")]
    ptrs = {"x_ptr": x_t, "y_ptr": x_t, "xidx_ptr": "*i64", "spec_ptr": "*i64", "h_ptr": h_t}
    consts = dict(
        K=K,
        COLS=mode == "cols",
        TRI=mode == "tri",
        EXCL=mode == "tri",  # a same-tower term leaves its diagonal out
        HAS_THR=True,  # with the false-negative margin: the most registers
        SINGLE=single,
        PRE_S=pre_s,
        UPCAST=False,
        PRECISION="tf32",
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
    )
    if kernel == "lse":
        consts["KP"] = triton.next_power_of_2(K)
        fn = C._row_lse_kernel
    else:
        fn = C._grad_tile_kernel
    return fn, ptrs, consts, cfg


def pooling_report() -> None:
    """Registers / spills of the pooling kernels (bf16 hidden states) for each autotune config and mode."""
    from triton_kernels import pooling as P

    fwd_ptrs = {"h_ptr": "*bf16", "mask_ptr": "*i64", "seg_lo_ptr": "*i32", "seg_hi_ptr": "*i32"}
    fwd_ptrs |= {"info_ptr": "*i32", "argmax_ptr": "*i32"}
    bwd_ptrs = {"gp_ptr": "*fp32", "mask_ptr": "*i64", "info_ptr": "*i32", "argmax_ptr": "*i32"}
    bwd_ptrs |= {"gh_ptr": "*bf16"}
    print(f"{'kernel':8} {'mode':14} {'(BLOCK_L, BLOCK_H, warps)':26} {'regs':>4} {'spill st/ld B':>14}")
    for name, code in P.MODE_CODES.items():
        if name in ("first", "last"):
            continue  # one token per row: a fixed config, no token loop
        for kernel, configs in (("fwd", P._FWD_CONFIGS), ("bwd", P._TOKEN_CONFIGS)):
            for c in configs:
                bl, bh, w = c.kwargs["BLOCK_L"], c.kwargs["BLOCK_H"], c.num_warps
                if kernel == "fwd":
                    consts = dict(MODE=code, SEGMENTS=False, BLOCK_SCAN=256, BLOCK_L=bl, BLOCK_H=bh)
                    st = compile_stats(P._pool_fwd_kernel, fwd_ptrs, consts, w, 3)
                else:
                    consts = dict(MODE=code, BLOCK_L=bl, BLOCK_H=bh)
                    st = compile_stats(P._pool_bwd_kernel, bwd_ptrs, consts, w, 3)
                spills = f"{st['spill_stores']}/{st['spill_loads']}"
                row = f"{kernel:8} {name:14} {str((bl, bh, w)):26}"
                print(f"{row} {st['registers']:>4} {spills:>14}", flush=True)


# Spills the check tolerates, in bytes per thread: a few registers' worth, as ptxas moves between otherwise
# identical builds (the shipped 128 x 128 column-term forward: 0 - 16 B). What it exists to catch is the
# kilobyte spills of an inner loop (the Matryoshka gradient kernel once spilled 1,184 B).
SPILL_TOLERANCE_BYTES = 32


def expected_spill_free(K: int, mode: str) -> bool:
    """Every shipped config is expected to compile without spills beyond the tolerance (a hook for
    documented exceptions)."""
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="float32 configs too")
    ap.add_argument("--check", action="store_true", help="exit 1 when a config expected spill-free spills")
    ap.add_argument("--pooling", action="store_true", help="report the pooling kernels' autotune configs")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernel_codegen: unset TRITON_INTERPRET (the interpreter replaces kernels)", file=sys.stderr)
        return 2
    if ptxas_path() is None:
        print("kernel_codegen: no ptxas (Triton's NVIDIA backend ships one)", file=sys.stderr)
        return 2
    if args.pooling:
        pooling_report()
        return 0
    import torch

    dtypes = [torch.bfloat16, torch.float32] if args.all else [torch.bfloat16]
    combos = [
        (kernel, dtype, K, mode, loop, False)
        for kernel, dtype, K, mode in itertools.product(
            ("lse", "grad"), dtypes, (1, 5), ("plain", "cols", "tri")
        )
        for loop in (("auto", "ranges") if K > 1 else ("auto",))
    ]
    # the opt-in cuBLAS-logits mode (its Matryoshka terms always take the per-range loops)
    combos += [
        (kernel, dtype, K, mode, "auto", True)
        for kernel, dtype, K, mode in itertools.product(
            ("lse", "grad"), dtypes, (1, 5), ("plain", "cols", "tri")
        )
    ]
    bad = []
    head = (
        f"{'kernel':6} {'dtype':9} {'K':>2} {'mode':5} {'loop':7} {'logits':6} "
        f"{'config (BM, BN, BD, warps, stages)':36}"
    )
    print(f"{head} {'regs':>4} {'spill st/ld B':>14}")
    for kernel, dtype, K, mode, loop, pre_s in combos:
        fn, ptrs, consts, cfg = contrastive_case(kernel, dtype, K, mode, loop, pre_s=pre_s)
        loop = "single" if consts["SINGLE"] else ("ranges" if K > 1 else "-")
        st = compile_stats(fn, ptrs, consts, cfg["num_warps"], cfg["num_stages"])
        conf = str((cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["num_warps"], cfg["num_stages"]))
        spills = f"{st['spill_stores']}/{st['spill_loads']}"
        logits = "gemm" if pre_s else "triton"
        row = f"{kernel:6} {str(dtype)[6:]:9} {K:>2} {mode:5} {loop:7} {logits:6} {conf:36}"
        print(f"{row} {st['registers']:>4} {spills:>14}", flush=True)
        spilled = max(st["spill_stores"], st["spill_loads"])
        if expected_spill_free(K, mode) and spilled > SPILL_TOLERANCE_BYTES:
            bad.append((kernel, str(dtype), K, mode, loop, logits, st))
    if bad:
        print(f"configs that spill: {bad}")
    if bad and not triton_is_tuned_version():
        import triton

        print(f"Triton {triton.__version__}: the spill limit applies to Triton {TUNED_TRITON}.x, where the "
              "configs were chosen; here it is reported, and --check only requires every config to compile")
        return 0
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
