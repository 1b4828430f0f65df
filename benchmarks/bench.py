"""Benchmark: the project's training loop against the seed's, time to 99% accuracy, start-up and recording costs.

Run from the repo root after `dvc repro` (it reads data/raw and data/split):

    python -m benchmarks.bench                      # every section
    python -m benchmarks.bench --only kernel_pins   # one section; the others of reports/benchmark.json stay

This file is the runner; each section's measuring code is in a module of its own: benchmarks/loop.py (loop, ddp,
kernel_pins, gpu_epoch_s), recipes.py (default_recipe, fast_recipe, peer_recipe), record.py (record_s,
live_curves, team_server), record_vs_base.py (record), serving.py (evaluate_10k_s, serving) and pipeline_times.py
(startup_s, pipeline, noop_dvc_repro_s). The loops and recipes run in this one process on the same data, and
speeds are printed as ratios against a baseline measured here and now, so the numbers compare like with like on
whatever machine runs it. The stages, `mlflow models serve`, the team server, a fresh clone's `dvc repro` and the
loop with and without the CPU kernel pins (which a process reads once) run in subprocesses, and are reported as
wall times or ratios of turns taken in pairs (benchmarks/turns.py). It prints a table and writes the same numbers
to reports/benchmark.json, with the CPU each section ran on where it matters. No test asserts a time.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.bookkeeping import bookkeeping_cost
from benchmarks.loop import ddp_scaling, gpu_epoch_seconds, kernel_pin_cost, loop_against_loop
from benchmarks.pipeline_times import noop_repro_seconds, pipeline_times, startup_seconds
from benchmarks.recipes import fast_recipe_runs, peer_ratios, peer_time_to_accuracy, time_to_accuracy
from benchmarks.record import live_curves_cost, recording_seconds, team_server_ratio
from benchmarks.record_vs_base import DEFAULT_BASE, record_comparison
from benchmarks.serving import evaluation_seconds, serving_rates
from benchmarks.sweep import PARTS, sweep_comparisons, sweep_rows
from benchmarks.workspace import RAW, Tensors, load_workspace
from mnist_pipeline import cpu_kernels
from mnist_pipeline.files import atomic_write_json
from mnist_pipeline.params import Params, load_params

# The report's sections, in the order they run; `--only` takes any of them.
SECTIONS = ("loop", "ddp", "kernel_pins", "default_recipe", "fast_recipe", "peer_recipe", "record_s", "record",
            "live_curves", "team_server", "evaluate_10k_s", "serving", "startup_s", "pipeline", "noop_dvc_repro_s",
            "gpu_epoch_s", "bookkeeping", "sweep")
# A section's key in reports/benchmark.json is its name, but for `loop`'s: the key it had when the section was called
# `throughput`, which --only still takes.
REPORT_KEYS = {"loop": "throughput"}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def section_name(text: str) -> str:
    """A section's name, given as such or as its key in the report (`throughput` for `loop`)."""
    return next((name for name, key in REPORT_KEYS.items() if key == text), text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=positive_int, default=16_000, help="samples for the loop-against-loop ratio")
    parser.add_argument("--repeats", type=positive_int, default=3, help="repeats of the record stage's timing")
    parser.add_argument("--probe-every", type=positive_int, default=100, help="iterations between accuracy probes")
    parser.add_argument("--fast-runs", type=positive_int, default=5, help="runs of the fast recipe")
    parser.add_argument("--fast-probe-every", type=positive_int, default=20,
                        help="iterations between its accuracy probes")
    parser.add_argument("--plot-only-runs", type=positive_int, default=3, help="plot-only experiments timed in a clone")
    parser.add_argument("--peer-budget-s", type=float, default=400.0,
                        help="training seconds PyTorch's example recipe gets to reach 99.0%% test accuracy")
    parser.add_argument("--serve-requests", type=positive_int, default=300, help="single-image requests to the server")
    parser.add_argument("--pin-samples", type=positive_int, default=42_000, help="samples of each kernel pins' turn")
    parser.add_argument("--pin-repeats", type=positive_int, default=9, help="turns of the kernel pins' cost")
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help="the commit the record section compares this checkout with (default %(default)s)")
    parser.add_argument("--sweep-repeats", type=positive_int, default=3,
                        help="sweep: pairs of a trial and a plain dvc exp run")
    parser.add_argument("--sweep-trials", type=positive_int, default=4,
                        help="sweep: trials of each side of the workers' comparison")
    parser.add_argument("--sweep-space", type=Path, default=Path("sweep.yaml"),
                        help="sweep: the space of Optuna against DVC's queue (budget: 2 to the power of its params)")
    parser.add_argument("--sweep-parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="sweep: measure these comparisons alone, keeping the others of --out")
    parser.add_argument("--only", nargs="+", type=section_name, choices=SECTIONS, metavar="SECTION",
                        help=f"measure these alone, keeping the other sections of --out: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmark.json"))
    return parser.parse_args()


