"""SynthVox: the real data sets' layout, determinism, splits, and that voices and faces carry
the hidden attributes they are meant to carry (measured from the written files)."""

import csv
import hashlib
import re
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from avpgan.config import DataConfig
from avpgan.data import synthvox

SECONDS = (4.0, 5.0)  # short utterances keep the tests fast; the default is 4-20 s


@pytest.fixture(scope="module")
def data24(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthvox24")
    stats = synthvox.generate(out, identities=24, utterances_per_id=2, faces_per_id=2, seed=3, workers=2,
                              seconds=SECONDS)
    return out, stats


def read_meta(out: Path) -> list[list[str]]:
    lines = (out / "vox1_meta.csv").read_text().splitlines()
    return [line.split("\t") for line in lines]


def read_attributes(out: Path) -> dict[str, dict]:
    with open(out / "attributes.csv", newline="") as f:
        return {row["voxceleb_id"]: row for row in csv.DictReader(f)}


def rule_split(name: str) -> str:
    d = DataConfig()
    if name[0] in d.val_prefixes:
        return "val"
    return "test" if name[0] in d.test_prefixes else "train"


def test_layout_meta_and_attributes(data24):
    out, stats = data24
    meta = read_meta(out)
    assert meta[0] == ["VoxCeleb1 ID", "VGGFace1 ID", "Gender", "Nationality", "Set"]
    rows = meta[1:]
    assert len(rows) == 24
    ids, names = [r[0] for r in rows], [r[1] for r in rows]
    assert ids == [f"id{10001 + k}" for k in range(24)]
    assert names == sorted(names), "VoxCeleb1's ids follow the alphabetical order of the names"
    assert len(set(names)) == 24
    for vid, name, gender, nationality, split_set in rows:
        assert re.fullmatch(r"[A-Z][a-z]+_([A-Z]\._)?[A-Z][a-z]+", name), name
        assert gender in ("m", "f") and nationality
        assert split_set == ("test" if name.startswith("E") else "dev")

    wavs = sorted((out / "voxceleb1" / "wav").rglob("*.wav"))
    assert len(wavs) == 48
    for p in wavs:
        rel = p.relative_to(out / "voxceleb1" / "wav").as_posix()
        assert re.fullmatch(r"id\d{5}/[A-Za-z0-9_-]{11}/\d{5}\.wav", rel), rel
    assert {p.relative_to(out / "voxceleb1" / "wav").parts[0] for p in wavs} == set(ids)
    for video in {p.parent for p in wavs}:  # numbering restarts at 00001 in every video
        assert sorted(q.name for q in video.glob("*.wav"))[0] == "00001.wav"
    jpgs = sorted((out / "vggface").rglob("*.jpg"))
    assert len(jpgs) == 48
    for p in jpgs:
        assert re.fullmatch(r"\d{8}\.jpg", p.name) and p.parent.name in names
    assert {p.parent.name for p in jpgs} == set(names)
    assert not [p for p in out.rglob(".*")], "temporary files left behind"

    attrs = read_attributes(out)
    assert set(attrs) == set(ids)
    for col in ("voxceleb_id", "vggface_name", "gender", "age", "size", "tone", "hair_style", "glasses_p",
                "timbre_0", "timbre_1", "timbre_2"):
        assert col in attrs["id10001"]
    for vid, name, gender, nationality, _ in rows:
        a = attrs[vid]
        assert (a["vggface_name"], a["gender"], a["nationality"]) == (name, gender, nationality)
        assert 0 < float(a["tone"]) < 1 and 18 < float(a["age"]) < 80

    assert stats["identities"] == 24 and stats["utterances"] == 48 and stats["faces"] == 48
    assert stats["seconds"] > 0 and stats["utterances_per_s"] > 0


def test_every_split_non_empty_under_the_first_letter_rule(data24):
    out, _ = data24
    attrs = read_attributes(out)
    got = {"train": 0, "val": 0, "test": 0}
    for _, name, *_ in read_meta(out)[1:]:
        got[rule_split(name)] += 1
    assert got == synthvox.split_counts(24)
    assert all(rule_split(a["vggface_name"]) == a["split"] for a in attrs.values())

    for n in [12, 13, 17, 25, 40]:
        for seed in range(3):
            idents = synthvox.draw_identities(n, seed)
            splits = [rule_split(i.vggface_name) for i in idents]
            assert {s: splits.count(s) for s in ("train", "val", "test")} == synthvox.split_counts(n)
            assert len({i.vggface_name for i in idents}) == n
    for n in range(12, 3000, 7):
        c = synthvox.split_counts(n)
        assert min(c.values()) >= 1 and sum(c.values()) == n
    c = synthvox.split_counts(1225)
    assert c == {"train": 924, "val": 112, "test": 189}
    with pytest.raises(ValueError, match="identities"):
        synthvox.split_counts(2)


def hash_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_across_runs_and_worker_counts(tmp_path):
    args = dict(identities=12, utterances_per_id=2, faces_per_id=2, seconds=SECONDS)
    synthvox.generate(tmp_path / "a", seed=11, workers=1, **args)
    synthvox.generate(tmp_path / "b", seed=11, workers=2, **args)
    synthvox.generate(tmp_path / "c", seed=12, workers=1, **args)
    a, b, c = (hash_tree(tmp_path / k) for k in "abc")
    assert len(a) == 12 * 2 + 12 * 2 + 2
    assert a == b
    assert not set(a.values()) & set(c.values()), "another seed must give other files"


def test_refuses_a_folder_that_already_holds_data(tmp_path):
    (tmp_path / "voxceleb1" / "wav" / "id10001").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="voxceleb1"):
        synthvox.generate(tmp_path, identities=12, utterances_per_id=1, faces_per_id=1, seed=0, workers=1)


