"""Logging setup (ARCHITECTURE §7): loguru sinks, stdlib logging routed in."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

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
        log = logger.opt(depth=6, exception=record.exc_info)
        if self.framework:
            log = log.bind(framework=self.framework)
        log.log(level, "[{}] {}", record.name, record.getMessage())


def setup_logging(*, run_dir: Path | None, module: str, rank: int, stderr_level: str = "INFO",
                  file_level: str = "DEBUG", sink_level: str | None = None) -> Path | None:
    """Configure loguru for this process; returns the log file (None without a run dir)."""
    if sink_level:
        stderr_level = file_level = sink_level
    logger.remove()
    fmt = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> [" + f"{module} r{rank}" + "] {message}"
    if rank == 0:
        logger.add(sys.stderr, level=stderr_level, format=fmt, colorize=None)
    else:
        # other ranks print only warnings and errors, so the console stays readable
        logger.add(sys.stderr, level="WARNING", format=fmt)
    log_file = None
    if run_dir is not None:
        log_file = run_dir / "logs" / module / f"rank-{rank}" / "primus.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(log_file, level=file_level, format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}",
                   enqueue=False)
    logging.basicConfig(handlers=[InterceptHandler()], level=logging.INFO, force=True)
    return log_file
