"""WebDataset shards: build them from the raw layout, check them, the one sample codec and the
one tar reader (`read_shards`, `decoded_samples`: the stream, the bank, evaluate and `shards
check` all read shards through them).

One sample = one utterance + one face of the same identity:

    <key>.json  identity, label, source paths, duration, the layout of <key>.bin, crc32 per part
    <key>.bin   raw parts back to back: the utterance after silence removal (16 kHz mono int16,
                little-endian) | the face (face_size^2 x 3 uint8 RGB, the GAN's 64 px) |
                face128 (restore_size^2 x 3 uint8 RGB, the restoration model's 128 px)

Raw because the GPU step eats 20-40k samples/s: np.frombuffer costs nothing while WAV, FLAC, PNG
and JPEG decoding cost 50-1500 us per part; one binary member rather than one per part because
each tar member costs the reader ~40 us (benchmarks/bench_shards.py, shards/README.md). Features
are not stored; the device computes them from the audio.

How a build stays deterministic and restartable:
- The plan comes first: layout.scan lists the inputs (sorted), every utterance becomes a sample
  with its face picked by cycling the identity's sorted faces, each split is shuffled with a
  fixed seed (so a shard mixes identities) and cut into shards. Nothing of this depends on timing.
- Each worker writes whole shards: a temp name, then os.replace, then a small sidecar
  `<shard>.done.json` (sample count, size, sha256, what was skipped) whose `plan` hash ties it to
  this plan. A re-run skips shards whose sidecar matches and rewrites the rest.
- Tar members carry fixed names, mtime, owner and mode, so the same plan gives byte-identical
  shards whatever the worker count or how often the build was interrupted.
- Inputs that fail while encoding (corrupt audio, silence, too short, unreadable image) are
  recorded in the sidecar of the shard they belonged to, so the skipped list is as stable as
  the plan.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import random
import re
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds
from tqdm import tqdm

from avpgan import atomic
from avpgan.atomic import sha256_file
from avpgan.audio import AudioError, read_audio, remove_silence, to_int16
from avpgan.config import DataConfig
from avpgan.data.layout import IngestError, Identity, scan
from avpgan.images import ImageError, load_rgb, resize

FORMAT = 1
SPLITS = ("train", "val", "test")
META, DATA = "json", "bin"
SHUFFLE_SEED = "avpgan-shards-v1"
SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar(\.done\.json)?$")

# Reasons a single input is left out while encoding (beside layout's folder-level ones).
SILENT = "silent audio"
EMPTY_AUDIO = "empty audio"
TOO_SHORT = "too short after silence removal"
BAD_IMAGE = "unreadable image"
NO_FACE = "no readable face for the identity"


class CorruptSample(ValueError):
    """A sample whose members cannot be decoded; the message names shard and member."""

    def __init__(self, message: str, shard: str = "", member: str = ""):
        super().__init__(message)
        self.shard, self.member = shard, member


# ----------------------------------------------------------------------------------------------
# The sample codec.

PARTS = ("audio", "face", "face128")  # the order of the parts inside <key>.bin


def encode_sample(key: str, meta: dict, audio: np.ndarray, face: np.ndarray, face128: np.ndarray) -> list[tuple[str, bytes]]:
    """(member name, bytes) in tar order: <key>.json, then <key>.bin = audio | face | face128.

    The json records the layout (samples, face sizes) and each part's crc32, so `check` can
    name a flipped byte in data that has no checksum of its own.
    """
    parts = [
        np.ascontiguousarray(audio, dtype="<i2").tobytes(),
        np.ascontiguousarray(face, dtype=np.uint8).tobytes(),
        np.ascontiguousarray(face128, dtype=np.uint8).tobytes(),
    ]
    meta = dict(meta, samples=int(len(audio)), face_size=int(face.shape[0]), restore_size=int(face128.shape[0]),
                crc32={name: zlib.crc32(b) for name, b in zip(PARTS, parts)})
    return [(f"{key}.{META}", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()), (f"{key}.{DATA}", b"".join(parts))]


def decode_sample(raw: dict, face128: bool = False, verify: bool = False) -> dict:
    """One raw tar sample -> {"key", "audio" int16[S], "face" uint8[H,W,3], ["face128"], "meta"}.

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
    if face128:
        out["face128"] = np.frombuffer(blob, dtype=np.uint8, count=rs * rs * 3, offset=ends[1]).reshape(rs, rs, 3)
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


