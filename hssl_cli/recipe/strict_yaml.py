"""A YAML loader for recipes and suites that refuses what YAML 1.1 would silently reinterpret: duplicate
keys (the last would win), aliases (a few lines can expand to 10^9 elements), nesting deeper than
MAX_DEPTH, and the 1.1 scalars a reader does not expect (`1:30` is 90, `0x10` is 16, `yes`/`on` are true):
those stay strings, which the schema then refuses where it wants a number or a boolean. Booleans are
true/false, numbers are decimal (with exponents, .inf, .nan), as in YAML 1.2's core schema."""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent

MAX_DEPTH = 32  # a recipe is 3-4 levels deep

_CORE_SCALARS = [
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789")),
    ("tag:yaml.org,2002:float", re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
     list("-+.0123456789")),
]  # fmt: skip


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

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (dict, list)):
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
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()
