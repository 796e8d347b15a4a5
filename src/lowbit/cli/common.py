"""What every verb of the command line shares: the app, the consoles, progress bars,
and saving a result with its table or JSON."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from lowbit.errors import TargetNotMetError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make trained neural networks smaller and faster, and prove it.")
out_console = Console()
err_console = Console(stderr=True)


@contextmanager
def progress_bar(enabled: bool) -> Any:
    """Yields a callback (stage, done, total) that drives a rich progress bar."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err_console, transient=True) as bar:
        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def emit(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")


def finish(result: Any, output: Path, show: bool, as_json: bool, require: bool, title: str,
           label: str = "compressed") -> None:
    """Save the result, print its table (or JSON), and apply --require."""
    result.save(output)
    report = result.report
    if show:
        from lowbit.report.table import render_report

        render_report(report, out_console, title=title, label=label)
        out_console.print(f"wrote {output} and {output.parent / 'report.json'}")
    emit(report, as_json)
    flags = report.get("verification", {}).get("flags", [])
    if require and flags:
        raise TargetNotMetError("--require: the report flags " + "; ".join(f["kind"] for f in flags))


def refuse_options(given: dict[str, Any], context: str) -> None:
    """Options that do not apply in ``context`` are an error when given, not ignored."""
    from lowbit.errors import ValidationError

    used = [name for name, value in given.items() if value is not None]
    if used:
        raise ValidationError(f"option {', '.join(used)}: does not apply with {context}")


MODEL_SUFFIXES = (".onnx", ".lbz")


def check_output(output: Path, *inputs: Any, report: bool = True,
                 suffixes: tuple[str, ...] = MODEL_SUFFIXES) -> None:
    """The output guard (``fileio.check_output_path``), before any work."""
    from lowbit.fileio import check_output_path

    check_output_path(output, inputs, report=report, suffixes=suffixes)


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    from lowbit.errors import ValidationError

    if not nm:
        return None
    try:
        n, m = (int(v) for v in nm.split(":"))
    except ValueError:
        raise ValidationError(f"option --nm: {nm!r} must look like 2:4") from None
    return n, m

