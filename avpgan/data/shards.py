"""WebDataset shards, the contract every room reads: the one sample codec, the one tar reader
(`read_shards`, `decoded_samples`: the stream, the bank, evaluate and `shards check` all read
shards through them) and the manifest. Building them is shards_build.py, checking them
shards_check.py.

One sample = one utterance + one face of the same identity:

    <key>.json  identity, label, source paths, duration, the layout of <key>.bin, crc32 per part
    <key>.bin   raw parts back to back: the utterance after silence removal (16 kHz mono int16,
                little-endian) | the face (face_size^2 x 3 uint8 RGB, the GAN's 64 px) |
                face128 (restore_size^2 x 3 uint8 RGB, the restoration model's 128 px; the
                `restore_face` of a decoded sample)

Raw because the GPU step eats 20-40k samples/s: np.frombuffer costs nothing while WAV, FLAC, PNG
and JPEG decoding cost 50-1500 us per part; one binary member rather than one per part because
each tar member costs the reader ~40 us (benchmarks/bench_shards.py, shards/README.md). Features
are not stored; the device computes them from the audio.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds

from avpgan.data.layout import IngestError

FORMAT = 1
SPLITS = ("train", "val", "test")
META, DATA = "json", "bin"


class CorruptSample(ValueError):
    """A sample whose members cannot be decoded; the message names shard and member."""

    def __init__(self, message: str, shard: str = "", member: str = ""):
        super().__init__(message)
        self.shard, self.member = shard, member


# ----------------------------------------------------------------------------------------------
# The sample codec.

# The order of the parts inside <key>.bin, and their names in the json's crc32 (so also in every
# shard written so far: keep them). Decoded, the third part is the sample's "restore_face".
PARTS = ("audio", "face", "face128")


def encode_sample(key: str, meta: dict, audio: np.ndarray, face: np.ndarray, restore_face: np.ndarray) -> list[tuple[str, bytes]]:
    """(member name, bytes) in tar order: <key>.json, then <key>.bin = audio | face | face128.

    The json records the layout (samples, face sizes) and each part's crc32, so `check` can
    name a flipped byte in data that has no checksum of its own.
    """
    parts = [
        np.ascontiguousarray(audio, dtype="<i2").tobytes(),
        np.ascontiguousarray(face, dtype=np.uint8).tobytes(),
        np.ascontiguousarray(restore_face, dtype=np.uint8).tobytes(),
    ]
    meta = dict(meta, samples=int(len(audio)), face_size=int(face.shape[0]), restore_size=int(restore_face.shape[0]),
                crc32={name: zlib.crc32(b) for name, b in zip(PARTS, parts)})
    return [(f"{key}.{META}", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()), (f"{key}.{DATA}", b"".join(parts))]


def decode_sample(raw: dict, restore_face: bool = False, verify: bool = False) -> dict:
    """One raw tar sample -> {"key", "audio" int16[S], "face" uint8[H,W,3], ["restore_face"], "meta"}.

    Arrays are read-only views into the member's bytes (no copy: this runs per sample at
    training rate). `verify` also checks each part's crc32 (what `shards check` does).
    """
    key, url = raw.get("__key__", "?"), raw.get("__url__", "?")

    def corrupt(ext: str, problem: str) -> CorruptSample:
        return CorruptSample(f"{url}: {key}.{ext}: {problem}", url, f"{key}.{ext}")

    if META not in raw or DATA not in raw:
        raise corrupt(META if META not in raw else DATA, "member missing")
    try:
        meta = json.loads(raw[META])
        n, fs, rs = int(meta["samples"]), int(meta["face_size"]), int(meta["restore_size"])
        meta["label"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise corrupt(META, f"not the expected JSON ({type(e).__name__}: {e})") from None
    blob = raw[DATA]
    ends = np.cumsum([2 * n, fs * fs * 3, rs * rs * 3])
    if n <= 0 or len(blob) != ends[-1]:
        raise corrupt(DATA, f"{len(blob)} bytes, the json's layout needs {ends[-1]}")
    if verify:
        view, start = memoryview(blob), 0
        for name, end in zip(PARTS, ends):
            if zlib.crc32(view[start:end]) != meta.get("crc32", {}).get(name):
                raise corrupt(DATA, f"{name} part (bytes {start}-{end - 1}): crc32 mismatch")
            start = end
    out = {
        "key": key,
        "audio": np.frombuffer(blob, dtype="<i2", count=n),
        "face": np.frombuffer(blob, dtype=np.uint8, count=fs * fs * 3, offset=ends[0]).reshape(fs, fs, 3),
        "meta": meta,
    }
    if restore_face:
        out["restore_face"] = np.frombuffer(blob, dtype=np.uint8, count=rs * rs * 3, offset=ends[1]).reshape(rs, rs, 3)
    return out


# ----------------------------------------------------------------------------------------------
# Reading shards.


def _members(path: Path, last: list[str]) -> Iterator[dict]:
    """Member dicts as webdataset's tar reader makes them; `last` tracks the current member name
    so an error can say where the tar broke."""
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            last[0] = info.name
            if info.isreg():
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": str(path)}


def read_shards(urls: Iterable[str | Path], on_error: Callable[[str], None]) -> Iterator[dict]:
    """The raw samples of the shards `urls` in tar order, as `decode_sample` takes them (`__key__`,
    `__url__`, bytes per extension). A shard that is missing, or whose tar breaks partway, costs
    the samples from there to its end: `on_error` gets one line naming the shard and the last
    member read, and reading goes on with the next shard (a broken shard is not fatal)."""
    for url in urls:
        last = [""]
        try:
            yield from wds.tariterators.group_by_keys(_members(Path(url), last))
        except (tarfile.TarError, OSError, ValueError) as e:
            on_error(f"{url}: {last[0] or 'first member'}: tar unreadable here ({e})")


def decoded_samples(urls: Iterable[str | Path], on_error: Callable[[str], None], *, restore_face: bool = False,
                    verify: bool = False) -> Iterator[dict]:
    """`read_shards`, decoded (`decode_sample`); a sample that does not decode is skipped and
    reported through `on_error` too, so every sample left out is counted once."""
    for raw in read_shards(urls, on_error):
        try:
            yield decode_sample(raw, restore_face=restore_face, verify=verify)
        except CorruptSample as e:
            on_error(str(e))


def load_manifest(dir: str | Path) -> dict:
    path = Path(dir) / "manifest.json"
    if not path.is_file():
        raise IngestError(f"{path}: manifest not found (build the shards first: avpgan shards build)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IngestError(f"{path}: manifest is not readable JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise IngestError(f"{path}: manifest has no 'splits' mapping")
    for split, info in manifest["splits"].items():
        if not isinstance(info, dict) or not all(k in info for k in ("shards", "samples", "identities", "labels")):
            raise IngestError(f"{path}: split '{split}' lacks shards/samples/identities/labels")
    return manifest
