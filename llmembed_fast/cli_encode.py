"""``llmembed-fast encode``: embed a text file with a Hugging Face / sentence-transformers model into .npy."""

from __future__ import annotations

import io
import json
import os
import sys
import time

from llmembed_fast.cli import CliError, RaisingFile, check_device, stdin_bytes, write_atomic

INPUT_FORMATS = ("txt", "jsonl", "json")


def _item_text(obj, field: str, where: str) -> str:
    """The text of one JSON item: a string, or an object's ``field``."""
    if isinstance(obj, dict):
        if field not in obj:
            raise ValueError(f"--input {where}: no field {field!r} (use --field)")
        obj = obj[field]
    if not isinstance(obj, str):
        raise ValueError(f"--input {where}: expected a string, got {type(obj).__name__}")
    return obj


def input_format(path: str, fmt: str | None = None) -> str:
    """``fmt`` when given (checked), else the format of ``path``'s suffix: ``.json`` an array,
    ``.jsonl`` / ``.ndjson`` one item per line, anything else (``-``, standard input, included) text lines."""
    if fmt is not None:
        if fmt not in INPUT_FORMATS:
            raise ValueError(f"--input-format: expected one of {', '.join(INPUT_FORMATS)}, got {fmt!r}")
        return fmt
    low = path.lower()
    if low.endswith(".json"):
        return "json"
    if low.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "txt"


def read_texts(path: str, field: str = "text", fmt: str | None = None) -> list[str]:
    """Texts from ``.txt`` (one per line, empty lines kept as empty texts), ``.jsonl`` (one JSON object per
    line with ``field``, or a JSON string) or ``.json`` (an array of such items). ``path`` ``-`` reads
    standard input (bytes, UTF-8); ``fmt`` (txt, jsonl, json) overrides the format the suffix gives (txt for
    ``-``). The same rules for a file and for standard input: a leading byte-order mark is dropped, lines
    end at \\n, bytes that are not UTF-8 are reported by line and column."""
    fmt = input_format(path, fmt)
    data = None  # bytes, decoded as UTF-8 below whatever the locale says
    if path == "-":
        data = stdin_bytes("--input")
        name = "- (standard input)"
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--input: no file at {path!r}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"--input {path!r} is a folder: give a file")
        name = repr(path)
        if not os.path.isfile(path):  # a pipe (/dev/stdin, <(zcat f)): read once, as standard input is
            with open(path, "rb") as f:
                data = f.read()

    def open_binary():
        return open(path, "rb") if data is None else io.BytesIO(data)

    try:
        texts = _read_texts(open_binary, name, fmt, field)
    except UnicodeDecodeError:
        raise ValueError(_first_bad_utf8(open_binary, name)) from None
    if not texts:
        raise ValueError(f"--input {name} holds no texts")
    return texts


def _first_bad_utf8(open_binary, name: str) -> str:
    """Where the input stops being UTF-8 (line and column; the decoder's own position is into a buffer)."""
    with open_binary() as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (
                    f"--input {name} line {n}, column {exc.start + 1}: not UTF-8 (byte "
                    f"{raw[exc.start]:#04x}); give UTF-8 text"
                )
    return f"--input {name}: not UTF-8; give UTF-8 text"


