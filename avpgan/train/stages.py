"""The pipeline's stages: which networks each trains, on which batches, with one `step`.

A stage builds its networks and optimizers, hands them to `accelerator.prepare`, and exposes
`state()` (everything a checkpoint must hold), `batches(...)` (where its batches come from: the
shard stream, or for the GAN the embedding bank), `step(batch, step)` (one update, returning
metrics and whether the update was finite), `write_model(path)` (the weights later stages and
`avpgan export` read) and, optionally, a fixed-input sample grid for MLflow.

    voice     voice encoder + speaker head, cross-entropy over the train identities
    embedder  ArcFace IResNet + additive angular margin over the train identities' faces
    gan       Algorithm 1: frozen voice encoder; D and C (one trunk, two heads) then G; EMA of G
    prior     the restoration model's StyleGAN2-style face prior, trained on the faces
    restore   degradation removal + prior with CS-SFT, eq. (7)-(11)

A new stage is one class here, one entry in STAGES and one `train.<name>` config section.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from avpgan import atomic, models
from avpgan.config import Config
from avpgan.data import bank
from avpgan.data.shards import load_manifest
from avpgan.data.stream import Batches, StreamPosition, make_stream
from avpgan.features import LogMel
from avpgan.images import make_grid
from avpgan.train import phases
from avpgan.train.ema import EMA

# Sample grids show each face at 128 px or more: the MLflow UI fits a grid into its image card,
# where a row of 64 px faces is too small to judge.
SAMPLE_CELL = 128


def read_weights(path: Path, what: str, stage: str) -> dict[str, torch.Tensor]:
    """The weights a stage needs from an earlier one, with an error that says how to get them."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: {what} weights not found. Train the '{stage}' stage first "
            f"(train.stages=[{stage}]) or point the config at an existing file."
        )
    return load_file(str(path))


def write_weights(module: nn.Module, path: Path) -> None:
    """Safetensors (no pickle), written to a temporary name and renamed."""
    with atomic.replacing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp))


def weights_path(cfg: Config, run_dir: Path, stage: str) -> Path:
    """`train.<stage>_weights` when set, else the stage's model file in this run."""
    explicit = cfg.train.weights(stage)
    return Path(explicit) if explicit else run_dir / stage / "model.safetensors"


