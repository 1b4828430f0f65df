"""DVC stage download: the four MNIST IDX files, verified and uncompressed, into the raw-data folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mnist_pipeline.errors import run_stage
from mnist_pipeline.params import load_params
from mnist_pipeline.sources import default_sources, download_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="folder for the uncompressed IDX files")
    args = parser.parse_args()
    params = load_params()
    start = time.perf_counter()
    source = download_mnist(args.out, default_sources(params.download.timeout_s))
    print(f"download: verified MNIST files from {source} in {args.out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    run_stage(main)
