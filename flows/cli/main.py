"""The `fsad` command line. Each subcommand parses its arguments and calls one function.

Every failure exits non-zero with a one-line reason on stderr (no traceback unless FSAD_DEBUG=1);
`fsad retrain` names the log file that keeps the flow's whole record.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from fsad_core.options import (
    BUNDLED_BACKBONES,
    FLIPS,
    INTENSITY_POLICIES,
    METHOD_NAMES,
    POOLINGS,
    RESIZE_MODES,
    SCORE_KINDS,
)
from infra.config import telemetry_off

INTERRUPT_GRACE_S = 2.0  # from the signal, an interrupted command's clean-up may take this long
INTERRUPTED = 130  # the exit status of a command ended by Ctrl-C or SIGTERM
# Without PREFECT_API_URL, flows run on Prefect's ephemeral API, whose 20 s start-up limit is too
# short on small busy machines (read when prefect is first imported, after `main` sets it).
_EPHEMERAL_API = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}

METHODS_HELP = ("methods of the registry: " + ", ".join(METHOD_NAMES) + "; default is the best measured setting, "
                "fast the patch score alone at 224 px (docs/method.md)")
# Help of the detector options; the defaults they name are DetectorConfig's (a test keeps them true).
BACKBONE_DEFAULT = "(default: the method's, tf_efficientnet_lite0)"
SIZE_HELP = "input size in pixels, square (default: the method's, 224)"
PATCH_SIZE_HELP = ("input size of the patch branch (default: the method's, 320; fast: as --size); larger finds "
                   "smaller defects")
RESIZE_HELP = ("input resize policy (default: the method's, tile). tile: square tiles along the long side, "
               "nothing stretched; resize: plain, to a square; letterbox: padded to a square")
INTENSITY_HELP = ("grey levels as shot, or standardised per image for parts whose shots differ in exposure; "
                  "auto (the default) standardises grey images and keeps colour ones raw")
POOLING_HELP = "statistics over positions of the image-level embeddings (default: the method's, mean+std+max)"
CORESET_HELP = ("choose the patch memory from a seeded random subsample of at most N patches (default: the method's, "
                "40000; at least 10000); all (or 0): from every patch, several times slower with many images or tiles")
MAP_SIGMA_HELP = ("blur of the anomaly map in pixels at 224, scaled with the patch side (default: the method's, 4; "
                  "0: none); larger suits defects that spread, smaller pores and fine cracks")
FLIPS_HELP = ("mirror images among the augmented views (default: the method's, horizontal); none for text-bearing "
              "or handed parts, both for parts that look the same mirrored either way")
ROTATION_HELP = ("largest rotation of the augmented views in degrees, 0 to 180 (default: the method's, 10); 0 for "
                 "parts always shot at one angle")
FALSE_ALARM_HELP = ("share of normal images the unsupervised threshold may flag (default 0.01); with few images "
                    "the threshold is wide, a higher target catches more defects")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _finite(text: str) -> float:
    """argparse type: a finite number (a threshold)."""
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _sigma(text: str) -> float:
    """argparse type: a blur in pixels, 0 <= sigma < 64 (the bound the detector enforces)."""
    value = _number(text)
    if not 0.0 <= value < 64.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to below 64, got {text}")
    return value


def _degrees(text: str) -> float:
    """argparse type: a rotation in degrees, 0 <= deg <= 180 (the bound AugmentConfig enforces)."""
    value = _number(text)
    if not 0.0 <= value <= 180.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 180, got {text}")
    return value


def _candidates(text: str) -> int:
    """argparse type: a patch count, or `all` (0: no subsample)."""
    if text == "all":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number or 'all': {text!r}") from None


# Each command checks its arguments with `flows.cli.preflight` before it imports what loads torch
# or starts a server: a wrong path, product or model costs a moment, not a start-up.

def _cmd_demo(args: argparse.Namespace) -> int:
    from flows.cli import preflight
    if args.data is not None:
        preflight.category(args.data)
    from flows.cli.demo import run_demo
    return run_demo(workdir=args.workdir, data=args.data)


def _cmd_train(args: argparse.Namespace) -> int:
    from flows.cli import preflight
    preflight.category(args.data)
    from flows.cli.commands import train
    return train(args)


def _cmd_score(args: argparse.Namespace) -> int:
    from flows.cli import preflight
    from flows.settings import locations
    preflight.paths(args.images)
    if args.runtime == "onnx":
        preflight.exported(args.model)
    else:
        preflight.model(args.model, locations())
    from flows.cli.commands import score
    return score(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from flows.cli import preflight
    from flows.settings import locations
    preflight.model(args.model, locations())
    if args.images:
        preflight.paths(args.images)
    from flows.cli.commands import export
    return export(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from fsad_core.data import find_all_categories
    find_all_categories(args.data)
    from flows.cli.commands import bench
    return bench(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from flows.cli.commands import report
    return report(args)


def _cmd_settings(args: argparse.Namespace) -> int:
    from flows.cli.commands import product_settings
    return product_settings(args)


def _cmd_label(args: argparse.Namespace) -> int:
    from flows.settings import load_settings
    from flows.store.labels import add_labels, current_labels, default_labeller, label_counts, read_sources
    from flows.store.queue import drawn, read_queue
    from flows.store.storage import open_store, validate_name
    validate_name(args.product, "product name")
    store = open_store(load_settings().storage_url)
    entries = add_labels(store, args.product, read_sources(store, args.images), args.label,
                         args.by or default_labeller(), args.reason, args.type, drawn(read_queue(store, args.product)))
    for entry in entries:
        print(f"{entry.source}: {entry.label}{f' ({entry.defect_type})' if entry.defect_type else ''} "
              f"by {entry.by} ({entry.image_sha256[:12]})")
    counts = label_counts(current_labels(store, args.product).values())
    print(f"{args.product}: {counts['good']} good and {counts['defect']} defect images labelled")
    return 0


def _cmd_control(args: argparse.Namespace) -> int:
    from flows.mlops import control, tracking
    from flows.settings import load_settings
    from flows.store.labels import default_labeller
    from flows.store.storage import open_store, validate_name
    validate_name(args.product, "product name")
    settings = load_settings()
    tracking.configure(settings)
    store, by = open_store(settings.storage_url), args.by or default_labeller()
    if args.command == "promote":
        done = control.promote_by_hand(store, args.product, args.version, by, args.why)
    elif args.command == "rollback":
        done = control.rollback(store, args.product, by, args.why)
    else:
        done = control.pin(store, args.product, not args.off, by, args.why)
    print(f"{args.product}: {done.action} by {done.by} ({done.why}); champion "
          f"{('v' + done.version) if done.version else 'unset'}")
    return 0


def _cmd_review_queue(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from flows.settings import load_settings
    from flows.store.queue import queue_state
    from flows.store.storage import open_store, validate_name
    validate_name(args.product, "product name")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n {args.n}: at least 1")
    state = queue_state(open_store(load_settings().storage_url), args.product)
    items = state.items[:args.n]
    for item in items:
        print(json.dumps(asdict(item)) if args.json else
              f"{item.score:10.4g}  {'flagged' if item.is_anomaly else 'passed ':7}  {item.reason:18}  {item.image}")
    escape = state.escape
    print(f"{args.product}: {len(items)} images to review" + (
        "" if escape is None else f"; estimated escape rate {escape.rate:.3f} (90 % interval {escape.low:.3f}-"
                                  f"{escape.high:.3f}, {escape.defects} defects in {escape.passed_labelled} labelled "
                                  f"images the model passed)"), file=sys.stderr)
    return 0


def _cmd_review(args: argparse.Namespace) -> int:
    from flows.review.serve import serve

    serve(args.host, args.port, args.product)
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fsad_core.data import load_category
    load_category(args.data)  # a wrong path is named before anything starts
    for name in ("k", "days", "per_day", "reviews"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: at least 1")
    from flows.cli.simulate import run_simulation
    return run_simulation(args)


def _cmd_upload(args: argparse.Namespace) -> int:
    from flows.store.upload import cli_upload
    return cli_upload(args.product, args.dir, args.resume)


def _cmd_retrain(args: argparse.Namespace) -> int:
    from flows.cli import preflight
    from flows.settings import locations
    from flows.store.storage import validate_name
    validate_name(args.product, "product name")  # before its name makes a log file's or a flow run's
    if args.upload is not None:
        validate_name(args.upload, "upload id")
    preflight.upload(args.product, args.upload, locations())
    from flows.pipeline.retrain import retrain_flow
    from flows.pipeline.runlog import logged_to, run_log_path
    from flows.pipeline.runners import prefect_api
    from flows.pipeline.summary import GATE_FAILED, RetrainSummary
    from flows.settings import load_settings
    with prefect_api(), logged_to(run_log_path(load_settings().home, "retrain", args.product)) as log:
        try:
            summary = RetrainSummary.from_dict(retrain_flow(args.product, upload_id=args.upload))
        except Exception as exc:
            exc.add_note(f"full log: {log}")
            raise
    print(summary.text())
    if summary.status == GATE_FAILED:  # no new champion: a failure for scripts that retrain
        print(f"fsad retrain: {summary.message}", file=sys.stderr)
        return 1
    return 0


def _cmd_score_prefix(args: argparse.Namespace) -> int:
    from flows.cli import preflight
    from flows.settings import locations
    if "://" not in args.url:
        preflight.paths([args.url])
    preflight.deciding(args.product, locations())
    from flows.pipeline.runners import prefect_api
    from flows.pipeline.score_prefix import score_prefix_flow
    with prefect_api():
        summary = score_prefix_flow(args.product, args.url, batch=args.batch, dask=args.dask)
    print(f"{summary['images']} images under {args.url}: {summary['already']} already decided, {summary['scored']} "
          f"scored now ({summary['anomalies']} flagged, {summary['unreadable']} unreadable) by {summary['model']}; "
          f"decisions in {summary['decisions']}; {summary['queued']} images in the review queue (fsad review-queue)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """``mlflow models serve`` on the product's champion (or ``--version``), told where fsad's
    registry is: the process becomes MLflow's server, so a signal stops it directly."""
    from flows.cli import preflight
    from flows.mlops.names import CHAMPION, model_name
    from flows.settings import locations
    from flows.store.storage import validate_name
    where = locations()
    ref = f"models:/{model_name(validate_name(args.product, 'product name'))}" + (
        f"/{args.version}" if args.version else f"@{CHAMPION}")
    preflight.model(ref, where)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", ref, "--env-manager", "local",
               "-h", args.host, "-p", str(args.port)]
    print(f"fsad serve: {ref} from {where.tracking_uri} on http://{args.host}:{args.port}/invocations", flush=True)
    os.execve(sys.executable, command, {**os.environ, "MLFLOW_TRACKING_URI": where.tracking_uri,
                                        "MLFLOW_REGISTRY_URI": where.tracking_uri})


