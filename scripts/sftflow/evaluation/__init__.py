"""Evaluation core: benchmark normalisation, answer grading (math-verify) and metrics (pass@k, majority@k)."""
