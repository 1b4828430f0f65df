"""The served model, logged by MLflow's models-from-code: digits as people have them in, digit and probabilities out.

The record stage passes this file as `python_model`, the weights as an artifact and the package's modules this
file imports (served_package.SERVED_CODE) as code, so the logged model holds source and a weights file loaded with
weights_only=True: nothing pickled. MLflow runs this file when it loads the model; `set_model` at the end names
the model it serves.
"""

from __future__ import annotations

import os

from mnist_pipeline import cpu_kernels

# The kernels evaluate scored with, set before torch loads (in `mlflow models serve` it has not yet).
cpu_kernels.pin(os.environ)

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from mnist_pipeline.digits import DigitError, deskew, read_batch, to_tensor
from mnist_pipeline.model import Net

WEIGHTS = "weights"  # the artifact's name
# The model_config key served_package.served_config writes: whether the network trained on deskewed digits.
DESKEW = "deskew"
CHUNK = 1000  # images per forward pass, as evaluate's batch_size: memory stays flat for any batch


class BadRequest(MlflowException):
    """A request the model cannot read: `mlflow models serve` answers HTTP 400 with this one line, and serves on.

    The server writes "Failed to predict data '<the request>'" before the message of any MlflowException raised
    in predict, which would echo a whole batch back (megabytes for a few photos); this message keeps its line.
    """

    def __init__(self, message: str) -> None:
        self._line = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        pass  # the server's prefixed copy (see above); the line given to __init__ stays


class DigitClassifier(PythonModel):
    """The seed's network behind MNIST's preprocessing, deskewing where it trained so, and normalization; a softmax."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.net = Net()
        # Tensors only: weights_only=True refuses any pickled object that would run code.
        self.net.load_state_dict(torch.load(context.artifacts[WEIGHTS], map_location="cpu", weights_only=True))
        self.net.eval()
        self.deskew = (context.model_config or {}).get(DESKEW, False)
        if not isinstance(self.deskew, bool):
            raise MlflowException(f"model_config {DESKEW}: expected true or false, got {self.deskew!r}")

    # np.ndarray, what MLflow passes for the object tensor of served_package's signature; a hint MLflow infers no
    # signature from (list[...] would be taken as the signature, and a missing hint makes MLflow warn).
    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray,
                params: dict | None = None) -> pd.DataFrame:
        """Per image, the predicted digit and the probability of each digit 0-9."""
        try:
            pixels = read_batch(model_input)
        except DigitError as err:
            raise BadRequest(str(err)) from None
        if self.deskew:
            pixels = deskew(pixels)
        with torch.inference_mode():
            logits = torch.cat([self.net(to_tensor(pixels[i : i + CHUNK])) for i in range(0, len(pixels), CHUNK)])
        probabilities = torch.softmax(logits.double(), 1).numpy()
        return pd.DataFrame({"digit": logits.argmax(1).numpy(), "probabilities": list(probabilities)})


mlflow.models.set_model(DigitClassifier())
