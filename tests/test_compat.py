"""Every llm-compressor / compressed-tensors workaround lives in :mod:`routealign.compat`, named for the versions it
targets: a pin bump fails here until each workaround has been revisited."""

from __future__ import annotations

import ast
from importlib.metadata import version
from pathlib import Path

import pytest

from routealign import compat

SRC = Path(compat.__file__).resolve().parent


@pytest.mark.parametrize("package", sorted(compat.TARGETS))
def test_the_installed_and_pinned_release_is_the_one_the_workarounds_target(package):
    pyproject = (SRC.parents[1] / "pyproject.toml").read_text()
    assert f'"{package}=={compat.TARGETS[package]}"' in pyproject, f"pyproject.toml pins another {package}"
    assert version(package) == compat.TARGETS[package], (
        f"{package} {version(package)} is installed; routealign.compat's workarounds target "
        f"{compat.TARGETS[package]}: check each one against the new release, then update TARGETS")


def test_no_module_outside_compat_imports_a_private_name_of_theirs():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    ("llmcompressor", "compressed_tensors", "transformers")):
                offenders += [f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


def test_no_module_outside_compat_patches_an_llmcompressor_or_compressed_tensors_attribute():
    """``patch_attr`` on, or assignment to, an attribute of an imported llm-compressor / compressed-tensors module
    happens in compat only (patching one of the model's own modules is not a workaround)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "compat.py":
            continue
        tree = ast.parse(path.read_text())
        foreign = {alias.asname or alias.name.split(".")[-1] for node in ast.walk(tree)
                   if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("llmcompressor",
                                                                                            "compressed_tensors"))
                   for alias in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "patch_attr" and node.args \
                    and getattr(node.args[0], "id", None) in foreign:
                offenders.append(f"{path.name}:{node.lineno} patch_attr({node.args[0].id}, ...)")
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                            and target.value.id in foreign:
                        offenders.append(f"{path.name}:{node.lineno} {target.value.id}.{target.attr}")
    assert not offenders, offenders


def test_pipeline_passes_skipped_and_restored(monkeypatch):
    """With every modifier of the active recipe one that takes its own streams, each decoder layer returns its input
    in llm-compressor's passes; restore puts the layer's own forward back (idempotent); a recipe with another
    modifier changes nothing."""
    import torch

    class Own:
        routealign_own_streams = True

    class Other:
        pass

    class Session:
        def __init__(self, modifiers):
            self.lifecycle = type("L", (), {"recipe": type("R", (), {"modifiers": modifiers})()})()

    model = torch.nn.Module()
    model.layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    import llmcompressor.core

    monkeypatch.setattr(llmcompressor.core, "active_session", lambda: Session([Other(), Own()]))
    assert not compat.skip_pipeline_passes(model, ["layer"])
    assert not torch.equal(model.layer(x), x)
    monkeypatch.setattr(llmcompressor.core, "active_session", lambda: Session([Own()]))
    assert compat.skip_pipeline_passes(model, ["layer"])
    assert torch.equal(model.layer(x), x)
    compat.restore_pipeline_passes(model)
    compat.restore_pipeline_passes(model)
    assert "forward" not in model.layer.__dict__ and not torch.equal(model.layer(x), x)
