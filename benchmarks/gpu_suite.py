#!/usr/bin/env python3
"""One-call GPU suite: correctness of every Triton/CUDA path against its reference, then timings side by
side, under a wall-clock budget; a compact table last, full figures as JSON.

    python benchmarks/gpu_suite.py --budget-s 420 --json $OUT/gpu_suite.json [--only pooling contrastive]

Needs only torch, triton and this repository (a quick `LLMEMBED_FAST_NO_EXT=1 pip install --no-deps
--no-build-isolation -e .`, or nothing: the script makes the checkout importable itself). Sections live in
benchmarks/gpu_sections/<name>.py and define ``correctness(ctx)`` and ``timings(ctx)`` (see README there).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION_ORDER = ("pooling", "contrastive", "quant", "grad_cache", "embedder")


def _make_checkout_importable() -> None:
    """Import llmembed_fast from this checkout, mapping triton_kernels/ to llmembed_fast.triton_kernels as
    the installed package does (setup.py's package_dir)."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import llmembed_fast

    try:
        importlib.import_module("llmembed_fast.triton_kernels")
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "llmembed_fast.triton_kernels",
            os.path.join(ROOT, "triton_kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "triton_kernels")],
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["llmembed_fast.triton_kernels"] = mod
        spec.loader.exec_module(mod)
        llmembed_fast.triton_kernels = mod


def _bench_ms(torch, fn, warmup: int = 3, reps: int = 20, min_s: float = 0.2) -> float:
    """Median of CUDA-event-timed runs after warm-up (adds runs until min_s has passed, at most 200)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start < min_s and len(times) < 200):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _peak_extra_bytes(torch, fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _dist_version(*names: str) -> str:
    """Installed version of the first of ``names`` (distribution names) found, else "not installed"."""
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _baseline_versions() -> dict:
    """Versions of the baselines and libraries the figures depend on, and this checkout's commit."""
    import subprocess

    out = {
        "transformers": _dist_version("transformers"),
        "sentence_transformers": _dist_version("sentence-transformers"),
        "inf_cl": _dist_version("inf-cl", "inf_cl"),
        "faiss": _dist_version("faiss-gpu", "faiss-cpu", "faiss", "faiss-gpu-cu12", "faiss-gpu-cu11"),
        "numpy": _dist_version("numpy"),
    }
    try:
        git = lambda *a: subprocess.run(  # noqa: E731
            ["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = git("rev-parse", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += " (with uncommitted changes)"
    except Exception:  # no git, or a copy of the tree without .git (the GPU machine gets such a copy)
        # the caller's commit, passed through run_gpu_suite.sh (LLMEMBED_FAST_COMMIT=$(git rev-parse HEAD))
        given = os.environ.get("LLMEMBED_FAST_COMMIT")
        commit = f"{given} (from LLMEMBED_FAST_COMMIT)" if given else "not available (no git checkout)"
    out["llmembed_fast_commit"] = commit
    return out


def _knobs() -> dict:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("LLMEMBED_FAST_")}


def _run_info(torch, cuda: bool, knobs: dict) -> dict:
    """What reproduces the run: the command line, the LLMEMBED_FAST_* knobs as the caller set them, Python,
    and the card's size (an H100 and an H200 differ in memory and SM count, not only in name)."""
    out = {"argv": sys.argv[1:], "knobs": knobs, "python": sys.version.split()[0]}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out["gpu_mem_GiB"] = round(props.total_memory / 2**30, 1)
        out["sm_count"] = props.multi_processor_count
    return out


def _measure_ceilings(torch, bench) -> tuple[float, float]:
    """Device-to-device copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    n = 1 << 30  # 1 GiB per buffer
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    bw = 2 * n / (ms / 1e3)
    src = dst = None
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    flops = 2 * m**3 / (ms / 1e3)
    a = b = None
    torch.cuda.empty_cache()
    return bw, flops


# Relative share of the correctness time (--check-share of the budget) per section: the contrastive checks
# compile the most kernel variants.
CHECK_WEIGHTS = {"contrastive": 3.0, "pooling": 1.0, "grad_cache": 1.0, "embedder": 1.0, "quant": 1.0}
# Relative share of the timing budget per section (what is left is split among the sections still to run).
# Sized for benchmarks/run_gpu_suite.sh's first stage: --budget-s 400 --check-share 0.3 --only contrastive
# grad_cache embedder. The checks end by 120 s (ceilings included; earlier when grad_cache's and embedder's
# few-second checks leave their part unused), so the timings get P = 280-300 s. Needs, from the H200 runs of
# 2026-11-27 (RESULTS.md): contrastive's headline cases ~100 s (its Inf-CL cases start only with >= 40 s
# left, the 262,144 one with >= 30 s); grad_cache ~100 s (~20 s model + cached vs uncached at B=256, 192
# on a card of 100 GiB or less; memory: one B=1,024 step 2.6 s + one B=16,384 step ~42 s, needing ~55 s with
# margin; then B=4,096 against ST, one ~10 s step each, ~34 s with margin); embedder ~75 s (2,000 texts,
# ours and ST, ~15 s; 20,000 texts, one pass each of ours and ST, predicted 10 x (1.0 + 2.3 s) x 1.25 + 10 s
# ~ 51 s, plus preparing them; then the ablations on the 2,000 texts, ~5 s, when time is left).
# Shares at P = 280 with these weights: contrastive 280 x 2.0/5.5 = 102 s; if it uses all of it, grad_cache
# 178 x 2.0/3.5 = 102 s, embedder the remaining 76 s (plus whatever the earlier sections leave). Before:
# 1.6 and 1.4 gave grad_cache ~90 s, which cannot hold both the 16,384 memory step and the ST comparison.
TIME_WEIGHTS = {"pooling": 0.8, "contrastive": 2.0, "quant": 1.0, "grad_cache": 2.0, "embedder": 1.5}


def _check_line(c: dict) -> str:
    return (
        f"{'ok ' if c['ok'] else 'BAD'} {c['section']:<11} {c['name']:<58} "
        f"err {c['err']:.2e} tol {c['tol']:.0e}"
        + (f"  {c['detail']}" if c.get("detail") and not c["ok"] else "")
    )


def _timing_line(r: dict) -> str:
    ours = r["ours_ms"]  # None: ours failed (the reason is in extra), the baselines were still timed
    base = " ".join(
        f"{k} {v:.3f}" + (f" ({v / ours:.2f}x)" if ours else "")
        for k, v in r.get("baselines", {}).items()
        if isinstance(v, (int, float))
    )
    floor = r.get("floor_ms")
    fl = f" floor {floor:.3f} ({100 * floor / ours:.0f}% of it)" if floor and ours else ""
    extra = r.get("extra") or {}
    ex = (" " + " ".join(f"{k}={v}" for k, v in extra.items())) if extra else ""
    mine = f"{ours:.3f}" if ours is not None else "not measured"
    return f"{r['section']:<11} {r['name']:<50} ours {mine}{fl} | {base}{ex}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for the whole suite")
    ap.add_argument("--json", default=None, help="write all records here")
    ap.add_argument("--only", nargs="*", default=None, help="sections to run")
    ap.add_argument("--skip-timings", action="store_true")
    ap.add_argument(
        "--checks",
        nargs="*",
        default=None,
        help="sections whose correctness checks run (default: every section run; checks of a section whose "
        "kernels did not change since a recorded run can be skipped to save device time)",
    )
    ap.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="NAME=W",
        help=f"relative share of the timing budget for a section (defaults: {TIME_WEIGHTS})",
    )
    ap.add_argument(
        "--check-share",
        type=float,
        default=0.5,
        help="most of the budget the correctness checks may take, all sections together (each section gets "
        "its weighted part of what is left; a section's checks stop early when theirs is spent)",
    )
    ap.add_argument("--full", action="store_true", help="the issues' largest configurations (long)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes; without a GPU, run the sections on CPU through the Triton interpreter "
        "(checks the suite's plumbing, times nothing meaningful)",
    )
    args = ap.parse_args()

    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    knobs = _knobs()  # before the suite sets any (LLMEMBED_FAST_POISON below)
    os.environ.setdefault("LLMEMBED_FAST_POISON", "1")  # kernels' outputs start as NaN during checks
    poison = os.environ["LLMEMBED_FAST_POISON"]
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_suite: no CUDA device (use --smoke to exercise the suite on CPU)")
        return 2
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    # after the line above: this imports llmembed_fast.triton_kernels (a smoke run without TRITON_INTERPRET
    # set by the caller failed every Triton call: "Cannot call @triton.jit'd outside of the scope of a
    # kernel")
    _make_checkout_importable()
    import triton

    env = {
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU smoke run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        **_baseline_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "smoke": args.smoke,
        **_run_info(torch, cuda, knobs),
    }
    print("gpu_suite:", json.dumps(env))
    if cuda:
        bench = lambda fn, **kw: _bench_ms(torch, fn, **kw)  # noqa: E731
        bw, flops = _measure_ceilings(torch, bench)
        peak = lambda fn: _peak_extra_bytes(torch, fn)  # noqa: E731
    else:

        def bench(fn, **kw):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

        bw, flops, peak = 1e10, 1e11, (lambda fn: (fn(), 0)[1])
    env["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    env["bf16_matmul_TFLOPs"] = round(flops / 1e12, 1)
    print(
        f"ceilings: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {flops / 1e12:.0f} TFLOP/s"
        + ("" if cuda else " (placeholders: no GPU)")
    )

    ctx = SimpleNamespace(
        device=torch.device("cuda" if cuda else "cpu"),
        time_left=lambda: deadline - time.monotonic(),
        bandwidth_Bps=bw,
        matmul_flops=flops,
        bench=bench,
        peak_extra_bytes=peak,
        smoke=args.smoke,
        full=args.full,
    )
    names = [  # --only runs sections in the order given (put the ones that matter most first)
        n
        for n in (args.only if args.only is not None else SECTION_ORDER)
        if n in SECTION_ORDER and os.path.exists(os.path.join(ROOT, "benchmarks", "gpu_sections", f"{n}.py"))
    ]
    sections = {}
    for name in names:
        try:
            sections[name] = importlib.import_module(f"gpu_sections.{name}")
        except Exception as exc:
            print(f"[{name}] import failed: {type(exc).__name__}: {exc}")
    checks, timings, errors, skipped = [], [], [], []

    def save() -> None:  # rewritten after every record, so a run cut short still leaves its figures
        if args.json:
            # a temporary file, then an atomic rename: `timeout` may SIGTERM the run mid-dump, which would
            # otherwise leave a truncated JSON in place of every figure saved before
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"env": env, "checks": checks, "timings": timings, "errors": errors,
                           "skipped": skipped}, f, indent=1)
            os.replace(tmp, args.json)

    def skip(name: str, rec: dict) -> None:  # a check or timing the budget (or the setup) left out
        skipped.append({"section": name, **rec})
        print(f"skip {name:<11} {rec.get('name', '?')}: {rec['skipped']}", flush=True)

    # Correctness with the pooling kernels' autotuning off (one fixed config each: a check's many shapes
    # would otherwise each tune six configs); timings tune as users' runs do.
    os.environ["LLMEMBED_FAST_AUTOTUNE"] = "0"
    weights = dict(TIME_WEIGHTS)
    for item in args.weight:
        name, _, w = item.partition("=")
        weights[name] = float(w)
    check_end = min(deadline, t0 + args.check_share * args.budget_s)
    to_check = [n for n in sections if args.checks is None or n in args.checks]
    for name, mod in sections.items():
        if name not in to_check:
            print(f"[{name}] correctness skipped (--checks)", flush=True)
            continue
        # this section's weighted part of the check time left (checks loop while ctx.time_left() allows)
        todo_w = sum(CHECK_WEIGHTS.get(n, 1.0) for n in to_check[to_check.index(name):])
        share = (check_end - time.monotonic()) * CHECK_WEIGHTS.get(name, 1.0) / todo_w
        t = time.monotonic()
        ctx.time_left = lambda end=t + share: min(end, deadline) - time.monotonic()
        try:
            for rec in mod.correctness(ctx):
                if "skipped" in rec:
                    skip(name, rec)
                    continue
                checks.append({"section": name, **rec})
                print(_check_line(checks[-1]), flush=True)
                save()
        except Exception as exc:
            errors.append(f"{name}.correctness: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        print(f"[{name}] correctness done in {time.monotonic() - t:.1f} s (share {share:.0f} s)", flush=True)
        save()  # a run cut short during the checks keeps what it found
    ctx.time_left = lambda: deadline - time.monotonic()
    os.environ.pop("LLMEMBED_FAST_AUTOTUNE", None)
    # Timings without poisoned outputs: the NaN fill of every output buffer is test-only work that users do
    # not pay (runs before this fix paid it: e.g. 2.6 of 89.9 ms in the contrastive profile).
    os.environ["LLMEMBED_FAST_POISON"] = "0"
    save()
    if not args.skip_timings:
        todo = list(sections)
        for name, mod in sections.items():
            # each section gets its weighted share of what is left, so an early one cannot starve the rest
            left = deadline - time.monotonic()
            if left < 5:
                errors.append(f"{name}.timings: skipped, budget spent")
                todo.remove(name)
                continue
            w = weights.get(name, 1.0)
            share = left * w / (sum(weights.get(n, 1.0) for n in todo) or 1.0)  # all 0: --weight X=0
            section_end = time.monotonic() + share
            ctx.time_left = lambda end=section_end: min(end, deadline) - time.monotonic()
            t = time.monotonic()
            try:
                for rec in mod.timings(ctx):  # sections yield records as they go: none lost to a crash
                    if "skipped" in rec:
                        skip(name, rec)
                        continue
                    if "ok" in rec:  # a check run late on purpose (one that could fault the device)
                        checks.append({"section": name, **rec})
                        print(_check_line(checks[-1]), flush=True)
                        save()
                        continue
                    timings.append({"section": name, **rec})
                    print(_timing_line(timings[-1]), flush=True)
                    save()
                    if cuda:
                        torch.cuda.empty_cache()
            except Exception as exc:
                errors.append(f"{name}.timings: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            todo.remove(name)
            print(f"[{name}] timings done in {time.monotonic() - t:.1f} s (share {share:.0f} s)", flush=True)
            save()
    os.environ["LLMEMBED_FAST_POISON"] = poison
    save()
    print("\n== correctness (error vs float64 reference) ==")
    for c in checks:
        print(_check_line(c))
    print("\n== timings (ms; speedup = baseline / ours; floor = bytes or FLOPs over the measured ceiling) ==")
    for r in timings:
        print(_timing_line(r))
    for s in skipped:
        print(f"SKIPPED {s['section']} {s.get('name', '?')}: {s['skipped']}")
    for e in errors:
        print("ERROR", e)
    bad = sum(not c["ok"] for c in checks)
    print(
        f"\n{len(checks) - bad} checks passed, {bad} failed, {len(skipped)} skipped; {len(timings)} timings;"
        f" {len(errors)} errors; {time.monotonic() - t0:.0f} s"
    )
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