def decoded_samples(urls: Iterable[str | Path], on_error: Callable[[str], None], *, face128: bool = False,
                    verify: bool = False) -> Iterator[dict]:
    """`read_shards`, decoded (`decode_sample`); a sample that does not decode is skipped and
    reported through `on_error` too, so every sample left out is counted once."""
    for raw in read_shards(urls, on_error):
        try:
            yield decode_sample(raw, face128=face128, verify=verify)
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


# ----------------------------------------------------------------------------------------------
# Planning.


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def plan(identities: list[Identity], data: DataConfig, samples_per_shard: int, sources: list[str]) -> tuple[list[dict], dict]:
    """Every shard of the build as a job {file, split, entries, plan}, plus the label index per split.

    An entry is one utterance with its identity and the index of its face (utterance i of an
    identity gets face i mod #faces). Each split is sorted, then shuffled with a fixed seed:
    sorted shards would hold a handful of identities each and starve the loader's shuffle buffer.
    A job's `plan` hash covers everything its shard's bytes depend on (bar the input files'
    contents), so a resumed build can trust a finished shard whose sidecar carries the same hash.
    """
    settings = dict(_settings(data), sources=sources)
    faces_digest = {ident.name: _digest(ident.faces) for ident in identities}
    jobs, labels = [], {}
    for split in SPLITS:
        members = sorted((i for i in identities if i.split == split), key=lambda i: i.name)
        labels[split] = {ident.name: n for n, ident in enumerate(members)}
        entries = []
        for ident in members:
            for u, utt in enumerate(ident.utterances):
                entries.append({
                    "name": ident.name, "voxceleb_id": ident.voxceleb_id, "label": labels[split][ident.name],
                    "gender": ident.gender, "nationality": ident.nationality, "audio": utt, "face": u % len(ident.faces),
                })
        random.Random(f"{SHUFFLE_SEED}/{split}").shuffle(entries)
        for n, e in enumerate(entries):
            e["key"] = f"{split}-{n:07d}"
        for s in range(math.ceil(len(entries) / samples_per_shard)):
            chunk = entries[s * samples_per_shard : (s + 1) * samples_per_shard]
            file = f"{split}-{s:06d}.tar"
            seen = sorted({e["name"] for e in chunk})
            job_plan = _digest({"format": FORMAT, "file": file, "settings": settings, "entries": chunk,
                                "faces": {n: faces_digest[n] for n in seen}})
            jobs.append({"file": file, "split": split, "entries": chunk, "plan": job_plan})
    return jobs, labels


def _settings(data: DataConfig) -> dict:
    return {
        "sample_rate": data.sample_rate, "vad_top_db": data.vad_top_db, "min_seconds": data.min_seconds,
        "face_size": data.face_size, "restore_size": data.restore_size,
    }


# ----------------------------------------------------------------------------------------------
# Encoding one shard (runs in a worker process).

_WORKER: dict = {}  # set once per worker process: roots, settings, every identity's face list


def _init_worker(voxceleb: str, vggface: str, out: str, settings: dict, faces: dict[str, list[str]]) -> None:
    _WORKER.update(voxceleb=Path(voxceleb), vggface=Path(vggface), out=Path(out), settings=settings, faces=faces)


class _Skip(Exception):
    def __init__(self, path: Path | str, reason: str, detail: str = ""):
        super().__init__(reason)
        detail = detail.removeprefix(f"{path}: ")  # decoder messages start with the path
        self.entry = {"path": str(path), "reason": reason, **({"detail": detail} if detail else {})}


def _prepare_audio(path: Path, s: dict) -> tuple[np.ndarray, float]:
    """The stored utterance: decoded, 16 kHz mono, silence removed, int16; or a _Skip."""
    try:
        y = read_audio(path, s["sample_rate"])
    except AudioError as e:
        raise _Skip(path, e.reason, str(e)) from None
    except Exception as e:  # a decoder choking on garbage must not end the build
        raise _Skip(path, "unreadable audio", f"{type(e).__name__}: {e}") from None
    if y.size == 0:
        raise _Skip(path, EMPTY_AUDIO, "no samples")
    source_seconds = y.size / s["sample_rate"]
    voiced = remove_silence(y, s["vad_top_db"])
    if voiced.size == 0:
        raise _Skip(path, SILENT, f"nothing within {s['vad_top_db']} dB of the peak or all zero")
    seconds = voiced.size / s["sample_rate"]
    if seconds < s["min_seconds"]:
        raise _Skip(path, TOO_SHORT, f"{seconds:.2f} s < {s['min_seconds']} s")
    return to_int16(voiced), source_seconds


