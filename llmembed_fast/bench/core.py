"""Bench cases, their discovery and the runner that prints the table of times and ratios."""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmembed_fast.bench.timing import measure


@dataclass
class BenchContext:
    """What a case provider may use: the device, whether to run the large configurations (``full``) or only
    tiny ones that check the plumbing (``smoke``), and a time budget."""

    device: torch.device
    full: bool = False
    smoke: bool = False
    budget_s: float = 120.0
    only: tuple[str, ...] = ()


@dataclass
class Case:
    """One comparison: ``ours`` against each baseline (name -> callable, or a string saying why it is
    skipped). ``bytes_moved`` / ``flops`` give the hardware floor when the device's rates are known."""

    group: str
    name: str
    ours: Callable[[], object]
    baselines: dict[str, Callable[[], object] | str] = field(default_factory=dict)
    bytes_moved: int | None = None
    flops: int | None = None
    note: str = ""


class Skip(Exception):
    """Raised by a provider's ``cases`` that has nothing to run here: its message becomes the note."""


def discover_providers() -> list[str]:
    import llmembed_fast.bench as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("cases_"))


def collect_cases(ctx: BenchContext) -> tuple[list[Case], list[str]]:
    cases, notes = [], []
    for name in discover_providers():
        group = name.removeprefix("cases_")
        if ctx.only and group not in ctx.only:
            continue
        try:
            mod = importlib.import_module(f"llmembed_fast.bench.{name}")
            cases.extend(mod.cases(ctx))
        except Skip as exc:
            notes.append(f"{group}: skipped ({exc})")
        except ImportError as exc:  # an optional dependency this machine lacks
            notes.append(f"{group}: skipped ({type(exc).__name__}: {exc})")
        except Exception as exc:  # a provider that failed building its cases: a case that raised (exit 1)
            cases.append(Case(group, "building the cases", ours=_raiser(exc)))
    return cases, notes


def _raiser(exc: Exception) -> Callable[[], object]:
    def ours():
        raise exc

    return ours


def _fmt_ms(s: float | None) -> str:
    return "-" if s is None else (f"{s * 1e3:.3f}" if s < 1e-2 else f"{s * 1e3:.1f}")


def run_cases(ctx: BenchContext, cases: list[Case], log=print) -> list[dict]:
    """Time every case and baseline within ``ctx.budget_s``; returns one record per (case, baseline)."""
    records: list[dict] = []
    deadline = time.perf_counter() + ctx.budget_s
    per_case = max(0.05, min(0.5, ctx.budget_s / max(1, 4 * len(cases))))
    for i, case in enumerate(cases):
        log(f"[{i + 1}/{len(cases)}] {case.group}: {case.name}")
        if time.perf_counter() > deadline:
            records.append({"group": case.group, "case": case.name, "skipped": "time budget spent"})
            continue
        try:
            ours = measure(case.ours, ctx.device, min_time_s=per_case)
        except Exception as exc:
            records.append({"group": case.group, "case": case.name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rec = {
            "group": case.group,
            "case": case.name,
            "ours_s": ours["median_s"],
            "note": case.note,
            "bytes": case.bytes_moved,
            "flops": case.flops,
            "baselines": {},
        }
        for bname, fn in case.baselines.items():
            if isinstance(fn, str):
                rec["baselines"][bname] = {"skipped": fn}
                continue
            try:
                t = measure(fn, ctx.device, min_time_s=per_case)["median_s"]
                rec["baselines"][bname] = {"s": t, "speedup": t / ours["median_s"]}
            except Exception as exc:
                rec["baselines"][bname] = {"error": f"{type(exc).__name__}: {exc}"}
        records.append(rec)
    return records


def format_record(rec: dict) -> str:
    if "ours_s" not in rec:
        return f"{rec['group']:<12} {rec['case']:<52} {rec.get('skipped') or rec.get('error')}"
    parts = []
    for bname, b in rec["baselines"].items():
        if "s" in b:
            parts.append(f"{bname} {_fmt_ms(b['s'])} ms ({b['speedup']:.2f}x)")
        else:
            parts.append(f"{bname}: {b.get('skipped') or b.get('error')}")
    return f"{rec['group']:<12} {rec['case']:<52} {_fmt_ms(rec['ours_s']):>9} ms | " + "; ".join(parts)


def print_table(records: list[dict], log=print) -> None:
    log("")
    log(f"{'group':<12} {'case':<52} {'ours':>12} | baseline time (speedup = baseline / ours)")
    log("-" * 120)
    for rec in records:
        log(format_record(rec))
