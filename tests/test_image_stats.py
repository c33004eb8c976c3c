"""Distribution metrics (fd_lite0, kid_lite0) on cases with known answers, the Lite0 feature
extractor, and the pixel-space attribute probe on a planted attribute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avpgan import evaluate as ev
from avpgan import image_stats as ist


def whitened(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n samples whose sample mean is exactly 0 and sample covariance exactly I, so the Fréchet
    distance of affine maps of them has a closed form without sampling error."""
    z = rng.normal(size=(n, d))
    z -= z.mean(axis=0)
    return z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T


def test_fd_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    for n, d in ((300, 8), (10, 40)):  # more samples than dimensions (sqrtm) and fewer (exact trace)
        a = rng.normal(size=(n, d)) * 3 + 1
        assert ist.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8 * d)


def test_fd_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(1)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    sd_a, sd_b = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    a = mu_a + whitened(rng, 200, 4) * sd_a
    b = mu_b + whitened(rng, 300, 4) * sd_b
    # ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) = ||mu_a - mu_b||^2 + sum (sd_a - sd_b)^2
    expected = ((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()
    assert ist.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fd_with_fewer_samples_than_dimensions_matches_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 20)), rng.normal(size=(15, 20)) * 2 + 1
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb) - 2 * np.trace(linalg.sqrtm(sa @ sb)).real
    assert ist.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        ist.frechet_distance(a[:1], b)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted_ones():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, same_std = ist.kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = ist.kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.02 and same_std > 0
    assert shifted > 0.5 and shifted > 20 * abs(same)
    assert ist.kernel_inception_distance(a, b, subsets=20, subset_size=200) == (same, same_std)  # seeded
    # subset_size larger than a set: capped, still defined
    small = ist.kernel_inception_distance(a[:5], b, subsets=3)
    assert np.isfinite(small).all()


def test_face_features_are_finite_deterministic_and_batch_independent():
    torch.manual_seed(0)
    faces = torch.rand(4, 3, 64, 64) * 2 - 1
    features = ist.FaceFeatures("cpu", batch_size=3)
    out = features(faces)
    assert out.shape == (4, 1280) and out.dtype == np.float64 and np.isfinite(out).all()
    assert np.array_equal(features(faces), out)
    assert np.allclose(ist.FaceFeatures("cpu", batch_size=4)(faces), out, atol=1e-5)
    assert not np.allclose(out[0], out[1])
    # any input size: a 128 px copy lands in the same 224 px space
    assert features(torch.nn.functional.interpolate(faces, size=128, mode="bilinear")).shape == (4, 1280)


def test_feature_distances_keys_and_too_small_sets():
    torch.manual_seed(0)
    features = ist.FaceFeatures("cpu")
    fake, real = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    m = ist.feature_distances(features(fake), features(real))
    assert set(m) == {"fd_lite0", "kid_lite0", "kid_lite0_std", "n_fake", "n_real"}
    assert (m["n_fake"], m["n_real"]) == (3, 4) and m["fd_lite0"] > 0 and np.isfinite(m["kid_lite0"])
    one = ist.feature_distances(features(fake[:1]), features(real))
    assert one["fd_lite0"] is None and one["kid_lite0"] is None and one["n_fake"] == 1


def planted_faces(rng: np.random.Generator, tone: np.ndarray) -> torch.Tensor:
    """Noisy 32 px faces tinted by `tone` along a fixed colour direction."""
    noise = torch.from_numpy(rng.normal(scale=0.4, size=(len(tone), 3, 32, 32))).float()
    tint = torch.tensor([0.5, 0.2, -0.3]).view(1, 3, 1, 1) * torch.from_numpy(tone).float().view(-1, 1, 1, 1)
    return (noise + tint).clamp(-1, 1)