def _cmd_stack(args: argparse.Namespace) -> int:
    from infra.stack import main as stack_main
    return stack_main(args.action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("fsad")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _add_dask(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dask", default=None, metavar="ADDRESS|local",
                        help=f"spread {what} over Dask as tasks of a Prefect flow (prefect-dask): a scheduler's "
                             "address (tcp://HOST:8786), or local for a cluster of one single-threaded worker a core")


def _add_setting(parser: argparse.ArgumentParser, bench: bool, flag: str, help_: str, label: str = "it",
                 **kwargs: Any) -> None:
    """One DetectorConfig setting, left unset by default (the method's value); bench's help says how rows show it."""
    in_rows = f"; for every method, the row is labelled with {label}" if bench else ""
    parser.add_argument(flag, default=None, help=help_ + in_rows, **kwargs)


def _add_detector_options(parser: argparse.ArgumentParser, bench: bool) -> None:
    """The DetectorConfig settings `fsad train` sets for its model and `fsad bench` for every method
    (flows.cli.commands reads them as overrides), added in one place so that both take the same.

    `bench` labels its rows with each setting given, and takes only backbones with bundled weights,
    as it has no --weights."""
    add = functools.partial(_add_setting, parser, bench)
    if bench:
        add("--backbone", f"a backbone with bundled weights {BACKBONE_DEFAULT}", choices=BUNDLED_BACKBONES)
    else:
        add("--backbone", f"timm backbone name; without --weights, one with bundled weights {BACKBONE_DEFAULT}")
    add("--size", SIZE_HELP, type=int)
    add("--patch-size", PATCH_SIZE_HELP, type=int)
    add("--resize", RESIZE_HELP, choices=RESIZE_MODES)
    add("--intensity", INTENSITY_HELP, choices=INTENSITY_POLICIES)
    add("--pooling", POOLING_HELP, choices=POOLINGS)
    add("--coreset-candidates", CORESET_HELP, "it (all: 0)", type=_candidates, metavar="N|all")
    add("--map-sigma", MAP_SIGMA_HELP, type=_sigma, metavar="PX")
    add("--flips", FLIPS_HELP, "hflip and vflip", choices=tuple(FLIPS))
    add("--rotation", ROTATION_HELP, "rotation_deg", type=_degrees, metavar="DEG")
    add("--false-alarm-target", FALSE_ALARM_HELP, dest="target_false_alarm_rate", type=_fraction, metavar="RATE")


# What add_subparsers returns: each _add_* function below adds one subcommand's parser to it.
Subcommands = argparse._SubParsersAction


def _subcommand(sub: Subcommands, name: str, handler: Callable[[argparse.Namespace], int],
                help_: str) -> argparse.ArgumentParser:
    """A subcommand's parser, its help repeated as its description so that `fsad NAME --help` says what it does."""
    parser = sub.add_parser(name, help=help_, description=help_)
    parser.set_defaults(handler=handler)
    return parser


def _add_device(parser: argparse.ArgumentParser) -> None:
    """The device choice of the subcommands that run a model, in one place."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _add_demo(sub: Subcommands) -> None:
    p = _subcommand(sub, "demo", _cmd_demo, "run the main job end to end on embedded defaults and a generated product")
    p.add_argument("--workdir", default=None, help="folder for everything the demo writes (default: FSAD_HOME)")
    p.add_argument("--data", default=None, help="an MVTec-layout category folder to use instead of generated data")


def _add_train(sub: Subcommands) -> None:
    p = _subcommand(sub, "train", _cmd_train, "fine-tune and calibrate a model on k normal images of a category")
    p.add_argument("--data", required=True, help="MVTec-layout category folder (train/good is the pool)")
    p.add_argument("--k", type=int, required=True, help="number of normal images to draw from train/good")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-shot draw and of training")
    p.add_argument("--out", required=True, help="model folder to write (config.json + safetensors)")
    p.add_argument("--method", default="default", help=METHODS_HELP)
    _add_detector_options(p, bench=False)
    p.add_argument("--weights", default=None, help="local checkpoint for the backbone instead of the bundled weights")
    p.add_argument("--score", choices=SCORE_KINDS, default=None,
                   help="the score the threshold is set on and `fsad score` reports (default: the method's: "
                        "fused, patch for fast); compare the components with `fsad report --components`")
    _add_device(p)


def _add_score(sub: Subcommands) -> None:
    p = _subcommand(sub, "score", _cmd_score, "score images with a trained model; writes a CSV (or JSON Lines) of "
                    "image, score, is_anomaly, threshold, model, error. Scores are in one unit everywhere: the "
                    "model's threshold reads 0.5 (0.5 + (s - t) / 2|t| of the model's own score s and threshold "
                    "t), higher is more anomalous, never clipped. An image that cannot be read is a row with its "
                    "error, no score and is_anomaly 1 (a part nobody could judge is not passed)")
    p.add_argument("--model", required=True, help="model folder, or models:/NAME@ALIAS from the MLflow registry")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", default=None, help="output file (default: standard output)")
    p.add_argument("--maps", default=None, help="folder for anomaly-map overlay PNGs, at the images' paths within "
                   "the folders given (good/000.png -> good/000_map.png)")
    p.add_argument("--raw-maps", action="store_true",
                   help="with --maps, also write each map as a float32 .npy array beside its PNG (the image's size)")
    p.add_argument("--threshold", type=_finite, default=None,
                   help="decide with this threshold in the score unit instead of the model's own, 0.5 (higher: "
                        "fewer false alarms, more misses)")
    p.add_argument("--json", action="store_true", help="write JSON Lines, one object an image, instead of CSV")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="torch (default) scores a model folder or registry version; onnx scores a folder `fsad "
                        "export` wrote, through onnxruntime (decisions only: no --maps)")
    _add_device(p)


def _add_export(sub: Subcommands) -> None:
    p = _subcommand(sub, "export", _cmd_export, "export a model for lines without torch: ONNX (the network, the "
                    "patch memory and the Gaussians as constants) with fsad_runtime.py, the NumPy/Pillow steps "
                    "around it. Written only once onnxruntime agrees with torch on the model's own images and a "
                    "defect made on each (scores within 0.001 in the score unit, the same decisions)")
    p.add_argument("--model", required=True, help="model folder, or models:/NAME@ALIAS from the MLflow registry")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="the export format (default: onnx; "
                   "OpenVINO reads ONNX as it is)")
    p.add_argument("--out", required=True, help="the folder to write (absent or empty)")
    p.add_argument("--images", nargs="+", default=None, help="images or folders to check the export on (default: "
                   "the model's training images, from its `fsad train` record or its upload)")


def _add_bench(sub: Subcommands) -> None:
    p = _subcommand(sub, "bench", _cmd_bench, "benchmark methods over k and seeds on MVTec-layout data; writes JSON")
    p.add_argument("--data", required=True, nargs="+", help="dataset root(s) or category folder(s)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["pretrained", "default"], help=METHODS_HELP)
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument("--report", default=None, help="also write the table as Markdown here")
    _add_device(p)
    p.add_argument("--max-test", type=int, default=None,
                   help="score at most this many test images (stratified), for quick runs")
    _add_dask(p, "the runs")
    _add_detector_options(p, bench=True)


def _add_report(sub: Subcommands) -> None:
    p = _subcommand(sub, "report", _cmd_report,
                    "merge result files of several bench runs into one table of means and stds")
    p.add_argument("results", nargs="+", help="JSON files written by fsad bench --out")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    columns = p.add_mutually_exclusive_group()
    columns.add_argument("--components", action="store_true",
                         help="image AUROC of each score (mahalanobis, patch, fused, either) "
                              "instead of the usual columns")
    columns.add_argument("--rates", action="store_true",
                         help="F1, false-alarm and miss rate at each model's own calibrated threshold instead")
    columns.add_argument("--defect-types", action="store_true",
                         help="image AUROC of each defect type against all normal test images instead")


def _add_upload(sub: Subcommands) -> None:
    p = _subcommand(sub, "upload", _cmd_upload, "put a few-shot set into storage (images first, manifest.json last)")
    p.add_argument("--product", required=True)
    p.add_argument("--resume", default=None, metavar="UPLOAD_ID",
                   help="finish an interrupted upload of the same folder (kept objects are not written twice)")
    p.add_argument("dir", help="folder with train/good/* and optionally eval/good|defect/*, or just images")


def _add_label(sub: Subcommands) -> None:
    p = _subcommand(sub, "label", _cmd_label, "say whether images of a product are good or defective (or withdraw "
                    "what was said); kept in the product's label store, the latest word on an image wins")
    p.add_argument("--product", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--good", dest="label", action="store_const", const="good")
    which.add_argument("--defect", dest="label", action="store_const", const="defect")
    which.add_argument("--retract", dest="label", action="store_const", const="retracted",
                       help="withdraw the images' labels (their history stays)")
    p.add_argument("--type", default="", metavar="T", help="the defect's type (with --defect), e.g. scratch")
    p.add_argument("--by", default=None, help="who labels (default: the OS user)")
    p.add_argument("--reason", default="command line", help="why the images were looked at (default: command "
                   "line); an image of the review queue keeps its queue reason and weight")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_KEY",
                   help="image files, or keys of images in the storage (e.g. those score-prefix decided)")


def _add_control(sub: Subcommands) -> None:
    """promote, rollback and pin: a person's word over the gate, each recorded with who and why."""
    helps = {"promote": "make a verified version the product's champion, whatever the gate said",
             "rollback": "make the previous champion the champion again",
             "pin": "turn automatic promotion off for a product (--off: on again); retraining still runs"}
    for name, help_text in helps.items():
        p = _subcommand(sub, name, _cmd_control, help_text)
        p.add_argument("--product", required=True)
        if name == "promote":
            p.add_argument("--version", required=True)
        if name == "pin":
            p.add_argument("--off", action="store_true", help="automatic promotion on again")
        p.add_argument("--why", required=True, help="the reason, kept in the product's action log")
        p.add_argument("--by", default=None, help="who (default: the OS user)")


def _add_review_queue(sub: Subcommands) -> None:
    p = _subcommand(sub, "review-queue", _cmd_review_queue, "the images of a product's line people should look at "
                    "next, each with why (near the threshold, highest score, audit); fed by score-prefix")
    p.add_argument("--product", required=True)
    p.add_argument("--n", type=int, default=None, help="the first N only")
    p.add_argument("--json", action="store_true", help="JSON Lines instead of a table")


def _add_review(sub: Subcommands) -> None:
    p = _subcommand(sub, "review", _cmd_review, "serve the review page: label the queue in a browser, see each "
                    "product's versions, evidence, escape rate and drift, promote, roll back or pin")
    p.add_argument("--product", default=None, help="print the address of this product's queue")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                                                       "FSAD_REVIEW_TOKEN)")
    p.add_argument("--port", type=_positive, default=8765, help="default 8765")


