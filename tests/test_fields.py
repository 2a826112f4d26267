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


@pytest.mark.parametrize("old,new", [("router_gate_z", "gate.z"), ("holdout_every", "holdout.every"),
                                     ("expert_chunk", "memory.expert_chunk"), ("min_expert_tokens",
                                                                               "rounding.min_expert_tokens"),
                                     ("router_balance", "loss.balance"), ("alpha", "loss.vsraq.alpha"),
                                     ("lambda_gh", "loss.expertquant.lambda_gh")])
def test_a_flat_name_from_before_the_groups_is_refused_with_its_new_place(old, new):
    from pydantic import ValidationError

    from routealign.modifiers.rounding import RouterAlignedRoundingModifier

    with pytest.raises(ValidationError, match=rf"'{old}' is now {new} \(write {new.split('.')[0]}: \{{"):
        RouterAlignedRoundingModifier(scheme="W4A16", **{old: 1})


def test_group_shorthands_and_a_recipe_round_trip():
    """``holdout: 0.25`` is the fraction, ``gate: false`` the switch; what llm-compressor serialises back into a
    recipe (``model_dump``) builds the same modifier; a nested error names its dotted place."""
    import yaml
    from pydantic import ValidationError

    from routealign.modifiers.rounding import RouterAlignedRoundingModifier

    m = RouterAlignedRoundingModifier(scheme="W4A16", holdout=0.25, gate=False, memory={"expert_chunk": 4},
                                      loss={"vsraq": {"alpha": 0.5}, "balance": "none"})
    assert m.holdout.fraction == 0.25 and m.holdout.every == 10 and m.gate.enabled is False and m.gate.z == 1.645
    assert m.memory.expert_chunk == 4 and m.params.alpha == 0.5 and m.params.gamma == 1.0 and m.loss.balance == "none"
    fields = {k: v for k, v in m.model_dump().items() if k in own_fields(RouterAlignedRoundingModifier)}
    again = RouterAlignedRoundingModifier(scheme="W4A16", **yaml.safe_load(yaml.safe_dump(fields)))
    assert again.model_dump() == m.model_dump()
    assert RouterAlignedRoundingModifier(scheme="W4A16").params.alpha == 0.3  # defaults without a section
    with pytest.raises(ValidationError, match=r"loss\.vsraq\.boundary: Input should be greater than or equal to 1"):
        RouterAlignedRoundingModifier(scheme="W4A16", loss={"vsraq": {"boundary": 0}})
    with pytest.raises(ValidationError, match=r"loss\.kll: neither a loss setting \(balance, structure_space\) nor a "
                                              r"router objective \(none, expertquant, kl"):
        RouterAlignedRoundingModifier(scheme="W4A16", loss={"kll": {}})
    with pytest.raises(ValidationError, match=r"loss.balance: output balances the router term"):
        RouterAlignedRoundingModifier(scheme="W4A16", router_scope="both", loss={"balance": "output"})


def test_a_shipped_recipe_yaml_with_a_flat_name_is_refused_naming_the_new_place(tmp_path):
    """The error a user sees from their own YAML through llm-compressor's recipe parsing."""
    from pydantic import ValidationError

    from llmcompressor.recipe import Recipe

    import routealign  # noqa: F401  (registers the modifiers)

    recipe = tmp_path / "old.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    RouterAlignedRoundingModifier:\n      scheme: W4A16\n"
                      "      router_headroom: false\n")
    with pytest.raises((ValidationError, ValueError), match=r"'router_headroom' is now gate\.headroom"):
        Recipe.create_instance(str(recipe)).modifiers
