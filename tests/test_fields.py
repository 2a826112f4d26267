"""Each modifier field is described once (its ``Field(description=...)``); the docstring and README §7 say the same."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from routealign.modifiers.fields import documented, field_lines, own_fields, readme_section, update_readme

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("cls", documented(), ids=lambda c: c.__name__)
def test_the_readme_lists_the_fields_as_their_descriptions_say(cls):
    assert readme_section(cls) in README.read_text(), (
        f"README §7 is not what {cls.__name__}'s Field descriptions generate: run "
        "`python -m routealign.modifiers.fields README.md`")


@pytest.mark.parametrize("cls", documented(), ids=lambda c: c.__name__)
def test_the_docstring_lists_every_field_with_its_description(cls):
    for name, info in own_fields(cls).items():
        assert info.description and f":param {name}: {info.description}" in cls.__doc__, name


def test_a_field_without_a_description_is_refused_and_the_readme_is_rewritten(tmp_path):
    from llmcompressor.modifiers import Modifier

    class Undocumented(Modifier):
        size: int = 3

    with pytest.raises(ValueError, match="Undocumented.size has no Field"):
        field_lines(Undocumented)

    class Documented(Modifier):
        size: int = Field(3, description="how many")

    readme = tmp_path / "README.md"
    marker = readme_section(Documented).splitlines()
    readme.write_text(f"intro\n{marker[0]}\n- stale\n{marker[-1]}\nafter\n")
    assert update_readme(readme, [Documented])
    assert readme.read_text() == f"intro\n{readme_section(Documented)}\nafter\n"
    assert "- `size` (3): how many" in readme.read_text()
    assert not update_readme(readme, [Documented])  # unchanged the second time
