"""SynthVox attribute probes: ridge regressions fitted on real train-split faces that predict the
hidden attributes (attributes.csv) from face embeddings, 16 x 16 pixels or EfficientNet-Lite0
features; how well they read generated faces tells what those faces carry.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from avpgan.evaluate.metrics import pearson, roc_auc, unit

PROBE_ATTRIBUTES = {"gender": "accuracy", "age": "pearson_r", "size": "pearson_r", "tone": "pearson_r"}
LITE0_PROBE_RIDGES = (1.0, 10.0, 100.0, 1000.0, 10000.0)  # the Lite0 probe's lambda is chosen from these
# The Lite0 probe also learns from real faces whose detail was cut to 1/2 and 1/4 of their size
# (shrunk, then scaled back): fitted on sharp faces alone it reads sharpness as much as gender
# (real SynthVox test faces at 1/2 detail: gender 0.58 against 0.93 sharp, docs/gan_recipe.md).
LITE0_PROBE_DETAILS = (2, 4)
# 16 x 16: coarse enough that 64 px generated and 128 px real faces land on the same grid and
# 768 inputs stay learnable from a few hundred train faces, fine enough for hair, beard and skin.
PIXEL_PROBE_SIZE = 16


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalised intercept: (X'X + lam I) w = X'y on centred data."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mx, my = x.mean(axis=0), y.mean()
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - my))
    return w, float(my - mx @ w)


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
    """Gender accuracy and ROC AUC (men positive), Pearson r per continuous attribute, of one set of faces."""
    out = {}
    for attr, (w, b) in probe.items():
        pred = emb @ w + b
        y = np.array([t[attr] for t in truth])
        if attr == "gender":
            out["gender"], out["gender_auc"] = float(np.mean(np.sign(pred) == y)), roc_auc(pred, y > 0)
        else:
            out[attr] = pearson(pred, y)
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
