"""Exported bundles carry a SHA-256 of their contents, checked on every load (generate, evaluate)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from safetensors.torch import save_file

from avpgan import bundle, models
from avpgan import config as config_mod
from avpgan.cli import main
from conftest import ROOT


@pytest.fixture
def exported(tmp_path) -> Path:
    """A run directory with untrained voice and gan stages (tiny config), exported for real."""
    cfg = config_mod.load(ROOT / "configs" / "tiny.yaml", ["name=bundle-test-a"])
    run = tmp_path / "run"
    for stage, net in (("voice", models.build_voice_encoder(cfg.model.voice)),
                       ("gan", models.build_generator(cfg.model.generator))):
        (run / stage).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run / stage / "model.safetensors"))
    (run / "config.yaml").write_text(config_mod.to_yaml(cfg))
    out = tmp_path / "model.safetensors"
    bundle.export(run, out)
    return out


def header_size(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_bundle_records_and_checks_its_sha256(exported):
    meta = json.loads(exported.read_bytes()[8:header_size(exported)])["__metadata__"]
    assert len(meta["sha256"]) == 64
    b = bundle.load(exported)
    assert b.voice is not None and b.generator is not None


def test_run_directory_opens_in_memory_as_its_export(exported, monkeypatch):
    """`generate RUN_DIR` builds the networks the exported file would give, and writes no file."""
    from avpgan.generate import open_model

    def no_writing(*args, **kwargs):
        raise AssertionError("open_model wrote a file")

    monkeypatch.setattr(bundle.atomic, "replacing", no_writing)
    from_dir, from_file = open_model(exported.parent / "run"), bundle.load(exported)
    assert from_dir.cfg == from_file.cfg and from_dir.restorer is None and from_dir.embedder is None
    for part in ("voice", "generator"):
        a, b = getattr(from_dir, part).state_dict(), getattr(from_file, part).state_dict()
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
        assert not getattr(from_dir, part).training


def test_flipped_tensor_byte_is_a_one_line_error(exported, tmp_path, capsys):
    data = bytearray(exported.read_bytes())
    data[header_size(exported) + (len(data) - header_size(exported)) // 2] ^= 0x10  # inside the tensors
    exported.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: contents do not match the bundle's SHA-256"):
        bundle.load(exported)
    voice = tmp_path / "v.wav"
    voice.write_bytes(b"")
    assert main(["generate", str(exported), str(voice), "--out", str(tmp_path / "faces")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "contents do not match the bundle's SHA-256 (corrupted or modified)" in err
    assert main(["evaluate", str(exported), "--shards", str(tmp_path)]) == 1
    assert "contents do not match the bundle's SHA-256" in capsys.readouterr().err


def test_changed_embedded_config_is_caught(exported):
    """A byte changed in the header's config (same length, so the file still parses) changes the model."""
    data = exported.read_bytes()
    assert data.count(b"bundle-test-a") == 1
    exported.write_bytes(data.replace(b"bundle-test-a", b"bundle-test-b"))
    with pytest.raises(ValueError, match="contents do not match the bundle's SHA-256"):
        bundle.load(exported)


def test_bundle_without_checksum_is_refused(exported):
    from safetensors.torch import load_file

    tensors = load_file(str(exported))
    meta = json.loads(exported.read_bytes()[8:header_size(exported)])["__metadata__"]
    del meta["sha256"]
    save_file(tensors, str(exported), metadata=meta)
    with pytest.raises(ValueError, match=r"bundle has no checksum .*export it again with `avpgan export RUN"):
        bundle.load(exported)


def test_cut_short_bundle_is_a_one_line_error(exported):
    data = exported.read_bytes()
    exported.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError) as err:
        bundle.load(exported)
    assert "model.safetensors" in str(err.value) and "\n" not in str(err.value)
