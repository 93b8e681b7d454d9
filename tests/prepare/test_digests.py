"""A worker's memory of the digests it sent: exact on all 16 bytes, across merges into its sorted array, and
bounded (forgetting only means a repeat is formatted again)."""

from __future__ import annotations

import random

from sftflow.prepare import digests as D


def test_sent_digests_say_exactly_which_were_sent_before(monkeypatch):
    monkeypatch.setattr(D, "MERGE_EVERY", 5)  # most digests are looked up in the sorted array
    rng = random.Random(0)
    pool = [rng.randbytes(14) + tail for tail in (b"\x00\x00", b"\x00\x01", b"\x01\x00")] * 3  # NULs count
    pool += [rng.randbytes(16) for _ in range(60)]
    sent, memory = set(), D.SentDigests(capacity=10_000)
    for _ in range(40):
        chunk = [rng.choice(pool) for _ in range(rng.randrange(0, 12))]
        expected = []
        for digest in chunk:
            expected.append(digest in sent)
            sent.add(digest)
        assert memory.add(chunk) == expected
    assert len(memory.older) > len(memory.newer)


def test_sent_digests_forget_everything_when_full():
    memory = D.SentDigests(capacity=3)
    assert memory.add([b"a" * 16, b"b" * 16, b"a" * 16]) == [False, False, True]
    assert memory.add([b"c" * 16, b"a" * 16]) == [False, False]  # 2 + 2 > 3: forgotten first
    assert len(memory) == 2
