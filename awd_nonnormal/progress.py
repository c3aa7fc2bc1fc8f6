"""The one progress display of the project (:func:`progress_bar`): a tqdm bar on a terminal, one
logged line per interval in a log file, nothing when progress is off."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO

__all__ = ["progress_bar", "LineProgress"]

logger = logging.getLogger(__name__)


class _NoProgress:
    """What :func:`progress_bar` returns when progress is off: every call does nothing."""

    def __init__(self, iterable: Optional[Iterable] = None):
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LineProgress(_NoProgress):
    """Progress for a stream that is not a terminal (a log file): one logged line per
    ``interval`` seconds, ``desc: n/total unit (p %), rate unit/s, postfix``, instead of a bar's
    carriage-return updates. The same calls as a tqdm bar (``update``, ``set_postfix``, ...)."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None,
                 initial: int = 0, desc: str = "", unit: str = "it", interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(iterable)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.interval, self.clock = interval, clock
        self.postfix = ""
        self._start_n, self._start = initial, clock()
        self._last = self._start

    def __iter__(self) -> Iterator:
        for item in super().__iter__():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            logger.info("%s", self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        now = self.clock() if now is None else now
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100.0 * self.n / self.total:.0f} %)" if self.total else ""
        elapsed = now - self._start
        rate = f", {(self.n - self._start_n) / elapsed:.4g} {self.unit}/s" if elapsed > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit}{share}{rate}{extra}"

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
                 initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True,
                 interval: float = 30.0, stream: Optional[TextIO] = None, **tqdm_kwargs: Any):
    """The one progress display of the project. On a terminal (``stream``, default stderr): a
    tqdm bar (``tqdm_kwargs`` passed on); elsewhere (a redirected stream, a log file): a
    :class:`LineProgress`, one logged line per ``interval`` seconds; with ``enabled`` false:
    nothing. All three take the same calls, and iterate over ``iterable`` when one is given."""
    if not enabled:
        return _NoProgress(iterable)
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, file=stream,
                    **tqdm_kwargs)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, unit=unit,
                        interval=interval)
