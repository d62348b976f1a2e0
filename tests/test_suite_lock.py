"""The lock that lets the suite's two xdist workers share the machine (tests/conftest.py): an
``alone`` test waits for the tests running beside it and keeps the next ones out until it ends."""

from __future__ import annotations

import threading
import time

from conftest import _held


def _take(path, exclusive: bool, got: threading.Event, release: threading.Event) -> None:
    with _held(path, exclusive=exclusive):
        got.set()
        release.wait(30)


def test_an_alone_test_waits_for_shared_holders_and_keeps_others_out(tmp_path):
    path = tmp_path / "machine.lock"
    alone_got, alone_release = threading.Event(), threading.Event()
    other_got, other_release = threading.Event(), threading.Event()
    with _held(path, exclusive=False):  # a test running on the other worker
        with _held(path, exclusive=False):  # shared holders do not exclude each other
            pass
        alone = threading.Thread(target=_take, args=(path, True, alone_got, alone_release))
        alone.start()
        assert not alone_got.wait(0.5)  # the alone test waits
    assert alone_got.wait(10)  # ... until the shared holder is done
    other = threading.Thread(target=_take, args=(path, False, other_got, other_release))
    other.start()
    time.sleep(0.5)
    assert not other_got.is_set()  # nothing starts beside the alone test
    alone_release.set()
    alone.join(10)
    assert other_got.wait(10)
    other_release.set()
    other.join(10)
