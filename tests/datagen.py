"""A tiny fake VoxCeleb1 / VGGFace tree with every kind of bad input the shard build must survive.

Deterministic (numpy seed), seconds to write. `EXPECT` states what a build must make of it, so
the tests compare against facts written down here rather than against the build's own output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

SR = 16000
META_HEADER = "VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet"


def speech(rng: np.random.Generator, voiced_s: float, sr: int = SR, pad_s: float = 0.4, f0: float = 140.0) -> np.ndarray:
    """A voiced, amplitude-modulated harmonic tone between two stretches of near-silence."""
    t = np.arange(int(voiced_s * sr)) / sr
    f = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2)
    voiced = 0.3 * voiced / np.max(np.abs(voiced))
    pad = 1e-4 * rng.standard_normal(int(pad_s * sr))
    return np.concatenate([pad, voiced, pad]).astype(np.float32)


def face(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth colour pattern (not noise, so resizing and compression behave as on photos)."""
    y, x = np.mgrid[:h, :w] / max(h, w)
    base = rng.uniform(40, 200, 3)
    img = np.stack([base[c] + 50 * np.sin(6 * x + 2 * c) * np.cos(5 * y + c) for c in range(3)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


# What the build must make of the tree (layout reasons and encode reasons).
EXPECT = {
    "train": {"Frank_Fox": 3, "george_green": 2, "Kate_Kim": 0},
    "val": {"Alice_Adams": 3, "Bob_Brown": 2},
    "test": {"Carol_Chen": 2, "emma_eve": 1},
    "skipped": {
        "unreadable audio": ["id10004/v2/00005.wav", "id10004/v2/00006.wav"],
        "truncated audio": ["id10004/v2/00004.wav"],
        "empty file": ["id10004/v3/00007.wav"],
        "silent audio": ["id10004/v3/00008.wav"],
        "too short after silence removal": ["id10005/v1/00003.wav"],
        "unreadable image": ["Frank_Fox/0001.jpg", "Kate_Kim/0001.jpg"],
        "no readable face for the identity": ["id10010/v1/00001.wav"],
        "not an audio file": ["id10001/v1/notes.txt"],
        "not an image file": ["Alice_Adams/Thumbs.db"],
        "identity has voices but no faces": ["id10006"],
        "identity has faces but no voices": ["Ivan_Ivanov"],
        "meta row has no voice or face files": ["vox1_meta.csv:11", "vox1_meta.csv:12", "vox1_meta.csv:13"],
        "voice folder not in the meta file": ["id19999"],
        "face folder not in the meta file": ["Not_In_Meta"],
        "file outside any identity folder": ["stray.wav"],
    },
    "converted": {"L": ["Carol_Chen/0002.png"], "RGBA": ["Frank_Fox/0002.png"], "P": ["george_green/0001.png"],
                  "CMYK": ["george_green/0002.jpg"]},
}


def make_tree(root: str | Path, seed: int = 0) -> dict:
    """Write voxceleb/, vggface/ and vox1_meta.csv under `root`; return their paths."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    vox, vgg = root / "voxceleb", root / "vggface"

    def wav(rel: str, seconds: float = 1.6, **kw) -> Path:
        p = vox / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, speech(rng, seconds, f0=rng.uniform(90, 250), **kw), SR, subtype="PCM_16")
        return p

    def img(rel: str, mode: str = "RGB", fmt: str | None = None, size: tuple[int, int] = (90, 72)) -> Path:
        p = vgg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(face(rng, size[1], size[0]))
        if mode == "P":
            im = im.quantize(16)
        elif mode != "RGB":
            im = im.convert(mode)
        im.save(p, format=fmt, quality=95)  # PNG ignores quality
        return p

    # val: A-B. Alice has more utterances than faces (faces cycle) and a stray file among her faces.
    for i in range(1, 4):
        wav(f"id10001/v{i % 2}/{i:05d}.wav")
    (vox / "id10001/v1/notes.txt").write_text("not audio")
    img("Alice_Adams/0001.jpg")
    img("Alice_Adams/0002.jpg", size=(60, 100))
    (vgg / "Alice_Adams/Thumbs.db").write_bytes(b"\0" * 16)
    # Bob: one 16 kHz wav, one 48 kHz stereo flac.
    wav("id10002/v1/00001.wav")
    p = vox / "id10002/v1/00002.flac"
    st = np.stack([speech(rng, 1.5, sr=48000), 0.5 * speech(rng, 1.5, sr=48000)], 1)
    sf.write(p, st, 48000, format="FLAC")
    img("Bob_Brown/0001.png")
    # test: C-E. Carol's second face is grayscale; emma's lowercase name still goes to test.
    wav("id10003/v1/00001.wav")
    wav("id10003/v1/00002.wav")
    img("Carol_Chen/0001.jpg")
    img("Carol_Chen/0002.png", mode="L")
    wav("id10009/v1/00001.wav")
    img("emma_eve/0001.jpg", size=(128, 128))
    # train: Frank has every kind of broken voice, an unreadable face and an RGBA face.
    for i in range(1, 4):
        wav(f"id10004/v1/{i:05d}.wav", seconds=1.4 + 0.3 * i)
    good = wav("id10004/v2/00004.wav", seconds=2.0)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated in the middle of the samples
    (vox / "id10004/v2/00005.wav").write_bytes(data[:30])  # truncated inside the header
    (vox / "id10004/v2/00006.wav").write_bytes(rng.bytes(4000))  # garbage
    (vox / "id10004/v3").mkdir(parents=True)
    (vox / "id10004/v3/00007.wav").write_bytes(b"")  # zero-length
    sf.write(vox / "id10004/v3/00008.wav", np.zeros(SR * 2, np.float32), SR, subtype="PCM_16")  # all silent
    (vgg / "Frank_Fox").mkdir(parents=True)
    (vgg / "Frank_Fox/0001.jpg").write_bytes(rng.bytes(3000))
    img("Frank_Fox/0002.png", mode="RGBA")
    # george: lowercase first letter, a too-short clip, palette and CMYK faces.
    wav("id10005/v1/00001.wav")
    wav("id10005/v1/00002.wav")
    wav("id10005/v1/00003.wav", seconds=0.5)
    img("george_green/0001.png", mode="P")
    img("george_green/0002.jpg", mode="CMYK")
    # Helen: voices, no face folder. Ivan: faces, no voice folder. Zed: a meta row with nothing.
    wav("id10006/v1/00001.wav")
    img("Ivan_Ivanov/0001.jpg")
    # Kate: one utterance, and her only face is unreadable.
    wav("id10010/v1/00001.wav")
    (vgg / "Kate_Kim").mkdir(parents=True)
    (vgg / "Kate_Kim/0001.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(500))
    # Folders the meta file does not know, and a stray file.
    wav("id19999/v1/00001.wav")
    img("Not_In_Meta/0001.jpg")
    (vox / "stray.wav").write_bytes(data)

    rows = [
        ("id10001", "Alice_Adams", "f", "USA", "dev"),
        ("id10002", "Bob_Brown", "m", "UK", "dev"),
        ("id10003", "Carol_Chen", "f", "China", "dev"),
        ("id10004", "Frank_Fox", "m", "Canada", "dev"),
        ("id10005", "george_green", "m", "Ireland", "dev"),
        ("id10006", "Helen_Hunt", "f", "USA", "dev"),
        ("id10007", "Ivan_Ivanov", "m", "Russia", "test"),
        ("id10009", "emma_eve", "f", "India", "test"),
        ("id10010", "Kate_Kim", "f", "Korea", "dev"),
        ("id10011", "Yan_Yu", "m", "China", "dev"),
        ("id10012", "Xena_X", "f", "Greece", "dev"),
        ("id10008", "Zed_Zero", "m", "USA", "dev"),
    ]
    meta = root / "vox1_meta.csv"
    # Yan and Xena have empty folders; Zed (line 13) has none: three rows without files.
    (vox / "id10011").mkdir()
    (vgg / "Xena_X").mkdir()
    meta.write_text(META_HEADER + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return {"voxceleb": vox, "vggface": vgg, "meta": meta, "root": root}
