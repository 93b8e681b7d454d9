"""sftflow: turn generated math solutions into a fine-tuned, evaluated model (Snakemake workflow code)."""

__version__ = "0.1.0"
