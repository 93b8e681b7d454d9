"""Turn a (problem, solution) row into the SFT record: chat-template-rendered input/output or messages."""

from __future__ import annotations

from pathlib import Path

from sftflow.errors import SftflowError
from sftflow.prepare.prompts import PromptConfig

_SENTINEL = "\u2063SFTFLOW_ASSISTANT_CONTENT\u2063"


def load_tokenizer(name_or_path: str, chat_template: str | None = None):
    """Load a HF tokenizer from a local path or hub name; `chat_template` is a Jinja file that replaces its template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise SftflowError(f"tokenizer '{name_or_path}': cannot load ({str(err).splitlines()[0]})") from None
    if chat_template:
        path = Path(chat_template)
        if not path.is_file():
            raise SftflowError(f"chat_template '{chat_template}': file not found")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    return tokenizer


class Formatter:
    """Renders rows with a prompt config and (optionally) a tokenizer's chat template."""

    def __init__(
        self,
        prompt: PromptConfig,
        tokenizer=None,
        system_message: str | None = None,
        chat_template_kwargs: dict | None = None,
        output_format: str = "input_output",
    ):
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.system = prompt.system_text() if system_message is None else system_message
        self.kwargs = dict(chat_template_kwargs or {})
        self.output_format = output_format
        self.mode = "plain"
        self.end_of_turn = ""
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            self.mode = "chat_template"
            self.end_of_turn = self._end_of_turn_text()
        elif tokenizer is not None:
            self.mode = "bos_prompt"
            self.end_of_turn = tokenizer.eos_token or ""

    def messages(self, user: str, assistant: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": user})
        if assistant is not None:
            msgs.append({"role": "assistant", "content": assistant})
        return msgs

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.kwargs
        )

    def _end_of_turn_text(self) -> str:
        """What the template writes after an assistant message's content (e.g. '<|im_end|>\\n')."""
        full = self._render(self.messages("x", _SENTINEL), add_generation_prompt=False)
        if _SENTINEL not in full:
            raise SftflowError("the tokenizer's chat template drops the assistant message; cannot build SFT targets")
        return full.split(_SENTINEL, 1)[1]

    def prompt_text(self, row: dict, where: str = "") -> str:
        """The model input for `row` (what generation at eval time also sends)."""
        user = self.prompt.fill(row, where)
        if self.mode == "chat_template":
            return self._render(self.messages(user), add_generation_prompt=True)
        text = f"{self.system}\n\n{user}" if self.system else user
        if self.mode == "bos_prompt":
            return (self.tokenizer.bos_token or "") + text
        return text

    def record(self, row: dict, solution: str, where: str = "") -> dict:
        if self.output_format == "messages":
            return {"messages": self.messages(self.prompt.fill(row, where), solution)}
        return {"input": self.prompt_text(row, where), "output": solution + self.end_of_turn}