def _add_simulate(sub: Subcommands) -> None:
    p = _subcommand(sub, "simulate", _cmd_simulate, "run the loop on a labelled category as a line would: day-0 "
                    "upload, then each day score, review, label and retrain; measured on a held-out truth")
    p.add_argument("--data", required=True, metavar="CATEGORY_DIR", help="an MVTec-layout category")
    p.add_argument("--k", type=int, default=4, help="normal images of the day-0 upload (default 4)")
    p.add_argument("--days", type=int, default=5)
    p.add_argument("--per-day", type=int, default=60, help="parts the line makes a day (default 60)")
    p.add_argument("--reviews", type=int, default=12, help="queued images labelled a day (default 12)")
    p.add_argument("--defect-share", type=float, default=0.1, help="share of defective parts (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="FILE.json", help='{"records": [one a day], "baselines": ...}')
    p.add_argument("--plot", default=None, metavar="FILE.png", help="held-out AUROC and the gate's belief by day")
    p.add_argument("--workdir", default=None, help="the line's store, MLflow and Prefect (default: OUT.work, "
                                                   "made anew)")


def _add_settings(sub: Subcommands) -> None:
    p = _subcommand(sub, "settings", _cmd_settings, "show, set or clear a product's own training settings "
                    "(merged over FSAD_TRAIN_OVERRIDES by retraining)")
    p.add_argument("--product", required=True)
    change = p.add_mutually_exclusive_group()
    change.add_argument("--set", default=None, metavar="JSON_FILE",
                        help='a JSON object of DetectorConfig fields, e.g. {"augment": {"hflip": false}}; '
                             "checked before it is stored, and the product retrains on its next run")
    change.add_argument("--clear", action="store_true", help="remove them")


def _add_retrain(sub: Subcommands) -> None:
    p = _subcommand(sub, "retrain", _cmd_retrain, "run the retraining flow now for a product")
    p.add_argument("--product", required=True)
    p.add_argument("--upload", default=None, help="upload id (default: the latest complete upload)")


def _add_score_prefix(sub: Subcommands) -> None:
    p = _subcommand(sub, "score-prefix", _cmd_score_prefix, "score every image under a storage prefix with a "
                    "product's champion; writes JSON Lines decisions beside them and resumes where an earlier run "
                    "stopped")
    p.add_argument("product")
    p.add_argument("url", help="s3://BUCKET/PREFIX, or a folder")
    p.add_argument("--batch", type=_positive, default=None, help="images a task (default: the flow's)")
    _add_dask(p, "the batches")


def _add_serve(sub: Subcommands) -> None:
    p = _subcommand(sub, "serve", _cmd_serve, "serve a product's champion over HTTP (mlflow models serve, told "
                    "where fsad's registry is); POST images to /invocations")
    p.add_argument("--product", required=True)
    p.add_argument("--version", default=None, help="a registered version instead of the champion")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive, default=5001, help="default 5001")


