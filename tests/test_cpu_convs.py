"""G's CPU routes for two transposed convs give the module's own values and gradients."""

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from avpgan.models.cpu_convs import transposed_conv


def _values_and_grads(conv: nn.Module, x: torch.Tensor, route):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    y = route(conv, x)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *conv.parameters()], gy)
    return y, grads


@pytest.mark.parametrize("make, size, route_name", [
    (lambda: nn.ConvTranspose2d(32, 16, 4, 2, 1), 4, "_WeightGradAsMatmulBackward"),  # G's layer 2 shape
    (lambda: nn.ConvTranspose2d(8, 32, 4, 1, 0), 1, "_WeightGradAsMatmulBackward"),   # G's layer 1 shape
    (lambda: spectral_norm(nn.ConvTranspose2d(32, 16, 4, 2, 1)), 4, "_WeightGradAsMatmulBackward"),
    (lambda: nn.ConvTranspose2d(16, 3, 1, 1, 0), 8, "AddBackward0"),                  # the RGB layer
    (lambda: nn.ConvTranspose2d(16, 8, 4, 2, 1), 8, None),                            # 8x8: the module's own
])
def test_same_values_and_gradients_as_the_module(make, size, route_name):
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(5, conv.in_channels, size, size)
    if hasattr(conv, "parametrizations"):
        conv.eval()  # no power iteration: both routes must read the same spectral-normalised weight
    y_ref, g_ref = _values_and_grads(conv, x, lambda c, v: c(v))
    y, g = _values_and_grads(conv, x, transposed_conv)
    # the route taken is the one named, so the comparison is not the module against itself
    assert y.grad_fn.name() == (route_name or y_ref.grad_fn.name())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_autocast_and_no_grad_use_the_module():
    conv = nn.ConvTranspose2d(32, 16, 4, 2, 1)
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = transposed_conv(conv, x)
    assert y.dtype == torch.bfloat16 and y.grad_fn.name() != "_WeightGradAsMatmulBackward"
    with torch.no_grad():
        torch.testing.assert_close(transposed_conv(conv, x), conv(x))
