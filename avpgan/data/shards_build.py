"""Building WebDataset shards (`avpgan shards build`) from the VoxCeleb1 / VGGFace layout: plan,
encode in worker processes, write the manifest; the sample format itself is shards.py's.

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
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from avpgan import atomic
from avpgan.atomic import sha256_file
from avpgan.audio import AudioError, read_audio, remove_silence, to_int16
from avpgan.config import DataConfig
from avpgan.data.layout import IngestError, Identity, scan
from avpgan.data.shards import DATA, FORMAT, META, SPLITS, encode_sample
from avpgan.images import ImageError, load_rgb, resize

SHUFFLE_SEED = "avpgan-shards-v1"
SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar(\.done\.json)?$")

# Reasons a single input is left out while encoding (beside layout's folder-level ones).
SILENT = "silent audio"
EMPTY_AUDIO = "empty audio"
TOO_SHORT = "too short after silence removal"
BAD_IMAGE = "unreadable image"
NO_FACE = "no readable face for the identity"


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
