"""``make review-screenshots``: pictures of the review page for the README, taken in headless
Chromium from a product as `fsad demo` leaves it (generated, never drawn by hand)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# As root on a closed network: no sandbox, and none of Chromium's own connections.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900", "--hide-scrollbars")


def chromium(user_data_dir: Path) -> Any:
    """Selenium's driver of the system's Chromium (Debian's chromium and chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        raise RuntimeError("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


@contextmanager
def served(app: Any) -> Iterator[str]:
    """The app on a free port of 127.0.0.1 while the block runs; its address."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the review page did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def take(home: Path, product: str, out: Path) -> list[Path]:
    """The queue (one card with its overlay) and the product view, as PNGs in ``out``."""
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from flows.mlops import tracking
    from flows.review.serve import review_app
    from flows.settings import load_settings

    os.environ["FSAD_HOME"] = str(home)
    settings = load_settings()
    tracking.configure(settings)
    token = "screenshot-token-0123456789"
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with served(review_app(token, settings.storage_url, settings.tracking_uri)) as base, \
            tempfile.TemporaryDirectory() as profile:
        driver = chromium(Path(profile))
        try:
            driver.get(f"{base}/signin?next=/p/{product}/queue")
            driver.find_element(By.ID, "name").send_keys("operator")
            driver.find_element(By.ID, "token").send_keys(token + "\n")
            driver.find_element(By.ID, "counts")
            ActionChains(driver).send_keys("o").perform()  # the overlay on the model's colour scale
            time.sleep(0.5)
            for name, path, height in (("review-queue.png", None, 720), ("review-product.png", "", 1400)):
                if path is not None:
                    driver.get(f"{base}/p/{product}" + (f"/{path}" if path else ""))
                driver.set_window_size(1280, height)
                time.sleep(0.3)
                driver.save_screenshot(str(out / name))
                Image.open(out / name).convert("RGB").save(out / name, optimize=True)
                shots.append(out / name)
        finally:
            driver.quit()
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="the FSAD_HOME `fsad demo --workdir` used")
    parser.add_argument("--product", default="demo-washer")
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args()
    for shot in take(Path(args.home).absolute(), args.product, Path(args.out)):
        print(shot)


if __name__ == "__main__":
    main()
