"""The benchmark as a Prefect flow (deployment ``benchmark``): same records and JSON as ``fsad bench``.

Run on the work pool, a benchmark is one click (or one ``prefect deployment run``) away, keeps its
logs with the flow run, and shows its table of means and standard deviations as a Markdown artifact.
One task per category, so the decoded test set is shared by all of that category's runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from fsad_core.benchmark import CategoryCache, environment, format_table, run_one, table
from fsad_core.data import find_categories


@task
def bench_category(root: str, k: list[int], seeds: list[int], methods: list[str], max_test: int | None,
                   device: str) -> list[dict[str, Any]]:
    """Every (k, method, seed) run on one category; a k above its number of normal images is skipped."""
    logger = get_run_logger()
    path = Path(root)
    dataset = path.parent.name if path.parent.name != path.name else path.name
    cache = CategoryCache.load(path, max_test)
    records = []
    for k_ in k:
        if k_ > len(cache.category.train):
            logger.warning("skip %s k=%d: only %d training images", path.name, k_, len(cache.category.train))
            continue
        for method in methods:
            for seed in seeds:
                record = run_one(cache, dataset, method, k_, seed, device)
                logger.info("%s/%s %s k=%d seed=%d: image AUROC %.3f (fit %.0f s)", dataset, path.name, method,
                            k_, seed, record["image_auroc"], record["fit_seconds"])
                records.append(record)
    return records


@flow(name="benchmark")
def benchmark_flow(data: list[str], k: list[int], seeds: list[int], methods: list[str], out: str,
                   max_test: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Benchmark ``methods`` x ``k`` x ``seeds`` on every MVTec-layout category under ``data``; writes
    ``{"records": [...], "environment": {...}}`` to ``out`` after each category and returns the table."""
    roots = [c for d in data for c in find_categories(d)]
    if not roots:
        raise FileNotFoundError(f"no MVTec-layout category under {' '.join(data)}")
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    records: list[dict[str, Any]] = []
    for root in roots:
        records += bench_category(str(root), k, seeds, methods, max_test, device)
        out_path.write_text(json.dumps({"records": records, "environment": env}, indent=1))
    markdown = format_table(table(records), markdown=True)
    create_markdown_artifact(markdown=f"# Benchmark\n\n{markdown}\n\nRecords: `{out_path.resolve()}`",
                             key="fsad-benchmark", description="image AUROC, pixel AUROC, AUPRO, F1: mean ± std")
    get_run_logger().info("benchmark table\n%s", format_table(table(records)))
    return {"out": str(out_path.resolve()), "records": len(records), "table": markdown}
