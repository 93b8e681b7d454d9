"""Per-step metrics from rank 0: a readable console line, TensorBoard events and metrics.jsonl.

MFU (GPU only) = 6 x parameters x tokens per second per GPU / the GPU's peak dense bf16 FLOP/s.
6·N per token counts the matmuls of forward (2N) and backward (4N) and ignores attention scores and
activation recomputation, the usual convention; peaks are the vendors' dense (not sparse) bf16 figures.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger("sftflow.train")

# Dense bf16 peak FLOP/s by substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


@dataclass(frozen=True)
class JobSteps:
    """The steps of one chained job: it resumes at `start`, trains to `target`, of the run's `total`."""

    start: int
    target: int
    total: int


@dataclass(frozen=True)
class Hardware:
    """What MFU is measured against: the GPUs of the run (none on CPU) and their name."""

    num_gpus: int = 0
    device_name: str = ""


class MetricsLogger:
    """Writes metrics on rank 0 only; every method is a no-op elsewhere."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool,
        steps: JobSteps,
        log_period: int = 1,
        num_params: int = 0,
        hardware: Hardware,
    ) -> None:
        self.enabled = enabled
        self.total_steps, self.target_step, self.start_step = steps.total, steps.target, steps.start
        self.log_period = log_period
        self.num_params = num_params
        self.peak = peak_flops(hardware.device_name) if hardware.num_gpus else None
        self.num_gpus = hardware.num_gpus
        self.start = time.time()
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        # A crashed job may have logged steps past the checkpoint it is resumed from: drop them, so the
        # file stays one line per step whatever the history of crashes.
        if path.exists():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= steps.start
            ]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=steps.start + 1)

    def mfu(self, tokens_per_second: float) -> float | None:
        if not self.peak or not self.num_params:
            return None
        return 6.0 * self.num_params * tokens_per_second / (self.peak * self.num_gpus)

    def log_step(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        tps = metrics.get("tokens_per_second")
        if tps is not None:
            mfu = self.mfu(tps)
            if mfu is not None:
                metrics["mfu"] = mfu
        elapsed = time.time() - self.start
        done = step - self.start_step
        eta = elapsed / done * (self.target_step - step) if done > 0 else 0.0
        self._write(step, metrics, elapsed)
        if step % self.log_period == 0 or step == self.target_step:
            parts = [f"step {step}/{self.total_steps}"]
            for key, fmt in (("loss", "{:.4f}"), ("grad_norm", "{:.3f}"), ("lr", "{:.3g}")):
                if key in metrics:
                    parts.append(f"{key} " + fmt.format(metrics[key]))
            if tps is not None:
                parts.append(f"tok/s {tps:,.0f}")
            if "sequences" in metrics:
                masked = metrics.get("overlong_masked", 0)
                parts.append(
                    f"seq {metrics['sequences']:,} in {metrics['bins']:,} bins (fill {metrics['fill_ratio']:.2f})"
                    + (f", {masked} over-long masked" if masked else "")
                )
            if "loss_tokens" in metrics:
                parts.append(f"loss_tok {int(metrics['loss_tokens']):,}")
            if "mfu" in metrics:
                parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
            parts.append(f"elapsed {format_duration(elapsed)}")
            parts.append(f"eta {format_duration(eta)} (to step {self.target_step})")
            LOG.info(" | ".join(parts))

    def log_validation(self, step: int, loss: float, num_tokens: int, num_sequences: int) -> None:
        if not self.enabled:
            return
        row = {"val_loss": loss, "val_loss_tokens": num_tokens, "val_sequences": num_sequences}
        self._write(step, row, time.time() - self.start)
        LOG.info(
            "step %d: val_loss %.4f on %s tokens (%s sequences)", step, loss, f"{num_tokens:,}", f"{num_sequences:,}"
        )

    def log_checkpoint(self, step: int, record: dict) -> None:
        """A save: its bytes, the checkpoints and bytes on disk after retention, what retention removed (a
        metrics.jsonl row with "checkpoint_bytes"; TensorBoard under checkpoint/)."""
        if not self.enabled:
            return
        row = {"step": step, **record, "elapsed_seconds": round(time.time() - self.start, 3)}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for key in ("checkpoint_bytes", "checkpoint_bytes_on_disk", "checkpoints_on_disk"):
            self.writer.add_scalar(f"checkpoint/{key}", record[key], step)
        self.writer.flush()

    def _write(self, step: int, metrics: dict, elapsed: float) -> None:
        row = {"step": step, **{k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()}}
        row["elapsed_seconds"] = round(elapsed, 3)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()