def _add_stack(sub: Subcommands) -> None:
    p = _subcommand(sub, "stack", _cmd_stack,
                    "start, stop or inspect local real services on 127.0.0.1 (Swift S3, MLflow, Prefect)")
    p.add_argument("action", choices=("up", "down", "status"))


def build_parser() -> argparse.ArgumentParser:
    """The `fsad` parser: global options, then one subparser a subcommand, each calling its handler."""
    parser = argparse.ArgumentParser(
        prog="fsad",
        description="Few-shot anomaly detection for industrial images: fine-tune on a handful of "
                    "normal photos, calibrate, score, and run it as a Prefect + MLflow pipeline.",
        epilog="Configuration: FSAD_HOME (default ~/.fsad), FSAD_STORAGE (folder or s3://BUCKET), "
               "MLFLOW_TRACKING_URI (default SQLite in FSAD_HOME).")
    parser.add_argument("--version", action="version", version=f"fsad {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # in the order `fsad --help` lists them
    for add_subcommand in (_add_demo, _add_train, _add_score, _add_bench, _add_report, _add_upload, _add_label,
                           _add_settings, _add_retrain, _add_control, _add_score_prefix, _add_review_queue,
                           _add_review, _add_serve, _add_export, _add_simulate, _add_stack):
        add_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    telemetry_off()
    for key, value in _EPHEMERAL_API.items():  # unless the caller's environment says otherwise
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    try:
        with _signals_end_the_command():
            return int(args.handler(args) or 0)
    except SystemExit:
        raise
    except Exception as exc:  # one-line reason for users; full trace on request
        if os.environ.get("FSAD_DEBUG"):
            raise
        print(f"fsad {args.command}: {one_line(exc)}", file=sys.stderr)
        return 1
    except BaseException:  # Ctrl-C, SIGTERM, or the exception a library raised for either
        _force_exit()  # what shutdown would still do is report to servers: the command ends here


@contextlib.contextmanager
def _signals_end_the_command() -> Iterator[None]:
    """Ctrl-C and SIGTERM end a command within `INTERRUPT_GRACE_S` (signals are handled in the
    main thread): the signal raises KeyboardInterrupt there, and from that moment the process
    exits when the grace runs out, whatever the libraries' clean-up is still waiting on (reports
    to a server, retries)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: Any) -> None:
    _exit_within(INTERRUPT_GRACE_S)
    raise KeyboardInterrupt(signal.Signals(signum).name)


_SAID: list[bool] = []  # whether "interrupted" was printed


def _say_interrupted() -> None:
    if not _SAID:
        _SAID.append(True)
        print("fsad: interrupted", file=sys.stderr, flush=True)


def _exit_within(seconds: float) -> None:
    """Exit (`INTERRUPTED`) after ``seconds`` should the command or the interpreter's shutdown
    still be going by then: an interrupted command must end, and its temporary Prefect server dies
    with it. An alarm does it in the main thread (between two steps of whatever it waits on) and
    a timer thread where the main thread waits in a call the alarm cannot break."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGALRM, _force_exit)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    timer = threading.Timer(seconds + 0.5, _force_exit)
    timer.daemon = True
    timer.start()


def _force_exit(*_: Any) -> NoReturn:
    _say_interrupted()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED)


def one_line(exc: BaseException) -> str:
    """``Type: message (notes)`` on one line (a multi-line message joined): what the console shows."""
    reason = " ".join(str(exc).split())
    notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
    return f"{type(exc).__name__}: {reason}{notes}"


if __name__ == "__main__":
    sys.exit(main())
