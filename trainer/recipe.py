"""Recipe files: YAML plus ``section.key=value`` overrides, validated against the schema."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import RecipeError
from .schema import Recipe

BUILTIN_RECIPES = "leantrain.recipes"
DEFAULT_RECIPE = "quickstart"


def resolve_recipe_path(name: str | None) -> Path:
    """A path as given, or the name of a recipe shipped with leantrain (``quickstart``)."""
    name = name or DEFAULT_RECIPE
    path = Path(name)
    if path.exists():
        return path
    shipped = importlib.resources.files(BUILTIN_RECIPES) / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    hint = "; overrides are written section.key=value" if "." in name and not name.endswith(".yaml") else ""
    raise RecipeError(name, None, f"no such recipe file (nor a recipe shipped with leantrain){hint}")


def parse_override(text: str, source: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(source, text, "overrides are written section.key=value, e.g. optimizer.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    for text in overrides:
        keys, value = parse_override(text, source)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise RecipeError(source, ".".join(keys[: depth + 1]), f"is a value, not a section; cannot set {text}")
            node = child
        node[keys[-1]] = value
    return data


def _format_validation_error(err: ValidationError, source: str) -> RecipeError:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    named = re.match(r"^([a-z_.]+): (.*)$", message)
    if named and first["type"] == "value_error":  # a cross-field check names its own key
        key, message = (f"{key}.{named[1]}" if key else named[1]), named[2]
    if first["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; `leantrain validate` lists each section's keys in the README)"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        message = f"{message} (got {first['input']!r})"
    return RecipeError(source, key, message)


def load_recipe(name: str | None, overrides: list[str] | None = None) -> tuple[Recipe, str]:
    """Read, override and validate a recipe. Returns it with the file name used in errors."""
    path = resolve_recipe_path(name)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "parse error"
        raise RecipeError(source, None, f"not valid YAML ({where}: {getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise RecipeError(source, None, "a recipe is a mapping of sections (model:, data:, ...)")
    data = apply_overrides(data, overrides or [], source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _format_validation_error(err, source) from None
    check_files(recipe, source, path.parent)
    return recipe, source


def check_files(recipe: Recipe, source: str, recipe_dir: Path) -> None:
    """Local data files must exist (resolved as given, else next to the recipe file); so must
    a checkpoint named by ``checkpointing.resume``."""
    from .checkpoint import is_checkpoint

    resume = recipe.checkpointing.resume
    if resume not in ("auto", "never") and not is_checkpoint(resume):
        raise RecipeError(source, "checkpointing.resume", f"{resume!r} is not a leantrain checkpoint directory "
                          "(allowed: auto, never, or a checkpoint path)")
    if not recipe.data.files:
        return
    resolved = {}
    for split, file in recipe.data.files.items():
        candidates = [Path(file), recipe_dir / file]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise RecipeError(source, f"data.files.{split}", f"file {file!r} not found (relative paths: from the "
                              f"working directory or from {recipe_dir})")
        resolved[split] = str(found)
    recipe.data.files = resolved
