"""How a command-line tool fails: one clear line for the user, the traceback only when asked.

Every CLI here (``shard-tools``, ``train.py``, ``evaluate.py``, the benchmarks) runs its ``main`` through
:func:`run_cli`. A :class:`UserError` is a failure the user can fix; its message names the file, URL
or flag and says what to do, and it is printed as ``<prog>: error: <message>`` with exit code 2.
Anything else is a bug or an environment problem: it is printed as one line too, with the exception
type, plus a hint that ``--debug`` (anywhere on the command line) or ``MUSICSSL_DEBUG=1`` shows the
traceback. Ctrl-C exits 130 without a traceback.

Raise ``UserError`` (or a subclass) at the place that knows what the user should change::

    raise UserError(f"--data {folder}: no train.manifest.json there; build the split with shard-tools build")
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

DEBUG_ENV = "MUSICSSL_DEBUG"


class UserError(Exception):
    """A failure the user can fix. The message names the file, URL or flag and what to do."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """True when ``--debug`` is on the command line or ``MUSICSSL_DEBUG`` is set to a true value."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return env not in ("", "0", "false", "no") or (argv is not None and "--debug" in argv)


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None, prog: str) -> int:
    """Run ``main(argv)`` (``--debug`` removed) and turn every failure into one line and an exit code.

    Exit codes: what ``main`` returns (None = 0); 2 for a :class:`UserError`; 1 for any other
    exception; 130 for Ctrl-C. With ``--debug`` or ``MUSICSSL_DEBUG=1`` other exceptions propagate
    with their traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != "--debug"]
    try:
        return int(main(args) or 0)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit:
        raise  # argparse's own exits (--help, usage errors) keep their codes
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a command-line tool
        if debug:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{prog}: error: {type(exc).__name__}{': ' + text if text else ''} "
              f"(re-run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        return 1