def grads_finite(params) -> torch.Tensor:
    """Whether every gradient is finite, as a bool tensor on the gradients' device: reading it
    would make the host wait for the step, so `Stage.update` hands it to the optimizer instead.
    After the DDP all-reduce every rank holds the same gradients, so all ranks agree here.

    The check is GradScaler's own fused kernel with a scale of 1 (the gradients are left as they
    are): one pass over them, where an isfinite() per parameter writes a bool copy of each, which
    took 40 ms of a 545 ms CPU step for the paper-size G alone."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    if not groups:
        return torch.tensor(True)
    found = []
    for (device, _), grads in groups.items():
        found_inf = torch.zeros((), device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.ones((), device=device))
        found.append(found_inf)
    device = next(iter(groups))[0]
    return torch.stack([f.to(device) for f in found]).sum() == 0


def step_unless(opt: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`opt.step()`, which changes nothing (weights, moments, step count) where `skip` is true.

    A fused Adam takes the flag as `found_inf`, the attribute torch's GradScaler sets for the
    same purpose, and skips on the device; any other optimizer reads the flag on the host first.
    """
    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one
    if inner.defaults.get("fused"):
        inner.found_inf = skip.float()
        try:
            opt.step()
        finally:
            del inner.found_inf
    elif not bool(skip):
        opt.step()


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """`module`'s trainable parameters take no gradient inside the block (the backward then skips
    their weight gradients); restored on the way out. For a network used, not trained, by an update."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Stage:
    name = ""
    split = "train"
    restore_face = False
    crop_seconds: float | None = None  # None: data.crop_seconds

    def __init__(self, cfg: Config, accelerator: Accelerator, run_dir: Path):
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        self.scfg = cfg.train.stage(self.name)
        self.phase: phases.Phase = phases.record  # regions of `step`; benchmarks time them
        manifest = load_manifest(Path(cfg.data.shards))
        self.num_identities = len(manifest["splits"]["train"]["identities"])

    def adam(self, *modules: nn.Module) -> torch.optim.Optimizer:
        """The stage's Adam over the trainable parameters of `modules` (frozen ones left out).

        Fused (one kernel for every tensor, on CPU and CUDA alike): it also skips a non-finite
        update on the device (`step_unless`), so a step never waits for the host."""
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.scfg.lr, betas=tuple(self.scfg.betas), fused=True)

    def update(self, loss: torch.Tensor, opt: torch.optim.Optimizer, phase: str = "backward") -> torch.Tensor:
        """Backward (timed as `phase`) + step; returns whether the gradients were finite, as a
        bool tensor on the device. A non-finite update is skipped: weights and Adam's state stay
        as they were, and the loop counts the skip when it next reads the flags."""
        opt.zero_grad(set_to_none=True)
        with self.phase(phase):
            self.accelerator.backward(loss)
        with self.phase("optimizer"):
            if self.accelerator.mixed_precision == "fp16":
                opt.step()  # the grad scaler skips non-finite steps itself and lowers its scale (a host read)
                return torch.tensor(not opt.step_was_skipped, device=loss.device)
            params = [p for g in opt.param_groups for p in g["params"]]
            finite = grads_finite(params).to(loss.device)
            step_unless(opt, ~finite)
        return finite

    def state(self) -> dict:
        raise NotImplementedError

    def batches(self, seed: int, step: int, saved: dict | None) -> Batches | bank.BankSampler:
        """This rank's batches from `step` on; the source's `position` is what the loop checkpoints.

        `saved` is the position this rank checkpointed (None: a fresh start, or a checkpoint from
        another world size). The default is the shard stream of `split`.
        """
        position = StreamPosition.from_state_dict(saved) if saved is not None else None
        return make_stream(
            self.cfg.data, self.split, self.scfg.batch_size, rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes, seed=seed, position=position, crop_seconds=self.crop_seconds,
            restore_face=self.restore_face, pin_memory=self.accelerator.device.type == "cuda",
        )

    def step(self, batch: dict, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One update: detached metric tensors, and whether it was finite (a bool tensor). Nothing
        here reads a device value on the host; the loop reads them all at its log interval."""
        raise NotImplementedError

    def write_model(self, path: Path) -> None:
        raise NotImplementedError

    def fixed_inputs(self) -> dict | None:
        return None

    def sample_grid(self, fixed: dict) -> np.ndarray | None:
        return None

    def sample_metrics(self, fixed: dict) -> dict[str, float]:
        """Metrics computed with the fixed inputs at every sample interval (none by default)."""
        return {}

    def fixed_val_batch(self, n: int = 8) -> dict:
        """The same voices/faces every time: the first validation batch for seed 0, no flips."""
        batch = next(make_stream(self.cfg.data, "val", n, seed=0, workers=0, flip=False, restore_face=True))
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def sync_bn(self, module: nn.Module) -> nn.Module:
        """SyncBatchNorm on multi-GPU only: it raises on CPU."""
        if self.accelerator.device.type == "cuda" and self.accelerator.num_processes > 1:
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return module


