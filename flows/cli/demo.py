"""``fsad demo``: the main job end to end on embedded defaults, in a few minutes on a laptop CPU.

Everything lives under one folder (``--workdir``, default FSAD_HOME): a local folder store, SQLite
MLflow with local artifacts and an ephemeral Prefect API whose database is kept there too, so the
runs can be looked at afterwards. A product is generated (or a real MVTec-layout category is used
with ``--data``), a few-shot set with a labelled evaluation set is uploaded, the retraining flow
runs, and the version it produces ends up as ``champion``. The champion then decides a short line
of further parts (score-prefix), which fills the review queue that ``fsad review`` shows. Running
it again on the same folder uploads the same images and shows the idempotency: "already trained
as version N".
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from flows.cli.embedded import environment, ephemeral_prefect
from flows.pipeline.runners import prefect_api
from flows.pipeline.summary import RetrainSummary
from flows.settings import Settings, load_settings
from flows.store.upload import upload_folder, write_upload_folder
from fsad_core.benchmark import stratified_subset
from fsad_core.data import load_category
from fsad_core.synthetic import make_category
from infra.config import TELEMETRY_OFF

DEMO_PRODUCT = "demo-washer"
DEMO_K = 6
DATA_K = 8
DATA_MAX_EVAL = 40  # stratified subset of a real category's test set: keeps the demo in minutes
LINE_GOOD, LINE_DEFECT = 20, 4  # parts of the demo's line, decided by the champion to fill the review queue
DEMO_TRAINING = {  # small on purpose: the demo must finish in minutes on two busy CPU cores
    "size": 128, "patch_size": 128, "pool_views": 24, "negatives": 16, "calibration_negatives": 12, "memory_views": 2,
    "finetune": {"steps": 20, "normals_per_batch": 12, "negatives_per_batch": 6},
}


def prepare_upload_set(out: Path, data: str | None) -> tuple[str, Path, str]:
    """(product, folder in upload layout, description): generated, or drawn from a real category."""
    if out.exists():
        shutil.rmtree(out)
    if data is None:
        category = make_category(out.parent / "generated" / DEMO_PRODUCT, kind="object", n_train=DEMO_K,
                                 n_test_good=8, n_test_defect=8, size=144, seed=7)
        cat, product, k = load_category(category), DEMO_PRODUCT, DEMO_K
        test = cat.test
        what = f"generated object product (144 px), k={k} normal images, eval 8 good + 8 defect"
    else:
        cat = load_category(data)
        k = min(DATA_K, len(cat.train))
        product = "demo-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in cat.name)[:58]
        test = stratified_subset(cat.test, DATA_MAX_EVAL)
        if not {s.label for s in test} >= {0, 1}:
            raise ValueError(f"{data}: the test set needs good and defect images for the evaluation set")
        what = (f"{cat.root}: k={k} from train/good (seed 0), eval {sum(s.label == 0 for s in test)} good + "
                f"{sum(s.label == 1 for s in test)} defect from test/")
    write_upload_folder(out, [s.path for s in cat.sample_k_shot(k, 0)], [s.path for s in test if s.label == 0],
                        [s.path for s in test if s.label == 1])
    return product, out, what


def prepare_line(out: Path, data: str | None, upload_set: Path) -> Path:
    """A folder of parts the upload did not hold: generated anew, or a real category's other test images."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if data is None:
        category = make_category(out.parent / "generated" / "line", kind="object", n_train=1, n_test_good=LINE_GOOD,
                                 n_test_defect=LINE_DEFECT, size=144, seed=8)
        parts = load_category(category).test
    else:
        uploaded = {p.name for p in upload_set.rglob("*")}
        parts = stratified_subset([s for s in load_category(data).test if s.path.name not in uploaded],
                                  LINE_GOOD + LINE_DEFECT)
    for i, sample in enumerate(parts):
        shutil.copyfile(sample.path, out / f"part-{i:03d}{sample.path.suffix.lower()}")
    return out


