"""The PyTorch-native trainer: FSDP2 (+ DTensor tensor parallelism) over packed data, DCP checkpoints, HF export.

One module per concept (torchtitan style):

- engine       the Engine contract and the backend registry (training.backend -> engine, config check)
- fsdp         the fsdp backend's engine; fsdp_config its config checks
- parallel     ParallelDims: both backends' parallel layout, the process group, the fsdp ("dp", "tp") mesh
- loss         token loss sum, optionally chunked over lm_head's logits
- model        HF model loading, varlen (per-sequence) attention, apply_tp / apply_ac / apply_fsdp
- data         deterministic, resumable bin order split over dp ranks and micro-batches
- lr_schedule  linear warm-up + cosine decay
- checkpoint   sharded DCP checkpoints with an atomic commit, exact resume
- deadline     stop before the Slurm / time_limit deadline with time to save
- metrics      console, TensorBoard, metrics.jsonl (+ MFU on GPU)
- trainer      the Trainer: one chained job (its loop in Trainer.train), and its DoneRecord
- export       checkpoint -> HF folder on CPU, through the backend's reader
- config       cross-key checks of the training section
- cli          the worker's command line (scripts/train.py): arguments, config, logging, Trainer
- launch       the train_job rule's launcher (`scripts/train.py launch`): torchrun / srun, exit codes
- export_cli   the export's command line (scripts/convert_checkpoint.py)
"""
