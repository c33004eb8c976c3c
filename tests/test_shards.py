"""Shard build and check on a fake VoxCeleb/VGGFace tree holding every kind of bad input.

One build (workers=1) is shared by the module; other tests build again (2 worker processes, after
damage, after a kill) and compare bytes with it.
"""

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from avpgan.audio import to_int16
from avpgan.config import DataConfig
from avpgan.data import layout, shards, shards_build, shards_check
from avpgan.data.layout import IngestError
from avpgan.images import read_image, resize

sys.path.insert(0, str(Path(__file__).parent))
from datagen import EXPECT, META_HEADER, make_tree  # noqa: E402

SPS = 2  # samples per shard: many shards from a tiny tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = shards_build.build(tree["voxceleb"], tree["vggface"], tree["meta"], out, DataConfig(), SPS, workers=1)
    return out, manifest


def tar_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def samples(d: Path, file: str) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList([str(d / file)]), wds.tarfile_to_samples()))


def rel(entry_path: str, tree: dict) -> str:
    for root in ("voxceleb", "vggface", "root"):
        prefix = str(tree[root]) + "/"
        if entry_path.startswith(prefix):
            return entry_path[len(prefix):]
    raise AssertionError(entry_path)


# ---------------------------------------------------------------------------------------------- build


def test_manifest_counts_and_reasons(built, tree):
    out, m = built
    for split in shards.SPLITS:
        info = m["splits"][split]
        assert info["identity_samples"] == EXPECT[split]
        assert info["identities"] == sorted(EXPECT[split])
        assert info["labels"] == {n: i for i, n in enumerate(sorted(EXPECT[split]))}
        assert info["samples"] == sum(EXPECT[split].values()) == sum(s["samples"] for s in info["shards"])
        for s in info["shards"]:  # the manifest's per-shard counts are the tars' real contents
            assert len(samples(out, s["file"])) == s["samples"]
    assert m["splits"]["train"]["empty_identities"] == ["Kate_Kim"]
    got: dict[str, list[str]] = {}
    for s in m["skipped"]:
        got.setdefault(s["reason"], []).append(rel(s["path"], tree))
    assert {k: sorted(v) for k, v in got.items()} == EXPECT["skipped"]
    assert m["counts"]["skipped"] == {k: len(v) for k, v in sorted(EXPECT["skipped"].items())}
    conv = {c["from"]: [] for c in m["converted"]}
    for c in m["converted"]:
        conv[c["from"]].append(rel(c["path"], tree))
    assert conv == EXPECT["converted"]
    assert m["counts"]["utterances"] == 20 and m["counts"]["identities"] == 7
    assert json.loads((out / "manifest.json").read_text()) == m
    assert shards.load_manifest(out) == m


def test_split_by_first_letter_case_insensitive():
    d = DataConfig()
    assert [layout.split_of(n, d) for n in ("Abe", "bob", "Cy", "dora", "Eve", "frank", "Zed", "9lives")] == [
        "val", "val", "test", "test", "test", "train", "train", "train"]
    assert layout.split_of("Frank", DataConfig(val_prefixes="F", test_prefixes="")) == "val"


