"""The data preparation run: read generation files, select, filter, deduplicate, downsample, format, write.

The parts: settings (PrepareConfig), blocks (reading, the worker pool), rows (one block's rows: parse, select,
filter, format), filter_table (which filters exist), ordering (NeMo-Skills' order and downsampling), funnel (the
stats).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from pathlib import Path

from sftflow.errors import SftflowError
from sftflow.io import atomic_path, write_json
from sftflow.packing.stream import available_cpus
from sftflow.prepare.blocks import block_results, file_blocks
from sftflow.prepare.funnel import Funnel, empty_output_reason, summary_lines
from sftflow.prepare.ordering import write_in_order
from sftflow.prepare.rows import RowProcessor
from sftflow.prepare.settings import PrepareConfig

LOG = logging.getLogger("sftflow.prepare")


def stats_path_for(output_path: str | Path) -> Path:
    output_path = Path(output_path)
    stem = output_path.name[: -len(".jsonl")] if output_path.name.endswith(".jsonl") else output_path.name
    return output_path.with_name(f"{stem}.stats.json")


def expand_input_files(patterns, outputs: tuple[str | Path, ...] = ()) -> list[Path]:
    """Glob patterns (a list, or one string separated by spaces/commas), recursive, each must match.

    A user's file is never overwritten or read back: a file named literally that is one of `outputs` (the
    stage's own output files) is an error naming both, before anything is read; one that a glob matches is left
    out, and the log says so (e.g. `dir/*.jsonl` with the output in `dir/`, on a rerun)."""
    if patterns is None:
        raise SftflowError("input_files is not set: give ++input_files='dir/output-rs*.jsonl'")
    if isinstance(patterns, str):
        patterns = [p for p in re.split(r"[,\s]+", patterns.strip()) if p]
    if not patterns:
        raise SftflowError("input_files is empty")
    own = {os.path.realpath(o): str(o) for o in outputs}
    files: set[Path] = set()
    for pattern in patterns:
        matches = [Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file()]
        if not glob.has_magic(pattern) and os.path.realpath(pattern) in own:
            raise SftflowError(
                f"input_files '{pattern}' is also this run's output ({own[os.path.realpath(pattern)]}): writing it "
                "would overwrite the input; choose another output_path"
            )
        for match in [m for m in matches if os.path.realpath(m) in own]:
            LOG.warning("input_files pattern '%s' also matches %s, this run's own output: left out", pattern, match)
            matches.remove(match)
        if not matches:
            raise SftflowError(f"input_files pattern '{pattern}' matches no file")
        files.update(matches)
    return sorted(files)


def prepare(cfg: PrepareConfig, cores: int | None = None) -> dict:
    """Run data preparation: cfg.output_path and its stats file (returned too) are written, each atomically.
    `cores` (the rule's threads) caps the worker count when num_workers is not set."""
    start = time.time()
    files = expand_input_files(cfg.input_files, (cfg.output_path, stats_path_for(cfg.output_path)))
    LOG.info("reading %d file(s): %s", len(files), ", ".join(map(str, files)))
    processor = RowProcessor(cfg)
    funnel = Funnel(processor.filters, processor.length_stages, processor.skipped_stages, cfg.deduplicate)
    workers = cfg.num_workers or min(available_cpus(), cores or 8)
    input_bytes = sum(path.stat().st_size for path in files if path.is_file())
    blocks = file_blocks(files, cfg.skip_first, funnel.input_files)
    results = block_results(blocks, processor.process_block, workers, input_bytes)
    with atomic_path(cfg.output_path) as tmp:
        funnel.rows_written = write_in_order(_counted(results, funnel), cfg, funnel, tmp)
        mode = processor.formatter.mode
        formatting = {"mode": mode, "output_format": cfg.output_format, "prompt_config": cfg.prompt_config}
        stats = funnel.stats(str(cfg.output_path), formatting, round(time.time() - start, 3))
        if funnel.rows_written == 0:
            message = empty_output_reason(stats, cfg.filters)
            if not cfg.allow_empty_output:
                for line in summary_lines(stats)[:-1]:  # the funnel, for the log (no file is written)
                    LOG.info("%s", line)
                raise SftflowError(message + " (or set allow_empty_output=true to write an empty file)")
            LOG.warning("%s", message)
        write_json(stats_path_for(cfg.output_path), stats)
    return stats


def _counted(results, funnel: Funnel):
    """The blocks' kept rows (Spool.add_block's arguments), each block's counters added to `funnel`."""
    for info, result in results:
        funnel.add_block(info, result)
        yield result.records, result.lengths, result.keys, result.has_code
