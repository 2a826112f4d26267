"""Each modifier field described once, in its ``Field(description=...)``; the docstring's field list and README §7
are generated from there (:func:`document`, :func:`readme_section`) and ``tests/test_fields.py`` checks that the
README says what the code does.

    python -m routealign.modifiers.fields README.md     # rewrite the generated README sections in place
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["own_fields", "default_text", "field_lines", "document", "readme_section", "update_readme"]

BEGIN = "<!-- generated from {name}'s Field descriptions (python -m routealign.modifiers.fields README.md) -->"
END = "<!-- end of {name}'s fields -->"


def own_fields(cls: type[BaseModel], base: type | None = None) -> dict:
    """The fields ``cls`` declares beyond ``base``'s (llm-compressor's ``Modifier`` by default)."""
    if base is None:
        from llmcompressor.modifiers import Modifier

        base = Modifier
    inherited = set(getattr(base, "model_fields", {}))
    return {name: info for name, info in cls.model_fields.items() if name not in inherited}


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


def field_lines(cls: type[BaseModel], base: type | None = None) -> list[str]:
    """``- `name` (default): description`` per own field of ``cls``; a field without a description is an error."""
    lines = []
    for name, info in own_fields(cls, base).items():
        if not info.description:
            raise ValueError(f"{cls.__name__}.{name} has no Field(description=...)")
        lines.append(f"- `{name}` ({default_text(info)}): {info.description}")
    return lines


def document(cls: type[BaseModel]) -> type[BaseModel]:
    """Class decorator: append the field list (``:param name: description``) to the docstring."""
    params = [f"    :param {name}: {info.description} (default {default_text(info)})"
              for name, info in own_fields(cls).items()]
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


def documented() -> list[type[BaseModel]]:
    """The modifiers whose fields README §7 lists from their descriptions."""
    from .smoothing import ExpertAwareSmoothingModifier

    return [ExpertAwareSmoothingModifier]


if __name__ == "__main__":
    changed = update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"), documented())
    print("updated" if changed else "unchanged")
