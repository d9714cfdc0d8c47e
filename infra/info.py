"""What a client needs to use the stack: endpoints, credentials and the environment to set."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from infra.config import REGION, SWIFT_ACCOUNT, SWIFT_USER, StackConfig


@dataclass(frozen=True)
class StackInfo:
    """Endpoints and credentials of a local stack (all on 127.0.0.1)."""

    s3_endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    mlflow_uri: str
    prefect_api_url: str
    region: str = REGION
    root: Path | None = None  # FSAD_HOME/stack
    started: tuple[str, ...] = field(default=(), compare=False)  # services this `up` started

    @classmethod
    def from_config(cls, cfg: StackConfig, started: tuple[str, ...] = ()) -> StackInfo:
        return cls(
            s3_endpoint=cfg.s3_endpoint,
            bucket=cfg.bucket,
            access_key=f"{SWIFT_ACCOUNT}:{SWIFT_USER}",
            secret_key=cfg.secret_key,
            mlflow_uri=cfg.mlflow_uri,
            prefect_api_url=cfg.prefect_api_url,
            root=cfg.root,
            started=started,
        )

    def env(self) -> dict[str, str]:
        """Environment variables for a client process (fsad CLI, flows, tests).

        The two ``AWS_*_CHECKSUM_*`` entries make any plain boto3 client (>= 1.36) skip the
        default checksums that Swift's s3api rejects.
        """
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "FSAD_STORAGE": f"s3://{self.bucket}",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "PREFECT_API_URL": self.prefect_api_url,
            # One result store for every process of this machine: a sweep reads its child runs' summaries.
            **({"PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(self.root / "prefect-results")} if self.root else {}),
        }

    def env_sh(self) -> str:
        """The environment as a POSIX shell snippet (``source env.sh``)."""
        lines = ["# fsad local stack: source this file to use it from a shell"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        return "\n".join(lines) + "\n"
