"""The one progress display: a bar on a terminal, one line per interval elsewhere, nothing when
off; the same calls in all three cases."""

import io
import logging

from awd_nonnormal.progress import LineProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_tqdm_bar_and_a_log_file_gets_lines(caplog):
    from tqdm import tqdm

    term = _Terminal()
    bar = progress_bar(total=10, desc="epoch 1", unit="tok", stream=term, mininterval=0)
    assert isinstance(bar, tqdm)
    with bar:
        bar.update(4)
    assert "\r" in term.getvalue()  # a bar redraws itself in place

    log = io.StringIO()  # not a terminal
    line = progress_bar(total=10, desc="epoch 1", unit="tok", stream=log)
    assert isinstance(line, LineProgress)
    assert log.getvalue() == ""  # writes go through logging, never raw to the stream


def test_line_progress_logs_one_line_per_interval(caplog):
    now = [100.0]
    bar = LineProgress(total=200, initial=20, desc="epoch 3", unit="tok", interval=30.0,
                       clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="awd_nonnormal.progress")
    for _ in range(9):  # 9 updates, 10 s apart: lines at 30, 60 and 90 s
        now[0] += 10.0
        bar.update(20)
        bar.set_postfix(loss="4.123", refresh=False)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    # at 30 s: 20 + 3 x 20 = 80 of 200 tokens, (80 - 20) / 30 = 2 tok/s
    assert lines[0] == "epoch 3: 80/200 tok (40 %), 2 tok/s, loss=4.123"
    assert lines[2] == "epoch 3: 200/200 tok (100 %), 2 tok/s, loss=4.123"
    assert all("\r" not in line for line in lines)


def test_iterating_and_disabled(caplog):
    caplog.set_level(logging.INFO, logger="awd_nonnormal.progress")
    items = ["a", "b", "c"]
    bar = progress_bar(items, desc="analysing", unit="ckpt", interval=0.0, stream=io.StringIO())
    assert list(bar) == items and bar.n == 3 and bar.total == 3
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "analysing: 1/3 ckpt (33 %)", "analysing: 2/3 ckpt (67 %)", "analysing: 3/3 ckpt (100 %)"]
    caplog.clear()
    off = progress_bar(items, total=3, enabled=False, stream=_Terminal())
    with off:
        assert list(off) == items
        off.update(5)
        off.set_postfix_str("x")
    assert caplog.records == []
