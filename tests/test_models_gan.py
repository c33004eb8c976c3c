"""The GAN's networks and losses: shapes, Voice2Face parity, spectral norm, CBAM, losses, converter."""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

from avpgan import config as config_mod
from avpgan.models import (
    CBAM,
    ConversionError,
    FaceDiscriminator,
    Generator,
    SpeakerHead,
    VoiceEncoder,
    build_discriminator,
    build_generator,
    build_voice_encoder,
    c_loss,
    convert_file,
    d_loss,
    g_loss,
    load_converted,
    voice_embedding,
)
from avpgan.models.convert import convert_voice2face_generator

ROOT = Path(__file__).resolve().parent.parent

# Voice2Face's published parameter counts (cmu-mlsp/reconstructing_faces_from_voices).
V2F_VOICE, V2F_GENERATOR, V2F_FACE_TRUNK = 2_670_720, 12_191_875, 3_310_720

# Small widths that keep every test here fast on two shared cores.
SMALL_G = dict(channels=(32, 16, 16, 8, 8), cbam_reduction=4)
SMALL_D = dict(channels=(8, 8, 16, 16, 32), cbam_reduction=4)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cbam_params(c: int, r: int = 16) -> int:
    """Shared MLP C -> h -> C with biases, plus a 2->1 7x7 conv without bias."""
    h = max(1, c // r)
    return c * h + h + h * c + c + 2 * 7 * 7


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Fixed seed; one torch thread, since the CI machine's two cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Voice encoder


@pytest.mark.parametrize("frames", [50, 200, 800, 2000])
def test_voice_encoder_any_length(frames):
    enc = VoiceEncoder()
    out = enc(torch.randn(2, 64, frames))
    assert out.shape == (2, 64)
    emb = voice_embedding(out)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_voice_encoder_is_voice2face_layers():
    enc = VoiceEncoder()
    assert count(enc) == V2F_VOICE
    kinds = [type(m) for m in enc.modules() if list(m.parameters(recurse=False))]
    assert kinds.count(nn.Conv1d) == 5 and kinds.count(nn.BatchNorm1d) == 4 and len(kinds) == 9
    assert all(c.bias is None for c in enc.convs) and enc.proj.bias is not None
    # Four stride-2 blocks then a stride-2 projection: T=800 -> 25 frames before the time mean.
    seen = []
    enc.proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    enc(torch.randn(2, 64, 800))
    assert seen == [torch.Size([2, 64, 25])]


def test_voice_encoder_rejects_wrong_input():
    enc = VoiceEncoder()
    with pytest.raises(ValueError, match=r"\[B, 64, T>=1\]"):
        enc(torch.randn(2, 40, 100))
    with pytest.raises(ValueError):
        enc(torch.randn(64, 100))


def test_voice_embedding_noise():
    raw = torch.randn(8, 64)
    clean = voice_embedding(raw)
    torch.testing.assert_close(clean, raw / raw.norm(dim=1, keepdim=True))
    noisy = voice_embedding(raw, noise_std=0.05)
    torch.testing.assert_close(noisy.norm(dim=1), torch.ones(8))
    delta = (noisy - clean).norm(dim=1)
    assert (delta > 0).all() and (delta < 0.5).all()  # 0.05 * sqrt(64) = 0.4 before renormalising
    # Voice2Face's 4-D output [B, 64, 1, 1] is accepted as well.
    torch.testing.assert_close(voice_embedding(raw[:, :, None, None]), clean)


# ---------------------------------------------------------------------------------------------
# Parameter counts: the Voice2Face configuration equals Voice2Face; CBAM is the only addition.


def test_parameter_counts_table(capsys):
    n_ids = 924  # the paper's training identities
    g_base = Generator(spectral_norm=False, cbam=False)
    g_avp = Generator()
    d_base = FaceDiscriminator(n_ids, spectral_norm=False, cbam=False)
    d_avp = FaceDiscriminator(n_ids)
    trunk = count(d_base) - count(d_base.real_fake) - count(d_base.classifier)

    assert count(g_base) == V2F_GENERATOR
    assert trunk == V2F_FACE_TRUNK
    assert count(d_base.real_fake) == 64 and count(d_base.classifier) == 64 * n_ids
    # Spectral norm adds no parameters; each CBAM adds exactly its MLP and 7x7 conv.
    assert count(g_avp) == V2F_GENERATOR + sum(cbam_params(c) for c in (512, 256, 128, 64))
    assert count(d_avp) == count(d_base) + sum(cbam_params(c) for c in (64, 128, 256, 512))

    rows = [
        ("voice encoder", count(VoiceEncoder()), V2F_VOICE),
        ("generator (no SN, no CBAM)", count(g_base), V2F_GENERATOR),
        ("generator (AVP-GAN)", count(g_avp), V2F_GENERATOR),
        ("D/C trunk (no SN, no CBAM)", trunk, V2F_FACE_TRUNK),
        (f"D + C, {n_ids} ids (AVP-GAN)", count(d_avp), V2F_FACE_TRUNK + 64 + 64 * n_ids),
    ]
    with capsys.disabled():
        print(f"\n{'network':34s} {'ours':>12s} {'Voice2Face':>12s}")
        for name, ours, ref in rows:
            print(f"{name:34s} {ours:12,d} {ref:12,d}")


# ---------------------------------------------------------------------------------------------
# Generator and discriminator


def test_generator_shapes_and_inputs():
    g = Generator(**SMALL_G)
    assert g(torch.randn(3, 64)).shape == (3, 3, 64, 64)
    assert g(torch.randn(3, 64, 1, 1)).shape == (3, 3, 64, 64)  # Voice2Face's embedding layout
    assert Generator(channels=(16, 8, 8), cbam_layers=(2, 3), cbam_reduction=4)(torch.randn(1, 64)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        g(torch.randn(3, 32))
    full = Generator()
    assert full(torch.randn(2, 64)).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("upsample, periodic", [("transposed", True), ("resize", False)])
def test_resize_upsampling_draws_no_checkerboard(upsample, periodic):
    """A spatially constant 4x4 map through two x2 upsamplers: the transposed convs give each
    pixel of a 2x2 cell other kernel taps (a period-2 pattern), the resize-convs cannot."""
    torch.manual_seed(0)
    g = Generator(embed_dim=4, channels=(8, 8, 8), spectral_norm=False, cbam=False, upsample=upsample)
    with torch.no_grad():
        first = g.convs[0]
        first.weight.copy_(first.weight.mean(dim=(2, 3), keepdim=True).expand_as(first.weight))
        out = g(torch.randn(1, 4))[0, :, 4:-4, 4:-4]  # the interior, away from zero padding
    cell = out.unfold(1, 2, 2).unfold(2, 2, 2)  # [3, h/2, w/2, 2, 2]: each 2x2 cell
    assert (cell.std(dim=(-1, -2)).max() > 1e-4) == periodic
    if not periodic:
        assert torch.allclose(out, out[:, :1, :1].expand_as(out), atol=1e-5)  # constant in, constant out


def test_discriminator_shapes_and_size_check():
    d = FaceDiscriminator(7, **SMALL_D)
    logit, ids = d(torch.randn(5, 3, 64, 64))
    assert logit.shape == (5,) and ids.shape == (5, 7)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        d(torch.randn(2, 3, 128, 128))
    full_logit, full_ids = FaceDiscriminator(11)(torch.randn(2, 3, 64, 64))
    assert full_logit.shape == (2,) and full_ids.shape == (2, 11)


def test_discriminator_heads_share_one_trunk():
    d = FaceDiscriminator(6, **SMALL_D).eval()  # eval: spectral norm does not iterate, so calls agree
    x = torch.randn(4, 3, 64, 64)
    logit, ids = d(x)
    h = d.features(x)
    torch.testing.assert_close(logit, h @ d.real_fake.weight[0])
    torch.testing.assert_close(ids, h @ d.classifier.weight.T)
    assert d.real_fake.bias is None and d.classifier.bias is None
    # Both losses train the trunk; each head only gets its own loss's gradient.
    labels = torch.tensor([0, 1, 2, 3])
    c_loss(d(x)[1], labels)[0].backward()
    assert d.trunk[0].weight.grad.abs().sum() > 0 and d.real_fake.weight.grad is None
    d.zero_grad(set_to_none=True)
    d_loss(d(x)[0], d(x.flip(0))[0])[0].backward()
    assert d.trunk[0].weight.grad.abs().sum() > 0 and d.classifier.weight.grad is None


def _sn_flags(convs) -> list[bool]:
    return [parametrize.is_parametrized(c, "weight") for c in convs]


def test_spectral_norm_placement():
    assert _sn_flags(Generator().convs) == [False, True, True, True, True, False]
    assert _sn_flags(FaceDiscriminator(3).trunk) == [False, True, True, True, True, False]
    assert not any(_sn_flags(Generator(spectral_norm=False).convs))
    assert not any(_sn_flags(FaceDiscriminator(3, spectral_norm=False).trunk))
    # Only the spectral-norm switch changes, not the CBAM blocks.
    assert set(Generator(spectral_norm=False).attention) == {"2", "3", "4", "5"}


def _sigma(weight: torch.Tensor, dim: int) -> float:
    """Largest singular value of the matrix spectral norm normalises (rows along `dim`)."""
    return torch.linalg.matrix_norm(weight.detach().movedim(dim, 0).flatten(1), ord=2).item()


def test_spectral_norm_reaches_unit_sigma():
    g, d = Generator(**SMALL_G).train(), FaceDiscriminator(4, **SMALL_D).train()
    layers = [(c, 1) for c in g.convs[1:-1]] + [(c, 0) for c in d.trunk[1:-1]]  # ConvTranspose: dim 1
    with torch.no_grad():
        for conv, _ in layers:  # make the raw weights clearly not unit-norm
            conv.parametrizations.weight.original.mul_(3.0)
        # One power iteration per training forward; random layers have sigma_2/sigma_1 ~ 0.9-0.99,
        # so the estimate needs tens of steps (training runs thousands).
        for _ in range(100):
            g(torch.randn(2, 64))
            d(torch.randn(2, 3, 64, 64))
    g.eval(), d.eval()
    for conv, dim in layers:
        assert _sigma(conv.parametrizations.weight.original, dim) > 1.5
        assert _sigma(conv.weight, dim) == pytest.approx(1.0, abs=0.01)
    # Layers without spectral norm keep their scale.
    assert _sigma(g.convs[0].weight, 1) != pytest.approx(1.0, abs=0.02)


# ---------------------------------------------------------------------------------------------
# CBAM


def test_cbam_matches_equations():
    c, r = 12, 4
    m = CBAM(c, reduction=r)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(3, c, 9, 7)
    w0, b0 = m.mlp[0].weight, m.mlp[0].bias  # W0 in R^{C/r x C}
    w1, b1 = m.mlp[2].weight, m.mlp[2].bias  # W1 in R^{C x C/r}
    assert w0.shape == (c // r, c) and w1.shape == (c, c // r)

    def mlp(v):  # eq. (2): W1(ReLU(W0 v)) with the shared weights
        return torch.einsum("oh,bh->bo", w1, torch.relu(torch.einsum("hc,bc->bh", w0, v) + b0)) + b1

    f_avg = x.sum(dim=(2, 3)) / (9 * 7)
    f_max = x.flatten(2).max(dim=2).values
    m_c = torch.sigmoid(mlp(f_avg) + mlp(f_max))
    f1 = m_c[:, :, None, None] * x  # eq. (3)
    s = torch.stack([f1.sum(dim=1) / c, f1.max(dim=1).values], dim=1)  # [F_avg^s; F_max^s]
    k = m.spatial.weight[0]  # [2, 7, 7]
    padded = F.pad(s, (3, 3, 3, 3))
    conv = torch.zeros(3, 9, 7)
    for i in range(9):
        for j in range(7):
            conv[:, i, j] = (padded[:, :, i : i + 7, j : j + 7] * k).sum(dim=(1, 2, 3))
    expected = torch.sigmoid(conv)[:, None] * f1  # eq. (4), (5)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


def test_cbam_structure():
    m = CBAM(64, reduction=16)
    assert [type(x) for x in m.modules() if list(x.parameters(recurse=False))] == [nn.Linear, nn.Linear, nn.Conv2d]
    assert m.mlp[0].out_features == 4 and m.spatial.bias is None and m.spatial.kernel_size == (7, 7)
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert CBAM(8, reduction=16).mlp[0].out_features == 1  # max(1, C // r)
    with pytest.raises(ValueError):
        CBAM(8, spatial_kernel=6)


def test_cbam_placement_after_activation():
    g = Generator(channels=(32, 16, 16, 8, 8), cbam_layers=(2, 4), cbam_reduction=4)
    d = FaceDiscriminator(3, channels=(8, 8, 16, 16, 32), cbam_layers=(1, 5), cbam_reduction=4)
    assert sorted(g.attention) == ["2", "4"] and sorted(d.attention) == ["1", "5"]
    seen = {}
    for name, net in (("g", g), ("d", d)):
        for k, block in net.attention.items():
            block.register_forward_hook(lambda m, i, o, key=f"{name}{k}": seen.__setitem__(key, i[0]))
    g(torch.randn(2, 64))
    d(torch.randn(2, 3, 64, 64))
    assert seen["g2"].shape == (2, 16, 8, 8) and seen["g4"].shape == (2, 8, 32, 32)
    assert seen["d1"].shape == (2, 8, 64, 64) and seen["d5"].shape == (2, 32, 4, 4)
    assert min(seen["g2"].min(), seen["g4"].min()) >= 0  # after ReLU
    assert seen["d1"].min() < 0  # after LeakyReLU: negatives survive, scaled
    with pytest.raises(ValueError, match="cbam_layers"):
        Generator(**{**SMALL_G, "cbam_layers": (6,)})
    assert len(Generator(cbam=False).attention) == 0 and len(FaceDiscriminator(2, cbam=False).attention) == 0


# ---------------------------------------------------------------------------------------------
# Losses, on cases small enough to compute by hand


def test_d_loss_by_hand():
    ln3 = math.log(3.0)  # sigmoid(ln 3) = 0.75
    real, fake = torch.tensor([0.0, ln3]), torch.tensor([ln3, 0.0])
    loss, parts = d_loss(real, fake)
    exp_real = (math.log(2) + math.log(4 / 3)) / 2
    exp_fake = (math.log(4) + math.log(2)) / 2
    assert parts["d_real"].item() == pytest.approx(exp_real, rel=1e-6)
    assert parts["d_fake"].item() == pytest.approx(exp_fake, rel=1e-6)
    assert loss.item() == pytest.approx(exp_real + exp_fake, rel=1e-6)
    w = torch.tensor([1.0, 3.0])
    loss_w, _ = d_loss(real[:, None], fake[:, None], weight=w)  # [B, 1] logits accepted
    exp_w = (math.log(2) + 3 * math.log(4 / 3)) / 4 + (math.log(4) + 3 * math.log(2)) / 4
    assert loss_w.item() == pytest.approx(exp_w, rel=1e-6)
    loss_pair, _ = d_loss(real, fake[:1], weight=(w, None))  # unequal real/fake batches
    assert loss_pair.item() == pytest.approx((math.log(2) + 3 * math.log(4 / 3)) / 4 + math.log(4), rel=1e-6)
    big, _ = d_loss(torch.tensor([100.0]), torch.tensor([-100.0]))  # stable at saturation
    assert torch.isfinite(big) and big.item() < 1e-30
    with pytest.raises(ValueError, match="weight shape"):
        d_loss(real, fake, weight=torch.ones(3))


def test_c_and_g_loss_by_hand():
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, 0.0, 0.0], [ln3, 0.0, 0.0]])
    labels = torch.tensor([2, 0])
    loss, parts = c_loss(logits, labels)
    assert loss.item() == pytest.approx((math.log(3) - math.log(0.6)) / 2, rel=1e-6)
    assert parts["c_acc_real"].item() == 0.5
    loss_w, _ = c_loss(logits, labels, weight=torch.tensor([0.0, 2.0]))
    assert loss_w.item() == pytest.approx(-math.log(0.6), rel=1e-6)

    g, parts = g_loss(torch.tensor([ln3]), torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([1]))
    assert parts["g_adv"].item() == pytest.approx(math.log(4 / 3), rel=1e-6)  # -ln 0.75
    assert parts["g_cls"].item() == pytest.approx(math.log(3), rel=1e-6)
    assert g.item() == pytest.approx(math.log(4), rel=1e-6)


