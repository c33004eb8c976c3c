"""docs/config.md is generated from the schema; these tests keep it from going stale."""

from __future__ import annotations

import dataclasses
import typing

from avpgan import config as config_mod
from avpgan import config_doc
from avpgan.cli import main
from conftest import ROOT

DOC = ROOT / "docs" / "config.md"


def schema_classes(cls: type = config_mod.Config) -> set[type]:
    """Every dataclass of the schema reachable from `cls`."""
    found = {cls}
    for hint in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(hint):
            found |= schema_classes(hint)
    return found


def test_docs_config_md_is_current():
    assert DOC.read_text() == config_doc.render(), (
        f"docs/config.md is stale: regenerate it with `{config_doc.REGENERATE}` and commit it")


def test_every_key_has_a_reason_and_every_reason_a_key():
    for cls in schema_classes():
        for f in dataclasses.fields(cls):
            assert config_doc.why(cls, f.name).strip()
    for cls, lines in config_doc.WHY.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(lines) <= names, f"{cls.__name__}: WHY explains keys it does not have: {set(lines) - names}"


def test_every_key_appears_with_its_default():
    text = DOC.read_text()
    for key, value in config_mod.flatten(config_mod.to_dict(config_mod.Config())).items():
        assert f"| `{key}` |" in text, key
    assert "| `train.gan.lr` | float | `0.0002` |" in text
    assert "| `train.mixed_precision` | str | `\"no\"` | one of no, bf16, fp16 |" in text
    assert "| `train.gan.augment` | list[str] | `[]` | each one of color, translation, cutout |" in text


def test_config_doc_command_prints_the_reference(capsys):
    assert main(["config", "doc"]) == 0
    assert capsys.readouterr().out == config_doc.render()
