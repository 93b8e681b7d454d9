"""The 128-bit digests that stand for a problem and a (problem, solution) row in deduplication and grouping,
and the compact memory of the digests a worker has sent."""

from __future__ import annotations

import hashlib

import numpy as np

DIGEST_BYTES = 16
NO_DIGEST = bytes(DIGEST_BYTES)  # the row digest when rows are not deduplicated
MERGE_EVERY = 1 << 16  # digests held in a set (~100 bytes each) before they join the sorted array (16 bytes each)


def problem_digest(problem: bytes) -> bytes:
    return hashlib.blake2b(problem, digest_size=DIGEST_BYTES).digest()


def row_digest(problem: bytes, solution: bytes) -> bytes:
    """The (problem, solution) pair's digest: the solution's, keyed with the problem's digest, so that the two texts
    cannot run into each other and rows with equal digests always belong to the same problem."""
    return hashlib.blake2b(solution, digest_size=DIGEST_BYTES, key=problem).digest()


class SentDigests:
    """The digests of the rows a worker has formatted and sent, up to `capacity` (then it forgets them all): the
    newest in a set, the others in a sorted array of 16 bytes each, looked up a chunk at a time."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.older = np.empty(0, dtype=f"S{DIGEST_BYTES}")  # compared as raw bytes, NULs included
        self.newer: set[bytes] = set()

    def __len__(self) -> int:
        return len(self.older) + len(self.newer)

    def add(self, digests: list[bytes]) -> list[bool]:
        """Per digest, whether it was sent before (earlier, or earlier in `digests`); remembers the others."""
        if len(self) + len(digests) > self.capacity:  # bounded memory: forgetting only costs formatting work
            self.older, self.newer = self.older[:0], set()
        sent_before = [False] * len(digests)
        if len(self.older) and digests:
            query = np.frombuffer(b"".join(digests), dtype=self.older.dtype)
            at = np.minimum(np.searchsorted(self.older, query), len(self.older) - 1)
            sent_before = (self.older[at] == query).tolist()
        for i, digest in enumerate(digests):
            if sent_before[i] or digest in self.newer:
                sent_before[i] = True
            else:
                self.newer.add(digest)
        if len(self.newer) >= MERGE_EVERY:
            newer = np.sort(np.frombuffer(b"".join(self.newer), dtype=self.older.dtype))
            self.older = np.insert(self.older, np.searchsorted(self.older, newer), newer)
            self.newer = set()
        return sent_before
