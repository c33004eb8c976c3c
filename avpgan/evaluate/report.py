"""The evaluation's results on disk (results.json: JSON-safe, written atomically) and on screen
(the readable table printed after a run).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from avpgan import atomic
from avpgan.evaluate.probes import PIXEL_PROBE_SIZE


def json_safe(obj):
    """NaN/inf -> null (JSON has no NaN), numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(obj: dict, path: Path) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2) + "\n")


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
            lines.append(f"{title} (gender: accuracy, gender_auc: ROC AUC; others: Pearson r):")
            lines.append(f"      real faces: {_fmt_attr(results[ref])}")
            for s, variants in results["results"].items():
                for variant, r in variants.items():
                    lines.append(f"{s:>5s} {variant:9s} {_fmt_attr(r.get(key, {}))}")
    if "attributes_lite0_real_reference" in results:
        lines.append("attribute probe on EfficientNet-Lite0 features (gender: accuracy, gender_auc: ROC AUC; others: Pearson r):")
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
