"""Turn a (problem, solution) row into the SFT record: chat-template-rendered input/output or messages."""

from __future__ import annotations

from pathlib import Path

from sftflow.errors import SftflowError
from sftflow.prepare.filters import TextMemo
from sftflow.prepare.prompts import PromptConfig


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
    """Renders rows with a prompt config and (optionally) a tokenizer's chat template.

    With a chat template, `input` is the conversation up to the assistant turn (generation prompt included) and
    `output` is what the template writes for the assistant turn: the full conversation's rendering minus
    `input`, so `input + output` is exactly the template's rendering of the whole conversation, whatever the
    template does to the content (Llama-3's `| trim`, Qwen3's think tags, a reasoning field). NeMo-Skills'
    WriteFinalSftManifest takes the same assistant-turn difference (docs/nemo-skills-parity.md).
    """

    def __init__(
        self,
        prompt: PromptConfig,
        tokenizer=None,
        system_message: str | None = None,
        chat_template_kwargs: dict | None = None,
        output_format: str = "input_output",
        assistant_end: str | None = None,
    ):
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.system = prompt.system_text() if system_message is None else system_message
        self.kwargs = dict(chat_template_kwargs or {})
        self.output_format = output_format
        self.assistant_end = assistant_end
        self.mode = "plain"
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            self.mode = "chat_template"
        elif tokenizer is not None:
            self.mode = "bos_prompt"
        self._rendered_prompts = TextMemo(lambda user: self._render(self.messages(user), add_generation_prompt=True))

    def messages(self, user: str, assistant: str | None = None, reasoning: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": user})
        if assistant is not None:
            msgs.append({"role": "assistant", "content": assistant})
            if reasoning is not None:
                # Templates name the field differently: Qwen3 and DeepSeek read reasoning_content, gpt-oss and
                # NeMo-Skills' format_assistant_response use thinking. Each template reads the one it knows.
                msgs[-1].update(reasoning_content=reasoning, thinking=reasoning)
        return msgs

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.kwargs
        )

    def prompt_text(self, row: dict, where: str = "") -> str:
        """The model input for `row` (what generation at eval time also sends)."""
        return self._prompt_of(self.prompt.fill(row, where))

    def _prompt_of(self, user: str) -> str:
        if self.mode == "chat_template":
            return self._rendered_prompts(user)  # a problem's seeds share one prompt: rendered once
        text = f"{self.system}\n\n{user}" if self.system else user
        if self.mode == "bos_prompt":
            return (self.tokenizer.bos_token or "") + text
        return text

    def _assistant_turn(self, prompt: str, user: str, solution: str, reasoning: str | None, where: str) -> str:
        """The chat template's rendering of the assistant turn: the whole conversation minus the prompt."""
        full = self._render(self.messages(user, solution, reasoning), add_generation_prompt=False)
        if not full.startswith(prompt):
            raise SftflowError(
                f"{where}the chat template renders the conversation with the assistant turn differently from the "
                "prompt it renders for generation (add_generation_prompt=True), so the assistant turn cannot be "
                "cut from it; fix the template (prepare_data.chat_template) or set prepare_data.assistant_end"
            )
        if reasoning and reasoning.strip() not in full[len(prompt) :]:
            raise SftflowError(
                f"{where}the row has a reasoning field (reasoning_content) but the chat template drops it: this "
                "template does not render reasoning; put the reasoning into the solution text (e.g. "
                "'<think>...</think>' + solution) before preparing, or use a template that renders it"
            )
        return full[len(prompt) :]

    def record(self, row: dict, solution: str, where: str = "", reasoning: str | None = None) -> dict:
        """The SFT record's input/output (or messages); `reasoning` is the row's reasoning_content, if any.

        A generation that did not finish (finish_reason other than "stop") gets no end of turn: the model must
        not learn to stop there.
        """
        user = self.prompt.fill(row, where)
        if self.output_format == "messages":
            return {"messages": self.messages(user, solution, reasoning)}
        prompt = self._prompt_of(user)
        finished = row.get("finish_reason", "stop") == "stop"
        if reasoning is not None and (self.assistant_end is not None or not finished or self.mode != "chat_template"):
            why = (
                "prepare_data.assistant_end is set"
                if self.assistant_end is not None
                else "the generation did not finish (finish_reason)"
                if not finished
                else "there is no chat template to render it (set tokenizer)"
            )
            raise SftflowError(f"{where}the row has reasoning_content, which cannot be rendered: {why}")
        if not finished:
            output = solution
        elif self.assistant_end is not None:
            output = solution + self.assistant_end
        elif self.mode == "chat_template":
            output = self._assistant_turn(prompt, user, solution, reasoning, where)
        elif self.mode == "bos_prompt":
            output = solution + (self.tokenizer.eos_token or "")
        else:
            output = solution
        return {"input": prompt, "output": output}
