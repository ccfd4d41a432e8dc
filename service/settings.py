"""The service's settings and request limits, read once from the environment.

    DREAMING_HOME              the library's home (models, the default bundle) and the service's database
    DREAMING_DB                the job database (default `$DREAMING_HOME/service/jobs.sqlite`)
    DREAMING_BUNDLE            the bundles to serve, comma-separated, each a directory (named after the directory)
                               or NAME=DIR; the first is the default one (default: the default bundle, built if
                               missing, named "default"); `dreaming serve --bundle` sets it
    DREAMING_API_KEY           when set, POST endpoints need `Authorization: Bearer <key>` or `X-API-Key: <key>`
    DREAMING_KEY_ON_READS      with a key set, "1" makes every GET need it too (but /v1/health)
    RAY_ADDRESS                attach to this Ray cluster; unset: start a local Ray
    DREAMING_GPU_WORKERS       GPU worker actors to start (default: the cluster's GPU count; 0 -> one CPU actor)
    DREAMING_GPU_CHECK_SECONDS without DREAMING_GPU_WORKERS, seconds between two looks for GPUs that joined the
                               cluster (each gets a worker), default 10
    DREAMING_FEATURES_PER_CALL features dreamed together in one engine call (same config), default 16
    DREAMING_MAX_ATTEMPTS      a job whose worker died this many times fails instead of being re-queued, default 3
    DREAMING_JOB_DEADLINE      seconds one engine call (up to DREAMING_FEATURES_PER_CALL jobs) may search before
                               it stops and keeps its best so far (result `stopped`: "deadline"), default 3600
    DREAMING_WORKER_STEP_DELAY fault injection for tests: seconds a worker sleeps at every progress report
    DREAMING_MAX_*             the limits below, e.g. DREAMING_MAX_BATCH_FEATURES=64

The limits of a dream configuration itself (prompt length, iterations, population, ...) are the bounds of
`dreaming.engine.DreamConfig`; the limits here bound what one request may ask of the service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from dreaming.bundle import DEFAULT_BUNDLE_NAME, parse_bundles
from dreaming.engine import DreamConfig
from dreaming.paths import dreaming_home


@dataclass(frozen=True)
class Limits:
    max_batch_features: int = 256  # features in one POST /batches
    max_texts: int = 32  # texts in one POST /activations
    max_text_chars: int = 4000  # characters of one text (activations, search)
    max_request_tokens: int = 4096  # tokens of all the texts of one activations or search request
    max_search_top: int = 100  # `top` of POST /search
    max_interactive_waiting: int = 8  # activations, searches and uncached feature pages waiting for the model: then 503
    max_request_bytes: int = 256 * 1024  # body of any request
    # DreamConfig.cost() ((iterations x population x children + scan) x seeds x longest prompt, a length chosen per
    # feature charged at its cap): a job may cost 50 default configs, a batch 256 default configs in all
    max_job_cost: int = field(default_factory=lambda: 50 * DreamConfig().cost())
    max_batch_cost: int = field(default_factory=lambda: 256 * DreamConfig().cost())
    max_template_tokens: int = 256  # tokens of a dream template's own text (without its {prompt} slot)

    @classmethod
    def from_env(cls) -> Limits:
        return cls(**{f.name: int(os.environ[f"DREAMING_{f.name.upper()}"]) for f in fields(cls)
                      if f"DREAMING_{f.name.upper()}" in os.environ})


def _optional_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


@dataclass(frozen=True)
class Settings:
    database: Path
    bundles: tuple[tuple[str, str | None], ...] = ((DEFAULT_BUNDLE_NAME, None),)  # (name, directory): parse_bundles
    api_key: str | None = None
    key_on_reads: bool = False
    ray_address: str | None = None
    gpu_workers: int | None = None
    features_per_call: int = 16
    max_attempts: int = 3
    worker_step_delay: float = 0.0
    job_deadline: float = 3600.0
    gpu_check_seconds: float = 10.0
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            database=Path(os.environ.get("DREAMING_DB") or dreaming_home() / "service" / "jobs.sqlite"),
            bundles=parse_bundles(os.environ.get("DREAMING_BUNDLE")),
            api_key=os.environ.get("DREAMING_API_KEY") or None,
            key_on_reads=os.environ.get("DREAMING_KEY_ON_READS", "").lower() in ("1", "true", "yes"),
            ray_address=os.environ.get("RAY_ADDRESS") or None,
            gpu_workers=_optional_int("DREAMING_GPU_WORKERS"),
            features_per_call=int(os.environ.get("DREAMING_FEATURES_PER_CALL", 16)),
            max_attempts=int(os.environ.get("DREAMING_MAX_ATTEMPTS", 3)),
            worker_step_delay=float(os.environ.get("DREAMING_WORKER_STEP_DELAY", 0)),
            job_deadline=float(os.environ.get("DREAMING_JOB_DEADLINE", 3600)),
            gpu_check_seconds=float(os.environ.get("DREAMING_GPU_CHECK_SECONDS", 10)),
            limits=Limits.from_env(),
        )
