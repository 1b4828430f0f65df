"""What the served model (served_model.py) is logged with: its code files, model_config, signature, input example and
requirements, and the SHA-256 of its code and config that, with the weights, makes a registered version.

No torch or MLflow at import: record's quick path takes the SHA-256 from here, and served_model.py, which MLflow runs
to load the model, imports both as it starts.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version as installed
from pathlib import Path

import mnist_pipeline
from mnist_pipeline.params import Params

PACKAGE = Path(mnist_pipeline.__file__).parent
# The files the served model runs (served_model.py imports the others), logged with its weights.
SERVED_CODE = ("__init__.py", "cpu_kernels.py", "digits.py", "model.py", "served_model.py")
# The names served_model.py reads, written out here as it imports torch (tests/test_record.py holds them equal).
WEIGHTS, DESKEW = "weights", "deskew"  # the weights' artifact, the model_config key
REQUIREMENTS = ("mlflow", "torch", "numpy", "Pillow")  # what the served model imports, pinned as installed here


def served_config(params: Params) -> dict[str, object]:
    """The served model's model_config: digits prepared as its network trained on them."""
    return {DESKEW: params.train.deskew}


def served_code_sha256(config: dict[str, object]) -> str:
    """SHA-256 of the files the served model runs and its model_config: with the weights, what a version is."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in SERVED_CODE:
        digest.update(f"{name}\0".encode() + (PACKAGE / name).read_bytes() + b"\0")
    return digest.hexdigest()


@contextmanager
def packaged(model_path: Path, raw: Path, params: Params) -> Iterator[dict[str, object]]:
    """mlflow.pyfunc.log_model's arguments for the served model; its code is copied to a folder the block may use.

    The weights are refused in one line unless they load (weights_only=True: no pickle) into this network. The
    model reads pixel arrays and PNG/JPEG files as clients have them; its input is one list whose items are either,
    which only an object tensor can say in an MLflow signature. The input example is the first test image as a PNG
    file, base64 as in a JSON request.
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array
    from PIL import Image

    from mnist_pipeline.data import load_mnist
    from mnist_pipeline.model import Net
    from mnist_pipeline.training import load_state_dict

    load_state_dict(model_path, Net())
    png = io.BytesIO()
    Image.fromarray(load_mnist(raw, "t10k")[0][0]).save(png, format="PNG")
    example = np.array([base64.b64encode(png.getvalue()).decode()], dtype=object)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
        outputs=Schema([ColSpec(DataType.long, "digit"), ColSpec(Array(DataType.double), "probabilities")]),
    )
    requirements = [f"{name}=={installed(name).split('+')[0]}" for name in REQUIREMENTS]
    with tempfile.TemporaryDirectory() as folder:
        code = Path(folder) / PACKAGE.name  # only what the served model runs, as the package it imports
        code.mkdir()
        for name in SERVED_CODE:
            shutil.copyfile(PACKAGE / name, code / name)
        yield {"python_model": str(code / "served_model.py"), "artifacts": {WEIGHTS: str(model_path)},
               "code_paths": [str(code)], "signature": signature, "input_example": example,
               "pip_requirements": requirements, "model_config": served_config(params)}