def _prepare_face(entry: dict, cache: dict, skipped: list, converted: list) -> tuple[str, np.ndarray, np.ndarray]:
    """The entry's face, or the next readable one of its identity in cycle order."""
    faces, s = _WORKER["faces"][entry["name"]], _WORKER["settings"]
    for k in range(len(faces)):
        rel = faces[(entry["face"] + k) % len(faces)]
        if rel not in cache:
            path = _WORKER["vggface"] / rel
            try:
                rgb, mode = load_rgb(path)
                cache[rel] = (resize(rgb, s["face_size"]), resize(rgb, s["restore_size"]))
                if mode != "RGB":
                    converted.append({"path": str(path), "from": mode})
            except ImageError as e:
                cache[rel] = None
                skipped.append({"path": str(path), "reason": BAD_IMAGE, "detail": str(e).removeprefix(f"{path}: ")})
        if cache[rel] is not None:
            return (rel, *cache[rel])
    raise _Skip(_WORKER["voxceleb"] / entry["audio"], NO_FACE, entry["name"])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def encode_shard(job: dict) -> dict:
    """Write one shard (temp name, then rename) and its sidecar; return the sidecar."""
    out, s = _WORKER["out"], _WORKER["settings"]
    path = out / job["file"]
    skipped, converted, used_faces, per_identity = [], [], set(), Counter()
    cache: dict = {}
    seconds = 0.0
    with atomic.replacing(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for e in job["entries"]:
            audio_path = _WORKER["voxceleb"] / e["audio"]
            try:
                pcm, source_seconds = _prepare_audio(audio_path, s)
                face_rel, face, restore = _prepare_face(e, cache, skipped, converted)
            except _Skip as skip:
                skipped.append(skip.entry)
                continue
            meta = {
                "key": e["key"], "name": e["name"], "voxceleb_id": e["voxceleb_id"], "split": job["split"],
                "label": e["label"], "gender": e["gender"], "nationality": e["nationality"],
                "duration": round(pcm.size / s["sample_rate"], 4), "source_duration": round(source_seconds, 4),
                "sample_rate": s["sample_rate"], "audio_path": e["audio"], "face_path": face_rel,
            }
            for name, data in encode_sample(e["key"], meta, pcm, face, restore):
                _add(tar, name, data)
            used_faces.add(face_rel)
            per_identity[e["name"]] += 1
            seconds += pcm.size / s["sample_rate"]
    sidecar = {
        "file": job["file"], "plan": job["plan"], "samples": sum(per_identity.values()),
        "bytes": path.stat().st_size, "sha256": sha256_file(path), "seconds": round(seconds, 3),
        "identities": dict(sorted(per_identity.items())), "faces_used": sorted(used_faces),
        "skipped": skipped, "converted": converted,
    }
    _write_json(out / f"{job['file']}.done.json", sidecar)
    return sidecar


def _write_json(path: Path, obj: dict, sort_keys: bool = True) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n")


def _finished(out: Path, job: dict) -> dict | None:
    """The sidecar of a shard already written for exactly this plan, else None."""
    try:
        sidecar = json.loads((out / f"{job['file']}.done.json").read_text())
        if sidecar.get("plan") == job["plan"] and (out / job["file"]).stat().st_size == sidecar["bytes"]:
            return sidecar
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# ----------------------------------------------------------------------------------------------
# Build.


def build(voxceleb: Path, vggface: Path, meta: Path, out: Path, data: DataConfig, samples_per_shard: int, workers: int) -> dict:
    """Plan, encode the shards not yet done (in `workers` processes), write manifest.json."""
    if samples_per_shard < 1:
        raise IngestError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    voxceleb, vggface, meta, out = Path(voxceleb), Path(vggface), Path(meta), Path(out)
    identities, skipped = scan(voxceleb, vggface, meta, data)
    if not identities:
        raise IngestError(f"{meta}: no identity has both voices ({voxceleb}) and faces ({vggface}); {len(skipped)} inputs skipped")
    jobs, labels = plan(identities, data, samples_per_shard, [str(voxceleb.resolve()), str(vggface.resolve())])
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # it appears again only when every shard is done
    _tidy(out, {j["file"] for j in jobs})

    sidecars = {j["file"]: sc for j in jobs if (sc := _finished(out, j)) is not None}
    todo = [j for j in jobs if j["file"] not in sidecars]
    total = sum(len(j["entries"]) for j in jobs)
    init = (str(voxceleb), str(vggface), str(out), _settings(data), {i.name: i.faces for i in identities})
    with tqdm(total=total, unit="utt", desc=f"shards -> {out}", initial=total - sum(len(j["entries"]) for j in todo),
              mininterval=1.0, file=sys.stderr) as bar:
        if workers <= 1 or len(todo) <= 1:
            _init_worker(*init)
            for job in todo:
                sidecars[job["file"]] = encode_shard(job)
                bar.update(len(job["entries"]))
        else:
            # spawn, not fork: the parent may hold threads (tqdm, torch) that a fork would copy mid-state
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=init) as pool:
                sizes = {j["file"]: len(j["entries"]) for j in todo}
                for sc in pool.imap_unordered(encode_shard, todo):
                    sidecars[sc["file"]] = sc
                    bar.update(sizes[sc["file"]])

    manifest = _manifest(voxceleb, vggface, meta, data, samples_per_shard, identities, jobs, labels, skipped, sidecars)
    _write_json(out / "manifest.json", manifest, sort_keys=False)  # keep train/val/test order
    print(summary(manifest, out))
    return manifest


