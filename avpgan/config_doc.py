"""The config reference (docs/config.md), generated from the dataclasses of avpgan/config.py.

Generated, so that it cannot drift from the schema: every key with its type, its default, the
values `config.validate` accepts, and why it exists. `avpgan config doc > docs/config.md`
rewrites it; tests/test_config_doc.py fails when the file is stale or a key has no reason here.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from functools import reduce
from typing import Any

from avpgan import config as c

REGENERATE = "avpgan config doc > docs/config.md"

# Why each key exists, one line, per dataclass; a subclass inherits its base's lines. A key that
# is a section (a nested dataclass) gets the sentence that opens its section.
WHY: dict[type, dict[str, str]] = {
    c.Config: {
        "name": "names the experiment: the MLflow run name when tracking.run_name is empty",
        "data": "where the shards are and how clips and faces are cut from them",
        "features": "the log-mel the voice encoder reads, computed on the training device and never stored",
        "model": "the networks' shapes; a bundle carries them, so `generate` rebuilds the same networks",
        "train": "which stages run, for how long, and how a run checkpoints, logs and resumes",
        "tracking": "MLflow: where params, metrics, sample grids and system metrics go",
    },
    c.DataConfig: {
        "shards": "the folder `avpgan shards build` wrote; training and evaluation read it",
        "sample_rate": "every voice is resampled to this rate when the shards are built",
        "crop_seconds": "length of the voice crop a training step sees (the paper: about 8 s)",
        "min_seconds": "utterances shorter than this after silence removal are left out of the shards",
        "vad_top_db": "silence removal: frames this far below the utterance's peak are dropped",
        "face_size": "the GAN's face resolution, stored in the shards",
        "restore_size": "the restoration model's target resolution, stored in the shards beside face_size",
        "val_prefixes": "identities whose VGGFace name starts with one of these letters form the validation split",
        "test_prefixes": "identities whose name starts with one of these letters form the test split; the rest train",
        "samples_per_shard": "samples per tar file: enough files to spread over every rank and loader worker",
        "shuffle_buffer": "samples a loader worker holds and draws from at random: larger mixes identities better, "
                          "costs memory",
        "workers": "loader processes per rank, so decoding overlaps the training step",
        "bank": "the GAN stage's voice embeddings, computed once so that a GAN step reads vectors, not audio",
    },
    c.BankConfig: {
        "enabled": "false streams audio through the voice encoder every GAN step (to fine-tune it, or for "
                   "data too large for memory)",
        "crops": "random crops embedded per utterance: how many different views of each voice the GAN sees",
        "seconds": "length of each embedded crop; 0 uses data.crop_seconds",
        "batch_size": "crops per encoder batch while the bank is built (memory, not results)",
    },
    c.FeatureConfig: {
        "n_mels": "mel bins of the log-mel: the frequency resolution the voice encoder sees",
        "fmin": "lowest frequency of the mel filterbank (Hz)",
        "fmax": "highest frequency of the mel filterbank (Hz), at most half the sample rate",
        "win_ms": "analysis window length (ms)",
        "hop_ms": "step between analysis windows (ms): the log-mel's time resolution",
        "n_fft": "FFT size of each window",
        "preemphasis": "first-order high-pass before the FFT, which lifts the formants",
        "log_floor": "added before the log so that silent bins stay finite",
        "normalize": "mean/std per mel bin per utterance; it also removes the spectral envelope that carries "
                     "speaker traits (configs/tiny.yaml turns it off)",
    },
    c.ModelConfig: {
        "voice": "F_e, the voice encoder: log-mel -> voice embedding",
        "generator": "G: voice embedding -> face",
        "discriminator": "D and the identity classifier C, which share one trunk",
        "embedder": "the ArcFace face embedder trained here; the restoration loss and `evaluate` use it",
        "restorer": "the GFPGAN-style restoration model and its face prior; the loss weights are the paper's eq. 7-11",
    },
    c.VoiceConfig: {
        "mel_bins": "input channels of the encoder, one per log-mel bin",
        "embed_dim": "width of the voice embedding that G reads",
        "channels": "width of each 1-D conv block of the encoder",
        "noise_std": "noise added to the normalised embedding while training, so G does not overfit exact "
                     "embeddings (Voice2Face's)",
    },
    c.GeneratorConfig: {
        "embed_dim": "G's input width: must equal model.voice.embed_dim",
        "channels": "width of each up-sampling block, from 4x4 to the face size",
        "spectral_norm": "spectral normalisation of G's weights (the paper's G has it)",
        "cbam": "CBAM attention in G (the paper's contribution; off in the Voice2Face baseline)",
        "cbam_layers": "the blocks that get a CBAM gate",
        "cbam_reduction": "CBAM's channel reduction ratio (narrow layers keep at least one channel)",
        "batch_norm": "BatchNorm before each hidden ReLU: steadier training on small budgets",
        "tanh": "bound the output to [-1, 1] like the real faces",
        "init": "weight init: PyTorch's default, or DCGAN's N(0, 0.02)",
        "upsample": "transposed convs (the paper's) or nearest x2 + conv, which draws no checkerboard",
    },
    c.DiscriminatorConfig: {
        "channels": "width of each down-sampling block of the shared trunk",
        "spectral_norm": "spectral normalisation of the trunk's weights: keeps D Lipschitz, the GAN stable",
        "cbam": "CBAM attention in the trunk",
        "cbam_layers": "the blocks that get a CBAM gate",
        "cbam_reduction": "CBAM's channel reduction ratio",
        "embed_dim": "width of the trunk's output that D and C read (not the voice's width)",
        "init": "weight init: PyTorch's default, or DCGAN's N(0, 0.02)",
    },
    c.EmbedderConfig: {
        "arch": "the IResNet depth of the backbone",
        "width": "base channel width of the backbone; scales every stage",
        "embed_dim": "width of the face embedding",
        "input_size": "faces are resized to this before the backbone",
        "margin": "ArcFace's additive angular margin m",
        "scale": "ArcFace's logit scale s",
        "dropout": "dropout before the final fully connected layer",
    },
    c.RestorerConfig: {
        "out_size": "resolution of the restored face",
        "unet_channels": "base width of the degradation-removal U-Net",
        "prior_channels": "base width of the StyleGAN2 face prior",
        "style_dim": "width of the prior's latent codes z and w",
        "freeze_prior": "keep the prior's weights fixed while the restorer trains (else fine-tuned with it)",
        "l1_weight": "weight of the pixel L1 loss",
        "perceptual_weight": "weight of the perceptual loss on the perceptual network's features",
        "adv_weight": "weight of the global adversarial loss",
        "r1_weight": "weight of the R1 gradient penalty on real faces, which keeps D smooth",
        "r1_every": "apply R1 every this many steps (lazy regularisation, scaled to match)",
        "local_weight": "weight of the facial-component adversarial loss (eyes, mouth)",
        "feature_style_weight": "weight of the Gram-matrix feature style loss on facial components",
        "identity_weight": "weight of the identity loss: restored and real faces close in the embedder",
        "perceptual_weights": "a VGG-19 state dict for the perceptual loss; empty uses the ImageNet network "
                              "shipped as a dependency",
        "mapping_layers": "depth of the prior's z -> w MLP; the restorer and its prior must agree",
        "noise": "noise injection in the prior's convs (fine detail)",
        "pyramid_weight": "weight of an L1 on the U-Net's intermediate RGB outputs (not in the paper; 0: off)",
        "perceptual_size": "faces are resized to this for the perceptual network, the scale its weights saw",
    },
    c.TrainConfig: {
        "stages": "the stages to run, in order; a later stage reads an earlier one's weights",
        "run_dir": "where checkpoints, samples, status, the run's config and the local MLflow store go",
        "seed": "every random stream of the run derives from it, which makes resume bit-exact",
        "mixed_precision": "Accelerate's mixed precision: bf16 or fp16 speed up GPUs; bf16 also CPUs with bf16 "
                           "instructions (AVX512-BF16, AMX), the GAN step about 1.5x faster there (docs/performance.md)",
        "ema_decay": "decay of the moving average of G's and the face prior's weights, which draws smoother faces "
                     "than the raw weights",
        "checkpoint_every": "steps between checkpoints: the most work a kill or preemption can lose",
        "keep_last": "complete checkpoints kept per stage",
        "log_every": "steps between metric logs",
        "sample_every": "steps between sample grids of generated faces",
        "max_nonfinite": "non-finite losses in a row after which the run stops instead of training on NaNs",
        "voice_weights": "voice encoder file the later stages read; empty: this run's voice stage",
        "embedder_weights": "face embedder file the restore stage reads (identity loss); empty: this run's embedder stage",
        "gan_weights": "generator file for a later stage; kept for symmetry, no stage reads the GAN's weights today",
        "prior_weights": "face prior file the restore stage starts from; empty: this run's prior stage",
        "voice": "the voice encoder's stage: F_e learns to tell speakers apart",
        "embedder": "the face embedder's stage: ArcFace on the training identities' faces",
        "gan": "the GAN's stage: G draws faces from frozen voice embeddings",
        "prior": "the face prior's stage: an unconditional StyleGAN2 on the faces",
        "restore": "the restoration model's stage: degraded faces back to sharp ones",
    },
    c.StageConfig: {
        "steps": "optimizer steps of the stage",
        "batch_size": "samples per step on each process (the global batch is this times the world size)",
        "lr": "Adam's learning rate",
        "betas": "Adam's (beta1, beta2)",
    },
    c.GanStageConfig: {
        "augment": "DiffAugment ops applied to real and generated faces before D: with few faces, D memorises "
                   "them without",
    },
    c.TrackingConfig: {
        "enabled": "false: no MLflow at all",
        "uri": "the MLflow server; empty: $MLFLOW_TRACKING_URI, else a sqlite store in the run directory",
        "experiment": "the MLflow experiment the run belongs to",
        "run_name": "the MLflow run's name; empty: the config's name",
        "system_metrics": "log CPU, GPU, memory, disk and network of rank 0's node as system/* metrics",
        "system_metrics_interval_s": "seconds between system metric samples",
        "http_timeout_s": "MLflow's HTTP timeout unless the environment sets MLFLOW_HTTP_REQUEST_TIMEOUT",
        "http_retries": "MLflow's HTTP retries unless the environment sets MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "queue_size": "log calls kept while the server is away; beyond it the oldest metrics and images are dropped",
        "retry_max_s": "longest wait between reconnection attempts while the server is away",
        "start_timeout_s": "how long training waits for the MLflow run to exist before it goes on without",
        "finish_timeout_s": "how long the end of training waits for queued logs and uploads to be sent",
    },
}


def why(cls: type, name: str) -> str:
    """The reason for field `name` of dataclass `cls`; KeyError naming the key when it has none."""
    for klass in cls.__mro__:
        if name in WHY.get(klass, {}):
            return WHY[klass][name]
    raise KeyError(f"{cls.__name__}.{name} has no line in avpgan/config_doc.py WHY")


def type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return f"{typing.get_origin(hint).__name__}[{', '.join(type_name(a) for a in args)}]"
    return hint.__name__


def valid_values() -> dict[str, str]:
    """{key: the values `config.validate` accepts}, in the words of its messages."""
    out = {key: text for key, _, text in c.RULES}
    defaults = c.Config()
    for key, choices in c.CHOICES:
        each = "each " if isinstance(reduce(getattr, key.split("."), defaults), list) else ""
        out[key] = f"{each}one of {', '.join(choices)}"
    # validate's checks that relate two keys
    out["features.fmax"] = "above features.fmin, at most data.sample_rate / 2"
    out["model.voice.mel_bins"] = "equal to features.n_mels"
    out["model.generator.embed_dim"] = "equal to model.voice.embed_dim"
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _sections(cls: type, value: Any, prefix: str, intro: str) -> list[str]:
    """One Markdown table for the plain keys of section `prefix`, then its subsections in order."""
    hints = typing.get_type_hints(cls)
    valid = valid_values()
    rows, subsections = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            subsections += _sections(hints[f.name], getattr(value, f.name), key + ".", why(cls, f.name))
        else:
            default = json.dumps(getattr(value, f.name))
            rows.append(f"| `{key}` | {type_name(hints[f.name])} | `{default}` | {_cell(valid.get(key, ''))} | "
                        f"{_cell(why(cls, f.name))} |")
    heading = [f"## {prefix.rstrip('.') or 'top level'}", "", intro[0].upper() + intro[1:] + ".", ""]
    table = ["| key | type | default | valid | why |", "|---|---|---|---|---|", *rows, ""] if rows else []
    return heading + table + subsections


def render() -> str:
    """docs/config.md: a header, then one section per dataclass in the order of the schema."""
    header = [
        "# Config reference",
        "",
        f"Generated from `avpgan/config.py`: do not edit by hand, regenerate it with `{REGENERATE}`.",
        "",
        "Every key can be set in a config file (YAML, nested by the dots) or on the command line as",
        "`key.sub=value`, e.g. `avpgan train --config tiny.yaml train.gan.steps=100`. The defaults are the",
        "schema's, the paper's settings; a config file changes some of them (`avpgan config show NAME` prints",
        "one resolved, `avpgan config list` the built-in ones). A value outside `valid` is refused when the",
        "config loads, with one line naming the key.",
        "",
    ]
    return "\n".join(header + _sections(c.Config, c.Config(), "", "the experiment")).rstrip("\n") + "\n"
