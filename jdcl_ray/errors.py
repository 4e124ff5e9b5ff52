"""One error type for mistakes in what the user gave us.

Command-line entry points catch it and print its message as one line (no traceback),
so every message must name the bad key, value or path and say what was expected.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """A user mistake (bad config, path, file or value), reported in one line."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a CLI ``main`` so that a UserError ends the process with one line and exit code 2."""
    try:
        code = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