def _tidy(out: Path, planned: set[str]) -> None:
    """Remove temp files of an interrupted build and shards this plan no longer has."""
    for p in out.iterdir():
        if p.name.startswith(".") and p.name.endswith(atomic.PARTIAL):
            p.unlink()
        elif SHARD_RE.match(p.name) and p.name.removesuffix(".done.json") not in planned:
            p.unlink()


def _manifest(voxceleb, vggface, meta, data, samples_per_shard, identities, jobs, labels, skipped, sidecars) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [{"file": j["file"], "samples": sidecars[j["file"]]["samples"], "bytes": sidecars[j["file"]]["bytes"],
                   "sha256": sidecars[j["file"]]["sha256"]} for j in jobs if j["split"] == split]
        per_identity = Counter()
        for j in jobs:
            if j["split"] == split:
                per_identity.update(sidecars[j["file"]]["identities"])
        names = sorted(labels[split])
        splits[split] = {
            "samples": sum(s["samples"] for s in shards),
            "seconds": round(sum(sidecars[j["file"]]["seconds"] for j in jobs if j["split"] == split), 3),
            "identities": names,
            "labels": labels[split],
            "identity_samples": {n: per_identity.get(n, 0) for n in names},
            "empty_identities": [n for n in names if per_identity.get(n, 0) == 0],
            "shards": shards,
        }
    all_skipped = {(s["path"], s["reason"]): s for s in skipped}
    converted = {}
    faces_used = set()
    for j in jobs:
        sc = sidecars[j["file"]]
        for s in sc["skipped"]:
            all_skipped.setdefault((s["path"], s["reason"]), s)
        for c in sc["converted"]:
            converted.setdefault(c["path"], c)
        faces_used.update(sc["faces_used"])
    skipped_list = [all_skipped[k] for k in sorted(all_skipped)]
    converted_list = [converted[k] for k in sorted(converted)]
    return {
        "format": FORMAT,
        "sources": {"voxceleb": str(voxceleb), "vggface": str(vggface), "meta": str(meta)},
        "samples_per_shard": samples_per_shard,
        "members": {"meta": META, "data": DATA, "layout": "audio int16 little-endian [samples] | face uint8 "
                    "[face_size, face_size, 3] | face128 uint8 [restore_size, restore_size, 3]"},
        "audio": {"sample_rate": data.sample_rate, "dtype": "int16", "byte_order": "little", "channels": 1,
                  "silence_removal": "librosa.effects.split", "vad_top_db": data.vad_top_db,
                  "min_seconds": data.min_seconds, "resampler": "soxr_hq", "stereo": "mean of channels"},
        "faces": {"size": data.face_size, "restore_size": data.restore_size, "dtype": "uint8", "layout": "HWC RGB",
                  "resize": "centre square crop, then Lanczos"},
        "features": {"stored": False, "computed": "log-mel on the training device from the audio member (avpgan.features)"},
        "shuffle_seed": SHUFFLE_SEED,
        "splits": splits,
        "counts": {
            "identities": len(identities),
            "utterances": sum(len(i.utterances) for i in identities),
            "faces": sum(len(i.faces) for i in identities),
            "faces_used": len(faces_used),
            "samples": sum(s["samples"] for s in splits.values()),
            "skipped": dict(sorted(Counter(s["reason"] for s in skipped_list).items())),
            "converted": dict(sorted(Counter(c["from"] for c in converted_list).items())),
        },
        "skipped": skipped_list,
        "converted": converted_list,
    }


