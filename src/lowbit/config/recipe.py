"""Recipes: an ordered list of stage configs (plus run-level distillation) read from a
YAML file, or one of the built-in named recipes, checked whole before any work starts.

A recipe file::

    name: my-edge                            # optional (default: the file's name)
    description: small and fast on a phone   # optional
    distill: {temperature: 4, alpha: 0.7}    # optional; `distill: true` for the defaults
    stages:
      - structured-prune: {sparsity: 0.5, epochs: 2}
      - prune: {sparsity: 0.8, epochs: 3}
      - cluster: {bits: 4, epochs: 1}
      - qat                                  # a bare name: the stage's defaults

Every refusal is one line naming the file and the line (``edge.yaml:7: stage 3
(cluster): option bits: 9 must be an integer from 1 to 8``)::

    >>> load_recipe("edge").stages[0].kind
    'prune-structured'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from lowbit.config import (
    CONFIG_TYPES,
    DistillSettings,
    StageConfig,
)
from lowbit.config.order import order_problem
from lowbit.config.recipe_yaml import Where, compose, mapping, node_value
from lowbit.errors import ValidationError

__all__ = ["Recipe", "load_recipe", "recipe_from_text", "builtin_recipes", "builtin_recipe_text",
           "STAGE_ALIASES"]

RECIPE_MAX_BYTES = 1 << 20  # a recipe is a few lines of YAML
TOP_LEVEL_KEYS = ("name", "description", "distill", "stages")
# short names a recipe may use for a stage kind (every kind is also its own name)
STAGE_ALIASES = {
    "structured-prune": "prune-structured", "structured": "prune-structured",
    "magnitude-prune": "prune", "weight-sharing": "cluster",
    "int8": "quantize-int8", "ptq": "quantize-int8",
    "weight-only": "quantize-weight-only", "mixed": "quantize-mixed",
    "mixed-precision": "quantize-mixed", "qat": "quantize-qat", "distillation": "distill",
}
_OPTION = re.compile(r"\boption (\w+)")


@dataclass(frozen=True)
class Recipe:
    """Stages to run in order over one model, and whether every training stage also
    learns from a teacher (``distill``)."""

    name: str
    stages: tuple[StageConfig, ...]
    distill: DistillSettings | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValidationError(f"recipe name: expected a non-empty string, got {self.name!r}")
        stages = tuple(self.stages) if isinstance(self.stages, (list, tuple)) else None
        if stages is None or not all(isinstance(c, StageConfig) for c in stages):
            raise ValidationError(f"recipe {self.name}: stages must be a list of configs such "
                                  "as PruneConfig")
        object.__setattr__(self, "stages", stages)
        if self.distill is not None and not isinstance(self.distill, DistillSettings):
            raise ValidationError(f"recipe {self.name}: distill must be DistillSettings or None, "
                                  f"not {type(self.distill).__name__}")
        _check_order(stages, None, f"recipe {self.name}", [])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "distill": None if self.distill is None else self.distill.to_dict(),
                "stages": [c.to_dict() for c in self.stages]}


# Built-in recipes: YAML text, read by the same parser as a user's file (so they are
# checked the same way, and `lowbit compress --show-recipe NAME` prints one to copy).
# Epochs are modest: a recipe should finish on a small CPU for a small CNN or MLP.
_BUILTIN = {
    "int8": """\
description: INT8 post-training quantization (auto picks static/dynamic per layer by timing); no training
stages:
  - quantize-int8: {mode: auto}
""",
    "int8-qat": """\
description: INT8 quantization-aware training, 2 epochs (needs labelled --data)
stages:
  - quantize-qat: {epochs: 2, lr: 0.0001}
""",
    "w4a8-qat": """\
description: 4-bit weight grid with INT8 activations, quantization-aware training, 3 epochs
stages:
  - quantize-qat: {weight_bits: 4, epochs: 3, lr: 0.0001}
""",
    "int4-weight-only": """\
description: 4-bit group-wise MatMul/Gemm weights (transformers); no training, no data needed
stages:
  - quantize-weight-only: {bits: 4, group_size: 128, algorithm: rtn}
""",
    "deep-compression": """\
description: prune 90% (gradual, global) then share 32 values per layer; save as .lbz
stages:
  - prune: {sparsity: 0.9, scope: global, epochs: 4, lr: 0.001}
  - cluster: {bits: 5, epochs: 1, lr: 0.0001}
""",
    "edge": """\
description: 3/4 of the channels removed, half the weights pruned, 16 shared values, INT8 QAT, distilled
distill: {temperature: 4, alpha: 0.7}
stages:
  - prune-structured: {sparsity: 0.75, epochs: 6, lr: 0.003}
  - prune: {sparsity: 0.5, scope: global, epochs: 2, lr: 0.001}
  - cluster: {bits: 4, epochs: 1, lr: 0.0001}
  - quantize-qat: {epochs: 1, lr: 0.0001}
