"""Install OpenStack Swift and memcached from the Debian/Ubuntu archive when they are missing.

Why: the S3 service of the stack is Swift with s3api; there is no pip-installable Swift that
runs its servers, but the distribution packages do. Quick no-op when already installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from infra.config import StackError

PACKAGES = ("swift", "swift-proxy", "swift-account", "swift-container", "swift-object", "memcached")
# The executables the stack runs; their presence means the packages are installed.
BINARIES = ("swift-proxy-server", "swift-account-server", "swift-container-server",
            "swift-object-server", "swift-ring-builder", "memcached")
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/sbin",
                                "/usr/local/bin"])


def which(name: str) -> str | None:
    """Path of an executable, also looking in /usr/sbin (memcached lives there on some systems)."""
    return shutil.which(name, path=_SEARCH_PATH)


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if which(name) is None]


def _run_logged(argv: list[str], log: Path) -> int:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, env=env, check=False).returncode


def ensure_packages(log: Path) -> bool:
    """Install the Swift/memcached packages with apt-get unless present; True if it installed.

    Needs root or password-less sudo; apt output goes to ``log``.
    """
    if not missing_binaries():
        return False
    if which("apt-get") is None:
        raise StackError(f"Swift is not installed and apt-get is missing; install "
                         f"{' '.join(PACKAGES)} with your package manager")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if which("sudo") is None:
            raise StackError("Swift is not installed; run: sudo apt-get install -y "
                             + " ".join(PACKAGES))
        prefix = ["sudo", "-n"]
    log.parent.mkdir(parents=True, exist_ok=True)
    install = [*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    if _run_logged(install, log) != 0:
        # Usually stale package lists: refresh once and retry.
        _run_logged([*prefix, "apt-get", "update", "-qq"], log)
        if _run_logged(install, log) != 0:
            raise StackError(f"apt-get install of {' '.join(PACKAGES)} failed; see {log}")
    if missing := missing_binaries():
        raise StackError(f"after installing Swift these are still missing: {', '.join(missing)}")
    return True
