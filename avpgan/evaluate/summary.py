"""From the gathered per-identity records to the results: every metric per length and variant,
the real-vs-real ceilings and chance levels, the probes' scores, the distribution distances.
"""

from __future__ import annotations

import numpy as np

from avpgan.evaluate.metrics import (
    RECALL_KS, centroid, centroid_cosine, identity_cosine, mean_ci, real_pair_cosines, retrieval_recall, unit,
)
from avpgan.evaluate.probes import LITE0_PROBE_DETAILS, probe_scores
from avpgan.image_stats import FaceFeatures, feature_distances


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


def summarise(records: list[dict], train: list[dict], seconds_keys: list[str], sizes: dict[str, int],
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
