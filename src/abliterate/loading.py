"""Loading the configured model: a hub id or local folder, a GGUF file, or the embedded refuser.

This sits above :mod:`abliterate.models` (the loaded model, chat formatting, config checks) and
:mod:`abliterate.refuser` (which builds the embedded model with those primitives), so neither
of them imports the other's caller: the dispatcher lives here.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate.config import ConfigError, ModelConfig, ModelSource, RecipeName, parse_choice
from abliterate.models import (
    LoadedModel,
    choose_batch_size,
    device_map_option,
    load_gguf_with_tokenizer,
    prepare_tokenizer,
    resolve_device,
    resolve_dtype,
)
from abliterate.provenance import model_identity
from abliterate.refuser import ensure_refuser, recipe_named


def load_model(cfg: ModelConfig, cache_dir: str | Path) -> LoadedModel:
    """Load the configured model and tokenizer.

    Args:
        cfg: a ``ModelConfig``.
        cache_dir: the project cache (the embedded refuser lives under ``<cache>/models``).
    """
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    placement = device_map_option(cfg)  # {} or {"device_map": ...}: accelerate places layers
    source = parse_choice(ModelSource, cfg.source, "model.source")  # a plain str from Python
    if source == ModelSource.embedded:
        recipe = getattr(cfg, "recipe", None)
        if recipe is not None:
            # a trial's config read back (chat, export) is not checked by the schema: a bad
            # recipe is a bad config value (one line), not a build failure
            recipe = parse_choice(RecipeName, recipe, "model.recipe")
        directory = ensure_refuser(Path(cache_dir), recipe_named(recipe))
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **placement)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        identity = model_identity("embedded", directory)
    elif source == ModelSource.gguf:
        path = Path(cfg.path)
        model, tokenizer = load_gguf_with_tokenizer(path, cfg.gguf_file, dtype)
        directory, file = (path, cfg.gguf_file) if path.is_dir() else (path.parent, path.name)
        assert file is not None  # loaded just above: a GGUF directory came with its gguf_file
        identity = model_identity("gguf", directory / file)
    else:
        local = Path(cfg.path)
        if (
            not cfg.allow_pickle
            and local.is_dir()
            and not any(local.glob("*.safetensors"))
            and any(local.glob("*.bin"))
        ):
            raise ConfigError(
                f"model.path={cfg.path} holds only pickle weights (.bin), which can run code when loaded; "
                "convert them to safetensors or set model.allow_pickle=true"
            )
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            # pickled (.bin) checkpoints can run code on load: only when explicitly allowed
            use_safetensors=None if cfg.allow_pickle else True,
            **placement,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
        identity = model_identity("hub", cfg.path, model.config, cfg.revision)
    if placement:
        # inputs go where the embedding is
        device = cast(torch.device, model.get_input_embeddings().weight.device)
    else:
        # transformers' stubs type the decorated .to() wrongly
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=prepare_tokenizer(tokenizer),
        name=cfg.name,
        identity=identity,
        device=device,
        system_prompt=cfg.system_prompt,
        disable_thinking=cfg.disable_thinking,
        batch_size=cfg.batch_size or choose_batch_size(model, device),
    )
