"""The benchmark as a Prefect flow (deployment ``benchmark``, and ``fsad bench --dask``): the records
and JSON of ``fsad bench``.

Run on the work pool, a benchmark is one click (or one ``prefect deployment run``) away, keeps its
logs with the flow run, and shows its table of means and standard deviations as a Markdown artifact.
One task a run: given a Dask scheduler (``dask``, see `flows.pipeline.runners`) the runs are spread over its
workers; without one they run one after another, as ``fsad bench`` runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed

from flows.pipeline.runners import task_runner
from fsad_core.benchmark import Cell, environment, format_table, grid, run_cell, table, write_records
from fsad_core.data import find_all_categories


@task(task_run_name="{cell.dataset} {cell.method} k={cell.k} seed={cell.seed}")
def bench_cell(cell: Cell, max_test: int | None, device: str, overrides: dict[str, Any]) -> dict[str, Any]:
    record = run_cell(cell, max_test, device, **overrides)
    get_run_logger().info("%s: image AUROC %.3f (fit %.0f s)", cell.label(), record["image_auroc"],
                          record["fit_seconds"])
    return record


@flow(name="benchmark-grid")
def grid_flow(cells: list[Cell], max_test: int | None, device: str, overrides: dict[str, Any], out: str,
              env: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run submitted to this flow's task runner; the result file is rewritten, in the grid's
    order, as each run finishes."""
    futures = [bench_cell.submit(cell, max_test, device, overrides) for cell in cells]
    done: dict[int, dict[str, Any]] = {}
    position = {future.task_run_id: i for i, future in enumerate(futures)}
    for future in as_completed(futures):
        done[position[future.task_run_id]] = future.result()
        write_records(Path(out), [done[i] for i in sorted(done)], env)
    return [done[i] for i in range(len(cells))]


@flow(name="benchmark")
def benchmark_flow(data: list[str], k: list[int], seeds: list[int], methods: list[str], out: str,
                   max_test: int | None = None, device: str = "auto", overrides: dict[str, Any] | None = None,
                   dask: str | None = None) -> dict[str, Any]:
    """Benchmark ``methods`` x ``k`` x ``seeds`` on every MVTec-layout category under ``data``
    (``overrides``: DetectorConfig fields for every method); writes ``{"records": [...],
    "environment": {...}}`` to ``out`` after each run and returns the records and the table."""
    logger = get_run_logger()
    cells, skipped = grid(find_all_categories(data), k, methods, seeds)
    for note in skipped:
        logger.warning(note)
    env, overrides = environment(), overrides or {}
    records = grid_flow.with_options(task_runner=task_runner(dask))(cells, max_test, device, overrides, out, env)
    markdown = format_table(table(records), markdown=True)
    create_markdown_artifact(markdown=f"# Benchmark\n\n{markdown}\n\nRecords: `{Path(out).resolve()}`",
                             key="fsad-benchmark", description="image AUROC, pixel AUROC, AUPRO, F1: mean ± std")
    logger.info("benchmark table\n%s", format_table(table(records)))
    return {"out": str(Path(out).resolve()), "records": records, "table": markdown}