def test_losses_bf16_logits_are_float32():
    loss, _ = d_loss(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(2 * math.log(2), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# A few optimisation steps lower each loss


def _steps(params, loss_fn, n: int, lr: float = 2e-3) -> tuple[float, float]:
    opt = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(n):
        loss = loss_fn()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss_fn().item()


def test_each_loss_decreases():
    """Each objective alone on a fixed tiny batch, as Algorithm 1 orders them: D, then G against
    that D frozen; C on a fresh network (with CBAM gates ~0.25 per block at init, the untrained
    trunk's output is tiny and C needs a few dozen steps to leave its plateau)."""
    n_ids = 4
    faces = torch.randn(8, 3, 64, 64).clamp(-1, 1)
    labels = torch.arange(8) % n_ids
    emb = voice_embedding(torch.randn(8, 64))
    g = Generator(**SMALL_G)
    fake = g(emb).detach()

    d = FaceDiscriminator(n_ids, **SMALL_D)
    before, after = _steps(d.parameters(), lambda: d_loss(d(faces)[0], d(fake)[0])[0], n=20)
    assert after < 0.5 * before, ("D", before, after)
    d.requires_grad_(False)
    adv_before = g_loss(*d(g(emb)), labels)[1]["g_adv"]
    before, after = _steps(g.parameters(), lambda: g_loss(*d(g(emb)), labels)[0], n=30, lr=5e-3)
    adv_after = g_loss(*d(g(emb)), labels)[1]["g_adv"]
    assert after < 0.7 * before and adv_after < 0.6 * adv_before, ("G", before, after, adv_before, adv_after)

    c = FaceDiscriminator(n_ids, **SMALL_D)
    before, after = _steps(c.parameters(), lambda: c_loss(c(faces)[1], labels)[0], n=40)
    assert after < 0.5 * before, ("C", before, after)

    enc, head = VoiceEncoder(channels=(16, 16, 16, 16)), SpeakerHead(64, n_ids)
    mel = torch.randn(8, 64, 120)
    params = [*enc.parameters(), *head.parameters()]
    before, after = _steps(params, lambda: F.cross_entropy(head(enc(mel)), labels), n=15, lr=1e-2)
    assert after < 0.5 * before, ("voice", before, after)


# ---------------------------------------------------------------------------------------------
# Config -> modules


def test_config_fields_map_onto_constructor_args():
    pairs = [
        (config_mod.VoiceConfig, VoiceEncoder, {"noise_std"}),  # noise_std is voice_embedding's
        (config_mod.GeneratorConfig, Generator, set()),
        (config_mod.DiscriminatorConfig, FaceDiscriminator, set()),
    ]
    for cfg_cls, net_cls, elsewhere in pairs:
        fields = {f.name for f in dataclasses.fields(cfg_cls)} - elsewhere
        args = set(inspect.signature(net_cls).parameters) - {"num_identities"}
        assert fields == args, (cfg_cls.__name__, fields ^ args)
    assert "noise_std" in inspect.signature(voice_embedding).parameters


def test_voice2face_and_avpgan_configs_build_from_the_same_classes():
    base = config_mod.load(ROOT / "configs" / "voice2face.yaml").model
    avp = config_mod.load(ROOT / "configs" / "avpgan.yaml").model
    g, d = build_generator(base.generator), build_discriminator(base.discriminator, 10)
    assert count(build_voice_encoder(base.voice)) == V2F_VOICE
    assert count(g) == V2F_GENERATOR and len(g.attention) == 0 and not any(_sn_flags(g.convs))
    assert count(d) == V2F_FACE_TRUNK + 64 + 640 and len(d.attention) == 0 and not any(_sn_flags(d.trunk))
    g2, d2 = build_generator(avp.generator), build_discriminator(avp.discriminator, 10)
    assert _sn_flags(g2.convs) == _sn_flags(d2.trunk) == [False, True, True, True, True, False]
    assert sorted(g2.attention) == sorted(d2.attention) == ["2", "3", "4", "5"]
    tiny = config_mod.load(ROOT / "configs" / "tiny.yaml").model
    assert build_generator(tiny.generator)(torch.randn(2, 64)).shape == (2, 3, 64, 64)
    assert build_voice_encoder(tiny.voice)(torch.randn(2, 64, 200)).shape == (2, 64)


# ---------------------------------------------------------------------------------------------
# Voice2Face weights: built here with exactly Voice2Face's nn.Sequential layout


class V2FVoice(nn.Module):
    """Voice2Face's VoiceEmbedNet layout: `model` = (Conv1d, BatchNorm1d, ReLU) x 4, Conv1d."""

    def __init__(self, widths=(64, 256, 384, 576, 864), out=64):
        super().__init__()
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv1d(a, b, 3, 2, 1, bias=False), nn.BatchNorm1d(b, affine=True), nn.ReLU(inplace=True)]
        self.model = nn.Sequential(*layers, nn.Conv1d(widths[-1], out, 3, 2, 1, bias=True))

    def forward(self, x):
        x = self.model(x)
        return F.avg_pool1d(x, x.size(2), stride=1).view(x.size(0), -1, 1, 1)


class V2FGenerator(nn.Module):
    """Voice2Face's Generator layout: `model` = (ConvTranspose2d, ReLU) x 5, ConvTranspose2d."""

    def __init__(self, widths=(64, 1024, 512, 256, 128, 64)):
        super().__init__()
        layers = [nn.ConvTranspose2d(widths[0], widths[1], 4, 1, 0, bias=True), nn.ReLU(inplace=True)]
        for a, b in zip(widths[1:-1], widths[2:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=True), nn.ReLU(inplace=True)]
        self.model = nn.Sequential(*layers, nn.ConvTranspose2d(widths[-1], 3, 1, 1, 0, bias=True))

    def forward(self, x):
        return self.model(x)


def test_convert_voice2face_voice_file(tmp_path):
    ref = V2FVoice()
    ref.train()
    with torch.no_grad():  # non-trivial running statistics, so eval mode depends on them
        for _ in range(3):
            ref(torch.randn(4, 64, 300) * 2 + 1)
    ref.eval()
    keys = list(ref.state_dict())
    assert keys[:2] == ["model.0.weight", "model.1.weight"] and keys[-2:] == ["model.12.weight", "model.12.bias"]
    torch.save(ref.state_dict(), tmp_path / "voice_embedding.pth")

    dst = tmp_path / "out" / "voice.safetensors"
    assert convert_file(tmp_path / "voice_embedding.pth", dst) == "voice"
    ours = VoiceEncoder().eval()
    ours.load_state_dict(load_file(str(dst)))  # the plain state dict loads into the default encoder
    rebuilt = load_converted(dst)
    mel = torch.randn(3, 64, 800)
    with torch.no_grad():
        expected = ref(mel).flatten(1)
        torch.testing.assert_close(ours(mel), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rebuilt(mel), expected, rtol=1e-5, atol=1e-5)
    assert not list(dst.parent.glob(".*.partial"))


def test_convert_voice2face_generator(tmp_path):
    ref = V2FGenerator()
    assert count(ref) == V2F_GENERATOR
    torch.save(ref.state_dict(), tmp_path / "generator.pth")
    dst = tmp_path / "generator.safetensors"
    assert convert_file(tmp_path / "generator.pth", dst) == "generator"
    ours = load_converted(dst)
    assert count(ours) == V2F_GENERATOR and len(ours.attention) == 0
    emb = voice_embedding(torch.randn(2, 64))
    with torch.no_grad():
        torch.testing.assert_close(ours(emb), ref(emb[:, :, None, None]), rtol=1e-5, atol=1e-5)
    # The converted names are exactly those of Generator(spectral_norm=False, cbam=False).
    tensors, kwargs = convert_voice2face_generator(ref.state_dict())
    assert set(tensors) == set(Generator(spectral_norm=False, cbam=False).state_dict())
    assert kwargs["channels"] == [1024, 512, 256, 128, 64]


def test_converter_variants_and_errors(tmp_path):
    small = V2FVoice(widths=(64, 16, 16, 16, 16))
    state = {f"module.{k}": v for k, v in small.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")  # DataParallel prefix, pre-0.4.1 batch norms
    convert_file(tmp_path / "old.pth", tmp_path / "old.safetensors")
    assert load_converted(tmp_path / "old.safetensors").convs[0].out_channels == 16

    broken = dict(small.state_dict())
    del broken["model.12.bias"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ConversionError, match=r"broken\.pth.*model\.12"):
        convert_file(tmp_path / "broken.pth", tmp_path / "broken.safetensors")
    assert not (tmp_path / "broken.safetensors").exists()

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match=r"junk\.pth: not a readable"):
        convert_file(tmp_path / "junk.pth", tmp_path / "junk.safetensors")
    with pytest.raises(ConversionError, match="file not found"):
        convert_file(tmp_path / "missing.pth", tmp_path / "x.safetensors")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="unexpected entry 'fc.weight'"):
        convert_file(tmp_path / "other.pth", tmp_path / "other.safetensors")


def test_import_voice2face_command(tmp_path, capsys):
    """`avpgan import-voice2face` converts a state dict with Voice2Face's key layout, and its
    output is what train.voice_weights reads (a plain VoiceEncoder state dict)."""
    from avpgan.cli import main

    ref = V2FVoice().eval()
    torch.save(ref.state_dict(), tmp_path / "voice_embedding.pth")
    dst = tmp_path / "w" / "voice.safetensors"
    assert main(["import-voice2face", str(tmp_path / "voice_embedding.pth"), "--out", str(dst)]) == 0
    assert "Voice2Face voice converted; train the gan stage from it with train.voice_weights=" in capsys.readouterr().out
    ours = VoiceEncoder().eval()
    ours.load_state_dict(load_file(str(dst)))
    mel = torch.randn(2, 64, 400)
    with torch.no_grad():
        torch.testing.assert_close(ours(mel), ref(mel).flatten(1), rtol=1e-5, atol=1e-5)

    torch.save(V2FGenerator().state_dict(), tmp_path / "generator.pth")
    assert main(["import-voice2face", str(tmp_path / "generator.pth"), "--out", str(tmp_path / "g.safetensors"),
                 "--kind", "voice"]) == 1  # forced to the wrong kind: refused, nothing written
    assert "generator.pth: voice encoder:" in capsys.readouterr().err
    assert not (tmp_path / "g.safetensors").exists()
