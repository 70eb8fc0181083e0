"""Residual-stream activations, every layer from one forward pass per batch, cached on disk.

The activation of a prompt at layer L is the output of decoder layer L (0-based; the residual
stream after that layer's writes) at the last prompt token after the chat template with the
generation prompt (``position=last``), or its mean over the template tokens that follow the
instruction (``position=mean_post_instruction``). Prompts are left-padded so the last token is at
index -1 in every row.

Entries live in ``<cache>/activations/<key>/activations.safetensors``, keyed by model identity,
dtype, prompts, position and chat template, and go through the caching layer
(:class:`abliterate.cache.DiskCache`: written atomically under a lock, checksummed, rebuilt when
damaged), so every later trial and process (and every SLURM job sharing the cache) reuses them.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from abliterate.architectures import get_decoder_layers
from abliterate.cache import DiskCache, content_key, save_safetensors_atomic
from abliterate.config import Position, parse_choice
from abliterate.hooks import Hook, attached
from abliterate.models import LoadedModel
from abliterate.prompts import PromptSet
from abliterate.templates import count_post_instruction_tokens, format_chat

log = logging.getLogger(__name__)


@dataclass
class Activations:
    """Per-prompt residual activations of one prompt set."""

    prompt_set: PromptSet
    values: torch.Tensor  # (n_prompts, n_layers, d_model) float32, CPU
    cache_hit: bool

    def mean(self, layer: int | None = None) -> torch.Tensor:
        """Mean over prompts, accumulated in float64: (n_layers, d_model) or (d_model,)."""
        values = self.values if layer is None else self.values[:, layer]
        return values.double().mean(dim=0)

    def category_means(self, layer: int | None = None) -> dict[str, torch.Tensor]:
        """Mean per category (float64)."""
        categories = self.prompt_set.categories
        means = {}
        for category in self.prompt_set.category_names():
            rows = [i for i, c in enumerate(categories) if c == category]
            values = self.values[rows] if layer is None else self.values[rows, layer]
            means[category] = values.double().mean(dim=0)
        return means


def template_fingerprint(loaded: LoadedModel) -> str:
    """Identifies the chat formatting (template, system prompt, thinking switch)."""
    probe = format_chat(
        loaded.tokenizer, ["{PROMPT}"], loaded.system_prompt, loaded.disable_thinking
    )[0]
    return hashlib.sha256(probe.encode()).hexdigest()[:12]


def activation_cache_key(
    loaded: LoadedModel, prompt_set: PromptSet, position: str, batch_size: int | None = None
) -> str:
    parts = {
        "model": loaded.identity,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "device": loaded.device.type,
        # padding follows the batch, and padding changes the last bits of every activation
        "batch_size": batch_size or loaded.batch_size,
        "prompts": prompt_set.fingerprint(),
        "position": position,
        "template": template_fingerprint(loaded),
    }
    return content_key(parts)


ENTRY_FILE = "activations.safetensors"


def _load_entry(directory: Path) -> torch.Tensor:
    return load_file(str(directory / ENTRY_FILE))["activations"]


def check_position(position: str) -> None:
    """A plain string from Python is checked; a composed config holds a Position already."""
    parse_choice(Position, position, "extraction.position", ValueError)


class PromptActivationCapture:
    """Every decoder layer's output at the prompt position, from the first forward of a batch.

    A context manager: hooks on the decoder layers are registered on entry and removed on exit
    (also on an error). Call :meth:`start_batch` before each batch's forward or ``generate`` call
    and :meth:`batch_values` after it. Only the first forward after ``start_batch`` is kept, so
    during ``generate`` this is the prefill over the whole prompt (later decoding steps see one
    token) and the activations come at no extra forward pass.
    """

    def __init__(self, loaded: LoadedModel, position: str):
        check_position(position)
        self.layers = get_decoder_layers(loaded.model)
        self.take = (
            1
            if position == "last"
            else count_post_instruction_tokens(
                loaded.tokenizer, loaded.system_prompt, loaded.disable_thinking
            )
        )
        self._captured: list[torch.Tensor] = []
        self._hooks = ExitStack()

    def _capture(self, _module, _inputs, output) -> None:
        if len(self._captured) < len(self.layers):
            hidden = output[0] if isinstance(output, tuple) else output  # (batch, seq, d_model)
            self._captured.append(hidden[:, -self.take :].float().mean(dim=1))  # (batch, d_model)

    def __enter__(self) -> PromptActivationCapture:
        self._hooks.enter_context(
            attached(Hook(layer, "forward", self._capture) for layer in self.layers)
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hooks.close()

    def start_batch(self) -> None:
        self._captured.clear()

    def batch_values(self) -> torch.Tensor:
        """(batch, n_layers, d_model) float32 on the CPU."""
        if len(self._captured) != len(self.layers):
            raise RuntimeError(
                f"captured {len(self._captured)} layer outputs, expected {len(self.layers)}"
            )
        return torch.stack(self._captured, dim=1).cpu()


def check_finite(values: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(values).all():
        raise FloatingPointError(
            "non-finite activations: check the model's dtype (float16 overflow?)"
        )
    return values


@torch.inference_mode()
def run_forward_passes(
    loaded: LoadedModel,
    prompts: tuple[str, ...] | list[str],
    position: str,
    batch_size: int,
    progress: str | None = None,
) -> torch.Tensor:
    """Activations of every layer for ``prompts``: (n_prompts, n_layers, d_model) float32 CPU."""
    check_position(position)
    tokenizer = loaded.tokenizer
    texts = format_chat(tokenizer, list(prompts), loaded.system_prompt, loaded.disable_thinking)
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    rows: dict[int, torch.Tensor] = {}
    decoder = loaded.model.get_decoder()  # no vocabulary head: only the residual stream is needed
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with PromptActivationCapture(loaded, position) as capture:
        for batch in tqdm(
            batches, desc=progress, disable=progress is None or len(batches) < 2, leave=False
        ):
            encoded = tokenizer(
                [texts[i] for i in batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(loaded.device)
            capture.start_batch()
            decoder(**encoded, use_cache=False)
            stacked = capture.batch_values()  # (batch, n_layers, d_model)
            for offset, index in enumerate(batch):
                rows[index] = stacked[offset]
    # (n_prompts, n_layers, d_model)
    return check_finite(torch.stack([rows[i] for i in range(len(texts))]))


def collect_activations(
    loaded: LoadedModel,
    prompt_set: PromptSet,
    position: str = "last",
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
) -> Activations:
    """Activations of ``prompt_set``, read from the cache when present, else computed and stored.

    Args:
        loaded: the (unedited) model.
        prompt_set: the prompts.
        position: ``last`` or ``mean_post_instruction``.
        batch_size: prompts per forward pass.
        cache_dir: the project cache; None disables caching.
    """
    if cache_dir is None:
        values = run_forward_passes(
            loaded, prompt_set.prompts, position, batch_size, progress=prompt_set.name
        )
        return Activations(prompt_set, values, cache_hit=False)
    disk = DiskCache(cache_dir, "activations")
    key = activation_cache_key(loaded, prompt_set, position, batch_size)

    def compute(directory: Path) -> torch.Tensor:
        values = run_forward_passes(
            loaded,
            prompt_set.prompts,
            position,
            batch_size,
            progress=f"activations {prompt_set.name}",
        )
        metadata = {
            "model": loaded.identity,
            "prompt_set": prompt_set.name,
            "position": position,
            "n_prompts": str(len(prompt_set)),
        }
        save_safetensors_atomic(
            directory / ENTRY_FILE, {"activations": values.contiguous()}, metadata
        )
        return values

    # concurrent jobs on a shared cache: one computes, the others wait on its lock and then read
    values, hit = disk.get_or_create(key, _load_entry, compute)
    return Activations(prompt_set, values, cache_hit=hit)
