"""Where dreaming keeps its files: `$DREAMING_HOME`, default `~/.cache/dreaming`."""

import os
from pathlib import Path


def dreaming_home() -> Path:
    return Path(os.environ.get("DREAMING_HOME") or Path.home() / ".cache" / "dreaming")
