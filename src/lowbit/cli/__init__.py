"""The ``lowbit`` command line: ``lowbit <verb> MODEL -o OUT [options]``.

Exit codes: 0 success, 1 the work failed (e.g. ``--require`` not met),
2 a usage or input error. Errors print one line; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import sys

from lowbit.cli import build_verbs, read_verbs  # noqa: F401  (register the verbs, in order)
from lowbit.cli.common import app, err_console, out_console
from lowbit.errors import LowbitError

__all__ = ["main", "app", "out_console"]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        # standalone mode: typer/click print usage errors themselves and exit 2
        app(args=args, prog_name="lowbit", standalone_mode=True)
    except LowbitError as exc:
        if debug:
            raise
        err_console.print("error: " + str(exc), markup=False, emoji=False, highlight=False,
                          soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        err_console.print(str(exc.code))
        return 1
    except Exception as exc:  # anything unexpected: one line, not a traceback
        if debug:
            raise
        err_console.print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for "
                          "the traceback)", markup=False, emoji=False, highlight=False,
                          soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
