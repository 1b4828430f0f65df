"""Serving the registered model as the docs say: its commands, read from README.md and docs/serving.md, run as written.

The model comes from a real `dvc repro` on the real data (training shrunk to one epoch) in a clone of the project.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from mnist_pipeline.data import load_mnist
from tests.conftest import REPO, copy_workdir, doc_block, free_port, project_env, serving
from tests.test_digits import LIGHTS, as_file, drawn_dark, uneven_paper

pytestmark = pytest.mark.slow
README_PORT = "5001"  # the port the README's commands use; the tests swap in a free one
EXAMPLE = re.compile(r"examples/digits/(\d+)_(\d)\S*\.(?:png|jpg)")


def post(url: str, body: object) -> tuple[int, dict]:
    """POST JSON; the status and the decoded answer, errors included."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def label_of(text: str) -> int:
    """The label in an example file's path, examples/digits/<test index>_<label>..."""
    return int(EXAMPLE.search(text).group(2))


def example_request(path: Path) -> dict:
    return {"inputs": [base64.b64encode(path.read_bytes()).decode()]}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, real_baseline: Path) -> Path:
    """A copy of the session's clone whose pipeline ran on the real data: its mlflow.db holds mnist-cnn@champion."""
    return copy_workdir(real_baseline, tmp_path_factory.mktemp("serving") / "repo")


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[str]:
    """The README's `mlflow models serve` command, in the repo root, on a free port; stopped after the module."""
    command = doc_block("mlflow models serve", "bash").strip()
    port = free_port()
    # `timeout` stops the server even if this process dies before its teardown.
    with serving(["timeout", "1200", "bash", "-c", command.replace(README_PORT, str(port))], port, "/ping", repo,
                 project_env()) as base:
        yield f"{base}/invocations"


def test_example_digits_are_real_mnist_test_digits(repo: Path) -> None:
    images, labels = load_mnist(repo / "data/raw", "t10k")
    files = sorted((REPO / "examples/digits").iterdir())
    for path in files:
        index, label = (int(n) for n in EXAMPLE.search(str(path.relative_to(REPO))).groups())
        assert labels[index] == label, path.name
    assert np.array_equal(np.asarray(Image.open(REPO / "examples/digits/0_7.png")), images[0])


def test_readme_curl_answers_with_the_digit(repo: Path, server: str) -> None:
    command = doc_block("curl", "bash").strip()
    label = label_of(command)
    url = server.removeprefix("http://").removesuffix("/invocations")
    out = subprocess.run(["bash", "-c", command.replace(f"127.0.0.1:{README_PORT}", url)], cwd=repo,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    (answer,) = json.loads(out)["predictions"]
    assert answer["digit"] == label
    assert len(answer["probabilities"]) == 10 and sum(answer["probabilities"]) == pytest.approx(1)
    assert int(np.argmax(answer["probabilities"])) == label
    # Every example file, whatever its size, polarity and format, is read as its digit.
    for path in sorted((REPO / "examples/digits").iterdir()):
        status, answer = post(server, example_request(path))
        assert status == 200 and answer["predictions"][0]["digit"] == label_of(path.relative_to(REPO).as_posix())


def test_bad_requests_get_400_in_one_line_and_the_server_keeps_serving(repo: Path, server: str) -> None:
    images, labels = load_mnist(repo / "data/raw", "t10k")
    seven = images[0].tolist()
    bad = [
        ({"inputs": ["aGVsbG8gd29ybGQ="]}, "inputs[0]: not a PNG or JPEG file"),  # base64 of "hello world"
        ({"inputs": ["not base64!"]}, "inputs[0]: text that is not base64"),
        ({"inputs": [[row[:27] for row in seven]]}, "got an array of shape (1, 28, 27)"),
        ({"inputs": (images[:2] / 255).tolist()}, "pixels must be whole numbers 0-255"),  # floats scaled by hand
        ({"inputs": [[[300] * 28] * 28]}, "got 300 at image 0, row 0, column 0"),
        ({"inputs": [seven, None]}, "inputs[1]: expected 28x28 pixels or a base64 PNG/JPEG file, got null"),
        # Pixels that are not JSON numbers, blank pixel arrays and wrapped base64, each refused saying why.
        *(({"inputs": [[[value] + row[1:] for row in seven]]}, f"expected numbers 0-255 (JSON numbers, not text "
                                                               f"or true/false), got {kind}")
          for value, kind in (("255", "str"), (" 7 ", "str"), ("1e2", "str"), (True, "bool"))),
        ({"inputs": [seven, [[0] * 28] * 28]}, "inputs[1]: no digit found"),
        ({"inputs": [[[255] * 28] * 28]}, "inputs[0]: no digit found"),
        ({"inputs": [base64.encodebytes((REPO / "examples/digits/0_7.png").read_bytes()).decode()]},
         "inputs[0]: base64 text with line breaks inside"),
        ({"inputs": [0] * 10_001}, "inputs: 10001 images is over the limit of 10,000 a request"),
        ({"inputs": []}, "Failed to enforce schema"),  # MLflow's own check, before the model sees it
        ({"dataframe_split": "x"}, "Dataframe split format must be a dictionary"),
    ]
    for body, message in bad:
        status, answer = post(server, body)
        assert status == 400 and message in answer["message"], (body if len(str(body)) < 200 else message, answer)
        if not message.startswith(("Failed", "Dataframe")):  # the model's own messages: one line, no echo
            assert "\n" not in answer["message"] and len(answer["message"]) < 300, answer["message"]
        status, answer = post(server, {"inputs": [seven]})
        assert status == 200 and answer["predictions"][0]["digit"] == labels[0]

    # A 16-bit grayscale PNG, dark ink on light paper: scaled to 8 bits, not clipped to white.
    big = np.asarray(Image.fromarray(images[0]).resize((112, 112))).astype(np.uint16) * 257
    png = io.BytesIO()
    Image.fromarray(65535 - big).save(png, format="PNG")
    status, answer = post(server, {"inputs": [base64.b64encode(png.getvalue()).decode()]})
    assert status == 200 and answer["predictions"][0]["digit"] == labels[0]

    # The largest batch taken, all 10,000 test images as pixel arrays: answered, as evaluate scored them.
    status, answer = post(server, {"inputs": images.tolist()})
    assert status == 200
    predicted = np.array([p["digit"] for p in answer["predictions"]])
    expected = json.loads((repo / "reports/metrics.json").read_text())["test"]["accuracy"]
    assert (predicted == labels).mean() == pytest.approx(expected, abs=1e-9)


def test_readme_models_predict_reads_the_request_file(repo: Path) -> None:
    commands = doc_block("mlflow models predict", "bash")
    label = label_of(commands)
    out = subprocess.run(["bash", "-e", "-c", commands], cwd=repo, env=project_env(), capture_output=True,
                         text=True, timeout=300, check=True).stdout
    (answer,) = json.loads(out[out.index('{"predictions"'):])["predictions"]
    assert answer["digit"] == label


def test_readme_python_predicts_the_test_set_with_evaluates_accuracy(repo: Path) -> None:
    code = doc_block("mlflow.pyfunc.load_model", "python")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=project_env(), capture_output=True,
                         text=True, timeout=300, check=True).stdout
    accuracy = float(re.search(r"^test accuracy (\S+)$", out, re.M).group(1))
    assert accuracy == json.loads((repo / "reports/metrics.json").read_text())["test"]["accuracy"]
    assert int(re.search(r"^digit (\d)$", out, re.M).group(1)) == label_of(code)


