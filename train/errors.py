"""User errors at the command line: one line on stderr and a non-zero exit, not a traceback.

`USER_ERRORS` is the one list of what counts as the user's mistake rather than the zoo's: a value the
zoo rejects (`ValueError` and its subclasses `CheckpointError`, `DataFormatError`,
`SyntheticPartsError`), a file that is missing or cannot be read (`OSError`: `FileNotFoundError`,
`ImageLoadError`, PIL's `UnidentifiedImageError`), a file that is not weights-only
(`pickle.UnpicklingError`) and a config the parser rejects (`argparse.ArgumentError`, which
jsonargparse raises). Any other exception is a bug and keeps its traceback. ``IZOO_DEBUG=1`` shows the
traceback of user errors too.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Any, Callable, NoReturn, Sequence

__all__ = ["USER_ERRORS", "debug", "one_line", "run_main"]

MAX_CHARS = 400  # torch's weights-only refusal alone is a page of advice

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, pickle.UnpicklingError, argparse.ArgumentError)

# jsonargparse's report of a failed Union lists every subtype it tried and the parsed namespace; these
# lines say nothing to a user.
_NOISE = ("Subtypes:", "Errors:", "Given value type:", "Does not validate against any of the Union subtypes",
          "- Expected a <class 'NoneType'>", "Given value: Namespace(", "Given value: NestedArg(")


def debug() -> bool:
    """Whether ``IZOO_DEBUG`` asks for tracebacks (any value but "", "0", "false", "no")."""
    return os.environ.get("IZOO_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
    """The message of `error` on one line: lines joined, jsonargparse's noise dropped, cut at `MAX_CHARS`."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line.removeprefix("- ") for line in lines if line and not line.startswith(_NOISE)
            and not (line.startswith("Given value:") and len(line) > 80)]  # a whole parsed structure
    joined = "".join(line + (" " if line.endswith(":") else "; ") for line in kept).removesuffix("; ").rstrip()
    if len(joined) > MAX_CHARS:
        joined = joined[:MAX_CHARS - 3] + "..."
    return joined or type(error).__name__


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a command-line `main`; exit 1 with ``error: <one line>`` on a user error, else exit with its
    integer result (0 for any other result)."""
    try:
        result = main(argv)
    except USER_ERRORS as error:
        if debug():
            raise
        print(f"error: {one_line(error)} (IZOO_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
