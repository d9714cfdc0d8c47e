"""Single-node, single-replica Swift ("SAIO" style) with the S3 API, all under one folder.

Why this shape: no real disks or mounts (``mount_check = false``, ``devices`` is a folder), one
replica, rings built with ``swift-ring-builder``, tempauth with test-only credentials and the
s3api middleware in the proxy pipeline. Every server binds to 127.0.0.1 and runs in one process
(``workers = 0``) so the stack stays light on small machines.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import subprocess
from pathlib import Path
from string import Template

from infra.config import HOST, REGION, SWIFT_ACCOUNT, SWIFT_USER, StackConfig, StackError, write_private
from infra.install import which

DEVICE = "d1"
RINGS = ("object", "container", "account")
_PORT_OFFSET = {"object": 0, "container": 1, "account": 2}

_DEFAULT = """\
[DEFAULT]
bind_ip = $host
bind_port = $port
workers = 0
user = $user
swift_dir = $swift_dir
devices = $devices
mount_check = false
disable_fallocate = true
log_name = $name
log_level = INFO
"""

_BACKEND = _DEFAULT + """
[pipeline:main]
pipeline = $name-server

[app:$name-server]
use = egg:swift#$name
"""

_PROXY = _DEFAULT + """
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo versioned_writes symlink proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:s3api]
use = egg:swift#s3api
location = $region
s3_acl = false
dns_compliant_bucket_names = true
allow_multipart_uploads = true

[filter:tempauth]
use = egg:swift#tempauth
# S3 access key "$account:$swift_user", secret "$key" (random per stack, see infra/config.py)
user_${account}_${swift_user} = $key .admin

[filter:cache]
use = egg:swift#memcache
memcache_servers = $host:$memcached_port

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo

[filter:versioned_writes]
use = egg:swift#versioned_writes

[filter:symlink]
use = egg:swift#symlink
"""

_SWIFT_CONF = """\
[swift-hash]
swift_hash_path_suffix = $suffix
swift_hash_path_prefix = $prefix

[storage-policy:0]
name = Policy-0
default = yes
"""


def _user() -> str:
    """The account the servers run as: the current one (Swift would otherwise switch to 'swift')."""
    return pwd.getpwuid(os.geteuid()).pw_name


def _etc(cfg: StackConfig) -> Path:
    return cfg.swift_dir / "etc"


def _devices(cfg: StackConfig) -> Path:
    return cfg.swift_dir / "srv"


def backend_port(cfg: StackConfig, ring: str) -> int:
    return cfg.swift_backend_port + _PORT_OFFSET[ring]


def conf_path(cfg: StackConfig, server: str) -> Path:
    """Config file of ``server`` in (object, container, account, proxy)."""
    return _etc(cfg) / f"{server}-server.conf"


def write_configs(cfg: StackConfig) -> None:
    """Write swift.conf (once: its hash suffix must never change) and the server configs."""
    etc, devices = _etc(cfg), _devices(cfg)
    (devices / DEVICE).mkdir(parents=True, exist_ok=True)
    etc.mkdir(parents=True, exist_ok=True)
    swift_conf = etc / "swift.conf"
    if not swift_conf.exists():
        swift_conf.write_text(Template(_SWIFT_CONF).substitute(
            suffix=secrets.token_hex(8), prefix=secrets.token_hex(8)))
    common = {"host": HOST, "user": _user(), "swift_dir": etc, "devices": devices}
    for ring in RINGS:
        conf_path(cfg, ring).write_text(Template(_BACKEND).substitute(
            common, name=ring, port=backend_port(cfg, ring)))
    write_private(conf_path(cfg, "proxy"), Template(_PROXY).substitute(
        common, name="proxy-server", port=cfg.s3_port, region=REGION, account=SWIFT_ACCOUNT,
        swift_user=SWIFT_USER, key=cfg.secret_key, memcached_port=cfg.memcached_port))


# Runs in Swift's own interpreter: the library behind ``swift-ring-builder create/add/rebalance``,
# all three rings in one process (nine CLI calls cost ~10 s of CPU on a small machine).
_RING_SCRIPT = """
import json, sys
from swift.common.ring import RingBuilder
for ring, port, builder_path, ring_path in json.loads(sys.argv[1]):
    builder = RingBuilder(8, 1, 1)  # part power 8 (256 partitions), 1 replica, min_part_hours 1
    builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "%(host)s", "port": port,
                     "replication_ip": "%(host)s", "replication_port": port,
                     "device": "%(device)s", "weight": 1.0, "meta": ""})
    builder.rebalance()
    builder.get_ring().save(ring_path)
    builder.save(builder_path)
    print(ring, "ring:", builder.devs[0]["ip"], port, builder.parts, "partitions")
""" % {"host": HOST, "device": DEVICE}


def _swift_python() -> str:
    """The interpreter Swift is installed for (from the swift-ring-builder shebang)."""
    tool = which("swift-ring-builder")
    if tool is None:
        raise StackError("swift-ring-builder not found; is the swift package installed?")
    first = Path(tool).read_text(errors="replace").splitlines()[0]
    return first[2:].strip().split()[0] if first.startswith("#!") else "python3"


def build_rings(cfg: StackConfig, log: Path) -> None:
    """Build the three one-device rings unless they exist for the same backend ports."""
    etc = _etc(cfg)
    stamp = etc / "rings.json"
    wanted = {ring: backend_port(cfg, ring) for ring in RINGS}
    try:
        if json.loads(stamp.read_text()) == wanted and all(
                (etc / f"{ring}.ring.gz").exists() for ring in RINGS):
            return
    except (OSError, ValueError):
        pass
    jobs = [(ring, port, str(etc / f"{ring}.builder"), str(etc / f"{ring}.ring.gz"))
            for ring, port in wanted.items()]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        result = subprocess.run([_swift_python(), "-c", _RING_SCRIPT, json.dumps(jobs)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                check=False)
    if result.returncode != 0 or not all(Path(job[3]).exists() for job in jobs):
        raise StackError(f"building the Swift rings failed; see {log}")
    stamp.write_text(json.dumps(wanted))


def prepare(cfg: StackConfig) -> None:
    """Everything the Swift servers need on disk before they start: configs and rings."""
    write_configs(cfg)
    build_rings(cfg, cfg.log_dir / "rings.log")


def server_argv(cfg: StackConfig, server: str) -> list[str]:
    """Command line of a Swift server in the foreground, logging to the console (our log file)."""
    exe = which(f"swift-{server}-server") or f"swift-{server}-server"
    return [exe, str(conf_path(cfg, server)), "--verbose"]


def memcached_argv(cfg: StackConfig) -> list[str]:
    argv = [which("memcached") or "memcached", "-l", HOST, "-p", str(cfg.memcached_port),
            "-U", "0", "-m", "64"]
    if _user() == "root":
        argv += ["-u", "root"]  # memcached refuses to run as root otherwise
    return argv
