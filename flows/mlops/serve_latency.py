"""How long a line waits for a decision: a model folder logged as the pipeline logs it, served by
``mlflow models serve`` on 127.0.0.1, and one-image requests timed (``make bench-serve``).

    python -m flows.mlops.serve_latency MODEL_DIR IMAGE_DIR WORKDIR [--requests N]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from infra.probes import http_ok


def serve(model_uri: str, log: Path, python: Path = Path(sys.executable), env: dict[str, str] | None = None,
          cwd: Path | None = None) -> tuple[subprocess.Popen, int]:
    """``mlflow models serve`` of ``python``'s environment for ``model_uri`` on a free port, once it
    answers /ping; stop it with `stop`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**(os.environ if env is None else env)}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"  # its uvicorn
    server = subprocess.Popen([str(python), "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=cwd,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not http_ok(f"http://127.0.0.1:{port}/ping", timeout_s=5):
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise RuntimeError(f"model server did not start: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(1)
    return server, port


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def request_seconds(port: int, image: Path, maps: bool = False) -> float:
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]},
            "params": {"maps": maps}}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        answer.read()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a model folder written by fsad train (named anything)")
    parser.add_argument("images", type=Path, help="a folder of images to post, one a request")
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--requests", type=int, default=10)
    args = parser.parse_args()

    import mlflow

    from flows.pyfunc import DATA_DIRNAME, log_pyfunc_model
    from fsad_core.imageio import is_image_name, read_image

    images = sorted(p for p in args.images.rglob("*") if is_image_name(p.name))[:args.requests + 1]
    if len(images) < 2:
        raise SystemExit(f"serve_latency: {args.images}: fewer than two images")
    folder = args.workdir / DATA_DIRNAME  # the name the artifact needs, linked anew to the model given
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.unlink(missing_ok=True)
    folder.symlink_to(args.model.resolve(), target_is_directory=True)
    tracking = f"sqlite:///{args.workdir.resolve()}/mlflow.db"
    mlflow.set_tracking_uri(tracking)
    with mlflow.start_run():
        info = log_pyfunc_model(folder, read_image(images[0]), "fsad-latency")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    server, port = serve(info.model_uri, args.workdir / "serve.log", env=env)
    try:
        request_seconds(port, images[0])  # the first request warms the model
        plain = [request_seconds(port, p) for p in images[1:]]
        mapped = [request_seconds(port, p, maps=True) for p in images[1:]]
    finally:
        stop(server)
    print(f"{len(plain)} requests of one image: median {1000 * statistics.median(plain):.0f} ms, "
          f"with the map {1000 * statistics.median(mapped):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
