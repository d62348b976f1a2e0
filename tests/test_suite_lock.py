"""How the suite's two xdist workers share the machine (tests/conftest.py): an ``alone`` test waits
for the tests running beside it and keeps the next ones out until it ends; the files are handed
out slowest first, unit tests after, ``alone`` ones last."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from conftest import SLOWEST_FIRST, _held, pytest_collection_modifyitems


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


class _Item:
    """What the ordering hook reads of a pytest item: its file and its marks."""

    def __init__(self, name: str, *marks: str) -> None:
        self.path, self.marks = Path("tests") / name, set(marks)

    def get_closest_marker(self, name: str) -> str | None:
        return name if name in self.marks else None


def test_files_are_handed_out_slowest_first_then_integration_then_unit_then_alone():
    items = [
        _Item("test_unit.py"),
        _Item("test_two_jobs.py", "integration", "alone"),
        _Item("test_two_jobs.py", "integration"),
        _Item("test_other_job.py", "integration"),
        _Item("test_run_states.py", "integration"),
        _Item("test_search.py"),
        _Item("test_search.py", "integration"),
        _Item("test_unit.py"),
    ]
    pytest_collection_modifyitems(items)
    assert [(item.path.name, sorted(item.marks)) for item in items] == [
        ("test_search.py", []),  # a file's own order is kept
        ("test_search.py", ["integration"]),
        ("test_run_states.py", ["integration"]),
        ("test_other_job.py", ["integration"]),
        ("test_unit.py", []),
        ("test_unit.py", []),
        ("test_two_jobs.py", ["alone", "integration"]),
        ("test_two_jobs.py", ["integration"]),
    ]


def test_the_slowest_files_named_exist():
    tests = Path(__file__).parent
    assert [name for name in SLOWEST_FIRST if not (tests / name).is_file()] == []