class VoiceClassifier(nn.Module):
    """Voice encoder + speaker head trained together; only the encoder is kept afterwards."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(mel))


class VoiceStage(Stage):
    name = "voice"

    def __init__(self, cfg: Config, accelerator: Accelerator, run_dir: Path):
        super().__init__(cfg, accelerator, run_dir)
        net = VoiceClassifier(models.build_voice_encoder(cfg.model.voice), models.SpeakerHead(cfg.model.voice.embed_dim, self.num_identities))
        self.model, self.opt = accelerator.prepare(self.sync_bn(net), self.adam(net))
        self.logmel = LogMel(cfg.features, cfg.data.sample_rate).to(accelerator.device)

    def state(self) -> dict:
        return {"model": self.model, "opt": self.opt}

    def step(self, batch, step):
        self.model.train()
        with self.accelerator.autocast():
            logits = self.model(self.logmel(batch["audio"]))
            loss = F.cross_entropy(logits.float(), batch["label"])
        ok = self.update(loss, self.opt)
        accuracy = (logits.argmax(1) == batch["label"]).float().mean()
        return {"loss": loss.detach(), "accuracy": accuracy}, ok

    def write_model(self, path: Path) -> None:
        write_weights(self.accelerator.unwrap_model(self.model).encoder, path)


class ArcFaceTrainer(nn.Module):
    """Backbone + margin head in one module so DDP syncs both."""

    def __init__(self, backbone: nn.Module, margin: nn.Module):
        super().__init__()
        self.backbone, self.margin = backbone, margin

    def forward(self, face: torch.Tensor, label: torch.Tensor):
        return self.margin(self.backbone(face), label)


class EmbedderStage(Stage):
    name = "embedder"

    def __init__(self, cfg: Config, accelerator: Accelerator, run_dir: Path):
        super().__init__(cfg, accelerator, run_dir)
        e = cfg.model.embedder
        net = ArcFaceTrainer(models.build_embedder(e), models.ArcMarginLoss(e.embed_dim, self.num_identities, s=e.scale, m=e.margin))
        self.model, self.opt = accelerator.prepare(self.sync_bn(net), self.adam(net))

    def state(self) -> dict:
        return {"model": self.model, "opt": self.opt}

    def step(self, batch, step):
        self.model.train()
        with self.accelerator.autocast():
            loss = self.model(batch["face"], batch["label"])
        ok = self.update(loss, self.opt)
        return {"loss": loss.detach()}, ok

    def write_model(self, path: Path) -> None:
        write_weights(self.accelerator.unwrap_model(self.model).backbone, path)


def load_voice_encoder(cfg: Config, run_dir: Path, device) -> nn.Module:
    enc = models.build_voice_encoder(cfg.model.voice)
    enc.load_state_dict(read_weights(weights_path(cfg, run_dir, "voice"), "voice encoder", "voice"))
    return enc.to(device).eval().requires_grad_(False)


class GanStage(Stage):
    """Algorithm 1. D and C share one trunk (as Voice2Face) and update together on real faces
    (C) and real vs generated (D); then G updates against the updated D and C.

    F_e is frozen, so by default (data.bank.enabled) the voices come from the embedding bank
    (avpgan/data/bank.py), built on first use; otherwise from the audio stream through F_e."""

    name = "gan"

    def __init__(self, cfg: Config, accelerator: Accelerator, run_dir: Path):
        super().__init__(cfg, accelerator, run_dir)
        self.voice_weights = weights_path(cfg, run_dir, "voice")
        self.encoder = load_voice_encoder(cfg, run_dir, accelerator.device)
        g = models.build_generator(cfg.model.generator)
        d = models.build_discriminator(cfg.model.discriminator, self.num_identities)
        self.ema = EMA(g, cfg.train.ema_decay).to(accelerator.device)
        self.g, self.d, self.opt_g, self.opt_d = accelerator.prepare(g, d, self.adam(g), self.adam(d))
        self.logmel = LogMel(cfg.features, cfg.data.sample_rate).to(accelerator.device)
        self._features = self._real_features = None  # Lite0 net and the val faces' features, made once
        self.train_bank: bank.Bank | None = None

    def state(self) -> dict:
        return {"g": self.g, "d": self.d, "ema": self.ema, "opt_g": self.opt_g, "opt_d": self.opt_d}

    def batches(self, seed, step, saved):
        if not self.cfg.data.bank.enabled:
            return super().batches(seed, step, saved)
        accelerator = self.accelerator
        paths = bank.prepare(self.cfg, self.run_dir, self.voice_weights, device=accelerator.device,
                             rank=accelerator.process_index, world_size=accelerator.num_processes,
                             barrier=accelerator.wait_for_everyone, log=accelerator.print)
        self.train_bank = train = bank.load(self.cfg, "train", paths["train"], self.voice_weights, accelerator.device)
        position = bank.BankPosition.from_state_dict(saved) if saved is not None else bank.BankPosition(step)
        return bank.BankSampler(train, self.scfg.batch_size, seed=seed, rank=accelerator.process_index,
                                world_size=accelerator.num_processes, start_step=position.step)

    def embed(self, batch: dict, noise_std: float) -> torch.Tensor:
        """The unit voice embedding G is fed: from the bank's stored one, or F_e on the batch's audio.
        Either way Voice2Face's training noise goes on top (normalising a unit vector changes nothing)."""
        with torch.no_grad():
            if "embedding" in batch:
                voice = batch["embedding"]
            else:
                with self.phase("features"):
                    mel = self.logmel(batch["audio"])
                with self.phase("encoder"):
                    voice = self.encoder(mel)
            return models.voice_embedding(voice, noise_std=noise_std)

    def step(self, batch, step):
        face, label = batch["face"], batch["label"]
        emb = self.embed(batch, self.cfg.model.voice.noise_std)
        self.g.train()
        self.d.train()
        augment = self.scfg.augment  # real and generated faces alike, so D cannot tell them apart by it
        with self.accelerator.autocast():
            with self.phase("G"):
                fake = self.g(emb)
            with self.phase("D/C"):
                logit, id_logits = self.d(models.diff_augment(torch.cat([face, fake.detach()]), augment))
                n = face.shape[0]
                loss_d, parts_d = models.d_loss(logit[:n], logit[n:])
                loss_c, parts_c = models.c_loss(id_logits[:n], label)
        ok_d = self.update(loss_d + loss_c, self.opt_d, "D/C")
        d_plain = self.accelerator.unwrap_model(self.d)  # G's step needs no all-reduce of D's gradients
        with frozen(d_plain):  # nor D's weight gradients: only those reaching G through D's input
            with self.phase("G"), self.accelerator.autocast():
                fake_logit, fake_ids = d_plain(models.diff_augment(fake, augment))
                loss_g, parts_g = models.g_loss(fake_logit, fake_ids, label)
            ok_g = self.update(loss_g, self.opt_g, "G")
        with self.phase("optimizer"):
            d_plain.zero_grad(set_to_none=True)  # D's own gradients, done with: not held until the next step
            self.ema.update(self.accelerator.unwrap_model(self.g), only_if=ok_g)  # the EMA follows G's finite updates only
        metrics = {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), **parts_d, **parts_c, **parts_g}
        return metrics, ok_d & ok_g

    def write_model(self, path: Path) -> None:
        write_weights(self.ema.module, path)

    def fixed_inputs(self) -> dict | None:
        """Fixed voices for the sample grid and the interval metrics.

        On the bank path: one utterance of each of 8 train identities spread over the labels
        (does G fit the voices it trains on?) and of 8 validation identities (does it generalise
        to voices it never saw?), plus every validation utterance (crop 0) and face for the
        distribution metric. The audio path shows the validation stream's first batch only.
        """
        if not self.cfg.data.bank.enabled:
            return self.fixed_val_batch()
        val = bank.load(self.cfg, "val", bank.bank_file(self.run_dir, "val"), self.voice_weights, self.accelerator.device)
        train = self.train_bank  # loaded by `batches`, which the loop calls first: one copy in memory
        fixed = {"val_embedding": val.embedding[:, 0], "val_face": val.faces(torch.arange(len(val), device=val.device))}
        for split, b in (("train", train), ("val", val)):
            labels = torch.unique(b.label)
            picked = labels[torch.linspace(0, len(labels) - 1, min(8, len(labels))).round().long()]
            first = torch.stack([torch.nonzero(b.label == lab)[0, 0] for lab in picked])
            fixed[f"{split}_grid_embedding"], fixed[f"{split}_grid_face"] = b.embedding[first, 0], b.faces(first)
        return fixed

    @torch.no_grad()
    def sample_grid(self, fixed: dict) -> np.ndarray:
        if "embedding" not in fixed and "audio" in fixed:  # audio path: validation voices only
            fake = self.ema(self.embed(fixed, 0.0)).clamp(-1, 1)
            return make_grid([fixed["face"], fake], nrow=fixed["face"].shape[0],
                             row_labels=["real (val)", "generated (val)"], min_cell=SAMPLE_CELL)
        rows, labels = [], []
        for split in ("train", "val"):
            fake = self.ema(self.embed({"embedding": fixed[f"{split}_grid_embedding"]}, 0.0)).clamp(-1, 1)
            rows += [fixed[f"{split}_grid_face"], fake]
            labels += [f"real ({split})", f"generated ({split})"]
        return make_grid(rows, nrow=rows[0].shape[0], row_labels=labels, min_cell=SAMPLE_CELL)

    @torch.no_grad()
    def sample_metrics(self, fixed: dict) -> dict[str, float]:
        """fd_lite0 / kid_lite0 of the EMA generator's faces for every validation voice against
        the validation faces, so the curves show G improving (or collapsing) between grids."""
        if "val_embedding" not in fixed:
            return {}
        from avpgan.image_stats import FaceFeatures, feature_distances

        if self._features is None:
            self._features = FaceFeatures(self.accelerator.device)
            self._real_features = self._features(fixed["val_face"])
        fake = torch.cat([self.ema(self.embed({"embedding": e}, 0.0)).clamp(-1, 1)
                          for e in fixed["val_embedding"].split(256)])
        out = feature_distances(self._features(fake), self._real_features)
        return {k: float(out[k]) for k in ("fd_lite0", "kid_lite0") if out.get(k) is not None}


