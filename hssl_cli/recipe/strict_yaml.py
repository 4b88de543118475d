"""A YAML loader for recipes and suites that refuses what YAML 1.1 would silently reinterpret: duplicate
keys (the last would win), aliases (a few lines can expand to 10^9 elements), nesting deeper than
MAX_DEPTH, and the 1.1 scalars a reader does not expect (`1:30` is 90, `0x10` is 16, `yes`/`on` are true):
those stay strings, which the schema then refuses where it wants a number or a boolean. Booleans are
true/false, numbers are decimal (with exponents, .inf, .nan), as in YAML 1.2's core schema. An explicit tag
on a value it does not fit (`seed: !!int abc`, `!!bool maybe`, `!!int [1, 2]`) is refused naming the key."""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_DEPTH = 32  # a recipe is 3-4 levels deep

_CORE_SCALARS = [
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789")),
    ("tag:yaml.org,2002:float", re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
     list("-+.0123456789")),
]  # fmt: skip


class UnfitTag(ConstructorError):
    """An explicit tag whose constructor could not read the value it tags; `node` is that value."""

    def __init__(self, node: Node) -> None:
        super().__init__(None, None, f"the tag {_short_tag(node.tag)} does not fit {_shown(node)}", node.start_mark)
        self.node = node


# what PyYAML's constructors raise on a value their tag does not fit (int('abc'), bool_values['maybe'], ...)
_UNFIT_VALUE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, OverflowError, IndexError)


class StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            raise ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed; write the value out",
                                event.start_mark)
        opening = self.check_event(MappingStartEvent, SequenceStartEvent)
        if opening:
            self._depth = getattr(self, "_depth", 0) + 1
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if opening:
                self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except _UNFIT_VALUE_ERRORS:
            raise UnfitTag(node) from None

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        if not isinstance(node, MappingNode):  # `!!map [1]`, `!!set 3`
            raise UnfitTag(node)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (dict, list, set)):
                raise ConstructorError(None, None, "a key must be a plain value", key_node.start_mark)
            if key in seen:
                raise ConstructorError(None, None, f"duplicate key '{key}' (first on line {seen[key]})",
                                       key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 core scalars instead of SafeLoader's 1.1 ones (the null and merge-key resolvers stay)
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _regexp, _first in _CORE_SCALARS:
    StrictLoader.add_implicit_resolver(_tag, _regexp, _first)
StrictLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(node.value))
StrictLoader.add_constructor("tag:yaml.org,2002:float", lambda loader, node: float(
    {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}.get(node.value.lower(), node.value)))


def load_strict(text: str) -> tuple[Any, yaml.Node | None]:
    """The document's value and its node tree (for the lines of keys), in one pass."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        try:
            return (loader.construct_document(node) if node is not None else None), node
        except UnfitTag as error:
            key = ".".join(_key_path(node, error.node) or ())
            raise ConstructorError(None, None, f"{key + ': ' if key else ''}{error.problem}; remove the tag (plain "
                                   "values need none)", error.problem_mark) from None
    finally:
        loader.dispose()


def _key_path(tree: Node, target: Node) -> tuple[str, ...] | None:
    """The dotted key path of `target` inside `tree` (list items by index), or None if it is not a value."""
    if tree is target:
        return ()
    if isinstance(tree, MappingNode):
        children = [(str(key.value) if isinstance(key, ScalarNode) else "?", value) for key, value in tree.value]
    elif isinstance(tree, SequenceNode):
        children = [(str(index), item) for index, item in enumerate(tree.value)]
    else:
        return None
    for name, child in children:
        path = _key_path(child, target)
        if path is not None:
            return (name, *path)
    return None


def _short_tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!", 1)


def _shown(node: Node) -> str:
    if isinstance(node, ScalarNode):
        return repr(node.value[:40])
    return "a list" if isinstance(node, SequenceNode) else "a mapping"
