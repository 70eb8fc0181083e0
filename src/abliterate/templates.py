"""Chat formatting: each prompt as one user turn of the model's chat template.

Every stage that turns prompts into model input (activations, generation, the unedited model's
evaluation, the prompt-length check, the embedded refuser's training data) renders them here, so
they all see the same text. The per-model settings (system prompt, thinking switch) are the
caller's, from ``conf/model/*.yaml``.
"""

from __future__ import annotations

from typing import cast

from transformers import PreTrainedTokenizerBase


def format_chat(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str] | tuple[str, ...],
    system_prompt: str | None = None,
    disable_thinking: bool = True,
) -> list[str]:
    """Each prompt as one user turn with the generation prompt appended.

    Thinking-mode templates (Qwen3/3.5) get ``enable_thinking=False`` so activations and responses
    start at the answer; templates without that switch ignore the extra variable.
    """
    formatted = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=not disable_thinking,
        )
        formatted.append(cast(str, text))  # tokenize=False: one conversation renders to a str
    return formatted


def count_post_instruction_tokens(
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = None,
    disable_thinking: bool = True,
) -> int:
    """How many template tokens follow the user's instruction (end-of-turn, assistant header...)."""
    sentinel = "ZQXJ sentinel"
    text = format_chat(tokenizer, [sentinel], system_prompt, disable_thinking)[0]
    suffix = text.split(sentinel, 1)[1]
    return max(1, len(tokenizer(suffix, add_special_tokens=False)["input_ids"]))
