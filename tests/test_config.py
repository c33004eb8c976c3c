"""Values that cannot work are refused when the config loads: one line naming the key and the
valid range, through `avpgan config show` as for every other command."""

from __future__ import annotations

import re

import pytest

from avpgan import config as config_mod
from avpgan.cli import main
from conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")

# override -> what the one-line error must say (after "avpgan: config error: <source>: ")
BAD = {
    "train.gan.batch_size=0": r"train\.gan\.batch_size: 0 is out of range; must be an integer >= 1",
    "train.voice.batch_size=-4": r"train\.voice\.batch_size: -4 is out of range; must be an integer >= 1",
    "train.checkpoint_every=0": r"train\.checkpoint_every: 0 is out of range; must be an integer >= 1",
    "train.log_every=-1": r"train\.log_every: -1 is out of range; must be an integer >= 1",
    "train.sample_every=0": r"train\.sample_every: 0 is out of range; must be an integer >= 1",
    "train.prior.steps=-1": r"train\.prior\.steps: -1 is out of range; must be an integer >= 0",
    "data.workers=-1": r"data\.workers: -1 is out of range; must be an integer >= 0",
    "train.gan.lr=nan": r"train\.gan\.lr: nan is out of range; must be a finite number > 0",
    "train.gan.lr=.inf": r"train\.gan\.lr: inf is out of range; must be a finite number > 0",
    "train.voice.lr=0": r"train\.voice\.lr: 0\.0 is out of range; must be a finite number > 0",
    "train.embedder.lr=-1e-3": r"train\.embedder\.lr: -0\.001 is out of range; must be a finite number > 0",
    "train.gan.betas=[0.5,1.0]": r"train\.gan\.betas: \[0\.5, 1\.0\] is out of range; must be two numbers in \[0, 1\)",
    "train.gan.betas=[-0.1,0.9]": r"train\.gan\.betas: \[-0\.1, 0\.9\] is out of range",
    "train.gan.betas=[0.5]": r"train\.gan\.betas: \[0\.5\] is out of range",
    "data.sample_rate=0": r"data\.sample_rate: 0 is out of range; must be an integer in \[4000, 192000\] \(Hz\)",
    "data.sample_rate=16": r"data\.sample_rate: 16 is out of range",
    "data.sample_rate=16000000": r"data\.sample_rate: 16000000 is out of range",
    "train.mixed_precision=bf17": r"train\.mixed_precision: 'bf17' is not a valid choice; must be one of no, bf16, fp16",
    "model.generator.init=xavier": r"model\.generator\.init: 'xavier' is not a valid choice; must be one of default, dcgan",
    "model.embedder.arch=resnet50": r"model\.embedder\.arch: 'resnet50' is not a valid choice; must be one of iresnet18",
    "train.stages=[voice,gna]": r"train\.stages\[1\]: 'gna' is not a valid choice; must be one of voice, embedder, gan, "
                                r"prior, restore",
    "train.gan.augment=[color,blur]": r"train\.gan\.augment\[1\]: 'blur' is not a valid choice; must be one of color, "
                                      r"translation, cutout",
    "model.generator.upsample=bilinear": r"model\.generator\.upsample: 'bilinear' is not a valid choice; must be one of "
                                         r"transposed, resize",
    "model.discriminator.init=orthogonal": r"model\.discriminator\.init: 'orthogonal' is not a valid choice",
    "tracking.enabled=yes": r"tracking\.enabled: expected true/false, got 'yes'",
    "data.bank.crops=0": r"data\.bank\.crops: 0 is out of range; must be an integer >= 1",
    "data.bank.seconds=-1": r"data\.bank\.seconds: -1\.0 is out of range; must be a number >= 0",
    "train.ema_decay=1.0": r"train\.ema_decay: 1\.0 is out of range; must be a number in \[0, 1\)",
    "features.fmax=9000": r"features\.fmax: 9000\.0 is out of range; must be above features\.fmin \(20\.0\) and at most "
                          r"half of data\.sample_rate \(8000\)",
    "model.generator.embed_dim=32": r"model\.generator\.embed_dim: 32 differs from model\.voice\.embed_dim \(64\)",
    "model.voice.mel_bins=40": r"model\.voice\.mel_bins: 40 differs from features\.n_mels \(64\)",
}


