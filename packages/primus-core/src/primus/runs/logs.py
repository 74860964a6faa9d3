"""Logging setup (ARCHITECTURE §7): loguru sinks, stdlib logging and Python warnings routed in.

The console stays quiet: rank 0 prints Primus's own lines and one copy of each distinct framework
warning per job (framework info lines and dumps, such as a bucket layout, go to the files only);
other ranks print errors only. Every rank's log file keeps everything at `file_sink_level`.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger


class InterceptHandler(logging.Handler):
    """Send records of the frameworks' stdlib loggers to loguru (backends reuse it)."""

    def __init__(self, framework: str | None = None) -> None:
        super().__init__()
        self.framework = framework

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        log = logger.opt(depth=6, exception=record.exc_info).bind(external=True)
        if self.framework:
            log = log.bind(framework=self.framework)
        log.log(level, "[{}] {}", record.name, record.getMessage())


def console_filter() -> Callable[[Any], bool]:
    """Primus's lines pass; a framework's record passes once per distinct message, from WARNING up."""
    seen: set[str] = set()
    warning = logger.level("WARNING").no

    def keep(record: Any) -> bool:
        if record["extra"].get("file_only"):
            return False  # said on the console another way (a one-line `primus: error:`)
        if not record["extra"].get("external"):
            return True
        if record["level"].no < warning:
            return False
        text = record["message"].split(" @ ")[0]  # the same warning raised from several places is one
        if text in seen:
            return False
        seen.add(text)
        return True

    return keep


def setup_logging(*, run_dir: Path | None, module: str, rank: int, stderr_level: str = "INFO",
                  file_level: str = "DEBUG", sink_level: str | None = None) -> Path | None:
    """Configure loguru for this process; returns the log file (None without a run dir)."""
    if sink_level:
        stderr_level = file_level = sink_level
    logger.remove()
    fmt = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> [" + f"{module} r{rank}" + "] {message}"
    if rank == 0:
        logger.add(sys.stderr, level=stderr_level, format=fmt, colorize=None, filter=console_filter())
    else:
        # other ranks print errors only: their warnings repeat rank 0's (all of it is in their files)
        # (an error said on the console another way, `primus: error:`, stays in the file here too)
        logger.add(sys.stderr, level="ERROR", format=fmt, filter=lambda record: not record["extra"].get("file_only"))
    log_file = None
    if run_dir is not None:
        log_file = run_dir / "logs" / module / f"rank-{rank}" / "primus.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(log_file, level=file_level, format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}",
                   enqueue=False)
    logging.basicConfig(handlers=[InterceptHandler()], level=logging.INFO, force=True)
    logging.captureWarnings(True)  # warnings.warn from the frameworks: deduplicated like the rest
    warnings.formatwarning = _one_line_warning
    return log_file


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """`UserWarning: text @ package/module.py:12`: one line, the source path cut to the package."""
    text = " ".join(str(message).split())
    short = filename.split("site-packages/")[-1]
    return f"{category.__name__}: {text} @ {short}:{lineno}"
