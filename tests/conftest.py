"""Shared fixtures: a character-level chat tokenizer for tiny models, and a safe environment."""

from __future__ import annotations

import os
import string

import pytest
import torch

# Tests never touch the network or a real W&B account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads(request):
    """Tiny models run fastest on one thread (thread start-up dominates their tiny matmuls);
    tests marked ``slow`` run the embedded model and get every core."""
    threads = DEFAULT_THREADS if request.node.get_closest_marker("slow") else 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(previous)


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer():
    """A ChatML tokenizer whose tokens are single characters (vocabulary < 128)."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
    characters = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: index for index, token in enumerate(specials + characters)}
    assert len(vocab) <= 128, len(vocab)
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.add_special_tokens(specials)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


@pytest.fixture()
def tiny_loaded(char_tokenizer):
    """A factory: ``tiny_loaded("llama")`` -> LoadedModel over a tiny random-init model."""
    from tiny_models import build_tiny_model

    from abliterate.models import LoadedModel

    def make(family: str = "llama", seed: int = 0):
        model = build_tiny_model(family, seed=seed)
        model.eval()
        model.generation_config.pad_token_id = char_tokenizer.pad_token_id
        model.generation_config.eos_token_id = char_tokenizer.eos_token_id
        return LoadedModel(
            model, char_tokenizer, f"tiny-{family}", f"tiny:{family}:{seed}", torch.device("cpu")
        )

    return make


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-init llama and the char tokenizer saved to disk: loads like a real model."""
    from tiny_models import build_tiny_model

    directory = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_model("llama", seed=0)
    # one token per character: the builtin prompts with the chat template (up to ~200) and the
    # new tokens must fit the context a trial checks (models.check_prompt_lengths); RoPE has no
    # position table, so the weights are the same
    model.config.max_position_embeddings = 512
    tokenizer = build_char_tokenizer()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
