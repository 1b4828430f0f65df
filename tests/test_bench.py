"""The benchmark's bookkeeping: the docs' fast recipe is the one it times, and its report reads DVC's output right.

No test times anything: speed is measured by `python -m benchmarks.bench`, never asserted.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.pipeline_times import LOOP_DONE, plot_only_values, stage_seconds
from benchmarks.recipes import FAST_RECIPE, peer_ratios
from mnist_pipeline.tracking import live_run
from stages import train
from tests.conftest import committed_params, doc_block, pipeline_commands


def test_docs_fast_recipe_is_the_one_the_benchmark_times() -> None:
    lines = [line for line in doc_block("# the fast recipe", "bash").splitlines() if line.endswith("# the fast recipe")]
    assert len(lines) == 1, "the docs give the fast recipe as one `dvc exp run -S ...  # the fast recipe` line"
    assert lines[0].startswith("dvc exp run -S ")
    overrides = {key: yaml.safe_load(value) for key, value in re.findall(r"-S (\S+)=(\S+)", lines[0])}  # as -S parses
    expected = {f"train.{key}": value for key, value in FAST_RECIPE.items()}
    typed = {k: (type(v), v) for k, v in overrides.items()}  # DVC writes `deskew=1` as 1, which params refuse
    assert typed == {k: (type(v), v) for k, v in expected.items()}
    # Every override names a real train param, and differs from the committed default (else it would not be one).
    train = committed_params()["train"]
    assert all(train[key] != value for key, value in FAST_RECIPE.items())


def test_the_benchmark_reads_the_loop_time_from_what_the_train_stage_prints(
    pipeline: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(live_run.SWITCH_ENV, "off")  # the stage's own output is what is read; no run needed
    monkeypatch.setattr(sys, "argv", ["train", *pipeline_commands()["train"]])
    start = time.perf_counter()
    train.main()
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    found = [float(match.group(1)) for line in out.splitlines() if (match := LOOP_DONE.search(line))]
    # The stage prints the loop's seconds to one decimal: a loop of 0.096 s prints 0.1.
    assert len(found) == 1 and 0 < found[0] <= elapsed + 0.05, (found, elapsed)


def test_stage_seconds_splits_a_repro_at_its_stage_lines() -> None:
    lines = [(0.5, "Verifying data sources in stage: 'data/raw.dvc'"), (1.0, "Running stage 'download':"),
             (1.1, "> python -m stages.download data/raw"), (3.0, "Running stage 'train':"),
             (63.0, "Stage 'evaluate' didn't change, skipping"), (63.5, "Running stage 'record':"),
             (70.0, "Updating lock file 'dvc.lock'")]
    assert stage_seconds(71.0, lines) == {"dvc_start": 1.0, "ran": {"download": 2.0, "train": 60.0, "record": 7.5},
                                          "skipped": {"evaluate": 0.5}}
    assert stage_seconds(2.0, [(1.0, "Stage 'plot' didn't change, skipping")]) == {
        "dvc_start": 1.0, "ran": {}, "skipped": {"plot": 1.0}}
    with pytest.raises(ValueError, match="wording"):
        stage_seconds(2.0, [(1.0, "Data and pipelines are up to date.")])


def test_plot_only_values_are_new_results() -> None:
    assert plot_only_values(25, 3) == [9, 10, 11]
    assert plot_only_values(10, 3) == [9, 11, 12]


def test_peer_ratios_are_a_lower_bound_when_the_peer_missed_99() -> None:
    default, fast = {"test_reaches_target_s": 40.0}, {"median_s": 10.0}
    reached = peer_ratios({"test_reaches_target_s": 120.0, "train_seconds": 125.0}, default, fast)
    assert reached == {"peer_reached": True, "default": 3.0, "fast": 12.0}
    missed = peer_ratios({"test_reaches_target_s": None, "train_seconds": 400.0}, default, {"median_s": None})
    assert missed == {"peer_reached": False, "default": 10.0, "fast": None}
    # A time of 0.0 is a time (reached at the first probe), not a miss; ours at 0.0 has no ratio.
    instant = peer_ratios({"test_reaches_target_s": 0.0, "train_seconds": 5.0}, {"test_reaches_target_s": 0.0}, fast)
    assert instant == {"peer_reached": True, "default": None, "fast": 0.0}
