"""Loader throughput: samples/s from shards with 0, 1 and 2 loader workers, and where the time goes.

    python benchmarks/bench_loader.py --shards data/demo/shards [--batch 32 --batches 40]

Prints, side by side: the stream with 0/1/2 workers (same batches, same order), and one core's
split of a sample's cost between tar reading, decoding (audio view + faces), crop/flip, and the
log-mel on the CPU (which the training loop runs on its device instead).
"""

from __future__ import annotations

import argparse
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from avpgan.audio import crop_or_tile
from avpgan.config import DataConfig, FeatureConfig
from avpgan.data.shards import decode_sample, load_manifest
from avpgan.data.stream import make_stream
from avpgan.features import LogMel


def stream_rate(data: DataConfig, workers: int, batch: int, batches: int) -> float:
    stream = make_stream(data, "train", batch, workers=workers, seed=0)
    next(stream)  # worker start-up is not throughput
    t = time.perf_counter()
    for _ in islice(stream, batches):
        pass
    return batches * batch / (time.perf_counter() - t)


def stage_costs(data: DataConfig, n: int) -> dict[str, float]:
    """Microseconds per sample for each stage, on this process's one core."""
    manifest = load_manifest(data.shards)
    urls = [str(Path(data.shards) / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    t = time.perf_counter()
    raws = list(islice(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()), n))
    t_tar = (time.perf_counter() - t) / len(raws)
    t = time.perf_counter()
    samples = [decode_sample(r) for r in raws]
    t_decode = (time.perf_counter() - t) / len(raws)
    length = int(data.crop_seconds * data.sample_rate)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    clips = [crop_or_tile(s["audio"], length, rng) for s in samples]
    faces = [s["face"][:, ::-1] for s in samples]
    np.stack(faces)
    t_crop = (time.perf_counter() - t) / len(raws)
    audio = torch.from_numpy(np.stack(clips))
    logmel = LogMel(FeatureConfig(), data.sample_rate)
    t = time.perf_counter()
    for chunk in audio.split(32):
        logmel(chunk)
    t_mel = (time.perf_counter() - t) / len(raws)
    return {"tar reading": t_tar, "decode (audio + faces)": t_decode, "crop / tile / flip": t_crop,
            "log-mel on CPU (not in the loader)": t_mel}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--crop-seconds", type=float, default=8.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = DataConfig(shards=args.shards, crop_seconds=args.crop_seconds, shuffle_buffer=256)
    print(f"loader from {args.shards}: batches of {args.batch}, {args.crop_seconds:g} s crops, "
          f"load average {open('/proc/loadavg').read().split()[0]}")
    for workers in (0, 1, 2):
        print(f"  {workers} loader workers: {stream_rate(data, workers, args.batch, args.batches):8.0f} samples/s")
    costs = stage_costs(data, args.batch * 8)
    loader = sum(v for k, v in costs.items() if "not in the loader" not in k)
    print("one core, per sample:")
    for k, v in costs.items():
        share = f"{100 * v / loader:5.1f}% of loader time" if "not in the loader" not in k else ""
        print(f"  {k:38s} {1e6 * v:9.1f} us  {share}")


if __name__ == "__main__":
    main()