def _json_why(exc: Exception, line: bool = False) -> str:
    """What a JSON parse error says (json raises RecursionError, not JSONDecodeError, past its depth)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return f"{exc.msg}, line {exc.lineno}" if line else exc.msg


def _read_texts(open_binary, name: str, fmt: str, field: str) -> list[str]:
    texts: list[str] = []
    # newline="\n": lines end at \n only (a lone \r inside a line is text, as wc -l counts lines; universal
    # newlines split there and shifted every later row); a leading byte-order mark is not part of the text
    with io.TextIOWrapper(open_binary(), encoding="utf-8-sig", newline="\n") as f:
        if fmt == "json":  # one JSON array of strings or objects
            try:
                data = json.load(f)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ValueError(
                    f"--input {name}: invalid JSON ({_json_why(exc, line=True)}); one text per line: "
                    ".jsonl or .txt (--input-format jsonl or txt)"
                ) from None
            if not isinstance(data, list):
                raise ValueError(f"--input {name}: a json input holds an array, got {type(data).__name__}")
            texts = [_item_text(obj, field, f"{name} item {n}") for n, obj in enumerate(data)]
        elif fmt == "jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise ValueError(f"--input {name} line {n}: invalid JSON ({_json_why(exc)})") from None
                texts.append(_item_text(obj, field, f"{name} line {n}"))
        else:
            texts = [line.rstrip("\r\n") for line in f]
    return texts


def _cmd_encode(args) -> int:
    try:
        texts = read_texts(args.input, args.field, args.input_format)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _encode(args, texts)
    except BrokenPipeError:  # `--output - | head`: cli.main leaves quietly
        raise
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, TypeError, ImportError) as exc:  # a bad argument or input: no traceback
        print(f"error: {type(exc).__name__}: {exc}{_hint(exc)}", file=sys.stderr)
        return 2


def _hint(exc: Exception) -> str:
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] in ("transformers", "tokenizers"):
        return " (encode needs the [hf] extra: pip install 'llmembed-fast[hf]')"
    return ""


def _load_model(args):
    """LLMEmbedder.from_pretrained with the CLI's arguments; any error is a CliError naming --model. With
    --no-progress, transformers' weight-loading bar is off too (its previous state is restored)."""
    from llmembed_fast.embedder import LLMEmbedder

    bars = None
    if args.no_progress:
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:  # reported by from_pretrained below
            hf_logging = None
        if hf_logging is not None:
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
    try:
        return LLMEmbedder.from_pretrained(
            args.model,
            pooling=args.pooling,
            normalize=False if args.no_normalize else None,
            dims=args.dims,
            dtype=args.dtype,
            device=args.device,
            max_length=args.max_length,
            prompt_style=args.prompt_style,
            attn_implementation=args.attn_implementation,
            packed={"auto": "auto", "on": True, "off": False}[args.packed],
            **({"gguf_file": args.gguf_file} if args.gguf_file else {}),
        )
    except Exception as exc:  # missing, corrupt or invalid: safetensors, config validation ... errors
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())}{_hint(exc)}"  # on one line
        raise CliError(f"cannot load --model {args.model}: {why}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _output_path(output: str) -> tuple[str, str]:
    """The .npy path ``np.save`` will write for ``--output`` and its folder (made at the end, once there is
    something to write); raises when the path is a folder or the folder cannot be written or created."""
    if os.path.isdir(output) or output.endswith(("/", os.sep)) or not os.path.basename(output):
        raise IsADirectoryError(f"--output {output!r} is a folder: give a file name")
    path = output if output.endswith(".npy") else output + ".npy"  # as np.save writes it
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"--output {path!r} is a folder")
    if not os.path.isdir(folder):
        parent = folder
        while not os.path.isdir(parent):
            if os.path.exists(parent):
                raise FileExistsError(f"--output {output!r}: {parent!r} is a file, not a folder")
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"--output {output!r}: cannot create folders in {parent!r}")
    elif not os.access(folder, os.W_OK):
        raise PermissionError(f"--output {output!r}: the folder {folder!r} is not writable")
    return path, folder


