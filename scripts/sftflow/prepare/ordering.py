"""The order of the output, as NeMo-Skills writes it: rows grouped by problem and deduplicated, the code/text choice
per problem, downsampling, then one seeded shuffle. The formatted records wait in a spool on disk meanwhile
(sftflow.prepare.spool): memory grows by a few bytes per row, not with the rows' text."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sftflow.prepare import filters as F
from sftflow.prepare import spool as S
from sftflow.prepare.funnel import Funnel
from sftflow.prepare.settings import PrepareConfig


def write_in_order(blocks: Iterable[tuple], cfg: PrepareConfig, funnel: Funnel, output: Path) -> int:
    """Spool the blocks of formatted records (Spool.add_block's arguments) to disk, order them (`order`), then copy
    the records to `output` in that order; the number of rows written."""
    spool = S.Spool(output.with_name(output.name + ".spool"))
    try:
        for block in blocks:
            spool.add_block(*block)
        spool.close()
        rows = order(spool, cfg, funnel)
        spool.copy(rows, output)
        return len(rows)
    finally:
        spool.remove()


def order(spool: S.Spool, cfg: PrepareConfig, funnel: Funnel) -> np.ndarray:
    """NeMo-Skills' order (GroupSamples, then ShuffleAndDownsampleData with its seeded `random`) as spool row
    numbers: the rows grouped by problem (problems in order of first appearance, each problem's rows in file
    order) and deduplicated, the code/text choice per problem, downsampling, then one shuffle of the whole list
    (`random.shuffle` of a memoryview: the same swaps as of NeMo-Skills' list of the same length). The stages
    that ran are counted in `funnel`."""
    rows, starts, repeats = spool.grouped_rows(cfg.deduplicate)
    if cfg.deduplicate:
        funnel.deduplicated["dropped"] += repeats
    mode = cfg.filters["code_text_filter"]
    if mode:
        stage = {"stage": "code_text_filter", "mode": mode, "rows_in": len(rows), "dropped": 0}
        has_code = np.frombuffer(spool.has_code, dtype=bool)
        rows, starts = S.pick_code_text(rows, starts, has_code, functools.partial(F.code_text_picks, mode=mode))
        stage["dropped"] = stage["rows_in"] - len(rows)
        funnel.code_text_filter = stage
    rng = random.Random(cfg.random_seed)  # as random.seed(random_seed) before NeMo-Skills' shuffle
    method, n = cfg.downsampling_method, cfg.num_output_samples
    if method:
        stage = {"stage": f"downsampling_{method}", "rows_in": len(rows), "num_output_samples": n}
        if method == "random":
            if cfg.do_shuffle:
                rng.shuffle(memoryview(rows))
            rows = rows[:n]
        elif len(rows) > n:  # fair: round robin over the problems, each one's solutions in file order
            rows = S.pick_fair(rows, starts, n)
        if len(rows) < n:
            stage["note"] = f"only {len(rows)} rows available, fewer than num_output_samples"
        stage["dropped"] = stage["rows_in"] - len(rows)
        funnel.downsampling = stage
        if method == "random":
            return rows
    if cfg.do_shuffle:
        rng.shuffle(memoryview(rows))
    return rows
