"""pack_jsonl: prepared SFT JSONL -> tokenized, filtered, sharded directory (one sequence per bin, in order) plus stats."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sftflow import config as C
from sftflow.errors import SftflowError
from sftflow.io import atomic_path, write_json
from sftflow.packing.held_out import RowSubset
from sftflow.packing.shards import write_shards
from sftflow.packing.stream import COUNTERS, ChunkTokenizer, TokenSpool, available_cpus, ordered_map, read_chunks

LOG = logging.getLogger("sftflow.packing")

# Rows go to the workers in chunks of at most CHUNK_ROWS rows or ~CHUNK_BYTES of JSON: big enough that
# one tokenizer call amortises the inter-process copies, small enough that a few in flight per worker
# stay a few MiB even with very long rows.
CHUNK_ROWS = 1024
CHUNK_BYTES = 4 * 2**20
# With num_workers unset, inputs smaller than this are tokenized in-process.
PARALLEL_MIN_BYTES = 2**20
LOG_EVERY_ROWS = 100_000


@dataclass(frozen=True)
class PackingConfig:
    """The `packing:` config section, schema-checked and defaults filled (see config/README.md for each key)."""

    enabled: bool
    max_total_sequence_length: int
    algorithm: str
    overlong: str
    sequences_per_shard: int
    num_workers: int | None

    @classmethod
    def from_section(cls, cfg: Mapping | PackingConfig) -> PackingConfig:
        """From a `packing:` section (missing keys take the schema defaults; errors name packing.<key>)."""
        if isinstance(cfg, PackingConfig):
            return cfg
        return cls(**C.validate_section("packing", cfg))

    def with_workers(self, input_path: str | os.PathLike, cores: int | None) -> PackingConfig:
        """This config with num_workers decided for `input_path` when unset: the automatic count, at most `cores`
        (a rule's threads)."""
        return replace(self, num_workers=_num_workers(self, Path(input_path), cores))


def _load_tokenizer(tokenizer: Any, chat_template: str | None) -> tuple[Any, str]:
    if isinstance(tokenizer, (str, os.PathLike)):
        from sftflow.prepare.formatting import load_tokenizer

        return load_tokenizer(str(tokenizer), chat_template), str(tokenizer)
    if chat_template:
        raise SftflowError(
            "chat_template: pass it only with a tokenizer name/path (set it on a loaded tokenizer yourself)"
        )
    return tokenizer, str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _pad_token_id(tokenizer: Any, name: str) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise SftflowError(f"tokenizer '{name}' has neither a pad nor an eos token; cannot choose a padding id")


def pack_jsonl(
    input_path: str | os.PathLike | RowSubset,
    output_dir: str | os.PathLike,
    tokenizer: Any,
    cfg: Mapping | PackingConfig,
    *,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> dict:
    """Tokenize and filter `input_path` into the sftflow-packed-v2 directory `output_dir`; return the stats.

    `input_path` may be a RowSubset (some lines of the file: a side of the held-out split, sftflow.packing.held_out).
    `tokenizer` is a loaded HF tokenizer or a path/hub name (then `chat_template`, a Jinja file, replaces
    its template); `cfg` is a PackingConfig or a `packing:` config section (missing keys take the schema defaults);
    `chat_template_kwargs` go to the template when rendering messages rows. With `packing.num_workers` unset, one
    worker per available core (PackingConfig.with_workers caps that at a rule's threads). Nothing is left at
    `output_dir` if anything fails.

    Every kept sequence is stored as a bin of its own, in the input's row order: the trainer packs each
    optimizer step's sequences (packing.enabled, packing.algorithm). Here packing.max_total_sequence_length
    only decides which sequences are over-long (packing.overlong: mask, truncate or drop).

    Two passes, so that memory does not grow with the number of rows: (1) chunks of rows are rendered
    and tokenized by `packing.num_workers` processes, each appending its kept sequences to its own part
    of a spool inside the output's temporary directory; this process keeps only the lengths (int32), in
    input order; (2) each shard is gathered from the spool and written. The output is the same whatever
    the number of workers.
    """
    t_start = time.perf_counter()
    cfg = PackingConfig.from_section(cfg)
    keep = input_path.keep if isinstance(input_path, RowSubset) else None
    input_path = Path(str(input_path))
    tok, tok_name = _load_tokenizer(tokenizer, chat_template)
    pad_id = _pad_token_id(tok, tok_name)
    max_len = cfg.max_total_sequence_length
    workers = _num_workers(cfg, input_path)

    with atomic_path(output_dir) as tmp:
        tmp.mkdir()
        spool = TokenSpool(tmp / ".spool")
        job = ChunkTokenizer(str(input_path), tok, chat_template_kwargs, max_len, cfg.overlong, spool)
        counts, lens = _tokenize_to_spool(input_path, job, workers, spool, keep)
        t_tokenized = time.perf_counter()
        if not len(lens):
            raise SftflowError(
                f"{input_path}: no sequence left to train on ({counts['rows']} rows read, "
                f"{counts['dropped_overlong']} dropped as over-long, {counts['dropped_no_loss']} without loss "
                "tokens); check packing.max_total_sequence_length and packing.overlong"
            )
        meta = {
            "max_total_sequence_length": max_len,
            "pad_token_id": pad_id,
            "tokenizer": tok_name,
            "source": str(input_path),
        }
        length_stats = _length_stats(lens)
        # From here on the sequences are addressed by offset: the int32 lengths make way for the int64 offsets.
        seq_offsets = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, dtype=np.int64, out=seq_offsets[1:])
        del lens
        index = write_shards(tmp, spool, seq_offsets, cfg.sequences_per_shard, meta)
        shutil.rmtree(tmp / ".spool")
        if not index["num_loss_tokens"]:
            raise SftflowError(
                f"{input_path}: no loss token left to train on: all {counts['masked']} sequences kept were over-long "
                f"and masked (packing.overlong: mask); check packing.max_total_sequence_length"
            )
        t_written = time.perf_counter()
        stats = _stats(cfg, counts, length_stats, index)
        stats["num_workers"] = workers
        stats["seconds"] = {
            "tokenize": round(t_tokenized - t_start, 3),
            "write": round(t_written - t_tokenized, 3),
            "total": round(time.perf_counter() - t_start, 3),
        }
        write_json(tmp / "stats.json", stats)
    for line in summary_lines(stats):
        LOG.info(line)
    return stats


def _num_workers(cfg: PackingConfig, input_path: Path, cores: int | None = None) -> int:
    """packing.num_workers, else one per available core, at most `cores` (one for small inputs: forking costs
    more than it saves)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    small = input_path.is_file() and input_path.stat().st_size < PARALLEL_MIN_BYTES
    return 1 if small else min(available_cpus(), cores or available_cpus())


def _tokenize_to_spool(
    input_path: Path, job: ChunkTokenizer, workers: int, spool: TokenSpool, keep: np.ndarray | None
) -> tuple[dict[str, int], np.ndarray]:
    """Pass 1: every row tokenized, kept sequences spooled (by the workers); return the counters and lengths (int32).

    Only the lengths and counters of each chunk come back to this process, in chunk order.
    """
    counts = dict.fromkeys(COUNTERS, 0)
    lengths: list[np.ndarray] = []
    next_log = LOG_EVERY_ROWS
    chunks = read_chunks(input_path, CHUNK_ROWS, CHUNK_BYTES, keep)
    try:
        for result in ordered_map(job, chunks, workers):
            spool.add_chunk(result.part, result.offset, int(result.lengths.sum(dtype=np.int64)))
            lengths.append(result.lengths)
            for key, value in result.counts.items():
                counts[key] += value
            if counts["rows"] >= next_log:
                LOG.info("tokenized %d rows", counts["rows"])
                next_log += LOG_EVERY_ROWS
    finally:
        spool.close()
    return counts, np.concatenate(lengths) if lengths else np.zeros(0, np.int32)


def _length_stats(lengths: np.ndarray) -> dict:
    """The sums the stats need from the per-sequence lengths (so that these can be freed before writing)."""
    return {
        "sequences": len(lengths),
        "total_tokens": int(lengths.sum(dtype=np.int64)),
        "mean": float(lengths.mean(dtype=np.float64)),
        "max": int(lengths.max()),
    }


def _stats(cfg: PackingConfig, counts: dict, lengths: dict, index: dict) -> dict:
    return {
        "source": index["source"],
        "tokenizer": index["tokenizer"],
        "max_total_sequence_length": cfg.max_total_sequence_length,
        "rows_read": counts["rows"],
        "sequences_kept": lengths["sequences"],
        "overlong": {
            "count": counts["overlong"],
            "action": cfg.overlong,
            "masked": counts["masked"],
            "tokens_truncated": counts["truncated_tokens"],
            "tokens_dropped": counts["dropped_overlong_tokens"],
            "tokens_masked": counts["masked_tokens"],
        },
        "dropped": {
            "overlong": counts["dropped_overlong"],
            "no_loss_tokens": counts["dropped_no_loss"],
            "no_loss_tokens_after_truncation": counts["dropped_no_loss_truncated"],
        },
        "shards": len(index["shards"]),
        "total_tokens": lengths["total_tokens"],
        "loss_tokens": index["num_loss_tokens"],
        "mean_sequence_length": round(lengths["mean"], 2),
        "max_sequence_length": lengths["max"],
    }


def summary_lines(stats: dict) -> list[str]:
    """A readable summary of pack_jsonl's stats, for the log."""
    ov, dr = stats["overlong"], stats["dropped"]
    return [
        f"read {stats['rows_read']} rows from {stats['source']}; kept {stats['sequences_kept']} sequences",
        f"over-long (> {stats['max_total_sequence_length']} tokens): {ov['count']} ({ov['action']}: "
        + {
            "mask": f"{ov['masked']} kept as sequences with no loss tokens, {ov['tokens_masked']} tokens cut",
            "truncate": f"{ov['tokens_truncated']} tokens truncated",
            "drop": f"{ov['tokens_dropped']} tokens in dropped sequences",
        }[ov["action"]]
        + ")",
        f"dropped: {dr['overlong']} over-long, {dr['no_loss_tokens']} with no loss tokens "
        f"({dr['no_loss_tokens_after_truncation']} of them after truncation)",
        f"tokenized: {stats['sequences_kept']} sequences in {stats['shards']} shards, in the input's order, "
        f"{stats['total_tokens']} tokens ({stats['loss_tokens']} loss tokens); the trainer packs each step's "
        "sequences (packing.enabled, packing.algorithm)",
        f"sequence length mean {stats['mean_sequence_length']}, max {stats['max_sequence_length']}; "
        f"took {stats['seconds']['total']} s",
    ]