def test_sample_contents(built, tree):
    out, m = built
    by_audio = {}
    for split in shards.SPLITS:
        for s in m["splits"][split]["shards"]:
            for raw in samples(out, s["file"]):
                d = shards.decode_sample(raw, restore_face=True)
                assert d["audio"].dtype == np.int16 and d["face"].shape == (64, 64, 3) and d["restore_face"].shape == (128, 128, 3)
                assert d["meta"]["split"] == split and d["meta"]["label"] == m["splits"][split]["labels"][d["meta"]["name"]]
                assert d["audio"].size == d["meta"]["samples"] and d["audio"].size >= 16000  # min_seconds
                by_audio[d["meta"]["audio_path"]] = d
    # Faces cycle in sorted order when an identity has fewer faces than utterances.
    alice = [by_audio[p]["meta"]["face_path"] for p in ("id10001/v0/00002.wav", "id10001/v1/00001.wav", "id10001/v1/00003.wav")]
    assert alice == ["Alice_Adams/0001.jpg", "Alice_Adams/0002.jpg", "Alice_Adams/0001.jpg"]
    # Frank's first face is unreadable: every sample falls back to his next one.
    assert {d["meta"]["face_path"] for p, d in by_audio.items() if p.startswith("id10004")} == {"Frank_Fox/0002.png"}
    # The stored audio is the source's 16-bit samples, only trimmed (exact after int16 round trip).
    src = to_int16(sf.read(tree["voxceleb"] / "id10003/v1/00001.wav", dtype="float32")[0])
    stored = by_audio["id10003/v1/00001.wav"]["audio"]
    starts = np.flatnonzero(src[: src.size - stored.size + 1] == stored[0])
    assert any(np.array_equal(src[i : i + stored.size], stored) for i in starts)
    assert stored.size < src.size  # the near-silent padding went
    # 48 kHz stereo flac: 1.5 s voiced at 16 kHz, plus at most the VAD's frame slack.
    assert 1.5 <= by_audio["id10002/v1/00002.flac"]["meta"]["duration"] <= 1.5 + 2 * 2048 / 16000
    d = by_audio["id10003/v1/00001.wav"]
    np.testing.assert_array_equal(d["face"], resize(read_image(tree["vggface"] / d["meta"]["face_path"]), 64))
    assert d["meta"]["gender"] == "f" and d["meta"]["nationality"] == "China" and d["meta"]["voxceleb_id"] == "id10003"


def test_decode_sample_names_missing_or_short_member(built):
    out, m = built
    raw = samples(out, m["splits"]["val"]["shards"][0]["file"])[0]
    assert set(raw) == {"__key__", "__url__", "json", "bin"}
    assert "restore_face" not in shards.decode_sample(raw) and shards.decode_sample(raw, restore_face=True)["restore_face"].shape == (128, 128, 3)
    with pytest.raises(shards.CorruptSample, match=r"val-000000\.tar: val-\d+\.bin: \d+ bytes, the json's layout needs"):
        shards.decode_sample(dict(raw, bin=raw["bin"][:-1]))
    del raw["bin"]
    with pytest.raises(shards.CorruptSample, match=r"val-000000\.tar: val-\d+\.bin: member missing"):
        shards.decode_sample(raw)


def test_byte_identical_across_runs_and_worker_counts(built, tree, tmp_path):
    out, m = built
    m2 = shards_build.build(tree["voxceleb"], tree["vggface"], tree["meta"], tmp_path, DataConfig(), SPS, workers=2)
    assert tar_files(tmp_path) == tar_files(out) and len(tar_files(out)) == 11
    assert m2 == m


def test_resume_rewrites_only_what_is_missing(built, tree, tmp_path):
    out, m = built
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    (tmp_path / "train-000001.tar").unlink()  # shard gone (sidecar stays)
    (tmp_path / "val-000001.tar.done.json").unlink()  # sidecar gone (shard stays)
    (tmp_path / ".test-000000.tar.partial").write_bytes(b"half a shard")  # killed mid-write
    (tmp_path / "train-000042.tar").write_bytes(b"from an older, bigger plan")
    keep = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    time.sleep(0.01)
    m2 = shards_build.build(tree["voxceleb"], tree["vggface"], tree["meta"], tmp_path, DataConfig(), SPS, workers=1)
    assert m2 == m and tar_files(tmp_path) == tar_files(out)
    assert not list(tmp_path.glob(".*.partial"))
    rewritten = {n for n, t in keep.items() if n in tar_files(tmp_path) and (tmp_path / n).stat().st_mtime_ns != t}
    assert rewritten == {"val-000001.tar"}