""",
}


def builtin_recipes() -> dict[str, str]:
    """The built-in recipes' names and one-line descriptions."""
    return {name: recipe_from_text(text, f"<recipe {name}>", name=name).description
            for name, text in _BUILTIN.items()}


def builtin_recipe_text(name: str) -> str:
    """The YAML of a built-in recipe (to copy and edit)."""
    if name not in _BUILTIN:
        raise ValidationError(f"recipe {name!r}: no built-in recipe of that name; built-in: "
                              f"{', '.join(_BUILTIN)}")
    return f"name: {name}\n" + _BUILTIN[name]


def load_recipe(recipe: str | os.PathLike[str] | Recipe) -> Recipe:
    """A recipe from a built-in name (``"edge"``) or a YAML file path.

    >>> load_recipe("deep-compression").stages[1].bits
    5
    """
    if isinstance(recipe, Recipe):
        return recipe  # checked when it was made
    if not isinstance(recipe, (str, os.PathLike)):
        raise ValidationError(f"recipe: expected a built-in name or a YAML file path, got "
                              f"{type(recipe).__name__}")
    text = os.fspath(recipe)
    if isinstance(recipe, str) and text in _BUILTIN:
        return recipe_from_text(_BUILTIN[text], f"<recipe {text}>", name=text)
    path = Path(text)
    if not path.is_file():
        hint = "" if path.suffix.lower() in (".yaml", ".yml") else \
            f"; built-in recipes: {', '.join(_BUILTIN)}"
        what = "is not a file" if path.exists() else "not found"
        raise ValidationError(f"recipe {text}: {what}{hint}")
    size = path.stat().st_size
    if size > RECIPE_MAX_BYTES:
        raise ValidationError(f"recipe {text}: {size:,} bytes; a recipe is a small YAML file")
    try:
        body = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"recipe {text}: cannot be read as UTF-8 text ({exc})") from None
    return recipe_from_text(body, text, name=path.stem)


def recipe_from_text(text: str, source: str = "<recipe>", *, name: str = "recipe") -> Recipe:
    """Parse and check a recipe's YAML; ``source`` names it in errors, ``name`` is the
    recipe's name when the text gives none."""
    root = compose(text, source)
    where = Where(source)
    if root is None:
        raise ValidationError(f"{source}: empty recipe; it needs a list of stages")
    if not isinstance(root, yaml.MappingNode):
        raise ValidationError(f"{where(root)}: a recipe is a mapping with the keys "
                              f"{', '.join(TOP_LEVEL_KEYS)}")
    top = mapping(root, where, "recipe")
    unknown = [k for k in top if k not in TOP_LEVEL_KEYS]
    if unknown:
        key_node = top[unknown[0]][0]
        raise ValidationError(f"{where(key_node)}: unknown key {unknown[0]!r}; a recipe has "
                              f"{', '.join(TOP_LEVEL_KEYS)}")
    name = _text(top, "name", where, name)
    description = _text(top, "description", where, "")
    distill = _distill(top.get("distill"), where)
    if "stages" not in top:
        raise ValidationError(f"{where(root)}: no 'stages' key; a recipe needs a list of stages")
    stages_node = top["stages"][1]
    if not isinstance(stages_node, yaml.SequenceNode):
        raise ValidationError(f"{where(stages_node)}: 'stages' must be a list (one '- kind: "
                              "{options}' per line)")
    if not stages_node.value:
        raise ValidationError(f"{where(stages_node)}: 'stages' is empty; a recipe needs at "
                              "least one stage")
    stages = tuple(_stage(node, i + 1, where) for i, node in enumerate(stages_node.value))
    _check_order(stages, where, source, stages_node.value)
    return Recipe(name=name, stages=stages, distill=distill, description=description)


def _built(make: Any, known_fields: Any, options: dict[str, tuple[yaml.Node, yaml.Node]],
           node: yaml.Node, where: Where, label: str) -> Any:
    """``make(values)`` from a mapping of options; an unknown option or a value the
    config refuses is one line naming the file, the line and ``label``."""
    known = [f.name for f in known_fields]
    for key, (key_node, _) in options.items():
        if key not in known:
            raise ValidationError(f"{where(key_node)}: {label}: unknown option {key!r}; "
                                  f"known: {', '.join(known)}")
    values = {k: node_value(v, where) for k, (_, v) in options.items()}
    try:
        return make(values)
    except ValidationError as exc:
        raise ValidationError(f"{_line_of(str(exc), options, node, where)}: {label}: {exc}") from None
    except (TypeError, ValueError) as exc:  # a value of a type no check foresaw
        raise ValidationError(f"{where(node)}: {label}: bad value ({exc})") from None


