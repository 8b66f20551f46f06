"""``python -m llmembed_fast ...``: the ``llmembed-fast`` command."""

import sys

from llmembed_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