def test_pixel_probe_recovers_a_planted_attribute_and_not_shuffled_labels():
    rng = np.random.default_rng(4)
    # 400: a permutation of n labels keeps a chance correlation of ~1/sqrt(n) with the truth, which
    # the tint, the pixels' main direction, carries through to the held-out faces
    n_train, n_test = 400, 100
    tone = rng.uniform(-1, 1, n_train + n_test)
    attrs = {f"id{i}": {"gender": float(rng.choice([-1.0, 1.0])), "age": float(rng.uniform(20, 70)),
                        "size": float(rng.uniform(0.5, 1.5)), "tone": float(t)} for i, t in enumerate(tone)}
    pixels = ev.pixel_vectors(planted_faces(rng, tone))
    assert pixels.shape == (n_train + n_test, 3 * 16 * 16)
    train = [{"name": f"id{i}", "real_pixels": pixels[i : i + 1]} for i in range(n_train)]
    test_truth = [attrs[f"id{i}"] for i in range(n_train, n_train + n_test)]

    probes = ev.fit_pixel_probes(train, attrs, lam=10.0)
    assert set(probes) == {"gender", "age", "size", "tone"}
    scores = ev.probe_scores(probes, pixels[n_train:], test_truth)
    assert scores["tone"] > 0.9
    assert abs(scores["age"]) < 0.3  # not in the pixels

    order = rng.permutation(n_train)
    shuffled = {f"id{i}": attrs[f"id{order[i]}"] for i in range(n_train)}
    scores = ev.probe_scores(ev.fit_pixel_probes(train, shuffled, lam=10.0), pixels[n_train:], test_truth)
    assert abs(scores["tone"]) < 0.25


def test_lite0_probe_picks_ridge_by_held_out_identities_and_recovers_gender():
    """Features where gender is one noisy direction among many: the probe fitted through
    `fit_lite0_probes` recovers it on new identities, and the cross-validated lambda is a
    strong one, since the other directions are pure noise."""
    rng = np.random.default_rng(5)
    dim, per_id = 200, 3
    direction = rng.normal(size=dim)

    def people(n, offset):
        out, attrs = [], {}
        for i in range(n):
            g = float(rng.choice([-1.0, 1.0]))
            attrs[f"id{offset + i}"] = {"gender": g, "age": float(rng.uniform(20, 70)),
                                        "size": float(rng.normal()), "tone": float(rng.uniform())}
            feats = 0.5 * g * direction + rng.normal(scale=3.0, size=(per_id, dim))
            detail = {div: (0.5 * g * direction + rng.normal(scale=3.0, size=(per_id, dim))).astype(np.float32)
                      for div in ev.LITE0_PROBE_DETAILS}
            out.append({"name": f"id{offset + i}", "real_lite0": {64: feats.astype(np.float32)},
                        "real_lite0_detail": {64: detail}})
        return out, attrs

    train, attrs = people(150, 0)
    test, test_attrs = people(60, 1000)
    probes, lam = ev.fit_lite0_probes(train, attrs, 64)
    assert lam in ev.LITE0_PROBE_RIDGES and lam >= 100  # 200 noisy inputs, 450 faces: shrink hard
    x = np.concatenate([r["real_lite0"][64] for r in test])
    truth = [test_attrs[r["name"]] for r in test for _ in range(per_id)]
    scores = ev.probe_scores(probes, x, truth)
    assert scores["gender"] > 0.9 and abs(scores["tone"]) < 0.3
    assert ev.fit_lite0_probes(train, attrs, 128) == ({}, None)  # no features at that size


def test_lite0_probe_learns_from_blurred_faces_too():
    """Blur moves every face's features the same way, partly along the gender direction: a
    probe fitted on sharp faces alone calls every blurry face one gender; fitted on the
    shrunk copies as well (what `Embedded` records), it reads gender through the blur."""
    rng = np.random.default_rng(6)
    dim, per_id = 40, 4
    direction = np.zeros(dim); direction[0] = 1.0
    blur = np.zeros(dim); blur[0], blur[1] = 3.0, 3.0  # shifts along gender and along its own axis

    def people(n, offset):
        out, attrs = [], {}
        for i in range(n):
            g = float(rng.choice([-1.0, 1.0]))
            attrs[f"id{offset + i}"] = {"gender": g, "age": 40.0, "size": 0.0, "tone": float(rng.uniform())}
            face = lambda: (g * direction + rng.normal(scale=0.5, size=(per_id, dim))).astype(np.float32)
            out.append({"name": f"id{offset + i}", "real_lite0": {64: face()},
                        "real_lite0_detail": {64: {div: face() + blur.astype(np.float32)
                                                   for div in ev.LITE0_PROBE_DETAILS}}})
        return out, attrs

    train, attrs = people(80, 0)
    test, test_attrs = people(40, 1000)
    blurry = np.concatenate([r["real_lite0_detail"][64][2] for r in test])
    truth = [test_attrs[r["name"]] for r in test for _ in range(per_id)]
    sharp_only = [{**r, "real_lite0_detail": {64: {}}} for r in train]
    assert ev.probe_scores(ev.fit_lite0_probes(sharp_only, attrs, 64)[0], blurry, truth)["gender"] < 0.7
    assert ev.probe_scores(ev.fit_lite0_probes(train, attrs, 64)[0], blurry, truth)["gender"] > 0.9