def _text(top: dict[str, tuple[yaml.Node, yaml.Node]], key: str, where: Where,
          default: str) -> str:
    if key not in top:
        return default
    node = top[key][1]
    value = node_value(node, where)
    if not isinstance(value, str) or "\n" in value.strip() or not value.strip():
        raise ValidationError(f"{where(node)}: {key}: expected one line of text, got {value!r}")
    return value.strip()


def _distill(entry: tuple[yaml.Node, yaml.Node] | None, where: Where) -> DistillSettings | None:
    if entry is None:
        return None
    node = entry[1]
    if isinstance(node, yaml.ScalarNode):
        value = node_value(node, where)
        if isinstance(value, bool):
            return DistillSettings() if value else None
        raise ValidationError(f"{where(node)}: distill: expected true, false or a mapping of "
                              f"temperature, alpha, loss; got {value!r}")
    if not isinstance(node, yaml.MappingNode):
        raise ValidationError(f"{where(node)}: distill: expected true, false or a mapping of "
                              "temperature, alpha, loss")
    options = mapping(node, where, "distill")
    return _built(lambda values: DistillSettings(**values), fields(DistillSettings), options,
                  node, where, "distill")


def _kinds() -> str:
    aliases = ", ".join(f"{a} ({k})" for a, k in STAGE_ALIASES.items())
    return f"{', '.join(sorted(CONFIG_TYPES))}; short names: {aliases}"


def _stage(node: yaml.Node, number: int, where: Where) -> StageConfig:
    """One ``- kind: {options}`` (or ``- kind``, or ``- {kind: ..., options}``) item."""
    kind_node: yaml.Node = node
    options: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    options_node: yaml.Node = node
    if isinstance(node, yaml.ScalarNode):
        kind = node_value(node, where)
    elif isinstance(node, yaml.MappingNode):
        entries = mapping(node, where, f"stage {number}")
        if "kind" in entries:  # the to_dict form: {kind: prune, sparsity: 0.5}
            kind_node = entries.pop("kind")[1]
            kind, options = node_value(kind_node, where), entries
        elif len(entries) == 1:
            (kind, (kind_node, options_node)), = entries.items()
            if isinstance(options_node, yaml.MappingNode):
                options = mapping(options_node, where, f"stage {number} ({kind})")
            elif not (isinstance(options_node, yaml.ScalarNode)
                      and node_value(options_node, where) is None):
                raise ValidationError(f"{where(options_node)}: stage {number} ({kind}): expected "
                                      f"a mapping of options ({{sparsity: 0.5, epochs: 2}}), "
                                      f"got {node_value(options_node, where)!r}")
        else:
            raise ValidationError(f"{where(node)}: stage {number}: one stage per list item, its "
                                  f"options indented under it ('- prune: {{sparsity: 0.5}}'); "
                                  f"got keys {', '.join(entries)}")
    else:
        raise ValidationError(f"{where(node)}: stage {number}: expected a stage such as "
                              "'- prune: {sparsity: 0.5}'")
    if not isinstance(kind, str) or STAGE_ALIASES.get(kind, kind) not in CONFIG_TYPES:
        raise ValidationError(f"{where(kind_node)}: stage {number}: unknown stage {kind!r}; "
                              f"known: {_kinds()}")
    kind = STAGE_ALIASES.get(kind, kind)
    config_type = CONFIG_TYPES[kind]
    return _built(config_type.from_dict, fields(config_type), options, options_node, where,
                  f"stage {number} ({kind})")


def _line_of(message: str, options: dict[str, tuple[yaml.Node, yaml.Node]], fallback: yaml.Node,
             where: Where) -> str:
    """The line of the option a config's error names ("option sparsity: ..."), else the
    stage's."""
    for name in _OPTION.findall(message):
        base = name.split("[")[0]
        if base in options:
            return where(options[base][1])
    return where(fallback)


def _check_order(stages: tuple[StageConfig, ...], where: Where | None, source: str,
                 nodes: list[yaml.Node]) -> None:
    """The order rules of ``lowbit.pipeline.check_stages``, naming the offending stage
    and its line: a run quantizes at most once, as its last stage; pruning comes before
    clustering."""
    if not stages:
        raise ValidationError(f"{source}: a recipe needs at least one stage")

    def at(i: int) -> str:
        return where(nodes[i]) if where is not None and i < len(nodes) else source

    problem = order_problem(stages)
    if problem is not None:
        raise ValidationError(f"{at(problem[0])}: {problem[1]}")