def test_changed_settings_rewrite_every_shard(built, tree, tmp_path):
    out, _ = built
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    time.sleep(0.01)
    m = shards_build.build(tree["voxceleb"], tree["vggface"], tree["meta"], tmp_path, DataConfig(min_seconds=1.9), SPS, workers=1)
    assert all((tmp_path / n).stat().st_mtime_ns != t for n, t in before.items())
    assert m["audio"]["min_seconds"] == 1.9 and m["counts"]["skipped"]["too short after silence removal"] > 1
    durations = [shards.decode_sample(r)["meta"]["duration"] for s in m["splits"].values() for f in s["shards"]
                 for r in samples(tmp_path, f["file"])]
    assert len(durations) == m["counts"]["samples"] > 0 and min(durations) >= 1.9


def test_interrupted_cli_build_resumes_to_identical_shards(built, tree, tmp_path):
    out, _ = built
    cmd = [sys.executable, "-m", "avpgan", "shards", "build", "--voxceleb", str(tree["voxceleb"]),
           "--vggface", str(tree["vggface"]), "--meta", str(tree["meta"]), "--out", str(tmp_path),
           "--samples-per-shard", str(SPS), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while len(list(tmp_path.glob("*.done.json"))) < 2 and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "manifest.json").exists(), "the build finished before it could be interrupted"
    assert 2 <= len(list(tmp_path.glob("*.done.json"))) < 11
    rc = subprocess.run(cmd, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert "skipped: 19 inputs" in rc.stdout and "truncated audio" in rc.stdout
    assert tar_files(tmp_path) == tar_files(out)
    assert json.loads((tmp_path / "manifest.json").read_text()) == json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize(
    "text, problem",
    [
        (None, "meta file not found"),
        ("", "meta file is empty"),
        ("id\tname\n", "expected the tab-separated header"),
        (META_HEADER.replace("\t", ",") + "\n", "expected the tab-separated header"),
        (META_HEADER + "\nid10001\tAlice\tf\tUSA\n", "line 2: expected 5 tab-separated fields, got 4"),
        (META_HEADER + "\nid10001\tAlice\tf\tUSA\tdev\nid10001\tBob\tm\tUK\tdev\n", "line 3: VoxCeleb1 ID id10001 repeats line 2"),
        (META_HEADER + "\n", "header but no rows"),
    ],
)
def test_bad_meta_is_a_one_line_error_naming_the_file(tree, tmp_path, text, problem):
    meta = tmp_path / "vox1_meta.csv"
    if text is not None:
        meta.write_text(text)
    with pytest.raises(IngestError) as e:
        shards_build.build(tree["voxceleb"], tree["vggface"], meta, tmp_path / "out", DataConfig(), SPS, workers=1)
    msg = str(e.value)
    assert msg.startswith(f"{meta}: ") and problem in msg and "\n" not in msg
    assert isinstance(e.value, ValueError) and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- check


def test_check_passes_on_good_shards(built, capsys):
    out, _ = built
    assert shards_check.check(out) == 0
    printed = capsys.readouterr().out
    assert "ok: 13 samples decoded and verified" in printed
    assert any(line.split()[:4] == ["train", "5", "2", "6"] for line in printed.splitlines())


def damaged(out: Path, tmp_path: Path) -> Path:
    shutil.copytree(out, tmp_path / "d")
    return tmp_path / "d"


@pytest.mark.parametrize("part", ["json", "audio", "face", "face128"])
def test_check_names_shard_and_member_of_a_flipped_byte(built, tmp_path, capsys, part):
    d = damaged(built[0], tmp_path)
    shard = d / "train-000002.tar"
    with tarfile.open(shard) as t:
        js, bin_ = [i for i in t.getmembers()][:2]
        meta = json.loads(t.extractfile(js).read())
    at = {"json": js.offset_data,  # its opening brace
          "audio": bin_.offset_data + 2 * meta["samples"] - 1,
          "face": bin_.offset_data + 2 * meta["samples"] + 100,
          "face128": bin_.offset_data + 2 * meta["samples"] + 64 * 64 * 3 + 100}[part]
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x5A
    shard.write_bytes(bytes(data))
    assert shards_check.check(d) == 1
    err = capsys.readouterr().err
    if part == "json":
        assert f"{shard}: {js.name}: not the expected JSON" in err
    else:
        assert f"{shard}: {bin_.name}: {part} part" in err and "crc32 mismatch" in err


def test_check_fails_on_truncated_missing_and_miscounted_shards(built, tmp_path, capsys):
    d = damaged(built[0], tmp_path)
    t = d / "val-000000.tar"
    t.write_bytes(t.read_bytes()[:30000])
    (d / "test-000001.tar").unlink()
    m = json.loads((d / "manifest.json").read_text())
    full = next(s for s in m["splits"]["train"]["shards"] if s["samples"] == 2)
    full["samples"] += 1
    (d / "manifest.json").write_text(json.dumps(m))
    assert shards_check.check(d) == 1
    err = capsys.readouterr().err
    assert f"{t}: val-" in err and "tar unreadable here" in err
    assert f"{d / 'test-000001.tar'}: shard missing" in err
    assert f"{d / full['file']}: 2 samples decoded, manifest says 3" in err


def test_read_shards_skips_what_breaks_and_reports_it(built, tmp_path):
    """The one tar reader: a truncated shard costs its samples from the break on, a missing one
    all of them, each reported once with shard and member; the next shard reads in full."""
    d = damaged(built[0], tmp_path)
    nonempty = [(d / s["file"], s["samples"]) for info in built[1]["splits"].values() for s in info["shards"] if s["samples"]]
    (good, n_good), (cut, _) = nonempty[:2]
    gone = d / "train-000099.tar"
    with tarfile.open(cut) as t:
        second = t.getmembers()[1]
    cut.write_bytes(cut.read_bytes()[: second.offset_data + 10])  # inside the first sample's .bin
    errors: list[str] = []
    raw = list(shards.read_shards([cut, gone, good], errors.append))
    assert len(raw) == n_good and [r["__key__"] for r in raw] == [r["__key__"] for r in samples(d, good.name)]
    assert len(errors) == 2
    assert errors[0].startswith(f"{cut}: {second.name}: tar unreadable here")
    assert errors[1].startswith(f"{gone}: first member: tar unreadable here")

    # Decoding too: a sample whose bytes are damaged is reported and skipped, the others come.
    errors.clear()
    blob = bytearray(good.read_bytes())
    with tarfile.open(good) as t:
        blob[t.getmembers()[1].offset_data] ^= 0x5A
    good.write_bytes(bytes(blob))
    decoded = list(shards.decoded_samples([good], errors.append, verify=True))
    assert len(decoded) == len(raw) - 1 and len(errors) == 1 and "crc32 mismatch" in errors[0]


def test_one_tar_reader():
    """docs/architecture.md: shard tars are read by data/shards.py alone (read_shards) and written
    by data/shards_build.py alone (a tarfile.open in a "w" mode)."""
    import ast

    import avpgan

    package = Path(avpgan.__file__).parent
    readers, writers = set(), set()
    for f in package.rglob("*.py"):
        tree = ast.parse(f.read_text())
        writing = {id(node.func) for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                   and str(node.args[1].value).startswith("w")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("tarfile_to_samples", "tariterators", "open") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("wds", "tarfile", "webdataset"):
                (writers if id(node) in writing else readers).add(f.relative_to(package).as_posix())
    assert readers == {"data/shards.py"}
    assert writers == {"data/shards_build.py"}


def test_check_without_manifest(tmp_path, capsys):
    assert shards_check.check(tmp_path) == 2
    assert f"{tmp_path / 'manifest.json'}: manifest not found" in capsys.readouterr().err
