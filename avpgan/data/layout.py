"""The raw data's layout: VoxCeleb1 voices, VGGFace faces, vox1_meta.csv joining them; the split.

    voxceleb/idNNNNN/<video>/<nnnnn>.wav   one folder per VoxCeleb1 id (any depth below it)
    vggface/<VGGFace1 name>/<file>.jpg     one folder per VGGFace1 name
    vox1_meta.csv                          VoxCeleb1 ID <tab> VGGFace1 ID <tab> Gender <tab> Nationality <tab> Set

Only listing happens here (no decoding), so the plan of a build is cheap and deterministic: every
list is sorted by its path relative to its root, never in the file system's order. Whatever is
left out (folders without a partner, files of the wrong kind, meta rows without files) is
returned as a skipped entry with its reason, never dropped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from avpgan.config import DataConfig

META_HEADER = ["VoxCeleb1 ID", "VGGFace1 ID", "Gender", "Nationality", "Set"]
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".m4a", ".aiff", ".aif", ".au"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Reasons a whole folder or row is left out (the manifest and the tests use these strings).
NOT_IN_META_VOICE = "voice folder not in the meta file"
NOT_IN_META_FACE = "face folder not in the meta file"
NO_FACES = "identity has voices but no faces"
NO_VOICES = "identity has faces but no voices"
NO_FILES = "meta row has no voice or face files"
NOT_AUDIO = "not an audio file"
NOT_IMAGE = "not an image file"
OUTSIDE = "file outside any identity folder"


class IngestError(ValueError):
    """Input that stops a build: a missing or malformed meta file, a missing root. One line,
    naming the file and the problem."""


@dataclass(frozen=True)
class MetaRow:
    voxceleb_id: str
    name: str  # the VGGFace1 name: the identity's label everywhere in this project
    gender: str
    nationality: str
    set: str  # VoxCeleb1's own dev/test column, kept for reference; our split is by name
    line: int


@dataclass
class Identity:
    name: str
    voxceleb_id: str
    gender: str
    nationality: str
    split: str
    utterances: list[str] = field(default_factory=list)  # paths relative to the voxceleb root
    faces: list[str] = field(default_factory=list)  # paths relative to the vggface root


def read_meta(path: str | Path) -> list[MetaRow]:
    """Parse the tab-separated meta file; any problem is an IngestError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: meta file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise IngestError(f"{path}: cannot read the meta file ({e})") from None
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise IngestError(f"{path}: meta file is empty (expected the header {' / '.join(META_HEADER)})")
    header = [c.strip() for c in lines[0][1].split("\t")]
    if header != META_HEADER:
        raise IngestError(
            f"{path}: line {lines[0][0]}: expected the tab-separated header {' / '.join(META_HEADER)}, got {lines[0][1].strip()!r}"
        )
    rows: list[MetaRow] = []
    seen_ids: dict[str, int] = {}
    seen_names: dict[str, int] = {}
    for no, ln in lines[1:]:
        cells = [c.strip() for c in ln.split("\t")]
        if len(cells) != len(META_HEADER):
            raise IngestError(f"{path}: line {no}: expected {len(META_HEADER)} tab-separated fields, got {len(cells)}")
        vid, name, gender, nationality, set_ = cells
        if not vid or not name:
            raise IngestError(f"{path}: line {no}: empty VoxCeleb1 ID or VGGFace1 ID")
        if "/" in vid or "/" in name or vid in (".", "..") or name in (".", ".."):
            raise IngestError(f"{path}: line {no}: an ID cannot be a path ({vid!r}, {name!r})")
        if vid in seen_ids:
            raise IngestError(f"{path}: line {no}: VoxCeleb1 ID {vid} repeats line {seen_ids[vid]}")
        if name in seen_names:
            raise IngestError(f"{path}: line {no}: VGGFace1 ID {name} repeats line {seen_names[name]}")
        seen_ids[vid], seen_names[name] = no, no
        rows.append(MetaRow(vid, name, gender, nationality, set_, no))
    if not rows:
        raise IngestError(f"{path}: meta file has a header but no rows")
    return rows


def split_of(name: str, data: DataConfig) -> str:
    """Nagrani et al.'s split by the name's first letter: val, test, else train."""
    first = name[:1].upper()
    if first and first in data.val_prefixes.upper():
        return "val"
    if first and first in data.test_prefixes.upper():
        return "test"
    return "train"


def _walk(folder: Path) -> list[str]:
    """Every file below `folder`, as sorted posix paths relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel = Path(dirpath).relative_to(folder)
        out.extend((rel / f).as_posix() for f in filenames)
    return sorted(out)


def _subfolders(root: Path) -> tuple[list[str], list[str]]:
    """(folder names, loose file names) directly in `root`, sorted."""
    folders, files = [], []
    for entry in os.scandir(root):
        (folders if entry.is_dir() else files).append(entry.name)
    return sorted(folders), sorted(files)


def scan(voxceleb: Path, vggface: Path, meta: Path, data: DataConfig) -> tuple[list[Identity], list[dict]]:
    """Join voices and faces through the meta file.

    Returns the identities that have both (sorted by name) and every input left out as
    {"path", "reason"}, sorted by path.
    """
    for root, what in ((voxceleb, "--voxceleb"), (vggface, "--vggface")):
        if not Path(root).is_dir():
            raise IngestError(f"{root}: {what} folder not found")
    rows = read_meta(meta)
    skipped: list[dict] = []

    def media(root: Path, folder: str, exts: set[str], reason: str) -> list[str]:
        keep = []
        for rel in _walk(root / folder):
            if Path(rel).suffix.lower() in exts:
                keep.append(f"{folder}/{rel}")
            else:
                skipped.append({"path": str(root / folder / rel), "reason": reason})
        return keep

    voice_dirs, voice_loose = _subfolders(voxceleb)
    face_dirs, face_loose = _subfolders(vggface)
    skipped += [{"path": str(voxceleb / f), "reason": OUTSIDE} for f in voice_loose]
    skipped += [{"path": str(vggface / f), "reason": OUTSIDE} for f in face_loose]
    known_ids = {r.voxceleb_id for r in rows}
    known_names = {r.name for r in rows}
    skipped += [{"path": str(voxceleb / d), "reason": NOT_IN_META_VOICE} for d in voice_dirs if d not in known_ids]
    skipped += [{"path": str(vggface / d), "reason": NOT_IN_META_FACE} for d in face_dirs if d not in known_names]
    voice_set, face_set = set(voice_dirs), set(face_dirs)

    identities = []
    for row in sorted(rows, key=lambda r: r.name):
        utts = media(voxceleb, row.voxceleb_id, AUDIO_EXTS, NOT_AUDIO) if row.voxceleb_id in voice_set else []
        faces = media(vggface, row.name, IMAGE_EXTS, NOT_IMAGE) if row.name in face_set else []
        if not utts and not faces:
            skipped.append({"path": f"{meta}:{row.line}", "reason": NO_FILES, "detail": f"{row.voxceleb_id} / {row.name}"})
        elif not faces:
            skipped.append({"path": str(voxceleb / row.voxceleb_id), "reason": NO_FACES, "detail": row.name})
        elif not utts:
            skipped.append({"path": str(vggface / row.name), "reason": NO_VOICES, "detail": row.voxceleb_id})
        else:
            identities.append(
                Identity(row.name, row.voxceleb_id, row.gender, row.nationality, split_of(row.name, data), utts, faces)
            )
    skipped.sort(key=lambda s: (s["path"], s["reason"]))
    return identities, skipped
