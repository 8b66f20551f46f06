"""Kernel-time profiles for the sections (a helper, not a section)."""

from __future__ import annotations

import torch


def kernel_times(fn, title: str, top: int = 12) -> tuple[float, list[tuple[float, int, str]]]:
    """Run ``fn`` once under the torch profiler and print its largest CUDA kernels.

    Returns (total kernel time in ms, [(ms, launches, kernel name)] of the ``top`` largest)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0) or 0
        if t > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((t / 1e3, ev.count, ev.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"profile {title}: kernel time {total:.1f} ms")
    for ms, n, key in rows[:top]:
        print(f"  {ms:9.2f} ms {100 * ms / max(total, 1e-9):5.1f}%  x{n:<6d} {key[:90]}")
    return total, [(round(ms, 2), n, key[:80]) for ms, n, key in rows[:top]]
