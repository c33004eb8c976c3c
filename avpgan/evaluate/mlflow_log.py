"""The evaluation in the run's MLflow run: its metrics under eval/ at the run's training step and
results.json as an artifact, through avpgan.tracking like everything MLflow.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from avpgan import config as config_mod


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