@pytest.mark.parametrize("override", BAD)
def test_config_show_refuses_values_that_cannot_work(override, capsys):
    assert main(["config", "show", TINY, override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    key = override.split("=")[0]
    assert err.startswith(f"avpgan: config error: {TINY} + overrides: {key}")
    assert re.search(BAD[override], err), err


def test_every_shipped_config_is_valid_and_the_rules_know_every_stage():
    from avpgan.train.stages import STAGES

    assert tuple(STAGES) == config_mod.STAGE_NAMES
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config_mod.load(path)
    config_mod.load(None)  # the defaults too


def test_embedded_config_of_a_bundle_is_validated():
    text = config_mod.to_yaml(config_mod.load(None))
    with pytest.raises(config_mod.ConfigError, match="model.bundle .embedded config.: train.mixed_precision: 'fp8'"):
        config_mod.from_yaml_text(text.replace("mixed_precision: 'no'", "mixed_precision: fp8"),
                                  "model.bundle (embedded config)")


@pytest.mark.parametrize("argv, message", [
    (["generate", "m.safetensors", "v.wav", "--out", "o", "--batch-size", "0"],
     "argument --batch-size: must be an integer >= 1, got 0"),
    (["evaluate", "m.safetensors", "--group-size", "0"], "argument --group-size: must be an integer >= 2, got 0"),
    (["evaluate", "m.safetensors", "--batch-size", "-3"], "argument --batch-size: must be an integer >= 1, got -3"),
    (["evaluate", "m.safetensors", "--seconds", "4", "0"], "argument --seconds: must be a finite number > 0, got 0"),
    (["generate", "m.safetensors", "v.wav", "--out", "o", "--seconds", "nan"],
     "argument --seconds: must be a finite number > 0, got nan"),
])
def test_cli_counts_are_refused_by_argparse(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_discriminator_embed_dim_is_the_trunk_width_not_the_voice_width():
    """model.discriminator.embed_dim sizes the trunk D and C read; the voice's width does not."""
    from avpgan import models

    cfg = config_mod.load(TINY, ["model.discriminator.embed_dim=24"])
    d = models.build_discriminator(cfg.model.discriminator, num_identities=5)
    widths = {p.shape[-1] for n, p in d.named_parameters() if p.dim() == 2}
    assert widths == {24} and cfg.model.voice.embed_dim == 64


def test_each_stage_has_its_typed_section_and_weights_key():
    """Stages reach their `train.<stage>` section and `train.<stage>_weights` through TrainConfig,
    so renaming a field breaks here and in the type checker, not in a getattr at run time."""
    cfg = config_mod.load(TINY, ["train.gan.steps=7", "train.prior_weights=p.safetensors"])
    assert cfg.train.stage("gan") is cfg.train.gan and cfg.train.stage("gan").steps == 7
    assert [cfg.train.stage(s) for s in config_mod.STAGE_NAMES] == [
        cfg.train.voice, cfg.train.embedder, cfg.train.gan, cfg.train.prior, cfg.train.restore]
    assert cfg.train.weights("prior") == "p.safetensors" and cfg.train.weights("voice") == ""
    with pytest.raises(config_mod.ConfigError, match="no stage 'gna'"):
        cfg.train.stage("gna")
    with pytest.raises(config_mod.ConfigError, match="stage 'restore' has no weights key"):
        cfg.train.weights("restore")


def test_the_choices_are_what_the_code_accepts():
    from avpgan.models import arcface, augment

    assert config_mod.EMBEDDER_ARCHS == tuple(arcface.ARCHS)
    assert config_mod.AUGMENT_OPS == augment.OPS


def test_no_is_a_word_not_false():
    """YAML 1.1 reads `no` as false; the config reads it as the valid mixed_precision 'no'."""
    assert config_mod.load(TINY, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert config_mod.load(TINY, ["tracking.enabled=false"]).tracking.enabled is False


def test_train_refuses_an_invalid_choice_before_it_starts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", "tiny.yaml", f"train.run_dir={run_dir}", "train.mixed_precision=bf17"]) == 2
    err = capsys.readouterr().err
    assert err == ("avpgan: config error: built-in tiny.yaml + overrides: train.mixed_precision: 'bf17' is not a "
                   "valid choice; must be one of no, bf16, fp16\n")
    assert not run_dir.exists()


# -- --config NAME: the built-in configs ---------------------------------------------------------

def test_a_built_in_name_loads_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    shipped = config_mod.load(TINY)
    assert config_mod.load("tiny.yaml") == shipped and config_mod.load("tiny") == shipped
    assert config_mod.load("avpgan.yaml").name == "avpgan"


def test_a_file_that_exists_wins_over_a_built_in_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text("name: mine\n")
    assert config_mod.load("tiny.yaml").name == "mine"


def test_neither_file_nor_name_is_one_line_listing_the_built_in_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "show", "tiny.yml"]) == 2
    err = capsys.readouterr().err
    assert err == ("avpgan: config error: tiny.yml: config file not found, and no built-in config has that name "
                   "(built-in: avpgan.yaml, avpgan_no_cbam.yaml, tiny.yaml, voice2face.yaml)\n")
    with pytest.raises(config_mod.ConfigError, match="configs/tiny.yaml: config file not found"):
        config_mod.load("configs/tiny.yaml")  # a path is never looked up among the built-in names
