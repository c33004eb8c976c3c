"""The exported bundle as an MLflow Model, so that a run's faces are one call away from its page:

    import mlflow, numpy as np
    model = mlflow.pyfunc.load_model("models:/m-...")      # or runs:/<run id>/avpgan
    faces = model.predict(waveforms)                       # uint8 [B, H, W, 3]

`waveforms` is a float32 array [B, S]: B voices as 16 kHz mono samples in [-1, 1] (the bundle's
`data.sample_rate`). Voices of different lengths are padded with zeros to one length: silence is
removed before the voice encoder, as in `avpgan generate`, so the padding changes nothing. Each
voice goes the way a file goes through `avpgan generate` (avpgan/generate.py): silence removed,
S-second windows (S: the training crop, or `params={"seconds": ...}`), the mean of the windows'
embeddings, the EMA generator, then the restoration model when the bundle has one
(`params={"restore": False}` gives the generator's 64 px faces). A voice with less than a quarter
second of sound is an error naming its row.

The model's artifact is the safetensors bundle itself; the avpgan package travels with it
(`code_paths`), so loading needs avpgan's dependencies but not avpgan installed. Only
avpgan/tracking.py logs it (`log_bundle_model`), on its sender thread.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

ARTIFACT = "bundle"
NAME = "avpgan"  # the logged model's name, also its path in `runs:/<run id>/avpgan`


class VoicesToFaces(mlflow.pyfunc.PythonModel):
    """predict(float32 [B, S] waveforms) -> uint8 [B, H, W, 3] faces (see the module notes)."""

    # The signature logged with the model says what goes in and out; MLflow's other schema, from
    # type hints on predict, is switched off (it would only warn that there are none).
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        import torch

        from avpgan.generate import VoiceToFace, open_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net = VoiceToFace(open_model(context.artifacts[ARTIFACT], device), device)

    def predict(self, context, model_input, params=None):  # no type hints: see above
        from avpgan.audio import AudioError
        from avpgan.generate import clips_of, faces_of
        from avpgan.images import to_uint8

        params = params or {}
        waves = np.asarray(model_input, dtype=np.float32)
        if waves.ndim != 2:
            raise ValueError(f"expected waveforms as a float array [voices, samples], got shape {waves.shape}")
        cfg = self.net.model.cfg
        seconds = float(params.get("seconds") or cfg.data.crop_seconds)
        try:
            voices = [clips_of(w, Path(f"voice {i}"), self.net.sample_rate, seconds, cfg.data.vad_top_db)
                      for i, w in enumerate(waves)]
        except AudioError as e:
            raise ValueError(str(e)) from None
        restore = bool(params.get("restore", True)) and self.net.has_restorer
        face, restored, _ = faces_of(self.net, voices, batch_size=64, restore=restore, seed=0)
        return to_uint8(restored if restored is not None else face)


def signature() -> Any:
    """Float waveforms [voices, samples] in, uint8 faces [voices, size, size, 3] out (the size
    depends on the bundle and on `restore`), and the two optional params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        params=ParamSchema([ParamSpec("restore", "boolean", True), ParamSpec("seconds", "double", 0.0)]),
    )


def requirements() -> list[str]:
    """avpgan's own dependencies (the package itself travels as code): what `mlflow models serve`
    or a fresh environment installs."""
    reqs = importlib.metadata.requires("avpgan") or []
    return [r.split(";")[0].strip() for r in reqs if "extra ==" not in r]


def log_bundle_model(uri: str, experiment_id: str, run_id: str, bundle_path: Path, step: int) -> str:
    """Log `bundle_path` as the run's pyfunc model (listed under the run's logged models, with the
    run's metrics at `step`); returns the model's URI (models:/<model id>).

    The logged model is created here, in the run's experiment: left to itself, `Model.log` files it
    under the process's active experiment, which is MLflow's Default one."""
    import warnings

    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    import avpgan

    model = MlflowClient(uri).create_logged_model(experiment_id, name=NAME, source_run_id=run_id)
    # Model.log reads the process's tracking URI. The signature is given: an input example would
    # only run the model once more here.
    with _use_tracking_uri(uri), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        info = Model.log(artifact_path=None, name=NAME, flavor=mlflow.pyfunc, model_id=model.model_id, run_id=run_id,
                         step=step, python_model=VoicesToFaces(), artifacts={ARTIFACT: str(bundle_path)},
                         signature=signature(), code_paths=[str(Path(avpgan.__file__).parent)],
                         pip_requirements=requirements())
    return info.model_uri