def section_table(args: argparse.Namespace, params: Params) -> dict[str, Callable[[], object]]:
    """Each section's measurement, by name; the data is read once, by the first section that needs it."""
    workspace = functools.cache(lambda: load_workspace(params.train.deskew))
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {}

    def data() -> Tensors:
        return workspace().data

    return {
        "loop": lambda: loop_against_loop(RAW, data(), params, args.samples),
        "ddp": lambda: ddp_scaling(*data()["train"], params, args.samples, args.repeats),
        "kernel_pins": lambda: kernel_pin_cost(args.pin_samples, args.pin_repeats),
        "default_recipe": lambda: time_to_accuracy(data(), params, 0.99, args.probe_every),
        "fast_recipe": lambda: fast_recipe_runs(workspace(), params, args.fast_runs, args.fast_probe_every),
        # Probed every 100 of its batches of 64 (6,400 samples; ours: 25,600 for the default, 2,560 for the fast).
        "peer_recipe": lambda: peer_time_to_accuracy(data(), params.seed, params.train.num_threads, 0.99, 100,
                                                     args.peer_budget_s),
        "record_s": lambda: recording_seconds(args.repeats),
        "record": lambda: record_comparison(args.base, args.repeats),
        "bookkeeping": lambda: bookkeeping_cost(args.repeats),
        "live_curves": lambda: live_curves_cost(args.repeats),
        "team_server": lambda: team_server_ratio(args.repeats),
        "evaluate_10k_s": lambda: evaluation_seconds(data(), params),
        "serving": lambda: serving_rates(workspace().test_images, Path("models/model.pt"), params.train.num_threads,
                                         args.serve_requests),
        "startup_s": startup_seconds,
        "pipeline": lambda: pipeline_times(Path.cwd(), RAW, params.plot.n_images, args.plot_only_runs),
        "noop_dvc_repro_s": noop_repro_seconds,
        "gpu_epoch_s": lambda: gpu_epoch_seconds(data(), params),
        "sweep": lambda: sweep_comparisons(args.sweep_repeats, args.sweep_trials, args.sweep_space, args.sweep_parts,
                                           earlier.get("sweep")),
    }


def main() -> None:
    args = parse_args()
    if args.only and not args.out.exists():
        raise SystemExit(f"error: {args.out}: --only updates an earlier report; run the whole benchmark once first")
    params = load_params()
    sections = section_table(args, params)
    report = json.loads(args.out.read_text()) if args.only else {}
    cpu = cpu_kernels.cpuinfo_field("model name") or "unknown"
    for name in args.only or SECTIONS:
        key = REPORT_KEYS.get(name, name)
        report[key] = sections[name]()
        report.setdefault("measured_on", {})[key] = cpu  # --only mixes sections of other runs, maybe other CPUs
    report.update(threads=params.train.num_threads, torch=torch.__version__)
    report["peer_ratios"] = peer_ratios(report["peer_recipe"], report["default_recipe"], report["fast_recipe"])
    atomic_write_json(args.out, report)
    print_table(report)


