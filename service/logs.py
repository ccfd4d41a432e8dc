"""The service's log: one JSON object per line on stderr, so an operator can follow a job through it.

Every record has `time`, `level` and `message`; records about work carry `worker` (the worker slot) and `jobs`
(job ids), passed as `extra={"worker": ..., "jobs": [...]}`; a logged exception carries its traceback in
`exception` (tracebacks go to the log, never into an API answer).
"""

from __future__ import annotations

import json
import logging
import time

CONTEXT = ("worker", "jobs", "features", "attempt")  # the `extra` fields a record may carry


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        line.update({name: getattr(record, name) for name in CONTEXT if hasattr(record, name)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def service_log() -> logging.Logger:
    """The "dreaming.service" logger, writing JSON lines (configured once; uvicorn configures only its own)."""
    log = logging.getLogger("dreaming.service")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLines())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
