"""Logging that a flood cannot drown: hostile or broken peers can make a rank
warn once per message, and a log line per message would be a denial of
service of its own."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """At most `per_interval` warnings per key every `interval_s`; counts the rest."""

    def __init__(self, logger: logging.Logger, per_interval: int = 5,
                 interval_s: float = 10.0) -> None:
        self._log = logger
        self._per = per_interval
        self._interval = interval_s
        self._window: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            start, n = self._window.get(key, (now, 0))
            if now - start > self._interval:
                if n > self._per:
                    self._log.warning("%s: %d more suppressed", key, n - self._per)
                start, n = now, 0
            self._window[key] = (start, n + 1)
            if len(self._window) > 1024:
                self._window.clear()
        if n < self._per:
            self._log.warning(msg, *args)
