"""Table 4 and Figures 6-9 of the paper, reproduced on SynthVox with one command.

    python experiments/table4.py --out data/table4                       # reduced, CPU (minutes)
    python experiments/table4.py --out data/table4 --full                # paper sizes (GPU)

Steps: SynthVox -> shards -> one shared `voice` + `embedder` run -> for each of Voice2Face,
AVP-GAN without CBAM and AVP-GAN: the `gan` stage with the same data, encoder, embedder, steps
and seed (plus `prior` + `restore` for AVP-GAN when --restore-steps > 0) -> export -> evaluate
at 4 s and 8 s -> `docs/results.md` with the table, the ceiling and chance rows and the figures.
Every step resumes: re-running the command after an interruption continues where it stopped.
Each training step is a plain `avpgan train` command, so the same list of commands can be
submitted as dependent SLURM jobs (`slurm/pipeline.sh`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avpgan import bundle as bundle_mod  # noqa: E402
from avpgan.audio import crop_or_tile  # noqa: E402
from avpgan.data.shards import decode_sample, load_manifest  # noqa: E402
from avpgan.generate import VoiceToFace  # noqa: E402
from avpgan.images import make_grid, save_png  # noqa: E402

MODELS = [("voice2face", "Voice2Face"), ("avpgan_no_cbam", "AVP-GAN (no CBAM)"), ("avpgan", "AVP-GAN")]
# Reduced size: the networks' widths of configs/tiny.yaml, the switches of each experiment config.
REDUCED = ["model.voice.channels=[32,48,64,96]", "model.generator.channels=[256,128,64,32,16]",
           "model.generator.cbam_reduction=4", "model.discriminator.channels=[16,32,64,128,128]",
           "model.discriminator.cbam_reduction=4", "model.embedder.width=16", "model.embedder.embed_dim=128",
           "model.embedder.input_size=64", "model.restorer.out_size=64", "model.restorer.unet_channels=8",
           "model.restorer.prior_channels=16", "model.restorer.style_dim=32", "data.workers=1"]


def sh(*cmd: str) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def avpgan(*args: str) -> None:
    sh(sys.executable, "-m", "avpgan", *args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/table4")
    ap.add_argument("--full", action="store_true", help="the paper's network sizes and schedule (needs a GPU)")
    ap.add_argument("--identities", type=int, default=None)
    ap.add_argument("--utterances-per-id", type=int, default=None)
    ap.add_argument("--faces-per-id", type=int, default=None)
    ap.add_argument("--voice-steps", type=int, default=None)
    ap.add_argument("--embedder-steps", type=int, default=None)
    ap.add_argument("--gan-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--restore-steps", type=int, default=None, help="prior and restore steps for AVP-GAN (0: skip)")
    ap.add_argument("--results", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    full = args.full
    ids = args.identities or (1225 if full else 300)
    utts = args.utterances_per_id or (12 if full else 6)
    faces = args.faces_per_id or (8 if full else 3)
    steps = {"voice": args.voice_steps or (20000 if full else 400),
             "embedder": args.embedder_steps or (20000 if full else 400),
             "gan": args.gan_steps or (50000 if full else 600)}
    restore_steps = args.restore_steps if args.restore_steps is not None else (20000 if full else 0)
    batch = args.batch_size or (128 if full else 32)
    out = (ROOT / args.out).resolve()
    synth, shards, runs = out / "synthvox", out / "shards", out / "runs"
    t0 = time.time()

    if not (synth / "vox1_meta.csv").exists():
        avpgan("synth", "--out", synth, "--identities", ids, "--utterances-per-id", utts, "--faces-per-id", faces)
    avpgan("shards", "build", "--voxceleb", synth / "voxceleb1/wav", "--vggface", synth / "vggface",
           "--meta", synth / "vox1_meta.csv", "--out", shards, "--samples-per-shard", 64 if not full else 1000)

    size = [] if full else REDUCED
    common = [f"data.shards={shards}", "data.crop_seconds=8.0", "tracking.enabled=true", "train.seed=0",
              f"train.voice.steps={steps['voice']}", f"train.embedder.steps={steps['embedder']}",
              f"train.gan.steps={steps['gan']}", f"train.voice.batch_size={batch}",
              f"train.embedder.batch_size={batch}", f"train.gan.batch_size={batch}",
              f"train.prior.steps={max(restore_steps, 1)}", f"train.restore.steps={max(restore_steps, 1)}",
              "train.log_every=50", "train.sample_every=200", "train.checkpoint_every=200", *size]
    base = runs / "shared"
    avpgan("train", "--config", "configs/avpgan.yaml", f"train.run_dir={base}", "train.stages=[voice,embedder]", *common)

    results = {}
    for name, _ in MODELS:
        run_dir = runs / name
        for stage in ("voice", "embedder"):  # the same encoder and embedder for every model
            (run_dir / stage).mkdir(parents=True, exist_ok=True)
            shutil.copy2(base / stage / "model.safetensors", run_dir / stage / "model.safetensors")
        stages = "[voice,embedder,gan,prior,restore]" if name == "avpgan" and restore_steps > 0 else "[voice,embedder,gan]"
        avpgan("train", "--config", f"configs/{name}.yaml", f"train.run_dir={run_dir}", f"train.stages={stages}", *common)
        avpgan("export", run_dir, "--out", run_dir / "model.safetensors")
        res_file = run_dir / "results.json"
        if not res_file.exists():
            avpgan("evaluate", run_dir / "model.safetensors", "--shards", shards, "--split", "test", "--seconds", "4", "8",
                   "--attributes", synth / "attributes.csv", "--out", res_file)
        results[name] = json.loads(res_file.read_text())

    figures = make_figures(runs, shards, ROOT / "docs" / "figures")
    write_results(Path(args.results), results, figures, dict(full=full, identities=ids, utterances=utts, faces=faces,
                                                              steps=steps, restore_steps=restore_steps, batch=batch,
                                                              minutes=(time.time() - t0) / 60, shards=load_manifest(shards)))


def test_voices(shards: Path, n: int) -> list[dict]:
    """The first utterance of the first n test identities (and one of their real faces)."""
    import webdataset as wds

    manifest = load_manifest(shards)
    urls = [str(shards / s["file"]) for s in manifest["splits"]["test"]["shards"]]
    picked: dict[str, dict] = {}
    for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        s = decode_sample(raw)
        name = s["meta"]["name"]
        if name not in picked:
            picked[name] = s
        if len(picked) == n:
            break
    return list(picked.values())


@torch.no_grad()
def make_figures(runs: Path, shards: Path, fig_dir: Path) -> dict[str, str]:
    fig_dir.mkdir(parents=True, exist_ok=True)
    voices = test_voices(shards, 8)
    real = torch.from_numpy(np.stack([v["face"] for v in voices])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    nets = {name: VoiceToFace(bundle_mod.load(runs / name / "model.safetensors"), torch.device("cpu")) for name, _ in MODELS}

    def faces(net: VoiceToFace, seconds: float, restore: bool = False) -> torch.Tensor:
        clips = np.stack([crop_or_tile(v["audio"], int(seconds * 16000), np.random.default_rng(0)) for v in voices])
        face, restored = net.faces(net.embed(clips), restore=restore)
        return restored if restore else face

    figs = {}
    rows = [faces(nets["avpgan"], s) for s in (2, 4, 6, 8)]
    save_png(make_grid(rows, nrow=len(voices)), fig_dir / "fig6_durations.png")
    figs["fig6"] = "figures/fig6_durations.png"
    rows = [real] + [faces(nets[name], 8) for name, _ in MODELS]
    save_png(make_grid(rows, nrow=len(voices)), fig_dir / "fig8_9_models.png")
    figs["fig8_9"] = "figures/fig8_9_models.png"
    if nets["avpgan"].has_restorer:
        rows = [real, faces(nets["avpgan"], 8), faces(nets["avpgan"], 8, restore=True)]
        save_png(make_grid([torch.nn.functional.interpolate(r, size=rows[-1].shape[-2:]) for r in rows],
                           nrow=len(voices)), fig_dir / "fig7_restoration.png")
        figs["fig7"] = "figures/fig7_restoration.png"
    return figs


def _ci(c: dict) -> str:
    if c["mean"] is None:
        return "-"
    return f"{c['mean']:.3f} ± {(c['high'] - c['mean']):.3f}" if c.get("high") is not None else f"{c['mean']:.3f}"


def write_results(path: Path, results: dict, figs: dict, run: dict) -> None:
    paper = {("voice2face", "4s"): 0.408, ("avpgan", "4s"): 0.471, ("voice2face", "8s"): 0.436,
             ("avpgan_no_cbam", "8s"): 0.447, ("avpgan", "8s"): 0.511}
    lines = ["# Table 4 on SynthVox", ""]
    where = "a GPU at the paper's sizes" if run["full"] else "2 CPU cores at a reduced size (no GPU was available)"
    sp = run["shards"]["splits"]
    lines += [
        f"Produced by `python experiments/table4.py{' --full' if run['full'] else ''}` on {where}, "
        f"in {run['minutes']:.0f} minutes. SynthVox: {run['identities']} identities "
        f"({len(sp['train']['identities'])}/{len(sp['val']['identities'])}/{len(sp['test']['identities'])} "
        f"train/val/test), {run['utterances']} utterances and {run['faces']} faces per identity. Steps: voice "
        f"{run['steps']['voice']}, embedder {run['steps']['embedder']}, GAN {run['steps']['gan']} at batch "
        f"{run['batch']}; the three models share the data, voice encoder, embedder, seed and schedule. "
        f"{'Network widths as configs/tiny.yaml-like reduced sizes (experiments/table4.py REDUCED), ' if not run['full'] else ''}"
        "Embedder: the run's own ArcFace (IResNet) trained on the train identities' faces; the metric is eq. (15): "
        "per test identity the mean cosine between generated-face and real-face embeddings, averaged over identities "
        "(± half-width of the 95% Student-t interval over identities).", "",
        "| Method | Len. | Cosine (eq. 15) | cos to mean | R@1 | R@5 | paper |", "|---|---|---|---|---|---|---|",
    ]
    for name, label in MODELS:
        for s in ("4s", "8s"):
            r = results[name]["results"].get(s, {}).get("gan")
            if r is None:
                continue
            rec = r["retrieval"]["recall"]
            lines.append(f"| {label} | {s[:-1]} s | {_ci(r['cosine'])} | {_ci(r['cosine_to_mean'])} | "
                         f"{rec['1']:.3f} | {rec['5']:.3f} | {paper.get((name, s), '-')} |")
    any_res = results["avpgan"]
    rr = any_res["real_vs_real"]
    ch = next(iter(any_res["results"].values()))["gan"]["retrieval"]
    lines += [
        f"| real vs real, same identity (ceiling) | | {_ci(rr['same_identity_cosine'])} | | | | |",
        f"| real vs real, different identities (chance) | | {_ci(rr['different_identity_cosine'])} | | "
        f"{ch['chance']['1']:.3f} | {ch['chance']['5']:.3f} | |", "",
    ]
    if "restored" in any_res["results"].get("8s", {}):
        r = any_res["results"]["8s"]["restored"]
        lines += [f"AVP-GAN with the restoration model, 8 s: cosine {_ci(r['cosine'])}.", ""]
    if "attributes_real_reference" in any_res:
        lines += ["Hidden attributes recovered by a ridge probe trained on real train faces' embeddings "
                  "(gender: accuracy; age, size, tone: Pearson r), 8 s voices:", "",
                  "| faces | " + " | ".join(any_res["attributes_real_reference"]) + " |",
                  "|---|" + "---|" * len(any_res["attributes_real_reference"])]
        fmt = lambda d: " | ".join("-" if v is None else f"{v:.3f}" for v in d.values())  # noqa: E731
        lines.append(f"| real test faces | {fmt(any_res['attributes_real_reference'])} |")
        for name, label in MODELS:
            a = results[name]["results"].get("8s", {}).get("gan", {}).get("attributes")
            if a:
                lines.append(f"| {label} | {fmt(a)} |")
        lines.append("")
    lines += ["## Figures", ""]
    if "fig6" in figs:
        lines += ["Figure 6 (AVP-GAN, rows: 2, 4, 6, 8 s of the same utterance; columns: test identities):", "",
                  f"![fig6]({figs['fig6']})", ""]
    if "fig8_9" in figs:
        lines += ["Figures 8 and 9 (rows: a real face of the identity, Voice2Face, AVP-GAN without CBAM, AVP-GAN; 8 s):",
                  "", f"![fig8]({figs['fig8_9']})", ""]
    if "fig7" in figs:
        lines += ["Figure 7 (rows: real, generated, restored):", "", f"![fig7]({figs['fig7']})", ""]
    lines += ["## Reading the numbers", "", "FINDINGS", ""]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
