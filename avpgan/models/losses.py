"""The GAN's three objectives, eq. (12)-(14) and Algorithm 1, as minimised losses.

Eq. (12)-(14) are written as log-likelihoods that D, C and G *ascend*; here each is its negative,
averaged over the batch the way Voice2Face trains (BCE/NLL means):

    L_D = BCE(D(p), 1) + BCE(D(G(v)), 0)       real faces -> 1, generated -> 0
    L_C = CE(C(p), y_p)                        real faces -> their identity
    L_G = BCE(D(G(v)), 1) + CE(C(G(v)), y_v)   fool D, and look like the voice's identity

The per-sample weights w_n of eq. (12) and (14) enter as a weighted mean sum(w l) / sum(w), so
w = 1 (the paper's default) gives the plain mean. Logits are taken in float32 so the losses are
the same under bf16/fp16 autocast. Each function returns (loss, parts): parts holds detached
tensors for logging (call .item() only when logging, to avoid a device sync every step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Weight = torch.Tensor | None


def _logit_vector(logit: torch.Tensor, name: str) -> torch.Tensor:
    """D's logits as [B]; accepts [B] or [B, 1]."""
    if logit.dim() == 2 and logit.shape[1] == 1:
        logit = logit[:, 0]
    if logit.dim() != 1:
        raise ValueError(f"{name}: expected logits [B] or [B, 1], got {tuple(logit.shape)}")
    return logit.float()


def weighted_mean(per_sample: torch.Tensor, weight: Weight, name: str = "loss") -> torch.Tensor:
    if weight is None:
        return per_sample.mean()
    if weight.shape != per_sample.shape:
        raise ValueError(f"{name}: weight shape {tuple(weight.shape)} != batch shape {tuple(per_sample.shape)}")
    weight = weight.to(per_sample)
    return (per_sample * weight).sum() / weight.sum().clamp_min(torch.finfo(per_sample.dtype).tiny)


def _bce(logit: torch.Tensor, real: bool, weight: Weight, name: str) -> torch.Tensor:
    # Float targets built from the logits: an integer target (torch.full(shape, 1)) is rejected.
    target = torch.ones_like(logit) if real else torch.zeros_like(logit)
    return weighted_mean(F.binary_cross_entropy_with_logits(logit, target, reduction="none"), weight, name)


def d_loss(
    real_logit: torch.Tensor,
    fake_logit: torch.Tensor,
    weight: Weight | tuple[Weight, Weight] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (12). `weight`: one [B] tensor for equal real/fake batches, or a (real, fake) pair."""
    real_w, fake_w = weight if isinstance(weight, tuple) else (weight, weight)
    real = _bce(_logit_vector(real_logit, "d_loss real"), True, real_w, "d_loss real")
    fake = _bce(_logit_vector(fake_logit, "d_loss fake"), False, fake_w, "d_loss fake")
    return real + fake, {"d_real": real.detach(), "d_fake": fake.detach()}


def c_loss(
    id_logits_real: torch.Tensor, labels: torch.Tensor, weight: Weight = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (13): cross-entropy of C on real faces against their identities."""
    logits = id_logits_real.float()
    ce = weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weight, "c_loss")
    accuracy = (logits.detach().argmax(1) == labels).float().mean()
    return ce, {"c_real": ce.detach(), "c_acc_real": accuracy}


def g_loss(
    fake_logit: torch.Tensor, id_logits_fake: torch.Tensor, voice_labels: torch.Tensor, weight: Weight = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (14): D should call G(v) real, and C should give G(v) the voice's identity."""
    adv = _bce(_logit_vector(fake_logit, "g_loss"), True, weight, "g_loss")
    logits = id_logits_fake.float()
    cls = weighted_mean(F.cross_entropy(logits, voice_labels, reduction="none"), weight, "g_loss")
    accuracy = (logits.detach().argmax(1) == voice_labels).float().mean()
    return adv + cls, {"g_adv": adv.detach(), "g_cls": cls.detach(), "c_acc_fake": accuracy}
