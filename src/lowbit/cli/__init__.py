"""The ``lowbit`` command line: ``lowbit <verb> MODEL -o OUT [options]``.

Exit codes: 0 success, 1 the work failed (e.g. ``--require`` not met),
2 a usage or input error. Errors print one line; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import typer

from lowbit.cli import build_verbs, read_verbs  # noqa: F401  (register the verbs, in order)
from lowbit.cli.common import app, cli_message, err_console, out_console, repeated_options
from lowbit.errors import LowbitError

__all__ = ["main", "app", "out_console"]

# the command-line parser's own errors (typer may vendor click: found through its classes)
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_TERMINATED: list[int] = []  # set by the SIGTERM handler


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    twice = repeated_options(args)
    if twice:
        _error(f"option {twice} is given more than once; give it once")
        return 2
    previous = _on_sigterm()
    try:
        try:
            return _run(args, debug)
        except KeyboardInterrupt:  # one that arrived while the first was being handled
            return _interrupted()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm() -> Any:
    """SIGTERM unwinds like Ctrl-C (temporary files are removed on the way out); the
    previous handler, or None where signals cannot be set (not the main thread)."""
    def interrupt(signum: int, frame: Any) -> None:
        if _TERMINATED:  # already unwinding: one interruption is enough
            return
        _TERMINATED.append(signum)
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        return None


def _run(args: list[str], debug: bool) -> int:
    try:
        # not standalone: usage errors come here as exceptions and print as one line
        rc = app(args=args, prog_name="lowbit", standalone_mode=False)
    except _USAGE_ERROR as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            out_console.print(ctx.get_help(), markup=False, highlight=False)
            return 2
        where = ctx.command_path if ctx is not None else "lowbit"
        _error(f"{exc.format_message()} (see '{where} --help')")
        return 2
    except _CLICK_ERROR as exc:
        _error(exc.format_message())
        return int(getattr(exc, "exit_code", 1))
    except LowbitError as exc:
        if debug:
            raise
        _error(cli_message(str(exc)))
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        return _interrupted()
    except Exception as exc:  # anything unexpected: one line, not a traceback
        if debug:
            raise
        _error(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)",
               prefix="internal error: ")
        return 1
    if rc == 130:  # typer turns Ctrl-C inside a verb into exit code 130
        return _interrupted()
    return int(rc or 0) if isinstance(rc, int) else 0


def _error(message: str, prefix: str = "error: ") -> None:
    err_console.print(prefix + " ".join(message.split()), markup=False, emoji=False,
                      highlight=False, soft_wrap=True)


def _interrupted() -> int:
    # writes are atomic (a temp file, then a rename): nothing half-written is left
    terminated = bool(_TERMINATED)
    _TERMINATED.clear()
    _error(f"{'terminated' if terminated else 'interrupted'}; nothing written", prefix="")
    return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
