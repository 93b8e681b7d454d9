"""The PyTorch-native trainer: FSDP2 (+ DTensor tensor parallelism) over packed data, DCP checkpoints, HF export.

One module per concept (torchtitan style):

- parallel     ParallelDims: process group and the ("dp", "tp") device mesh
- model        HF model loading, varlen (per-sequence) attention, apply_tp / apply_ac / apply_fsdp
- data         deterministic, resumable bin order split over dp ranks and micro-batches
- lr_schedule  linear warm-up + cosine decay
- checkpoint   sharded DCP checkpoints with an atomic commit, exact resume
- deadline     stop before the Slurm / time_limit deadline with time to save
- metrics      console, TensorBoard, metrics.jsonl (+ MFU on GPU)
- trainer      one chained job, top to bottom
- export       DCP checkpoint -> HF folder, streaming on CPU
- config       cross-key checks of the training section
- cli          command lines of scripts/train.py (worker and `launch`) and scripts/convert_checkpoint.py
"""