def _print_summary(summary: RetrainSummary, settings: Settings, product: str, folder: Path, prefect_home: Path,
                   seconds: float) -> None:
    q, home = shlex.quote, settings.home
    print(f"\n== fsad demo done in {seconds:.0f} s")
    print(summary.text())
    print("\nwhere things are")
    print(f"  storage   {settings.storage_url}/products/{product}/uploads/{summary.upload_id}/ "
          f"(validation.json beside the images)")
    print(f"  MLflow    {settings.tracking_uri}  artifacts {settings.artifact_root}")
    print(f"  Prefect   {prefect_home}/prefect.db")
    print("\nlook at it")
    print(f"  mlflow ui --backend-store-uri {q(settings.tracking_uri)}")
    print(f"  PREFECT_HOME={q(str(prefect_home))} prefect server start      # UI at http://127.0.0.1:4200")
    print(f"  PREFECT_HOME={q(str(prefect_home))} prefect flow-run ls")
    print(f"  FSAD_HOME={q(str(home))} fsad score --model models:/fsad-{product}@champion {q(str(folder / 'eval'))}")
    overrides = q(json.dumps(settings.train_overrides, separators=(",", ":")))
    print(f"  FSAD_HOME={q(str(home))} PREFECT_HOME={q(str(prefect_home))} FSAD_TRAIN_OVERRIDES={overrides} "
          f"fsad retrain --product {product}   # same images and settings: not trained twice")


def run_demo(workdir: str | None = None, data: str | None = None) -> int:
    """Generate (or take) a product, upload it, run the retraining flow, print what happened."""
    start = time.monotonic()
    caller = load_settings()
    home = Path(workdir).expanduser().absolute() if workdir else caller.home
    embedded = {
        "FSAD_HOME": str(home), "FSAD_STORAGE": str(home / "store"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "FSAD_TRAIN_OVERRIDES": json.dumps(caller.train_overrides or DEMO_TRAINING),
        **TELEMETRY_OFF,
    }
    prefect_home = home / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    with environment(embedded), ephemeral_prefect(prefect_home), prefect_api():
        from flows.pipeline.retrain import retrain_flow
        from flows.pipeline.score_prefix import score_prefix_flow
        from flows.store.storage import open_store

        settings = load_settings()
        product, folder, what = prepare_upload_set(home / "demo" / "upload-set", data)
        print(f"fsad demo in {home}")
        print(f"data        {what}")
        print(f"training    {json.dumps(settings.train_overrides)} (small settings for a quick demo; "
              f"FSAD_TRAIN_OVERRIDES changes them)")
        print(f"gate        benchmark AUROC >= {settings.gate_min_auroc} and credibly better than the champion")
        result = upload_folder(open_store(settings.storage_url), product, folder)
        print(f"uploaded    {product} {result.upload_id}: "
              + ", ".join(f"{n} {split}" for split, n in result.counts.items()))
        print("retraining  (Prefect flow `retrain`; progress below)", flush=True)
        summary = RetrainSummary.from_dict(retrain_flow(product, upload_id=result.upload_id))
        if summary.champion is None:
            _print_summary(summary, settings, product, folder, prefect_home, time.monotonic() - start)
            print(f"fsad demo: no champion for {product}: {summary.message}", file=sys.stderr)
            return 1
        line = prepare_line(home / "demo" / "line", data, folder)
        decided = score_prefix_flow(product, str(line))
        print(f"line        {decided['scored']} parts decided by the champion ({decided['anomalies']} flagged); "
              f"{decided['queued']} queued for review")
        _print_summary(summary, settings, product, folder, prefect_home, time.monotonic() - start)
        print(f"  FSAD_HOME={shlex.quote(str(home))} fsad review --product {product}   # label the queue in a browser")
    return 0


__all__ = ["DEMO_TRAINING", "prepare_upload_set", "run_demo"]
