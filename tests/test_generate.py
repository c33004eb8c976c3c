"""`avpgan generate`: odd rates, stereo, short, corrupt and empty files; one model load, batched."""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from avpgan import generate as gen
from test_evaluate import tiny_model


@pytest.fixture(scope="module")
def model(tiny_shards, tmp_path_factory) -> Path:
    return tiny_model(tiny_shards, tmp_path_factory) / "model.safetensors"


@pytest.fixture(scope="module")
def voices(synthvox_dir, tmp_path_factory) -> dict[str, Path]:
    """One SynthVox utterance written in the ways users hand files over, plus broken ones."""
    src = sorted((synthvox_dir / "voxceleb1" / "wav").rglob("*.wav"))[0]
    y, sr = sf.read(src, dtype="float32")
    d = tmp_path_factory.mktemp("voices")
    files = {name: d / name for name in ("rate8k.wav", "stereo44k.flac", "short.wav", "corrupt.wav", "empty.wav",
                                         "silent.wav")}
    sf.write(files["rate8k.wav"], librosa.resample(y, orig_sr=sr, target_sr=8000), 8000)
    y44 = librosa.resample(y, orig_sr=sr, target_sr=44100)
    sf.write(files["stereo44k.flac"], np.stack([y44, 0.5 * y44], axis=1), 44100)
    sf.write(files["short.wav"], y[: int(0.7 * sr)], sr, subtype="PCM_16")
    files["corrupt.wav"].write_bytes(np.random.default_rng(0).bytes(4000))
    files["empty.wav"].write_bytes(b"")
    sf.write(files["silent.wav"], np.zeros(sr, dtype=np.float32), sr)
    return files


def test_windows_and_tiling():
    a = np.arange(10, dtype=np.float32)
    w = gen.windows(a, 4)  # two windows centred: samples 1..8
    assert w.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert gen.windows(a[:3], 7).tolist() == [[0, 1, 2, 0, 1, 2, 0]]
    assert gen.windows(a[:4], 4).tolist() == [[0, 1, 2, 3]]


def test_generate_good_files_and_names_bad_ones(model, voices, tmp_path, capsys):
    from avpgan.cli import main

    out = tmp_path / "faces"
    # batches of 2 files: the grid and the names must come out right across batches
    rc = main(["generate", str(model), *[str(p) for p in voices.values()], "--out", str(out), "--grid",
               "--batch-size", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    for good in ("rate8k", "stereo44k", "short"):
        face = np.asarray(Image.open(out / f"{good}_64.png"))
        restored = np.asarray(Image.open(out / f"{good}_64_restored.png"))  # tiny config restores at 64 px
        assert face.shape == (64, 64, 3) and restored.shape == (64, 64, 3)
    assert "repeated to 4 s" in printed  # short.wav: 0.7 s of voice, tiled up to tiny.yaml's 4 s crop
    assert "mean of" in printed  # the long ones: several windows
    for bad, why in (("corrupt.wav", "cannot decode"), ("empty.wav", "empty file"), ("silent.wav", "of voice")):
        line = next(line for line in printed.splitlines() if line.startswith("skipped") and bad in line)
        assert why in line
        assert not (out / f"{Path(bad).stem}_64.png").exists()
    assert "3 faces from 6 voices" in printed and "faces/s" in printed
    grid = np.asarray(Image.open(out / "grid.png"))
    margin = grid.shape[1] - (2 + 3 * 66)  # 3 voices: generator row above restored row, each row named
    assert grid.shape[0] == 2 + 2 * 66 and margin > 0
    assert all(grid[2 + r * 66 : 2 + r * 66 + 64, :margin].max() > 200 for r in (0, 1))  # white label text


def test_nothing_usable_exits_1(model, voices, tmp_path, capsys):
    from avpgan.cli import main

    rc = main(["generate", str(model), str(voices["corrupt.wav"]), str(voices["empty.wav"]), "--out", str(tmp_path)])
    assert rc == 1
    assert "0 faces from 2 voices" in capsys.readouterr().out


def test_long_voice_is_the_mean_of_its_windows_and_repeatable(model, voices, tmp_path):
    """The face of a long file equals the face of the normalised mean of its windows' embeddings."""
    from avpgan import bundle
    from avpgan.audio import read_audio, remove_silence
    from avpgan.images import to_uint8

    b = bundle.load(model)
    net = gen.VoiceToFace(b, "cpu")
    report = gen.generate(b, [voices["stereo44k.flac"]], tmp_path / "a", restore=False, log=lambda s: None)
    assert report.made[0]["windows"] > 1 and len(report.made[0]["files"]) == 1
    y = remove_silence(read_audio(voices["stereo44k.flac"], 16000), b.cfg.data.vad_top_db)
    clips = gen.windows(y, int(b.cfg.data.crop_seconds * 16000))
    emb = torch.nn.functional.normalize(net.embed(clips).mean(0, keepdim=True), dim=1)
    expected = to_uint8(net.faces(emb, restore=False)[0])[0]
    got = np.asarray(Image.open(tmp_path / "a" / "stereo44k_64.png"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1

    again = gen.generate(b, [voices["stereo44k.flac"], voices["short.wav"]], tmp_path / "b", log=lambda s: None)
    once = gen.generate(b, [voices["stereo44k.flac"], voices["short.wav"]], tmp_path / "c", log=lambda s: None)
    for r1, r2 in zip(again.made, once.made):
        for f1, f2 in zip(r1["files"], r2["files"]):
            assert np.array_equal(np.asarray(Image.open(f1)), np.asarray(Image.open(f2)))
