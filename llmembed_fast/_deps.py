"""Optional dependencies: an ImportError that names the extra to install, not a bare one from deep inside."""

from __future__ import annotations

from typing import NoReturn


def raise_missing(exc: ImportError, module: str, extra: str, what: str) -> NoReturn:
    """For ``except ImportError as exc: raise_missing(exc, ...)``: when ``module`` itself is not installed,
    raises an ImportError saying that ``what`` needs it and ``pip install 'llmembed-fast[extra]'`` (from
    ``exc``); re-raises any other import failure (a broken install, a submodule another version lacks)."""
    # a missing package fails on its top-level name, even for ``from package.sub import x``
    if isinstance(exc, ModuleNotFoundError) and getattr(exc, "name", None) == module:
        raise ImportError(
            f"{what} needs {module}, which is not installed: pip install 'llmembed-fast[{extra}]'"
        ) from exc
    raise exc