def test_the_logged_model_holds_no_pickle_and_serves_its_own_input_example(repo: Path, server: str,
                                                                           tmp_path: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    folder = Path(mlflow.artifacts.download_artifacts("models:/mnist-cnn@champion", dst_path=str(tmp_path)))
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
    assert {"served_model.py", "artifacts/model.pt", "code/mnist_pipeline/digits.py"} <= files
    example = json.loads((folder / "serving_input_example.json").read_text())
    assert example == example_request(REPO / "examples/digits/0_7.png")
    status, answer = post(server, example)  # the input example, as logged, accepted as is
    assert status == 200 and [p["digit"] for p in answer["predictions"]] == [7]


def test_digits_under_uneven_light_read_as_on_clean_paper_and_blank_paper_is_refused(repo: Path, server: str) -> None:
    """The first 1,000 test digits drawn dark on clean paper, and on paper lit unevenly (each light in turn, grey
    200 to 250, grain 4, PNG and JPEG): at most 1 point of accuracy lost. Blank paper and a speck: refused."""
    images, labels = load_mnist(repo / "data/raw", "t10k")
    count = 1000
    clean = [as_file(drawn_dark(digit, np.full((300, 300), 240.0)), "PNG") for digit in images[:count]]
    uneven = [as_file(drawn_dark(digit, uneven_paper(LIGHTS[i % 4], 4, seed=i)), ("PNG", "JPEG")[i // 4 % 2])
              for i, digit in enumerate(images[:count])]
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/mnist-cnn@champion")
    read = {name: model.predict(np.array(files, dtype=object))["digit"].to_numpy()
            for name, files in (("clean", clean), ("uneven", uneven))}
    accuracy = {name: float((digits == labels[:count]).mean()) for name, digits in read.items()}
    assert accuracy["uneven"] >= accuracy["clean"] - 0.01, accuracy

    # Through the served model: the same answers, and the blank paper and speck refused in one line.
    status, answer = post(server, {"inputs": [base64.b64encode(f).decode() for f in uneven[:40]]})
    assert status == 200 and [p["digit"] for p in answer["predictions"]] == read["uneven"][:40].tolist()
    speck = uneven_paper("left to right", 0, shades=(240, 240))
    speck[100:104, 200:204] = 100
    for page, fmt, words in ((uneven_paper("left to right", 4), "PNG", "the image is blank paper"),
                             (uneven_paper("left to right", 4), "JPEG", "the image is blank paper"),
                             (speck, "PNG", "the only marks span 4x4 pixels of 300x300")):
        status, answer = post(server, {"inputs": [base64.b64encode(as_file(page, fmt)).decode()]})
        assert status == 400 and answer["message"].startswith(f"inputs[0]: no digit found: {words}"), answer
        assert "\n" not in answer["message"] and len(answer["message"]) < 300, answer["message"]
