"""The recipes shipped with routealign, by name (package data: they work from an installed wheel).

The files are the repository's top-level ``recipes/`` folder, where users browse them; ``files`` here is a link to
it, which a built wheel carries as real files (one copy of each; ``tests/test_recipes.py`` and the wheel test check
that what ships is that folder, byte for byte).

    from routealign import recipes
    recipes.names()                      # every shipped recipe
    recipes.describe()                   # {name: its one-line description}
    recipes.path("vsraq_w4a16")          # the YAML file, for oneshot(recipe=...)
    recipes.for_scheme("NVFP4")          # the recipe recommended for a scheme
    recipes.text("autoround_w4a16", iters=50, objective="vsraq")   # the YAML with fields overridden

``routealign recipes`` lists them; ``routealign quantize --recipe NAME`` and ``--scheme W4A16|NVFP4`` use them (a
recipe file given by path wins over a name). The recommendation per scheme is the recipe measured best on held-out
text at that format (benchmarks/RESULTS.md); the others are described by what they were measured to do.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

__all__ = ["names", "describe", "path", "resolve", "for_scheme", "text", "SCHEMES"]

_HERE = (Path(__file__).resolve().parent / "files").resolve()  # in a checkout: the top-level recipes/

# the recipe ``--scheme`` picks: plain learned rounding at W4A16 (issue 30: ahead of AutoRoundModifier and of the
# router-term recipe on the two models tried there; every method ties on the shared tiny models), and at NVFP4 VSRAQ
# with the per-block LM-head gate (issue 31: at or below plain rounding and the earlier gate on every model's 3-seed
# mean, below GPTQModifier; benchmarks/RESULTS.md section 15)
SCHEMES = {"W4A16": "autoround_w4a16", "NVFP4": "vsraq_nvfp4"}


def names() -> list[str]:
    """Every shipped recipe's name (its file name without ``.yaml``)."""
    return sorted(p.stem for p in _HERE.glob("*.yaml"))


def describe() -> dict[str, str]:
    """Each shipped recipe's one-line description (the first comment line of its file)."""
    out = {}
    for name in names():
        first = path(name).read_text().splitlines()[0]
        out[name] = first.lstrip("#").strip()
    return out


def path(name: str) -> Path:
    """The file of shipped recipe ``name``; an :class:`InputError` listing the names when there is none."""
    file = _HERE / f"{name}.yaml"
    if not file.is_file():
        raise InputError(f"no recipe named '{name}'; shipped recipes: {', '.join(names())} (or pass a YAML file's path)")
    return file


def resolve(spec: str | Path) -> Path:
    """A recipe file: ``spec`` when it is an existing file (a path wins over a name), else the shipped recipe of that
    name; an :class:`InputError` naming both possibilities otherwise."""
    candidate = Path(spec)
    if candidate.is_file():
        return candidate
    looks_like_path = candidate.suffix in (".yaml", ".yml") or len(candidate.parts) > 1
    if looks_like_path:
        raise InputError(f"recipe file does not exist: {spec} (shipped recipes by name: {', '.join(names())})")
    return path(str(spec))


def for_scheme(scheme: str) -> str:
    """The name of the recipe recommended for ``scheme`` (``W4A16`` or ``NVFP4``)."""
    key = scheme.upper()
    if key not in SCHEMES:
        raise InputError(f"--scheme {scheme}: routealign ships recipes for {', '.join(SCHEMES)}; for another scheme "
                         "pass a recipe (its modifiers take any compressed-tensors preset in `scheme:`)")
    return SCHEMES[key]


def text(spec: str | Path, **overrides) -> str:
    """The recipe ``spec`` (a name or a file) as YAML, with ``overrides`` (e.g. ``iters``, ``objective``; None: left
    as is) set on every ``RouterAlignedRoundingModifier`` in it."""
    import yaml

    file = resolve(spec)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    content = file.read_text()
    if not overrides:
        return content
    recipe = yaml.safe_load(content)
    found = 0
    for stage in (recipe or {}).values():
        if not isinstance(stage, dict):
            continue
        for group in stage.values():
            if isinstance(group, dict) and isinstance(group.get("RouterAlignedRoundingModifier"), dict):
                group["RouterAlignedRoundingModifier"].update(overrides)
                found += 1
    if not found:
        fields = ", ".join(f"--{k}" for k in overrides)
        raise InputError(f"recipe {spec}: no RouterAlignedRoundingModifier to apply {fields} to")
    return yaml.safe_dump(recipe, sort_keys=False)