def summary(manifest: dict, out: Path | str, max_listed: int = 10) -> str:
    """What was written and everything left out, for the end of a build."""
    lines = [f"shards in {out}:"]
    for split, info in manifest["splits"].items():
        lines.append(f"  {split:5s} {info['samples']:8d} samples {len(info['identities']):6d} identities "
                     f"{len(info['shards']):5d} shards {info['seconds'] / 3600:8.2f} h")
        if info["empty_identities"]:
            lines.append(f"        {len(info['empty_identities'])} identities lost every utterance: "
                         + ", ".join(info["empty_identities"][:max_listed]))
    c = manifest["counts"]
    lines.append(f"  faces: {c['faces']} listed, {c['faces_used']} paired with an utterance")
    for mode, n in c["converted"].items():
        lines.append(f"  converted to RGB: {n} {mode} images")
    skipped = manifest["skipped"]
    lines.append(f"  skipped: {len(skipped)} inputs" + (" (full list in manifest.json)" if skipped else ""))
    for reason, n in c["skipped"].items():
        lines.append(f"    {n:6d}  {reason}")
        listed = [s for s in skipped if s["reason"] == reason]
        for s in listed[:max_listed]:
            lines.append(f"            {s['path']}" + (f"  ({s['detail']})" if s.get("detail") else ""))
        if len(listed) > max_listed:
            lines.append(f"            ... {len(listed) - max_listed} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Check.


def check(dir: Path) -> int:
    """Decode every sample of every shard against the manifest. 0 when all is well, else 1
    (2 when there is no usable manifest). Problems are printed naming shard and member."""
    dir = Path(dir)
    try:
        manifest = load_manifest(dir)
    except IngestError as e:
        print(f"avpgan shards check: {e}", file=sys.stderr)
        return 2
    errors: list[str] = []
    print(f"{'split':6s} {'samples':>8s} {'ids':>6s} {'shards':>6s} {'hours':>8s} {'mean s':>7s} {'min s':>7s} {'max s':>7s}")
    for split, info in manifest["splits"].items():
        durations, names, keys = [], set(), set()
        # leave=False: the bar gives way to the split's row of the table; disable=None: no bar in a log file
        bar = tqdm(total=info["samples"], desc=f"check {split}", unit="sample", leave=False, disable=None)
        for shard in info["shards"]:
            path = dir / shard["file"]
            if not path.is_file():
                errors.append(f"{path}: shard missing")
                continue
            n, before = 0, len(errors)
            for s in decoded_samples([path], errors.append, face128=True, verify=True):
                m, where = s["meta"], f"{path}: {s['key']}"
                if m.get("split") != split or info["labels"].get(m.get("name")) != m.get("label"):
                    errors.append(f"{where}.{META}: identity {m.get('name')!r} / label {m.get('label')} / split "
                                  f"{m.get('split')!r} do not match the manifest's {split} labels")
                if s["key"] in keys:
                    errors.append(f"{where}: key repeats")
                keys.add(s["key"])
                names.add(m.get("name"))
                durations.append(s["audio"].size / manifest["audio"]["sample_rate"])
                n += 1
                bar.update()
            if n != shard["samples"]:
                errors.append(f"{path}: {n} samples decoded, manifest says {shard['samples']}")
            if len(errors) == before and "sha256" in shard and sha256_file(path) != shard["sha256"]:
                errors.append(f"{path}: sha256 differs from the manifest (a tar header or member was altered)")
        bar.close()
        total = len(durations)
        if total != info["samples"]:
            errors.append(f"{dir}: split {split}: {total} samples decoded, manifest says {info['samples']}")
        d = np.array(durations) if durations else np.zeros(1)
        print(f"{split:6s} {total:8d} {len(names):6d} {len(info['shards']):6d} {d.sum() / 3600:8.3f} "
              f"{d.mean():7.2f} {d.min():7.2f} {d.max():7.2f}")
    if errors:
        for e in errors[:50]:
            print(f"CORRUPT {e}", file=sys.stderr)
        if len(errors) > 50:
            print(f"... {len(errors) - 50} more problems", file=sys.stderr)
        print(f"avpgan shards check: {dir}: {len(errors)} problems", file=sys.stderr)
        return 1
    print(f"ok: {sum(i['samples'] for i in manifest['splits'].values())} samples decoded and verified")
    return 0