def faces_at(batch: dict, size: int) -> torch.Tensor:
    """The batch's faces at `size` px: the stored 64 or 128 px copy, resized only if neither fits."""
    face = batch["restore_face"] if size > 64 and "restore_face" in batch else batch["face"]
    if face.shape[-1] != size:
        face = F.interpolate(face, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return face


class PriorStage(Stage):
    """The restoration model's face prior: a small StyleGAN2 trained unconditionally on the faces
    (softplus GAN loss, lazy R1), since no pretrained prior exists at 64-128 px."""

    name = "prior"

    def __init__(self, cfg: Config, accelerator: Accelerator, run_dir: Path):
        super().__init__(cfg, accelerator, run_dir)
        r = cfg.model.restorer
        self.size, self.style_dim = r.out_size, r.style_dim
        self.restore_face = r.out_size > 64
        g, d = models.build_prior(r), models.build_style_discriminator(r)
        self.ema = EMA(g, cfg.train.ema_decay).to(accelerator.device)
        self.g, self.d, self.opt_g, self.opt_d = accelerator.prepare(g, d, self.adam(g), self.adam(d))

    def state(self) -> dict:
        return {"g": self.g, "d": self.d, "ema": self.ema, "opt_g": self.opt_g, "opt_d": self.opt_d}

    def step(self, batch, step):
        real = faces_at(batch, self.size)
        z = torch.randn(real.shape[0], self.style_dim, device=real.device)
        r = self.cfg.model.restorer
        with self.accelerator.autocast():
            fake = self.g(z)
            loss_d = models.softplus_gan(self.d(real), real=True) + models.softplus_gan(self.d(fake.detach()), real=False)
        ok = self.update(loss_d, self.opt_d)
        metrics = {"loss_d": loss_d.detach()}
        if step % r.r1_every == 0:
            loss_r1, parts = models.r1_loss(self.d, real, r.r1_weight, r.r1_every)
            ok &= self.update(loss_r1, self.opt_d)
            metrics.update(parts)
        d_plain = self.accelerator.unwrap_model(self.d)
        with self.accelerator.autocast():
            loss_g = models.softplus_gan(d_plain(fake), real=True)
        ok &= self.update(loss_g, self.opt_g)
        d_plain.zero_grad(set_to_none=True)
        self.ema.update(self.accelerator.unwrap_model(self.g))
        metrics["loss_g"] = loss_g.detach()
        return metrics, ok

    def write_model(self, path: Path) -> None:
        write_weights(self.ema.module, path)

    def fixed_inputs(self) -> dict | None:
        g = torch.Generator().manual_seed(0)
        return {"z": torch.randn(8, self.style_dim, generator=g).to(self.accelerator.device)}

    @torch.no_grad()
    def sample_grid(self, fixed: dict) -> np.ndarray:
        return make_grid([self.ema(fixed["z"]).clamp(-1, 1)], nrow=8, row_labels=["generated"], min_cell=SAMPLE_CELL)


class RestoreStage(Stage):
    """Section 3.3: degradation removal + the trained prior with CS-SFT, eq. (7)-(11), on pairs
    made by degrading clean faces (GFPGAN's pipeline)."""

    name = "restore"

    def __init__(self, cfg: Config, accelerator: Accelerator, run_dir: Path):
        super().__init__(cfg, accelerator, run_dir)
        r = cfg.model.restorer
        self.size = r.out_size
        self.restore_face = r.out_size > 64
        restorer = models.build_restorer(r)
        restorer.load_prior(read_weights(weights_path(cfg, run_dir, "prior"), "face prior", "prior"))
        embedder = models.build_embedder(cfg.model.embedder)
        embedder.load_state_dict(read_weights(weights_path(cfg, run_dir, "embedder"), "face embedder", "embedder"))
        self.losses = models.RestoreLosses(
            models.PerceptualNet(r.perceptual_weights, input_size=r.perceptual_size), embedder,
            l1_weight=r.l1_weight, perceptual_weight=r.perceptual_weight, adv_weight=r.adv_weight,
            r1_weight=r.r1_weight, r1_every=r.r1_every, local_weight=r.local_weight,
            feature_style_weight=r.feature_style_weight, identity_weight=r.identity_weight,
            pyramid_weight=r.pyramid_weight,
        ).to(accelerator.device)
        # Global and component discriminators are separate DDP modules: the R1 step uses only the
        # global one, and DDP insists that a module's every parameter takes part in its backward.
        disc, comps = models.build_style_discriminator(r), models.build_components(r)
        self.g, self.d, self.c, self.opt_g, self.opt_d = accelerator.prepare(
            restorer, disc, comps, self.adam(restorer), self.adam(disc, comps))

    def state(self) -> dict:
        return {"g": self.g, "d": self.d, "c": self.c, "opt_g": self.opt_g, "opt_d": self.opt_d}

    def pairs(self, batch: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(64 px degraded input, clean target) made from the batch's faces on their device. The
        draws come from a CPU generator, so a seed makes the same pairs on any device."""
        return models.degrade(faces_at(batch, self.size), torch.Generator().manual_seed(seed), out_size=64)

    def step(self, batch, step):
        r = self.cfg.model.restorer
        lq, target = self.pairs(batch, int(torch.randint(0, 2**31 - 1, (1,))))  # from the step's seed
        for m in (self.g, self.d, self.c):
            m.train()
        with self.accelerator.autocast():
            restored = self.g(lq)
            loss_d, parts_d = self.losses.discriminator(restored, target, self.d, self.c)
        ok = self.update(loss_d, self.opt_d)
        metrics = {"loss_d": loss_d.detach(), **parts_d}
        if step % r.r1_every == 0:
            loss_r1, parts = self.losses.r1(target, self.d)
            ok &= self.update(loss_r1, self.opt_d)
            metrics.update(parts)
        disc, comps = self.accelerator.unwrap_model(self.d), self.accelerator.unwrap_model(self.c)  # no sync needed for G's step
        with self.accelerator.autocast():
            loss_g, parts_g = self.losses.generator(restored, target, disc, comps)
        ok &= self.update(loss_g, self.opt_g)
        disc.zero_grad(set_to_none=True)
        comps.zero_grad(set_to_none=True)
        metrics.update(loss_g=loss_g.detach(), **parts_g)
        return metrics, ok

    def write_model(self, path: Path) -> None:
        write_weights(self.accelerator.unwrap_model(self.g), path)

    def fixed_inputs(self) -> dict | None:
        lq, target = self.pairs(self.fixed_val_batch(), seed=0)
        return {"lq": lq, "target": target}

    @torch.no_grad()
    def sample_grid(self, fixed: dict) -> np.ndarray:
        g = self.accelerator.unwrap_model(self.g).eval()
        restored = g(fixed["lq"]).clamp(-1, 1)
        lq_up = F.interpolate(fixed["lq"], size=restored.shape[-2:], mode="nearest")
        return make_grid([fixed["target"], lq_up, restored], nrow=restored.shape[0],
                         row_labels=["real", "degraded", "restored"], min_cell=SAMPLE_CELL)


STAGES: dict[str, type[Stage]] = {s.name: s for s in (VoiceStage, EmbedderStage, GanStage, PriorStage, RestoreStage)}
