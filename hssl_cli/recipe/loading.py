"""Reading recipes: bounded UTF-8 text, YAML with the line of every key, `--set` overrides, and pydantic's
errors turned into one line naming file:line, the dotted key and a fix."""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from hssl_cli.errors import RecipeError
from hssl_cli.recipe.schema import Recipe
from hssl_cli.recipe.strict_yaml import load_strict


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply `--set key.sub=value` overrides, validate against the schema."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file (see the recipes/ folder for examples)")
    return parse_recipe(read_text_file(path, "recipe"), source=str(path), overrides=overrides, require_name=True)


MAX_TEXT_FILE_BYTES = 1_000_000  # recipes and suites are a few kB; a bigger file is not one


def read_text_file(path: Path, what: str) -> str:
    """A recipe or suite file's text; unreadable, oversized or non-UTF-8 files are one-line errors."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TEXT_FILE_BYTES + 1)
    except OSError as error:
        raise RecipeError(f"{path}: cannot read this {what} file ({error.strerror})") from None
    if len(data) > MAX_TEXT_FILE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_TEXT_FILE_BYTES:,} bytes; a {what} is a short YAML text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text (byte {error.start}); a {what} is a YAML text file") from None


def read_yaml_mapping(text: str, source: str, what: str) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """A YAML document that must be a mapping (an empty one is {}), and the line of every key path."""
    try:
        raw, node = load_strict(text)
        lines = _key_lines(node)
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply for a {what.split(' is ')[0].removeprefix('a ')}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and context_mark:
            problem += f" ({context} on line {context_mark.line + 1})"
        kind = "refused" if isinstance(error, (ComposerError, ConstructorError)) else "YAML syntax error"
        raise RecipeError(f"{where}: {kind}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {what}, not a list or value")
    return raw, lines


def parse_recipe(text: str, source: str, overrides: typing.Sequence[str] = (), require_name: bool = False
                 ) -> Recipe:
    """A recipe from YAML text; `require_name` (recipe files): refuse one without `name:` (else the name
    is the source's stem)."""
    raw, lines = read_yaml_mapping(text, source, "a recipe is a YAML mapping of sections (data, augment, ...)")
    if not raw:
        raise RecipeError(f"{source}: an empty recipe; a recipe names its run at least, e.g. name: my_run "
                          "(see recipes/quickstart.yaml)")
    overridden = {}
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value, override)
        overridden[key] = override
    named = "name" in raw
    raw.setdefault("name", Path(source).stem)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(describe_validation_error(error, source, lines, Recipe, overridden)) from None
    if require_name and not named:
        raise RecipeError(f"{source}: no name: key; a recipe names its run (the output folder), e.g. name: my_run")
    return recipe



def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, value = override.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise RecipeError(f"--set {override}: expected key.sub=value, e.g. --set optim.lr=0.2")
    try:
        return key.strip(), load_strict(value)[0]
    except (yaml.YAMLError, RecursionError):
        raise RecipeError(f"--set {override}: the value is not valid YAML") from None


def _set_dotted(tree: dict[str, Any], key: str, value: Any, override: str) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for index, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parents[: index + 1])
            raise RecipeError(f"--set {override}: '{prefix}' is a value, not a section")
        node = child
    node[leaf] = value


def _key_lines(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map each dotted key path of a YAML document to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, str(index))
            lines[path] = item.start_mark.line + 1
            lines.update(_key_lines(item, path))
    return lines


def describe_validation_error(error: ValidationError, source: str, lines: dict, root: type[BaseModel],
                              overridden: dict[str, str] | None = None) -> str:
    """Turn pydantic's first error into one line naming file:line, the dotted key and the fix."""
    first = error.errors()[0]
    path, model = _schema_path(first["loc"], root)
    key = ".".join(path) or "(top level)"
    if first["type"] == "extra_forbidden":
        known = list(model.model_fields) if model else []
        close = difflib.get_close_matches(path[-1], known, n=1)
        hint = f"did you mean '{'.'.join((*path[:-1], close[0]))}'?" if close else f"known keys: {', '.join(known)}"
        message = f"unknown key '{key}'; {hint}"
    elif first["type"] == "union_tag_invalid":
        tags = first.get("ctx", {}).get("expected_tags", "")
        close = difflib.get_close_matches(str(first["ctx"].get("tag", "")), [t.strip(" '") for t in tags.split(",")],
                                          n=1) if tags else []
        hint = f"did you mean '{close[0]}'? " if close else ""
        message = f"{key}.name: '{first['ctx'].get('tag')}' is not a method; {hint}known: {tags.replace(chr(39), '')}"
    elif first["type"] == "union_tag_not_found":
        given = first.get("input") if isinstance(first.get("input"), dict) else {}
        close = difflib.get_close_matches("name", [str(k) for k in given], n=1)
        message = (f"unknown key '{key}.{close[0]}'; did you mean '{key}.name'? (it picks the method)" if close
                   else f"{key}: no name: key; {key}.name picks the method, e.g. {key}: {{name: simclr}}")
    elif first["type"] == "value_error" or not path:
        message = first["msg"].removeprefix("Value error, ")
        message = f"{key}: {message}" if path else message
    else:
        given = first.get("input")
        shown = "" if isinstance(given, dict) or first["type"] == "missing" else f" (got {given!r})"
        message = f"{key}: {first['msg']}{shown}"
    if error.error_count() > 1:
        message += f" (and {error.error_count() - 1} more problem(s))"
    for dotted, override in (overridden or {}).items():
        if path and (key == dotted or f"{key}.".startswith(f"{dotted}.") or dotted.startswith(f"{key}.")):
            return f"--set {override}: {message}"
    line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
    return f"{source}:{line}: {message}" if line else f"{source}: {message}"


def _schema_path(loc: tuple, root: type[BaseModel]) -> tuple[tuple[str, ...], type[BaseModel] | None]:
    """Drop the union tags pydantic puts in error locations; return the key path and the model
    that holds its last key (for "did you mean")."""
    model: type[BaseModel] | None = root
    owner = model
    path: list[str] = []
    parts = [str(part) for part in loc]
    while parts:
        part = parts.pop(0)
        path.append(part)
        owner = model
        field = model.model_fields.get(part) if model else None
        annotation = _without_none(field.annotation) if field else None
        if typing.get_origin(annotation) is list and parts and parts[0].isdigit():  # a list of sections
            path.append(parts.pop(0))
            annotation = typing.get_args(annotation)[0]
        members = _union_members(annotation) if field else []
        if len(members) > 1 and parts:
            tag = parts.pop(0)
            model = next((m for m in members if m.model_fields["name"].default == tag), None)
        else:
            model = members[0] if len(members) == 1 else None
    return tuple(path), owner


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = typing.get_args(annotation)
    else:
        candidates = (annotation,)
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X (an optional list of sections is still a list of sections)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation
