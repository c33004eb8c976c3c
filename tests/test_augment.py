"""DiffAugment ops: what each does to an image, that gradients pass, and the config's op list."""

import pytest
import torch

from avpgan import config as config_mod
from avpgan.models import augment


def _faces(n=6, size=16):
    torch.manual_seed(0)
    return torch.rand(n, 3, size, size) * 2 - 1


def test_empty_policy_is_identity():
    x = _faces()
    assert augment.diff_augment(x, []) is x


def test_translation_is_a_zero_filled_shift_of_at_most_an_eighth():
    x = _faces(n=20, size=16)
    out = augment.translation(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = []
    for i in range(len(x)):
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(out[i], padded[i, :, 2 + dy:18 + dy, 2 + dx:18 + dx])]
        assert match, f"image {i} is not a shift of its input by at most 2 px"
        shifts.append(match[0])
    assert len(set(shifts)) > 1  # drawn per image, not one shift for the batch


def test_cutout_zeroes_one_square_of_at_most_half_the_side():
    x = _faces(n=20, size=16) * 0.5 + 0.6  # strictly positive, so zeros are the cut
    out = augment.cutout(x)
    for i in range(len(x)):
        zero = (out[i] == 0).all(0)
        assert 0 < int(zero.sum()) <= 64
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert int(zero.sum()) == len(rows) * len(cols)  # one rectangle, nothing else zeroed
        assert torch.equal(out[i][:, ~zero], x[i][:, ~zero])


def test_color_changes_images_differently_and_keeps_shape():
    x = _faces()
    out = augment.color(x)
    assert out.shape == x.shape
    change = (out - x).abs().flatten(1).mean(1)
    assert (change > 0).all() and change.std() > 0


def test_gradients_flow_through_every_op():
    x = _faces().requires_grad_(True)
    augment.diff_augment(x, list(augment.OPS)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_op_is_refused_by_the_function_and_the_config():
    with pytest.raises(ValueError, match="unknown op 'blur'"):
        augment.diff_augment(_faces(), ["blur"])
    with pytest.raises(config_mod.ConfigError, match=r"train.gan.augment.*blur.*valid"):
        config_mod.load(None, ["train.gan.augment=[color,blur]"])
    assert set(config_mod.AUGMENT_OPS) == set(augment.OPS)
