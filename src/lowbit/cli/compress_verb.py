"""``lowbit compress``: a recipe of stages (built-in or YAML) over one model, or Deep
Compression (prune + cluster) from --sparsity/--bits. Registered by ``build_verbs``, in
its place among the verbs that write a model."""

from __future__ import annotations

from pathlib import Path

import typer

from lowbit.cli.common import check_output, finish, out_console, progress_bar, refuse_options


def _list_recipes(value: bool) -> None:
    if not value:
        return
    from lowbit.config.recipe import builtin_recipes

    recipes = builtin_recipes()
    width = max(map(len, recipes))
    for name, description in recipes.items():
        out_console.print(f"{name:<{width}}  {description}", markup=False, highlight=False,
                          soft_wrap=True)
    out_console.print("lowbit compress --show-recipe NAME prints one as YAML (to copy and "
                      "edit, then --recipe FILE)", markup=False, highlight=False,
                      soft_wrap=True)
    raise typer.Exit()


def _show_recipe(value: str | None) -> None:
    if value is None:
        return
    from lowbit.config.recipe import builtin_recipe_text

    out_console.print(builtin_recipe_text(value), end="", markup=False, highlight=False,
                      soft_wrap=True)
    raise typer.Exit()


def compress(
    model: Path = typer.Argument(..., help="Float ONNX model (the teacher with --student)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .lbz (or .onnx, or .tflite: "
                                "the recipe's result exported as by lowbit export)."),
    recipe: str | None = typer.Option(None, "--recipe", help="Built-in recipe name (see "
                                      "--list-recipes) or a YAML recipe file."),
    data: Path | None = typer.Option(None, "--data", help=".npz training/calibration data (x, y)."),
    eval_data: Path | None = typer.Option(None, "--eval-data", "--val", help=".npz verification "
                                          "data; default: the last 20% of --data, held back."),
    student: Path | None = typer.Option(None, "--student", help="A smaller ONNX model to "
                                        "compress instead, taught by MODEL (distillation)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run after its "
                                "last finished stage (checkpoints in OUT.checkpoints)."),
    sparsity: float | None = typer.Option(None, help="Without --recipe: weights to prune, "
                                          "[0, 1) (default 0.9)."),
    bits: int | None = typer.Option(None, help="Without --recipe: bits per shared value, 1..8 "
                                    "(default 5)."),
    epochs: int | None = typer.Option(None, help="Without --recipe: fine-tuning epochs for each "
                                      "stage (default 0)."),
    lr: float | None = typer.Option(None, help="Without --recipe: learning rate (default 1e-3; "
                                    "centroids use a tenth)."),
    max_drop: float | None = typer.Option(None, "--max-drop", help="Search: the most compressed "
                                          "model within this many accuracy points (needs labels)."),
    min_cosine: float | None = typer.Option(None, "--min-cosine", help="Search: ... whose outputs "
                                            "keep this cosine similarity (no labels needed)."),
    budget: str = typer.Option("10m", "--budget", help="Search: time allowed (90s, 10m, 1h); the "
                               "best model found so far is returned when it runs out."),
    objective: str = typer.Option("size", "--objective", help="Search: size (.lbz bytes) or "
                                  "latency."),
    techniques: str | None = typer.Option(None, "--techniques", help="Search: comma list of "
                                          "prune, structured, cluster, int8 (default by objective)."),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads for timing."),
    require: bool = typer.Option(False, "--require", help="Exit 1 if the report flags a degradation."),
    quiet: bool = typer.Option(False, "--quiet", help="No table or progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    list_recipes: bool = typer.Option(False, "--list-recipes", is_eager=True,
                                      callback=_list_recipes, help="List the built-in recipes."),
    show_recipe: str | None = typer.Option(None, "--show-recipe", is_eager=True,
                                           callback=_show_recipe, help="Print a built-in "
                                           "recipe's YAML."),
) -> None:
    """Compress with a recipe of stages, or prune + cluster (Deep Compression) into a .lbz.

    Example: lowbit compress cnn.onnx -o cnn.small.onnx --recipe edge --data train.npz --val val.npz
    Example: lowbit compress cnn.onnx -o cnn.lbz --recipe my-recipe.yaml --data train.npz
    Example: lowbit compress lenet.onnx -o lenet.lbz --sparsity 0.95 --bits 5 --data train.npz --epochs 10
    Example: lowbit compress cnn.onnx -o cnn.lbz --max-drop 0.5 --budget 10m --data train.npz
    Built-in recipes: lowbit compress --list-recipes
    """
    from lowbit.api import compress as api_compress

    if max_drop is not None or min_cosine is not None:
        _search(model, output, data, eval_data, max_drop=max_drop, min_cosine=min_cosine,
                budget=budget, objective=objective, techniques=techniques, threads=threads,
                require=require, quiet=quiet, as_json=as_json,
                others={"--recipe": recipe, "--student": student, "--sparsity": sparsity,
                        "--bits": bits, "--epochs": epochs, "--lr": lr})
        return

    loaded = None
    recipe_file = None
    if recipe is not None:  # a bad recipe is refused first, before anything is read
        from lowbit.config.recipe import load_recipe

        loaded = load_recipe(recipe)
        refuse_options({"--sparsity": sparsity, "--bits": bits, "--epochs": epochs, "--lr": lr},
                       "--recipe (the recipe sets its stages' options)")
        recipe_file = Path(recipe) if Path(recipe).is_file() else None
    if output.suffix.lower() == ".tflite":  # a recipe's result written as TFLite
        from lowbit.cli.export_verb import export

        refuse_options({"--student": student, "--sparsity": sparsity, "--bits": bits,
                        "--epochs": epochs, "--lr": lr}, "a .tflite output (use --recipe)")
        export(model, "tflite", output, data, eval_data, "auto", "float", recipe, None, threads,
               quiet, as_json)
        return
    check_output(output, model, data, eval_data, student, recipe_file)
    checkpoints = output.with_name(output.name + ".checkpoints")
    show = not quiet and not as_json
    with progress_bar(show) as update:
        cm = api_compress(str(model), str(data) if data else None, recipe=loaded,
                          sparsity=sparsity, bits=bits, epochs=epochs, lr=lr,
                          student=str(student) if student else None, checkpoints=checkpoints,
                          resume=resume, threads=threads,
                          eval_data=str(eval_data) if eval_data else None, progress=update)
    title = f"original vs compressed (recipe {loaded.name})" if loaded else "original vs compressed"
    finish(cm, output, show, as_json, require, title)


def _search(model: Path, output: Path, data: Path | None, eval_data: Path | None, *,
            budget: str, others: dict[str, object], require: bool, quiet: bool, as_json: bool,
            **options: object) -> None:
    """``--max-drop``/``--min-cosine``: the accuracy-aware search (``search_compression``)."""
    from lowbit.api import search_compression
    from lowbit.autosearch import parse_budget

    refuse_options(others, "--max-drop/--min-cosine (the search chooses the stages)")
    seconds = parse_budget(budget, "--budget")
    check_output(output, model, data, eval_data)
    show = not quiet and not as_json
    with progress_bar(show) as update:
        outcome = search_compression(str(model), str(data) if data else None, budget_s=seconds,
                                     eval_data=str(eval_data) if eval_data else None,
                                     progress=update, **options)
    finish(outcome, output, show, as_json, require, "original vs best found (search)")
    if show:
        out_console.print(outcome.summary, soft_wrap=True)