def test_default_lengths_look_like_voxceleb1():
    rng = np.random.default_rng(0)
    s = np.array([synthvox.utterance_seconds(rng, synthvox.UTTERANCE_SECONDS) for _ in range(4000)])
    assert s.min() >= 4.0 and s.max() <= 20.0
    assert 7.0 < s.mean() < 10.0  # VoxCeleb1: 8.2 s on average
    assert (s < 8).mean() > 0.4 and (s > 12).mean() > 0.1  # crops of 4 s and 8 s see different amounts


def test_fft_vocal_tract_matches_scipy_lfilter_for_fixed_formants():
    """The frame-wise FFT filter is a real linear filter: with formants held still it must
    equal the same resonator cascade run by scipy in the time domain."""
    from scipy import signal

    x = np.random.default_rng(0).standard_normal(3 * 16000)
    formants = np.array([500.0, 1500.0, 2500.0, 3500.0, 4500.0])
    bw = np.array([60.0, 90.0, 120.0, 160.0, 220.0])
    y = synthvox.voice._vocal_tract(x, np.array([0.0, 3.0]), np.stack([formants, formants], 1), bw, nasality=0.0)
    ref = x
    for f, b in zip(formants, bw):
        r = np.exp(-np.pi * b / 16000)
        c = 2 * r * np.cos(2 * np.pi * f / 16000)
        ref = signal.lfilter([1 - c + r * r], [1, -c, r * r], ref)
    core = slice(1000, -1000)  # the reference starts from rest; skip the edges
    assert np.sqrt(np.mean((y - ref)[core] ** 2) / np.mean(ref[core] ** 2)) < 1e-3


def median_f0(x: np.ndarray) -> float:
    """Median YIN f0 over the loud frames (pauses and fricatives left out)."""
    f0 = librosa.yin(x, fmin=60, fmax=400, sr=16000, frame_length=1024, hop_length=256)
    rms = librosa.feature.rms(y=x, frame_length=1024, hop_length=256)[0][: len(f0)]
    return float(np.median(f0[rms > 0.5 * np.percentile(rms, 90)]))


def test_audio_properties_and_pitch_carries_gender(data24):
    out, _ = data24
    attrs = read_attributes(out)
    per_id: dict[str, list[float]] = {}
    for p in sorted((out / "voxceleb1" / "wav").rglob("*.wav")):
        info = sf.info(p)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert SECONDS[0] <= info.duration <= SECONDS[1] + 1e-3
        x, _ = sf.read(p, dtype="float32")
        rms = np.sqrt(np.mean(x ** 2))
        assert rms > 10 ** (-40 / 20), f"{p} is nearly silent"
        frames = librosa.feature.rms(y=x, frame_length=320, hop_length=320)[0]
        # speech has pauses: a good share of 20 ms frames sit well below the loud ones
        assert np.mean(frames < 0.25 * np.percentile(frames, 95)) > 0.1, p
        per_id.setdefault(p.relative_to(out / "voxceleb1" / "wav").parts[0], []).append(median_f0(x))

    f0 = {vid: np.mean(v) for vid, v in per_id.items()}
    male = [f0[v] for v in f0 if attrs[v]["gender"] == "m"]
    female = [f0[v] for v in f0 if attrs[v]["gender"] == "f"]
    assert len(male) >= 4 and len(female) >= 4
    assert np.mean(male) < 0.75 * np.mean(female)
    # A one-number classifier with a fixed threshold: the voice->gender relation is learnable.
    accuracy = np.mean([(f0[v] < 160) == (attrs[v]["gender"] == "m") for v in f0])
    assert accuracy > 0.8
    # ... and the measured pitch follows each identity's hidden f0.
    r = np.corrcoef([f0[v] for v in f0], [float(attrs[v]["f0"]) for v in f0])[0, 1]
    assert r > 0.8


def test_faces_decode_and_skin_follows_tone(data24):
    out, _ = data24
    attrs = {a["vggface_name"]: a for a in read_attributes(out).values()}
    lum: dict[str, list[float]] = {}
    for p in sorted((out / "vggface").rglob("*.jpg")):
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (128, 128)
            arr = np.asarray(im, dtype=np.float64)
        assert arr.std() > 10  # a drawing, not a flat colour
        centre = arr[56:80, 48:80].mean(-1)  # cheeks, nose and mouth: mostly skin
        lum.setdefault(p.parent.name, []).append(float(np.median(centre)))
    names = sorted(lum)
    r = np.corrcoef([np.mean(lum[n]) for n in names], [float(attrs[n]["tone"]) for n in names])[0, 1]
    assert r > 0.8
    # The same person in two photos differs (pose, lighting, background).
    a, b = sorted((out / "vggface" / names[0]).glob("*.jpg"))[:2]
    assert a.read_bytes() != b.read_bytes()