def serving_rows(serving: dict) -> list[tuple[str, str]]:
    """Per payload: the server's rate and latency, the forward pass's, and their ratio."""
    rows = []
    for name, r in serving.items():
        s, f = r["serve"], r["forward"]
        rows += [(f"mlflow models serve, {name}",
                  f"{s['per_s']} requests/s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms"),
                 (f"  forward pass, batch of {r['batch']}", f"{f['per_s']} calls/s, p50 {f['p50_ms']} ms, "
                  f"p99 {f['p99_ms']} ms"),
                 ("  ratio, serving / forward pass", f"{r['ratio']}x")]
    return rows


def print_table(report: dict) -> None:
    """The numbers a person reads, one per line."""
    t, r, k, d = report["throughput"], report["default_recipe"], report["record_s"], report["ddp"]
    rows = [
        ("seed-style loop (batch 16, DataLoader)", f"{t['seed_style_per_s']} samples/s"),
        ("project loop (default recipe)", f"{t['project_per_s']} samples/s"),
        ("throughput ratio, project / seed-style", f"{t['ratio']}x"),
        ("project loop, 1 process x 1 thread", f"{d['one_by_1_per_s']} samples/s"),
        ("project loop, 1 process x 2 threads", f"{d['one_by_2_per_s']} samples/s"),
        ("project loop, 2 processes x 1 thread (torchrun, Gloo)", f"{d['two_by_1_per_s']} samples/s"),
        ("  ratio, 2 processes x 1 / 1 process x 2 threads", f"{d['ratio_two_by_1_over_one_by_2']}x"),
        ("  scaling efficiency, 2 processes / (2 x 1 process, 1 thread)", f"{d['scaling_efficiency']}"),
        *kernel_pin_rows(report.get("kernel_pins")),
        ("default recipe: training time", f"{r['train_seconds']} s"),
        (f"  validation accuracy first >= 99.0% (probed every {r['probe_every']} it)",
         f"{r['val_reaches_target_s']} s"),
        ("  test accuracy first >= 99.0%", f"{r['test_reaches_target_s']} s"),
        ("  final test accuracy (best model)", f"{100 * r['final_test_acc']:.2f}%"),
        *fast_rows(report["fast_recipe"]),
        *peer_rows(report["peer_recipe"], report["peer_ratios"]),
        ("record stage, a new model (store created)", f"{k['new_model_s']} s"),
        ("record stage, a model already registered", f"{k['known_model_s']} s"),
        ("tracking overhead, (training + record) / training",
         f"{(r['train_seconds'] + k['new_model_s']) / r['train_seconds']:.3f}"),
        *record_rows(report.get("record")),
        *bookkeeping_rows(report.get("bookkeeping")),
        *live_curves_rows(report.get("live_curves")),
        *team_server_rows(report["team_server"]),
        ("evaluate 10,000 test images", f"{report['evaluate_10k_s']} s"),
        *serving_rows(report["serving"]),
        *((f"start-up of stage {s}", f"{v} s") for s, v in report["startup_s"].items()),
        *pipeline_rows(report["pipeline"]),
        ("no-op `dvc repro`", "n/a (not up to date)" if report["noop_dvc_repro_s"] is None
         else f"{report['noop_dvc_repro_s']} s"),
        ("GPU epoch", "n/a (no CUDA device)" if report["gpu_epoch_s"] is None else f"{report['gpu_epoch_s']} s"),
        *sweep_rows(report.get("sweep")),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def live_curves_rows(live: dict | None) -> list[tuple[str, str]]:
    if live is None:
        return [("train stage with its live MLflow run / without", "n/a (not measured in this report)")]
    return [(f"train stage ({live['epochs']} epoch) with its live MLflow run / without, loop",
             f"{live['loop']['on_s']} s / {live['loop']['off_s']} s = {live['loop']['ratio']}x "
             f"({live['loop']['ratio_min']}-{live['loop']['ratio_max']})"),
            ("  the whole stage", f"{live['stage']['on_s']} s / {live['stage']['off_s']} s = {live['stage']['ratio']}x "
                                  f"({live['stage']['ratio_min']}-{live['stage']['ratio_max']})")]


def bookkeeping_rows(cost: dict | None) -> list[tuple[str, str]]:
    """This checkout's bookkeeping against 817411a's, and where a new-model record's time goes."""
    if cost is None:
        return [("bookkeeping, this checkout / 817411a", "n/a (not measured in this report)")]
    rows = [(f"bookkeeping, this checkout / {cost['base']} (medians of pairs)", "")]
    for what, key in (("a new-model record, new store", "new_model_record"),
                      ("one-epoch `dvc exp run`, outside its training loop", "exp_run_outside_loop")):
        pair = cost[key]
        rows.append((f"  {what}", f"{pair['now_s']} s / {pair['base_s']} s = {pair['ratio']}x "
                                  f"({pair['ratio_min']}-{pair['ratio_max']})"))
    rows.append(("a new-model record of this checkout, by part (wall s, CPU s)", ""))
    rows += [(f"  {part}", f"{wall} s, {cpu} CPU-s") for part, (wall, cpu) in cost["record_parts"].items()]
    if "load_torch_mlflow_and_exit" in cost:  # reports from before mnist_pipeline/import_gc.py have none
        pair = cost["load_torch_mlflow_and_exit"]
        rows.append(("a process loading torch and MLflow, then exiting: collector paused / Python's",
                     f"{pair['now_s']} s / {pair['base_s']} s = {pair['ratio']}x "
                     f"({pair['ratio_min']}-{pair['ratio_max']})"))
    return rows


def record_rows(record: dict | None) -> list[tuple[str, str]]:
    """This checkout's record against the base commit's, each a median of pairs (ratio: now / base)."""
    if record is None:
        return [("record, this checkout / base commit", "n/a (not measured in this report)")]

    def row(what: str, pair: dict) -> tuple[str, str]:
        return (f"  {what}", f"{pair['now_s']} s / {pair['base_s']} s = {pair['ratio']}x "
                             f"({pair['ratio_min']}-{pair['ratio_max']})")

    rows = [(f"record, this checkout / {record['base']} (medians of pairs)", ""),
            row("a new model, new store", record["new_model_new_store"]),
            row("the same result again (base: a known model)", record["same_result_again"]),
            row("a new model, store of 10 runs", record["new_model_store_of_10_runs"]),
            row("a new model, store of 1,000 runs", record["new_model_store_of_1000_runs"]),
            row("check before training, store of 10 runs", record["check_before_training_10_runs"]),
            row("check before training, store of 1,000 runs", record["check_before_training_1000_runs"]),
            row("plot-only `dvc exp run`", record["plot_only_dvc_exp_run"])]
    for what in ("new_model_store_of", "check_before_training"):
        growth = record[f"{what}_growth_1000_over_10"]
        rows.append((f"  {what.replace('_', ' ')}: 1,000 runs / 10 runs", f"{growth['now']}x (base {growth['base']}x)"))
    team = record["team_server"]
    if team is not None:
        rows.append(("  team server / local store, a new model",
                     f"{team['now']['ratio']}x ({team['now']['ratio_min']}-{team['now']['ratio_max']}); "
                     f"base {team['base']['ratio']}x"))
    return rows


def kernel_pin_rows(pins: dict | None) -> list[tuple[str, str]]:
    if pins is None:
        return [("project loop, CPU kernels pinned / not pinned", "n/a (not measured in this report)")]
    capability = pins["cpu_capability"]
    return [
        (f"project loop, CPU kernels pinned ({capability['pinned']}, as the stages run)",
         f"{pins['pinned_per_s']} samples/s"),
        (f"project loop, CPU kernels not pinned ({capability['unpinned']})", f"{pins['unpinned_per_s']} samples/s"),
        (f"  ratio, pinned / not pinned: median of {pins['repeats']} back-to-back pairs",
         f"{pins['ratio_pinned_over_unpinned']}x (pairs {pins['ratio_range'][0]}x to {pins['ratio_range'][1]}x; "
         f"{pins['cpu']})"),
    ]


def fast_rows(fast: dict) -> list[tuple[str, str]]:
    times = ", ".join("-" if t is None else f"{t}" for t in fast["test_reaches_target_s"])
    overrides = " ".join(f"-S train.{k}={str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in fast["overrides"].items())
    deskewing = [] if fast.get("deskew_70k_images_s") is None else [
        ("  deskewing the 70,000 images first (not in the times below)", f"{fast['deskew_70k_images_s']} s")]
    return [
        ("fast recipe (docs/parameters.md)", overrides),
        *deskewing,
        (f"  test accuracy first >= 99.0% (probed every {fast['probe_every']} it)", f"after {times} s"),
        (f"  median, range; runs within {fast['bar_s']:.0f} s",
         f"{fast['median_s']} s, {fast['range_s']}; {fast['runs_within_bar']} of {fast['runs']}"
         if fast["median_s"] is not None else f"{fast['runs_reaching_target']} of {fast['runs']} reached 99.0%"),
        ("  final test accuracy (best model); same weights every run",
         f"{100 * fast['final_test_acc']:.2f}%; {fast['same_weights_every_run']}"),
    ]


def peer_rows(peer: dict, ratios: dict) -> list[tuple[str, str]]:
    name = f"peer, PyTorch's example: test accuracy first >= 99.0% (probed every {peer['probe_every']} it)"
    if peer["test_reaches_target_s"] is None:
        last = f"last probe {100 * peer['last_test_acc']:.2f}%"
        first, bound = f"not within {peer['budget_s']:.0f} s ({last})", "at least "
    else:
        before = f"the probe before: {peer['last_probe_below_target_s']} s"
        first, bound = f"{peer['test_reaches_target_s']} s ({before})", ""
    return [(name, first), *((f"  ratio, peer's time to 99.0% / {recipe} recipe's",
                              "n/a" if ratios[recipe] is None else f"{bound}{ratios[recipe]}x")
                             for recipe in ("default", "fast"))]


def pipeline_rows(pipeline: dict) -> list[tuple[str, str]]:
    def shares(split: dict) -> str:
        ran = ", ".join(f"{name} {s}" for name, s in split["ran"].items())
        skipped = ", ".join(split["skipped"]) or "none"
        return f"DVC start-up {split['dvc_start']}, {ran} s (skipped: {skipped})"

    runs = pipeline["plot_only_exps"]
    middle = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
    return [
        ("fresh clone `dvc repro` (MNIST from a local mirror)", f"{pipeline['fresh_clone_repro_s']} s"),
        ("  by stage", shares(pipeline["stages"])),
        ("  all but the training loop", f"{pipeline['fresh_clone_without_training_loop_s']} s "
                                        f"(the loop: {pipeline['training_loop_s']} s)"),
        ("plot-only `dvc exp run -S plot.n_images=...`",
         f"median {pipeline['plot_only_exp_median_s']} s of {[run['seconds'] for run in runs]}"),
        (f"  by stage (n_images={middle['n_images']})", shares(middle)),
    ]


def team_server_rows(team: dict | None) -> list[tuple[str, str]]:
    if team is None:
        return [("record stage, team server / local SQLite", "n/a (no PostgreSQL)")]
    return [
        ("record stage, team server / local SQLite, a new model",
         f"{team['new_model_ratio']}x ({team['new_model_server_s']} s / {team['new_model_sqlite_s']} s)"),
        ("record stage, team server / local SQLite, a known model",
         f"{team['known_model_ratio_median']}x (median of {team['pairs']}; "
         f"{team['known_model_ratio_min']} to {team['known_model_ratio_max']})"),
    ]



if __name__ == "__main__":
    main()
