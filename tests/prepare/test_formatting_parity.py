"""The SFT record as NeMo-Skills' WriteFinalSftManifest writes it (issue 13): `output` is the chat template's
rendering of the assistant turn, not the solution plus an end-of-turn string; expected_answer is a string.

Every case checks the project's own rule too: input + output is exactly the template's rendering of the
whole conversation. The templates are written here to do what real ones do: Llama-3 trims the content,
Qwen3 renders `reasoning_content` as a think block, gpt-oss reads a `thinking` field.
"""

from __future__ import annotations

import pytest

from tests.conftest import write_jsonl
from tests.prepare.conftest import prepare, row

LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}<think>\n{{ (m.reasoning_content or '') | trim }}\n</think>\n\n"
    "{{ m.content | trim }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
THINKING_FIELD = (
    "{% for m in messages %}<|{{ m.role }}|>{% if m.thinking %}<|analysis|>{{ m.thinking }}<|end|>{% endif %}"
    "{{ m.content }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_REASONING = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer_with(template: str, demo_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    tok.chat_template = template
    path = tmp_path / "template.jinja"
    path.write_text(template)
    return tok, path


def whole(tok, messages) -> str:
    return tok.apply_chat_template(messages, tokenize=False)


def test_output_is_the_templates_assistant_turn_where_the_template_trims(tmp_path, demo_tokenizer_dir):
    tok, template = tokenizer_with(LLAMA3_LIKE, demo_tokenizer_dir, tmp_path)
    solution = "\n  2 + 2 = 4. The answer is \\boxed{4}.  \n"
    _, out, _ = prepare(
        tmp_path, {"a.jsonl": [row("What is 2 + 2?", solution)]}, f"++tokenizer={demo_tokenizer_dir}",
        f"++chat_template={template}",
    )  # fmt: skip
    (rec,) = out
    assert rec["output"] == "2 + 2 = 4. The answer is \\boxed{4}.<|eot_id|>"  # trimmed, as the template does
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": solution}]
    assert rec["input"] + rec["output"] == whole(tok, messages)
    assert rec["input"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_reasoning_content_is_rendered_as_the_template_does(tmp_path, demo_tokenizer_dir):
    tok, template = tokenizer_with(QWEN3_LIKE, demo_tokenizer_dir, tmp_path)
    r = row("What is 2 + 2?", "The answer is \\boxed{4}.", reasoning_content="2 and 2 make 4.")
    _, out, _ = prepare(tmp_path, {"a.jsonl": [r]}, f"++tokenizer={demo_tokenizer_dir}", f"++chat_template={template}")
    (rec,) = out
    assert rec["output"] == "<think>\n2 and 2 make 4.\n</think>\n\nThe answer is \\boxed{4}.<|im_end|>\n"
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": r["generation"], "reasoning_content": r["reasoning_content"]},
    ]
    assert rec["input"] + rec["output"] == whole(tok, messages)
    # Without a reasoning field the template still writes its (empty) think block: the template decides.
    _, out, _ = prepare(
        tmp_path / "plain", {"a.jsonl": [row("p", "s")]}, f"++tokenizer={demo_tokenizer_dir}",
        f"++chat_template={template}",
    )  # fmt: skip
    assert out[0]["output"] == "<think>\n\n</think>\n\ns<|im_end|>\n"


def test_a_thinking_field_template_gets_the_reasoning_too(tmp_path, demo_tokenizer_dir):
    _, template = tokenizer_with(THINKING_FIELD, demo_tokenizer_dir, tmp_path)
    r = row("p", "s", reasoning_content="r")
    _, out, _ = prepare(tmp_path, {"a.jsonl": [r]}, f"++tokenizer={demo_tokenizer_dir}", f"++chat_template={template}")
    assert out[0]["output"] == "<|analysis|>r<|end|>s<|end|>"


def test_a_template_that_drops_the_reasoning_is_an_error_naming_the_row(tmp_path, demo_tokenizer_dir, capsys):
    _, template = tokenizer_with(NO_REASONING, demo_tokenizer_dir, tmp_path)
    rc, _, _ = prepare(
        tmp_path, {"a.jsonl": [row("p", "s", reasoning_content="Some reasoning.")]},
        f"++tokenizer={demo_tokenizer_dir}", f"++chat_template={template}",
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "a.jsonl:1: the row has a reasoning field (reasoning_content) but the chat template drops it" in err
    assert not (tmp_path / "out" / "sft.jsonl").exists()


def test_assistant_end_replaces_the_templates_assistant_turn(tmp_path, demo_tokenizer_dir, capsys):
    _, out, _ = prepare(
        tmp_path, {"a.jsonl": [row("p", "  s  ")]}, f"++tokenizer={demo_tokenizer_dir}", "++assistant_end=<END>"
    )
    assert out[0]["output"] == "  s  <END>"
    assert out[0]["input"].endswith("<|im_start|>assistant\n")
    rc, _, _ = prepare(
        tmp_path / "r", {"a.jsonl": [row("p", "s", reasoning_content="r")]}, f"++tokenizer={demo_tokenizer_dir}",
        "++assistant_end=<END>",
    )  # fmt: skip
    assert rc == 2 and "reasoning_content, which cannot be rendered: prepare_data.assistant_end is set" in (
        capsys.readouterr().err
    )


def test_an_unfinished_generation_gets_no_end_of_turn(tmp_path, demo_tokenizer_dir):
    rows = [row("p", "cut off mid", finish_reason="length"), row("q", "done", finish_reason="stop")]
    _, out, _ = prepare(tmp_path, {"a.jsonl": rows}, f"++tokenizer={demo_tokenizer_dir}")
    assert [r["output"] for r in out] == ["cut off mid", "done<|im_end|>\n"]


@pytest.mark.parametrize(
    "answer, written", [(42, "42"), (3.0, "3.0"), ("\\frac{1}{2}", "\\frac{1}{2}"), (True, "True")]
)
def test_expected_answer_is_written_as_a_string_first(tmp_path, answer, written):
    r = {"problem": "p", "generation": "s", "expected_answer": answer, "symbolic_correct": True}
    _, out, _ = prepare(tmp_path, {"a.jsonl": [r]})
    assert list(out[0]) == ["expected_answer", "input", "output"]  # NeMo-Skills' key order
    assert out[0]["expected_answer"] == written  # Python's str(), as NeMo-Skills writes it


def test_without_a_prompt_config_the_input_is_the_bare_problem(tmp_path, demo_tokenizer_dir):
    _, out, _ = prepare(tmp_path, {"a.jsonl": [row("What is 2 + 2?", "4")]})  # no tokenizer: NeMo-Skills' plain
    assert (out[0]["input"], out[0]["output"]) == ("What is 2 + 2?", "4")
    _, out, _ = prepare(tmp_path / "t", {"a.jsonl": [row("What is 2 + 2?", "4")]}, f"++tokenizer={demo_tokenizer_dir}")
    assert out[0]["input"].endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")


def test_another_input_key_fills_the_bare_prompt(tmp_path):
    rows = [{"question": "Q?", "problem": "not this", "generation": "s", "symbolic_correct": True}]
    write_jsonl(tmp_path / "gen" / "a.jsonl", rows)
    _, out, _ = prepare(tmp_path, {}, "++input_key=question")
    assert out[0]["input"] == "Q?"


def test_smollm2s_real_template(tmp_path, smollm2_tokenizer_dir):
    """SmolLM2-135M-Instruct's own template: it adds a default system message when none is given."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    solution = "2 + 2 = 4, so the answer is \\boxed{4}."
    _, out, _ = prepare(
        tmp_path, {"a.jsonl": [row("What is 2 + 2?", solution)]}, f"++tokenizer={smollm2_tokenizer_dir}"
    )
    (rec,) = out
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": solution}]
    assert rec["input"] + rec["output"] == whole(tok, messages)
    assert rec["output"] == solution + "<|im_end|>\n"
    assert "<|im_start|>system\n" in rec["input"]  # the template's default system message
