"""Talk to an edited model in the terminal.

    python -m abliterate.chat TRIAL_DIR            # the trial's edit, applied in memory
    python -m abliterate.chat MODEL_DIR            # a folder from abliterate.export (or any model)
    python -m abliterate.chat MODEL_ID             # a hub model (needs the network or its cache)
    python -m abliterate.chat TARGET --prompt "..."   # answer once and exit

A trial directory (one with results.json) is loaded as the trial loaded its model and edited
with the trial's own directions and settings, through the functions :mod:`abliterate.export`
uses, so the chat talks to the model the export writes. Replies are greedy by default (as the
trial's evaluation), with the model's chat template over the whole conversation; the system
prompt and thinking-mode switch are the trial's (an exported folder records them in
abliteration_card.json). Commands: ``/reset`` forgets the conversation, ``/exit`` (or end of
input) leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf
from transformers import TextStreamer

from abliterate import records
from abliterate.config import ConfigError, Dtype, ModelConfig, ModelSource, parse_choice
from abliterate.export import (
    CARD_FILE,
    ExportError,
    applied_edit,
    load_trial_model,
    read_trial_edit,
)
from abliterate.generation import end_token_ids
from abliterate.loading import load_model
from abliterate.models import LoadedModel

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


class ChatError(ValueError):
    """A chat target that cannot be loaded; the message is one line."""


@dataclass
class Conversation:
    """A multi-turn conversation with one model.

    Attributes:
        loaded: the model (edited, when it came from a trial).
        max_new_tokens: the longest reply, in tokens.
        temperature: 0 for greedy decoding, else the sampling temperature.
        messages: the user and assistant turns so far (the system prompt is added per call).
    """

    loaded: LoadedModel
    max_new_tokens: int = 256
    temperature: float = 0.0
    messages: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.messages.clear()

    def _input_ids(self) -> torch.Tensor:
        """The conversation through the chat template, with the generation prompt; the oldest
        turns are dropped while it would not fit the model's context with a full reply."""
        tokenizer, loaded = self.loaded.tokenizer, self.loaded
        limit = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
        while True:
            messages = list(self.messages)
            if loaded.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": loaded.system_prompt})
            text = cast(
                str,
                tokenizer.apply_chat_template(
                    messages,
                    tokenize=False,
                    add_generation_prompt=True,
                    enable_thinking=not loaded.disable_thinking,
                ),
            )
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            too_long = limit is not None and ids.shape[1] + self.max_new_tokens > limit
            if not too_long or len(self.messages) <= 1:
                return ids
            del self.messages[:2]  # forget the oldest exchange

    def reply(self, text: str, stream: bool = False) -> str:
        """Add a user turn, generate the assistant's reply (printed as it comes when
        ``stream``), add it to the conversation and return it."""
        self.messages.append({"role": "user", "content": text})
        input_ids = self._input_ids().to(self.loaded.device)  # (1, prompt tokens)
        tokenizer = self.loaded.tokenizer
        streamer = (
            TextStreamer(cast(Any, tokenizer), skip_prompt=True, skip_special_tokens=True)
            if stream
            else None
        )
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": self.temperature}
            if self.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        with torch.no_grad():
            output = self.loaded.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=end_token_ids(self.loaded).tolist(),
                streamer=streamer,
                **sampling,
            )
        new_tokens = output[0, input_ids.shape[1] :]
        answer = cast(str, tokenizer.decode(new_tokens, skip_special_tokens=True)).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def is_trial_dir(path: Path) -> bool:
    return path.is_dir() and (path / records.RESULTS_FILE).is_file()


@contextlib.contextmanager
def open_target(
    target: str, device: str | None = None, dtype: str | None = None
) -> Iterator[LoadedModel]:
    """The model to chat with, as a context: a trial directory's model with the trial's edit
    applied (and restored on exit), or a model folder / hub id loaded as it is.

    Raises:
        ChatError: the target is neither a trial, a model folder nor a loadable hub id.
        ExportError: a trial whose edit cannot be rebuilt (see :func:`read_trial_edit`).
    """
    path = Path(target).expanduser()
    if is_trial_dir(path):
        if dtype is not None:
            raise ChatError("--dtype applies to a model folder or id; a trial uses its own")
        edit = read_trial_edit(path)
        # other weights than the trial's: a warning here (exploring), an error in export
        loaded, writers = load_trial_model(edit, device, check_identity=False)
        with applied_edit(writers, edit):
            yield loaded
        return
    if path.is_dir() and not (path / "config.json").is_file():
        raise ChatError(
            f"{target} is neither a trial directory (no {records.RESULTS_FILE}) nor a model "
            "folder (no config.json)"
        )
    if not path.exists() and (target.startswith((".", "/", "~")) or target.count("/") > 1):
        raise ChatError(
            f"{target} does not exist (give a trial directory, a model folder or a hub id)"
        )
    yield load_plain_model(target, path, device, dtype)


def load_plain_model(target: str, path: Path, device: str | None, dtype: str | None) -> LoadedModel:
    """A model folder or hub id, loaded like ``model=hub model.path=TARGET``; an exported
    folder's abliteration_card.json supplies the trial's chat settings."""
    chat_settings: dict[str, Any] = {}
    card = path / CARD_FILE
    if card.is_file():
        with contextlib.suppress(ValueError, OSError):
            chat_settings = json.loads(card.read_text()).get("chat") or {}
    model_cfg = OmegaConf.structured(
        ModelConfig(
            name=path.name if path.is_dir() else target,
            source=ModelSource.hub,
            path=str(path) if path.is_dir() else target,
            dtype=parse_choice(Dtype, dtype or "auto", "--dtype", ChatError),
            device=device or "auto",
            default_layer=0,
            system_prompt=chat_settings.get("system_prompt"),
            disable_thinking=bool(chat_settings.get("disable_thinking", True)),
        )
    )
    try:
        return load_model(model_cfg, ".")
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ChatError(f"{target} cannot be loaded as a model: {first_line}") from None


def run_interactive(conversation: Conversation, name: str) -> None:
    print(f"chatting with {name}; /reset forgets the conversation, /exit leaves", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        command = line.strip()
        if not command:
            continue
        if command in EXIT_COMMANDS:
            return
        if command == RESET_COMMAND:
            conversation.reset()
            print("(conversation reset)", flush=True)
            continue
        print("model> ", end="", flush=True)
        conversation.reply(line, stream=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abliterate.chat",
        description="Chat with an edited model: a trial directory (its edit applied in memory), "
        "an exported folder, or a hub model id.",
    )
    parser.add_argument("target", help="TRIAL_DIR, MODEL_DIR or MODEL_ID")
    parser.add_argument("--prompt", default=None, help="answer this once and exit")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=256, help="longest reply (tokens)"
    )
    parser.add_argument(
        "--temperature",
        type=_non_negative,
        default=0.0,
        help="0: greedy, as the trial's evaluation (default); > 0 samples",
    )
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--dtype", default=None, help="for a folder or id: float32 | bfloat16 | float16 | auto"
    )
    args = parser.parse_args(argv)
    try:
        with open_target(args.target, args.device, args.dtype) as loaded:
            conversation = Conversation(loaded, args.max_new_tokens, args.temperature)
            if args.prompt is not None:
                print(conversation.reply(args.prompt), flush=True)
            else:
                run_interactive(conversation, args.target)
    except (ChatError, ExportError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
