"""Assistant-only loss masks for input/output and messages rows, on the demo ChatML and real SmolLM2 templates."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sftflow.errors import SftflowError
from sftflow.packing.tokenize import row_segments, tokenize_rows
from tests.packing.conftest import EOT


def encode(tok, row, **kw):
    ((_, ids, mask),) = list(tokenize_rows(tok, [("data.jsonl:7", row)], **kw))
    return ids.tolist(), mask.tolist()


def loss_runs(tok, ids, mask) -> list[str]:
    """Decoded text of each maximal run of loss tokens."""
    runs, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def io_row(tok, question: str, answer: str) -> dict:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return {"input": prompt, "output": answer + EOT}


def conversation():
    return [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4.\nThe answer is \\boxed{4}."},
        {"role": "user", "content": "And 3 * 3?"},
        {"role": "assistant", "content": "3 * 3 = 9, so \\boxed{9}."},
    ]


def check_io(tok):
    row = io_row(tok, "Calculate 76 * 2.", "We compute 76 * 2 = 152.\nSo the answer is \\boxed{152}.")
    ids, mask = encode(tok, row)
    n_in = len(tok(row["input"], add_special_tokens=False).input_ids)
    assert mask == [0] * n_in + [1] * (len(ids) - n_in)
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == row["output"]
    assert tok.decode(ids) == row["input"] + row["output"]
    assert ids[-2] == tok.convert_tokens_to_ids("<|im_end|>")  # end-of-turn is a target (then "\n")


def check_messages(tok, messages):
    ids, mask = encode(tok, {"messages": messages})
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == full
    expected = [m["content"] + EOT for m in messages if m["role"] == "assistant"]
    assert loss_runs(tok, ids, mask) == expected
    return ids, mask, full


def test_demo_input_output_mask(demo_tok):
    check_io(demo_tok)


def test_demo_messages_multi_turn(demo_tok):
    check_messages(demo_tok, conversation())
    check_messages(demo_tok, [{"role": "system", "content": "Be brief."}, *conversation()[:2]])


def test_demo_messages_equal_input_output(demo_tok):
    msgs = conversation()[:2]
    io = io_row(demo_tok, msgs[0]["content"], msgs[1]["content"])
    assert encode(demo_tok, {"messages": msgs}) == encode(demo_tok, io)


def test_assistant_first_message(demo_tok):
    ids, mask, _ = check_messages(demo_tok, [{"role": "assistant", "content": "assistant"}])
    assert mask[0] == 0  # '<|im_start|>' of the turn is prompt, not target


def test_demo_real_prepared_rows(demo_tok):
    # Rows in the shape prepare_data writes (ChatML, output = solution + end-of-turn).
    rows = [
        io_row(demo_tok, f"What is {a} + {a}?", f"{a} + {a} = {2 * a}.\nThe answer is \\boxed{{{2 * a}}}.")
        for a in range(50)
    ]
    out = list(tokenize_rows(demo_tok, [(f"f:{i}", r) for i, r in enumerate(rows)], batch_size=7))
    assert len(out) == 50
    for row, (_, ids, mask) in zip(rows, out, strict=True):
        assert demo_tok.decode(ids[mask.astype(bool)].tolist()) == row["output"]


def test_smollm2_input_output_mask(smollm2_tok):
    check_io(smollm2_tok)


def test_smollm2_messages_with_injected_system_prompt(smollm2_tok):
    ids, mask, full = check_messages(smollm2_tok, conversation())
    assert "You are a helpful AI assistant named SmolLM" in full  # default system prompt injected
    prompt_text = smollm2_tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "SmolLM" in prompt_text and "What is 2 + 2?" in prompt_text
    check_messages(smollm2_tok, [{"role": "system", "content": "Be brief."}, *conversation()])
    check_messages(smollm2_tok, [{"role": "assistant", "content": "Hello!"}])


def test_smollm2_messages_equal_input_output(smollm2_tok):
    msgs = conversation()[:2]
    io = io_row(smollm2_tok, msgs[0]["content"], msgs[1]["content"])
    assert encode(smollm2_tok, {"messages": msgs}) == encode(smollm2_tok, io)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"problem": "x"}, "neither an input/output row nor a messages row"),
        ({"input": "x", "output": ""}, "'output' is empty"),
        ({"input": "x", "output": "  \n"}, "'output' is empty"),
        ({"input": 3, "output": "y"}, "'input' must be a string"),
        ({"input": "x"}, "'output' must be a string"),
        ({"input": "x", "output": "y", "messages": []}, "both"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "user"}]}, "messages\\[0\\]"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty content"),
    ],
)
def test_bad_rows_name_file_and_line(demo_tok, row, message):
    with pytest.raises(SftflowError, match=message) as err:
        row_segments(row, "data.jsonl:7", demo_tok)
    assert str(err.value).startswith("data.jsonl:7: ")


def test_template_that_rewrites_earlier_turns_is_refused(demo_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    # Drops the content of every assistant turn but the last (like templates that strip old reasoning).
    tok.chat_template = (
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' -}}"
        "{%- if m['role'] == 'assistant' and not loop.last -%}[old]{%- else -%}{{- m['content'] -}}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    with pytest.raises(SftflowError, match="data.jsonl:7: .*messages\\[1\\]"):
        row_segments({"messages": conversation()}, "data.jsonl:7", tok)


def test_messages_without_chat_template(demo_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(SftflowError, match="chat template"):
        row_segments({"messages": conversation()}, "data.jsonl:7", tok)


def test_chat_template_kwargs_reach_the_template(demo_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    tok.chat_template = (
        "{%- if brief -%}{{- '<|im_start|>system\\nBe brief.<|im_end|>\\n' -}}{%- endif -%}"
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    msgs = conversation()[:2]
    ids, mask = encode(tok, {"messages": msgs}, chat_template_kwargs={"brief": True})
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.")
    assert loss_runs(tok, ids, mask) == [msgs[1]["content"] + EOT]


def test_encode_texts_equals_the_tokenizer_call(demo_tokenizer_dir):
    # The Rust fast path must give exactly the ids of tokenizer(texts), even on a tokenizer whose
    # backend was left with truncation and padding switched on.
    from sftflow.packing.tokenize import encode_texts

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    texts = ["<|im_start|>user\n12 + 30 = 42<|im_end|>\n", "", " 7 * 6 " * 40, "<|im_end|><|im_start|>"]
    expected = tok(texts, add_special_tokens=False)["input_ids"]
    assert len(expected[2]) > 20
    tok.backend_tokenizer.enable_truncation(max_length=5)
    tok.backend_tokenizer.enable_padding(length=64)
    assert encode_texts(tok, texts) == expected
    tok.split_special_tokens = True  # the special tokens' text is then tokenized as plain text
    assert encode_texts(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"] != expected
