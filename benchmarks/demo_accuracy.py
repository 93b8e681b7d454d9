"""Greedy accuracy of a model on the demo's test problems, with Hugging Face `generate` (a quick check, not the eval stage).

Usage: .venv/bin/python benchmarks/demo_accuracy.py results/final_hf_model [results/benchmarks/demo/test.jsonl] [--limit 200]
The prompt is the one training used (generic/math through the model's chat template); the answer is the
last \\boxed{} of the completion, compared as a string with expected_answer (demo answers are integers).
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("benchmark", nargs="?", default="results/benchmarks/demo/test.jsonl")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=25)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftflow.io import read_jsonl
    from sftflow.mathtext import last_boxed
    from sftflow.prepare.formatting import Formatter
    from sftflow.prepare.prompts import load_prompt_config

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    formatter = Formatter(load_prompt_config("generic/math"), tokenizer)
    rows = read_jsonl(args.benchmark)[: args.limit]
    correct = 0
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i : i + args.batch_size]
        enc = tokenizer(
            [formatter.prompt_text(r) for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row, ids in zip(chunk, out):
            text = tokenizer.decode(ids[enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += last_boxed(text) == row["expected_answer"]
    print(
        f"{args.model}: {correct}/{len(rows)} correct = {correct / len(rows):.1%} (greedy, {args.max_new_tokens} new tokens)"
    )


if __name__ == "__main__":
    main()
