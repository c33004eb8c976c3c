"""Checking WebDataset shards (`avpgan shards check`): every sample decoded and verified
against the manifest, through the one reader in shards.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from avpgan.atomic import sha256_file
from avpgan.data.layout import IngestError
from avpgan.data.shards import META, decoded_samples, load_manifest


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
            for s in decoded_samples([path], errors.append, restore_face=True, verify=True):
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
