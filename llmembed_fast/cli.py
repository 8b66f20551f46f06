"""``llmembed-fast``: info | bench | encode | search."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


def _cmd_info(args) -> int:
    from llmembed_fast import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"llmembed_fast {data['llmembed_fast']}  (python {data['python']}, {data['platform']})")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v))
    b = data["backends"]
    print(
        f"backends: triton {'yes' if b['triton_available'] else 'no'}"
        f" (interpreter {'on' if b['triton_interpreter'] else 'off'}),"
        f" cuda {'yes' if b['cuda_available'] else 'no'}"
        f", CPU tensors use {b['default_for_cpu_tensors']}"
        + (f", forced {b['forced']}" if b["forced"] else "")
    )
    if data["gpu"]:
        print(f"gpu: {data['gpu']} (torch cuda {data['torch_cuda']})")
    cpu = data["cpu"]
    print(
        f"cpu: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or '-'};"
        f" torch threads {data['torch_threads']}"
    )
    ext = data["extension"]
    if ext["built"]:
        print("extension: " + ", ".join(f"{k} {v}" for k, v in ext.items() if k != "built"))
    else:
        print(f"extension: not built ({ext['error']}); build with: {ext['build_command']}")
    return 0


def check_device(text: str):
    """A torch device this machine has, from ``text`` (cpu, cuda, cuda:N); ValueError otherwise."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"expected cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("cuda is not available here (torch without CUDA, or no GPU)")
    return dev


def _device(text: str):
    """argparse type of --device."""
    try:
        return check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    """argparse type of --budget-s: a positive, finite number of seconds (0 gave an empty table, nan none)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return v


def int_at_least(minimum: int):
    """argparse type of an int >= ``minimum`` (shared by the subcommands)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


positive_int = int_at_least(1)


class CliError(Exception):
    """A user error: printed as ``error: ...`` with exit code 2, no traceback (shared by the subcommands)."""


def stdin_bytes(flag: str) -> bytes:
    """All of standard input as bytes, for ``flag`` given as ``-`` (shared by the subcommands); OSError naming
    ``flag`` when the process has no standard input (started with it closed)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise OSError(f"{flag} -: there is no standard input to read")
    try:
        return stream.read()
    except OSError as exc:
        raise OSError(f"{flag} -: cannot read standard input: {exc}") from None


def unwritable(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be written (a folder, or a folder that cannot take the file: a message naming
    ``flag``), or None: checked before the run, not after it (shared by the subcommands)."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        return f"{flag} {path!r} is a folder: give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return f"{flag} {path!r}: folder {folder!r} does not exist or is not writable"
    return None


class RaisingFile:
    """``f`` as numpy must see it to write through ``f.write``, which raises on a full disk or a file size
    limit: given a real file, np.save calls ndarray.tofile, which reported success on a truncated file."""

    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        return getattr(self._f, name)


def write_atomic(path: str, data) -> None:
    """Write the file ``path`` all or nothing (shared by the subcommands; see ``_files.write_atomic``):
    ``data`` is bytes, or a function that writes to the binary file it is given, a :class:`RaisingFile`."""
    from llmembed_fast import _files

    fill = (lambda f: data(RaisingFile(f))) if callable(data) else (lambda f: f.write(data))
    _files.write_atomic(path, fill)


def _writable(path: str, flag: str) -> bool:
    """False (with the error printed) when ``path``'s folder cannot take the file."""
    why = unwritable(path, flag)
    if why:
        print(f"error: {why}", file=sys.stderr)
    return why is None


def _cmd_bench(args) -> int:
    import torch

    from llmembed_fast.bench.core import (
        BenchContext,
        collect_cases,
        discover_providers,
        print_table,
        run_cases,
    )
    from llmembed_fast.bench.plot import plot_path

    groups = [n.removeprefix("cases_") for n in discover_providers()]
    unknown = [g for g in (args.only or ()) if g not in groups]
    if unknown:
        print(f"error: --only: unknown group(s) {unknown}; choose from {groups}", file=sys.stderr)
        return 2
    if args.json and not _writable(args.json, "--json"):
        return 2
    if args.plot and not _writable(plot_path(args.plot), "--plot"):
        return 2
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    ctx = BenchContext(
        device=device, full=args.full, smoke=args.smoke, budget_s=args.budget_s, only=tuple(args.only or ())
    )
    cases, notes = collect_cases(ctx)
    print(
        f"llmembed-fast bench on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
        f" ({len(cases)} cases, budget {args.budget_s:.0f} s{', full' if args.full else ''})"
    )
    if os.environ.get("TRITON_INTERPRET") == "1" and not args.smoke:
        notes = [
            *notes,
            "TRITON_INTERPRET=1: Triton kernels run in the interpreter, their timings say "
            "nothing about speed (unset it, or set LLMEMBED_FAST_BACKEND=torch)",
        ]
    for n in notes:
        print("note:", n)
    records = run_cases(ctx, cases)
    print_table(records)
    if args.json:
        from llmembed_fast import info

        text = json.dumps({"info": info(), "records": records, "notes": notes}, indent=2, default=str)
        try:
            write_atomic(args.json, text.encode())
        except OSError as exc:
            print(f"error: cannot write --json {args.json!r}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    if args.plot:
        from llmembed_fast.bench.plot import plot_records

        msg = plot_records(records, args.plot)
        print(msg)
    failed = [r["case"] for r in records if "error" in r] + [
        f"{r['case']} / {name}" for r in records for name, b in r.get("baselines", {}).items() if "error" in b
    ]
    if failed:  # the table shows each error; the exit status says that some case or baseline did not run
        listed = ", ".join(failed)[:300]
        print(f"error: {len(failed)} case(s) or baseline(s) raised: {listed}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmembed-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, backends, CPU features, extension build")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("bench", help="time the fast paths against their baselines")
    p.add_argument("--full", action="store_true", help="run the large configurations too")
    p.add_argument("--smoke", action="store_true", help="tiny shapes only (checks that every case runs)")
    p.add_argument(
        "--budget-s", type=_positive_seconds, default=120.0, help="wall-clock budget for timing (default 120)"
    )
    p.add_argument(
        "--only", nargs="*", help="groups to run (pooling, contrastive, quant, grad_cache, embedder)"
    )
    p.add_argument("--device", type=_device, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="write a bar chart of speedups (needs matplotlib)")
    p.set_defaults(func=_cmd_bench)
    # Further subcommands live in their own modules (cli_<name>.py, each with register(subparsers)).
    for name in ("encode", "search"):
        try:
            mod = importlib.import_module(f"llmembed_fast.cli_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"llmembed_fast.cli_{name}":
                raise
            continue
        mod.register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `llmembed-fast info | head`: the reader left; no traceback (Python's advice)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # Ctrl-C: no traceback (a file being written is left as it was)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
