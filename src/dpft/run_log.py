"""What a run prints, and what its `train.log` keeps.

Hydra writes the root logger to `<run folder>/train.log`, but Lightning logs to a handler of its own that does
not propagate, and the results table is printed: the file held one line. `keep_run_log` adds Lightning's
messages, Python warnings and the results table to it. `quiet_library_noise` drops the console messages no
user can act on (logging filters and warning filters by message, so a new message still shows).
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger, message pattern): Lightning's advertisement and its echo of our own limit_*_batches=1.0
RANK_ZERO = "lightning.pytorch.utilities.rank_zero"  # where Lightning's messages are logged (filters act there)
NOISE_LOGS = (
    (RANK_ZERO, r"💡 Tip: For seamless cloud logging"),
    (RANK_ZERO, r"`Trainer\(limit_(val|test)_batches=1\.0\)` was configured"),
)
# (category, message pattern): Lightning calling a torch API torch has deprecated; frozen encoders kept in eval
# mode on purpose (method.trainable=head: no dropout in a fixed feature extractor); the "fewer batches than the
# logging interval" note (an epoch means nothing to a run counted in steps)
NOISE_WARNINGS = (
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (Warning, r".*module\(s\) in eval mode"),
    (Warning, r"The number of training batches \(\d+\) is smaller than the logging interval"),
)
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")
RESULTS_LOGGER = "dpft.results"  # the final table: to train.log only (it is printed to the console)


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_library_noise() -> None:
    for name, pattern in NOISE_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))
    for category, pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


def _run_files() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def keep_run_log() -> None:
    """Lightning's messages, Python warnings and the results table go to the run's log file too."""
    files = _run_files()
    logging.captureWarnings(True)  # warnings through the root's handlers: the console and the file
    for name in (*LIBRARY_LOGGERS, RESULTS_LOGGER):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler) and h not in files]:
            logger.removeHandler(handler)  # an earlier job's file (multirun jobs run one after another)
        for handler in files:
            if handler not in logger.handlers:
                logger.addHandler(handler)
    logging.getLogger(RESULTS_LOGGER).propagate = False  # printed to the console already


def log_results(text: str) -> None:
    """Print `text` and keep it in the run's log file."""
    print(text)
    logging.getLogger(RESULTS_LOGGER).info("%s", text)
