"""Each modifier field described once, in its ``Field(description=...)``; the docstring's field list and README §7
are generated from there (:func:`document`, :func:`readme_section`) and ``tests/test_fields.py`` checks that the
README says what the code does.

    python -m routealign.modifiers.fields README.md     # rewrite the generated README sections in place
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pydantic import BaseModel, model_validator
from pydantic_core import PydanticUndefined

__all__ = ["own_fields", "groups", "default_text", "field_lines", "document", "readme_section", "update_readme",
           "renamed"]

BEGIN = "<!-- generated from {name}'s Field descriptions (python -m routealign.modifiers.fields README.md) -->"
END = "<!-- end of {name}'s fields -->"


def own_fields(cls: type[BaseModel]) -> dict:
    """The fields ``cls`` declares itself or inherits from routealign's settings, not those of llm-compressor's
    classes (``Modifier``, ``QuantizationMixin``: their fields are theirs to document)."""
    inherited = set()
    for base in cls.__mro__[1:]:
        if isinstance(base, type) and issubclass(base, BaseModel) and not base.__module__.startswith("routealign"):
            inherited |= set(base.model_fields)
    return {name: info for name, info in cls.model_fields.items() if name not in inherited}


def groups(info) -> dict[str, type[BaseModel]]:
    """The settings a field nests: its own model's fields (a group such as ``gate``), plus, for a group with
    ``sections()`` (``loss``), each section's model by name."""
    kind = info.annotation
    if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
        return {}
    out = {"": kind}
    sections = getattr(kind, "sections", None)
    if sections is not None:
        out.update(sections())
    return out


def _walk(cls: type[BaseModel], fields: dict, prefix: str = ""):
    """``(dotted name, FieldInfo or None, text)`` for ``fields`` and every field nested in their groups, in
    declaration order; a section (``loss.vsraq``) comes as a name without FieldInfo and its model's first doc line."""
    for name, info in fields.items():
        if not info.description:
            raise ValueError(f"{cls.__name__}.{prefix}{name} has no Field(description=...)")
        yield prefix + name, info, info.description
        for section, model in groups(info).items():
            inner = f"{prefix}{name}."
            if section:
                inner += f"{section}."
                yield inner[:-1], None, (model.__doc__ or "").strip().splitlines()[0]
            yield from _walk(model, dict(model.model_fields), inner)


def default_text(info) -> str:
    """A field's default as the README writes it: strings in backticks, lists joined, none for None."""
    value = info.default_factory() if info.default_factory is not None else info.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" if isinstance(v, str) else str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def field_lines(cls: type[BaseModel]) -> list[str]:
    """``- `name` (default): description`` per own field of ``cls``, each group's fields indented under it; a field
    without a description is an error."""
    lines = []
    for name, info, text in _walk(cls, own_fields(cls)):
        depth = name.count(".")
        default = "section" if info is None else "group" if groups(info) else default_text(info)
        lines.append(f"{'  ' * depth}- `{name}` ({default}): {text}")
    return lines


def document(cls: type[BaseModel]) -> type[BaseModel]:
    """Class decorator: append the field list (``:param name: description``, nested fields by dotted name) to the
    docstring."""
    params = [f"    :param {name}: {text}"
              + ("" if info is None or groups(info) else f" (default {default_text(info)})")
              for name, info, text in _walk(cls, own_fields(cls))]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Fields:\n\n" + "\n".join(params) + "\n"
    return cls


def readme_section(cls: type[BaseModel]) -> str:
    """The generated README block of ``cls``: its markers and field list."""
    name = cls.__name__
    return "\n".join([BEGIN.format(name=name), *field_lines(cls), END.format(name=name)])


def update_readme(path: Path, classes: list[type[BaseModel]]) -> bool:
    """Replace each class's generated block in the README at ``path``; True when the file changed."""
    text = path.read_text()
    new = text
    for cls in classes:
        name = cls.__name__
        pattern = re.compile(re.escape(BEGIN.format(name=name)) + r".*?" + re.escape(END.format(name=name)), re.S)
        if not pattern.search(new):
            raise ValueError(f"{path}: no generated block for {name} (add its two marker lines)")
        new = pattern.sub(lambda _: readme_section(cls), new)
    if new != text:
        path.write_text(new)
    return new != text


def renamed(moves, hint=None):
    """A model validator refusing each old field name in ``moves`` (a dict, or a function returning one) with its new
    place (``'alpha' is now ...``, plus ``hint(new place)`` in parentheses when given); a name that is a field of the
    model itself is never refused."""

    def check(cls, data):
        if not isinstance(data, dict):
            return data
        table = moves() if callable(moves) else moves
        old = [key for key in data if key in table and key not in cls.model_fields]
        if old:
            raise ValueError("; ".join(f"'{key}' is now {table[key]}" + (f" ({hint(table[key])})" if hint else "")
                                       for key in old))
        return data

    return model_validator(mode="before")(classmethod(check))


def documented() -> list[type[BaseModel]]:
    """The modifiers whose fields README §7 lists from their descriptions."""
    from .rounding import RouterAlignedRoundingModifier
    from .smoothing import ExpertAwareSmoothingModifier

    return [RouterAlignedRoundingModifier, ExpertAwareSmoothingModifier]


if __name__ == "__main__":
    changed = update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"), documented())
    print("updated" if changed else "unchanged")
