"""The offline demo: a tiny Llama model, a locally trained BPE tokenizer and synthetic generation outputs."""
