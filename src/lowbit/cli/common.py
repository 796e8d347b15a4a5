"""What every verb of the command line shares: the app, the consoles, progress bars,
and saving a result with its table or JSON."""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from lowbit.backends.torch.distributed import is_main
from lowbit.errors import TargetNotMetError
from lowbit.fileio import report_path

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make trained neural networks smaller and faster, and prove it.")
out_console = Console()
err_console = Console(stderr=True)


@contextmanager
def progress_bar(enabled: bool) -> Any:
    """Yields a callback (stage, done, total) that drives a rich progress bar, shown from
    the first update on (a run refused before any work prints nothing but its error)."""
    if not enabled or not is_main():  # (under torchrun, process 0 shows the progress)
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    tasks: dict[str, Any] = {}
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   console=err_console, transient=True)

    def update(stage: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def emit(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")


def finish(result: Any, output: Path, show: bool, as_json: bool, require: bool, title: str,
           label: str = "compressed") -> None:
    """Save the result, print its table (or JSON), and apply --require."""
    result.save(output)
    report = result.report
    if not is_main():  # under torchrun, process 0 speaks for the run
        return
    if show:
        from lowbit.report.table import render_report

        render_report(report, out_console, title=title, label=label)
        out_console.print(f"wrote {output} and {report_path(output)}")
    emit(report, as_json)
    flags = report.get("verification", {}).get("flags", [])
    if require and flags:
        raise TargetNotMetError("--require: the report flags " + "; ".join(f["kind"] for f in flags))


# API/config names whose command-line option is spelled differently
_CLI_NAMES = {"weight_granularity": "--weights", "max_calibration_samples": "--max-samples",
              "exclude_nodes": "--exclude", "symmetric": "--asymmetric", "n:m": "--nm",
              "eval_data": "--eval-data", "data": "--data"}
_OPTION_LIST = re.compile(r"\b(options?) ([a-z][a-z_]*(?::[a-z])?(?:(?:, | and | or )[a-z][a-z_]*)*)")


def cli_message(message: str) -> str:
    """An API error message in command-line terms: "option min_cosine" becomes
    "option --min-cosine" (only for names that are options of lowbit)."""
    from dataclasses import fields

    from lowbit.config import CONFIG_TYPES

    known = {f.name for t in CONFIG_TYPES.values() for f in fields(t)} | set(_CLI_NAMES) | {
        "batch", "threads", "iterations", "max_bits", "bits", "epochs", "lr", "init", "output"}

    def flag(name: str) -> str:
        return _CLI_NAMES.get(name, "--" + name.replace("_", "-")) if name in known else name

    def rewrite(match: re.Match[str]) -> str:
        names = re.split(r"(, | and | or )", match.group(2))
        return match.group(1) + " " + "".join(n if n in (", ", " and ", " or ") else flag(n)
                                              for n in names)

    return _OPTION_LIST.sub(rewrite, message)


REPEATABLE = frozenset({"--exclude"})
_SAME_OPTION = {"-o": "--output", "--val": "--eval-data"}  # two spellings of one option


def repeated_options(args: list[str]) -> str | None:
    """The first option given twice (the last would silently win), if any."""
    seen: set[str] = set()
    for arg in args:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if not name.startswith("-") or name in REPEATABLE or _is_number(name):
            continue
        name = _SAME_OPTION.get(name, name)
        if name in seen:
            return name
        seen.add(name)
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
    from lowbit.model_io import external_data_files

    companions = [f for item in inputs for f in external_data_files(item)]
    check_output_path(output, (*inputs, *companions), report=report, suffixes=suffixes)


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    from lowbit.errors import ValidationError

    if nm is None:
        return None
    try:
        n, m = (int(v) for v in nm.split(":"))
    except ValueError:
        raise ValidationError(f"option --nm: {nm!r} must look like 2:4") from None
    return n, m

