"""Reading a recipe's YAML as nodes, so every refusal can name its line: the safe
loader only (plus YAML 1.2 floats such as ``1e-4``), plain tags only, keys given once."""

from __future__ import annotations

import re
from typing import Any

import yaml

from lowbit.errors import ValidationError

__all__ = ["Where", "compose", "node_value", "mapping"]


class Where:
    """``FILE:LINE`` of a YAML node (lines counted from 1)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, node: yaml.Node) -> str:
        return f"{self.source}:{node.start_mark.line + 1}"


class SafeRecipeLoader(yaml.SafeLoader):
    """The safe loader, plus YAML 1.2 floats without a dot (``1e-4``; YAML 1.1, and so
    PyYAML, reads them as strings, a surprise for a learning rate)."""


SafeRecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


SAFE_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in
                       ("str", "int", "float", "bool", "null", "map", "seq"))


def compose(text: str, source: str) -> yaml.Node | None:
    loader = SafeRecipeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ValidationError(f"{source}{line}: not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ValidationError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()
    check_tags(root, Where(source))
    return root


def check_tags(root: yaml.Node | None, where: Where) -> None:
    """Plain data only: no ``!!python/...`` or other explicit tags, no merge keys
    (the safe loader would refuse most of them, with a less clear message)."""
    seen: set[int] = set()
    todo = [root] if root is not None else []
    while todo:
        node = todo.pop()
        if id(node) in seen:  # an alias: already checked (and maybe recursive)
            continue
        seen.add(id(node))
        if node.tag == "tag:yaml.org,2002:timestamp":
            raise ValidationError(f"{where(node)}: {node.value!r} reads as a date; quote it")
        if node.tag not in SAFE_TAGS:
            raise ValidationError(f"{where(node)}: tag {node.tag!r} is not allowed in a recipe "
                                  "(plain values, lists and mappings only)")
        if isinstance(node, yaml.MappingNode):
            todo.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)


def node_value(node: yaml.Node, where: Where) -> Any:
    """The Python value of a node (safe types only)."""
    loader = SafeRecipeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise ValidationError(f"{where(node)}: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()


def mapping(node: yaml.MappingNode, where: Where, what: str
             ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """key -> (key node, value node); keys must be strings, each given once."""
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = node_value(key_node, where)
        if not isinstance(key, str):
            raise ValidationError(f"{where(key_node)}: {what}: key {key!r} is not a name")
        if key in out:
            raise ValidationError(f"{where(key_node)}: {what}: key {key!r} is given twice "
                                  f"(first on line {out[key][0].start_mark.line + 1})")
        out[key] = (key_node, value_node)
    return out
