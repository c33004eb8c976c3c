"""Reading a split for the evaluation and reducing every face on the spot to what the metrics
read (embedding, Lite0 features, pixel vector), one rank's identities at a time; rank 0 gathers.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from avpgan.audio import crop_or_tile
from avpgan.data.shards import decoded_samples
from avpgan.evaluate.probes import LITE0_PROBE_DETAILS, PIXEL_PROBE_SIZE
from avpgan.generate import VoiceToFace
from avpgan.image_stats import FaceFeatures
from avpgan.images import to_tensor


def split_samples(shards: Path, manifest: dict, split: str, keep: Callable[[str], bool],
                  errors: list, progress: str | None = None) -> Iterator[dict]:
    """Decoded samples of the split whose identity `keep` accepts, in shard order; broken tar
    members and corrupt samples are skipped and appended to `errors`. `progress`: the label of
    a progress bar over every sample of the split (each rank reads them all)."""
    from tqdm import tqdm

    urls = [shards / s["file"] for s in manifest["splits"][split]["shards"]]
    with tqdm(total=manifest["splits"][split]["samples"], desc=progress, unit="sample",
              disable=True if progress is None else None,
              leave=False) as bar:
        for s in decoded_samples(urls, errors.append, restore_face=True):
            bar.update()
            if keep(s["meta"]["name"]):
                yield s


def resized(faces: torch.Tensor, size: int) -> torch.Tensor:
    """Square faces scaled to `size` px; antialiased, so shrinking averages instead of aliasing."""
    if faces.shape[-1] == size:
        return faces
    return F.interpolate(faces.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def pixel_vectors(faces: torch.Tensor, size: int = PIXEL_PROBE_SIZE) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> [N, 3 * size * size] float32: what the pixel probe reads."""
    return resized(faces.float(), size).flatten(1).cpu().numpy()


class Embedded:
    """One rank's per-face vectors, filled batch by batch so the split never sits in memory
    whole: every face, generated or real, is reduced on the spot to its embedding (skipped when
    `embed` is None), its Lite0 features (the distribution metrics) and its pixel vector (the
    pixel probe); no image is kept.

    Real faces get Lite0 features at each of `real_sizes`, the sizes of the generated faces they
    are compared with: the same downsampling on both sides, so the distance is about the faces
    rather than the resolution. Features are kept as float32 (the network computes in float32),
    which halves what gather_object pickles.
    """

    def __init__(self, net: VoiceToFace, embed, features: FaceFeatures, lengths: dict[str, int], batch_size: int,
                 restore: bool, real_sizes: tuple[int, ...]):
        self.net, self.embed, self.features, self.lengths = net, embed, features, lengths
        self.batch_size, self.restore, self.real_sizes = batch_size, restore, real_sizes
        self.clips = {s: [] for s in lengths}  # S -> [(name, key, clip)]
        # name -> S -> variant -> kind ("emb", "lite0", "pixels") -> [vector]
        self.gen: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
        self.faces: list = []  # (name, [3, H, W])
        self.real: dict = defaultdict(lambda: defaultdict(list))  # name -> kind ("emb", "pixels", size) -> [vector]
        self.utterances: dict = defaultdict(int)

    def add_voice(self, name: str, key: str, audio: np.ndarray) -> None:
        self.utterances[name] += 1
        for s, length in self.lengths.items():
            self.clips[s].append((name, key, crop_or_tile(audio, length, rng=None)))
            if len(self.clips[s]) >= self.batch_size:
                self._voices(s)

    def add_face(self, name: str, face: np.ndarray) -> None:
        self.faces.append((name, to_tensor(np.array(face))))  # a copy: shard views are read-only
        if len(self.faces) >= self.batch_size:
            self._faces()

    def finish(self) -> None:
        for s in self.clips:
            self._voices(s)
        self._faces()

    def _voices(self, s: str) -> None:
        if not self.clips[s]:
            return
        names = [n for n, _, _ in self.clips[s]]
        audio = torch.from_numpy(np.stack([c for _, _, c in self.clips[s]]))
        # The restorer's noise: seeded by the batch's first utterance, so a rerun repeats it
        seed = zlib.crc32(f"{s}/{self.clips[s][0][1]}".encode())
        self.clips[s] = []
        face, restored = self.net.faces(self.net.embed(audio), self.restore, seed=seed)
        for variant, images in (("gan", face), ("restored", restored)):
            if images is not None:
                vectors = {"emb": self.embed(images), "lite0": self.features(images).astype(np.float32),
                           "pixels": pixel_vectors(images)}
                for kind, batch in vectors.items():
                    for name, v in zip(names, batch):
                        self.gen[name][s][variant][kind].append(v)

    def _faces(self) -> None:
        if not self.faces:
            return
        faces = torch.stack([f for _, f in self.faces])
        vectors = {"pixels": pixel_vectors(faces)}
        if self.embed is not None:
            vectors["emb"] = self.embed(faces)
        for size in self.real_sizes:
            vectors[size] = self.features(resized(faces, size)).astype(np.float32)
            for div in LITE0_PROBE_DETAILS:
                vectors[(size, div)] = self.features(resized(resized(faces, size // div), size)).astype(np.float32)
        for kind, batch in vectors.items():
            for (name, _), v in zip(self.faces, batch):
                self.real[name][kind].append(v)
        self.faces = []

    def records(self) -> list[dict]:
        """Plain dicts of numpy arrays: what gather_object pickles to rank 0. `real` and `gen`
        hold embeddings; `real_lite0` is keyed by face size."""
        out = []
        for name in sorted(set(self.real) | set(self.gen)):
            real = self.real[name]
            out.append({"name": name, "utterances": self.utterances[name],
                        "real": np.stack(real["emb"]) if real["emb"] else None,
                        "real_pixels": np.stack(real["pixels"]) if real["pixels"] else None,
                        "real_lite0": {size: np.stack(real[size]) for size in self.real_sizes if real[size]},
                        "real_lite0_detail": {size: {div: np.stack(real[(size, div)]) for div in LITE0_PROBE_DETAILS}
                                              for size in self.real_sizes if real[size]},
                        "gen": self._generated(name, "emb"), "gen_lite0": self._generated(name, "lite0"),
                        "gen_pixels": self._generated(name, "pixels")})
        return out

    def _generated(self, name: str, kind: str) -> dict:
        return {s: {v: np.stack(k[kind]) for v, k in by_variant.items()} for s, by_variant in self.gen[name].items()}


def gather(obj: list, state) -> list:
    """Every rank's list `obj`, concatenated in rank order (as is on one process)."""
    if state.num_processes == 1:
        return obj
    from accelerate.utils import gather_object

    return gather_object(obj)
