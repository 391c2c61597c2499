"""The trained model as an MLflow pyfunc model: an H x W x 3 uint8 RGB image in, the H x W
map of class ids out (semantic inference at the image's own size, on the CPU)::

    model = mlflow.pyfunc.load_model("models:/simformer-synthetic-split1@champion")
    labels = model.predict(image)            # image: np.uint8 H x W x 3 -> np.int64 H x W

The logged model holds the train stage's file unchanged as ``artifacts/model.pt`` (artifact
key :data:`MODEL_ARTIFACT`; ``torch.load(..., weights_only=True)`` reads it) and this
package's code, so it loads outside the repository too.
"""
from __future__ import annotations

import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

# predict takes an array and says so in the signature; MLflow's type-hint inference is not needed
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)
import mlflow  # noqa: E402

MODEL_ARTIFACT = "model"
REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "opencv-python-headless", "tqdm", "PyYAML")


class Segmenter(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from pipeline.engine.evaluate import load_trained
        self.model, _, self.split = load_trained(context.artifacts[MODEL_ARTIFACT], torch.device("cpu"))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        from pipeline.engine.evaluate import predict
        image = np.asarray(model_input)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return predict(self.model, x, image.shape[:2]).argmax(0).numpy().astype(np.int64)


def log_segmenter(client, experiment_id: str, run_id: str, model_file: Path, example: np.ndarray,
                  registered_name: str | None = None):
    """Log ``model_file`` as a :class:`Segmenter` of run ``run_id`` (signature and input example
    ``example``, an H x W x 3 uint8 image), registered as ``registered_name`` when given.
    Returns MLflow's ``ModelInfo`` (``model_uri``, ``model_id``, ``registered_model_version``).
    Call it with the tracking URI set and from the store root."""
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
                               outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1))]))
    # created here so that the model lands in the run's experiment, not the fluent default one
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    info = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
                     python_model=Segmenter(), artifacts={MODEL_ARTIFACT: str(model_file)}, signature=signature,
                     input_example=np.ascontiguousarray(example, dtype=np.uint8),
                     code_paths=[str(Path(__file__).resolve().parent)],
                     pip_requirements=[f"{r}=={metadata.version(r)}" for r in REQUIREMENTS],
                     registered_model_name=registered_name)
    return info
