"""models/heap.py: the glibc settings that let the next generate call's oneDNN copies reuse this call's memory."""

from __future__ import annotations

import platform

import pytest

from posttrain.models import heap


class FakeLibc:
    def __init__(self, ok: int = 1):
        self.calls, self.ok = [], ok

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.ok


@pytest.fixture
def fake(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    monkeypatch.setattr(heap, "_kept", 0)
    monkeypatch.delenv(heap.ENV, raising=False)
    return libc


def test_raises_the_trim_threshold_by_the_copies_and_pins_the_mmap_threshold(fake):
    assert heap.keep_freed(500 << 20)
    assert fake.calls == [(heap.M_MMAP_THRESHOLD, 32 << 20), (heap.M_TRIM_THRESHOLD, (64 << 20) + (500 << 20))]
    assert heap.keep_freed(100 << 20) and len(fake.calls) == 2  # already keeps more: nothing to set
    assert heap.keep_freed(3 << 30) and fake.calls[-1] == (heap.M_TRIM_THRESHOLD, 2 ** 31 - 1)  # an int at most


def test_left_alone_when_switched_off_or_refused(fake, monkeypatch):
    monkeypatch.setenv(heap.ENV, "0")
    assert not heap.keep_freed(1 << 20) and fake.calls == []
    monkeypatch.delenv(heap.ENV)
    fake.ok = 0  # mallopt refused: not counted as kept
    assert not heap.keep_freed(1 << 20) and heap._kept == 0
    monkeypatch.setattr(heap, "_glibc", lambda: None)  # macOS, musl
    assert not heap.keep_freed(1 << 20)


def test_glibc_takes_the_settings_on_linux():
    if platform.libc_ver()[0] != "glibc":
        assert heap._glibc() is None
        return
    assert heap._glibc() is not None
    assert heap.keep_freed(heap._kept + (1 << 20))
