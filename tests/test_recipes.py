"""The shipped recipes are the repository's top-level ``recipes/`` folder: one copy of each file."""

from __future__ import annotations

from pathlib import Path

import yaml

from routealign import recipes

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_recipes_are_the_top_level_folder_byte_for_byte():
    top = sorted(ROOT.glob("recipes/*.yaml"))
    assert [p.stem for p in top] == recipes.names() and len(top) >= 6
    for file in top:
        shipped = recipes.path(file.stem)
        assert shipped.read_bytes() == file.read_bytes()
        assert shipped.resolve() == file.resolve()  # the same file, not a copy that could drift
    assert not list((ROOT / "src/routealign/recipes").glob("*.yaml")), "a second copy inside the package"


def test_each_recipe_names_a_modifier_and_describes_itself():
    for name, line in recipes.describe().items():
        assert line, name
        recipe = yaml.safe_load(recipes.path(name).read_text())
        keys = [key for stage in recipe.values() for group in stage.values() for key in group]
        assert set(keys) <= {"RouterAlignedRoundingModifier", "ExpertAwareSmoothingModifier", "QuantizationModifier",
                             "GPTQModifier"}, (name, keys)