def _encode(args, texts: list[str]) -> int:
    import numpy as np

    # the output is checked before any work (loading and encoding can take hours); "-": the .npy bytes go
    # to standard output and the status line to stderr
    path, folder = (None, None) if args.output == "-" else _output_path(args.output)
    if path is None and getattr(sys.stdout, "buffer", None) is None:
        raise CliError("--output -: there is no standard output to write (started with it closed)")
    if args.device is not None:
        try:
            check_device(args.device)
        except ValueError as exc:
            raise ValueError(f"--device: {exc}") from None
    ranges = None
    if args.precision in ("int8", "uint8") and args.ranges is None and len(texts) == 1:
        raise ValueError(
            f"--precision {args.precision}: one text cannot calibrate its own ranges (max == min in every "
            "dimension); pass --ranges RANGES.npy (llmembed_fast.quant.calibrate of a sample's embeddings)"
        )
    if args.ranges is not None:
        if args.precision not in ("int8", "uint8"):
            raise ValueError("--ranges applies to --precision int8 / uint8 only")
        try:
            ranges = np.load(args.ranges, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"--ranges: cannot read {args.ranges!r}: {exc}") from None
        if not isinstance(ranges, np.ndarray) or ranges.ndim != 2 or ranges.shape[0] != 2:
            raise ValueError(
                f"--ranges {args.ranges!r} must be a .npy of shape [2, D] (per-dimension min, "
                "max), e.g. from llmembed_fast.quant.calibrate"
            )
        if ranges.dtype.kind != "f":
            raise ValueError(f"--ranges {args.ranges!r} must hold floats, got {ranges.dtype}")
        from llmembed_fast.quant._args import check_range_values

        try:  # before the model loads and encodes
            check_range_values(ranges)
        except ValueError as exc:
            raise ValueError(f"--ranges {args.ranges!r}: {exc}") from None
    t0 = time.perf_counter()
    emb = _load_model(args)
    t1 = time.perf_counter()
    fn = {"query": emb.encode_queries, "document": emb.encode_documents}.get(args.role, emb.encode)
    kw = dict(
        batch_size=args.batch_size,
        max_tokens_per_batch=args.max_tokens_per_batch,
        precision=args.precision,
        show_progress_bar=not args.no_progress,
    )
    if args.instruction is not None:
        kw["instruction"] = args.instruction
    if ranges is not None:
        kw["ranges"] = ranges
    out = fn(texts, **kw)
    t2 = time.perf_counter()
    # through write(), which raises on a full disk, a file size limit or a closed pipe (tofile did not)
    if path is None:
        np.save(RaisingFile(sys.stdout.buffer), out, allow_pickle=False)
        sys.stdout.buffer.flush()
    else:
        os.makedirs(folder, exist_ok=True)
        try:
            write_atomic(path, lambda f: np.save(f, out, allow_pickle=False))
        except OSError as exc:
            raise CliError(f"cannot write --output {path!r}: {exc.strerror or exc}") from None
    print(
        f"encoded {len(texts)} texts -> {path or 'standard output'} {tuple(out.shape)} {out.dtype} "
        f"(load {t1 - t0:.1f} s, encode {t2 - t1:.1f} s, {len(texts) / max(t2 - t1, 1e-9):.1f} texts/s)",
        file=sys.stderr if path is None else sys.stdout,
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "encode",
        help="embed texts (.txt / .jsonl / .json, or standard input) with a model into a .npy file",
        description="Embed texts with a model into a .npy file, e.g. "
        "cat texts.txt | llmembed-fast encode --model DIR --input - --output emb.npy",
    )
    p.add_argument("--model", required=True, help="model folder (HF or sentence-transformers) or Hub id")
    p.add_argument(
        "--input",
        required=True,
        help="texts.txt (one per line), .jsonl, or .json (an array), UTF-8; - reads standard input "
        "(a file named -: ./-)",
    )
    p.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        help="txt, jsonl or json (default: from the --input suffix; txt for -)",
    )
    p.add_argument(
        "--output",
        required=True,
        help="embeddings .npy (the suffix is added when missing); - writes the .npy to standard output "
        "(e.g. piped into llmembed-fast search INDEX -)",
    )
    p.add_argument("--field", default="text", help="JSON field holding the text (jsonl, json; default: text)")
    p.add_argument(
        "--precision", default="float32", choices=["float32", "float16", "int8", "uint8", "binary", "ubinary"]
    )
    p.add_argument(
        "--ranges",
        metavar="RANGES.npy",
        help="int8/uint8 ranges [2, D] (quant.calibrate of a sample corpus), so that codes of separately "
        "encoded files share one scale (default: calibrated on this file's embeddings)",
    )
    p.add_argument("--role", choices=["query", "document"], help="use the model's query/document prompt")
    p.add_argument("--instruction", help="task instruction (queries of instruction-tuned embedders)")
    p.add_argument(
        "--prompt-style", help="none, instruct, qwen3, prompteol, pcot, ke, echo or a {text} template"
    )
    p.add_argument("--pooling", help="last, mean, weighted_mean, max, first, mean_sqrt_len")
    p.add_argument("--dims", type=int, help="Matryoshka width")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalize")
    p.add_argument("--max-length", type=int, help="tokens per text (template and specials included)")
    p.add_argument("--batch-size", type=int, help="most texts per batch")
    p.add_argument("--max-tokens-per-batch", type=int, help="padded tokens per batch")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--attn-implementation", help="sdpa, eager, flash_attention_2 ...")
    p.add_argument("--packed", default="auto", choices=["auto", "on", "off"], help="padding-free batches")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_encode)
