"""Model loading: config and tokenizer reads, the checks that run before weights load, the load.

A model comes from a hub id or local directory (``source: hub``), a GGUF file (``source: gguf``),
or the embedded refusing model built by :mod:`abliterate.refuser` (``source: embedded``).
Per-model facts (repo id, dtype, thinking-mode handling) live in ``conf/model/*.yaml``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from abliterate.config import ConfigError, Dtype, ModelConfig, parse_choice
from abliterate.templates import format_chat

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# model.batch_size=0 (auto). On a CPU, throughput per token stops growing well before 32 prompts
# per batch and larger batches only add padding; on a GPU the bound is memory (choose_batch_size).
CPU_BATCH_SIZE = 32
MAX_BATCH_SIZE = 256
# What one sequence may need at once, for the GPU estimate: the full-vocabulary float32 logits and
# log-softmax of this many teacher-forced KL positions, plus keys, values and activations of a
# sequence this long (a generous bound for chat prompts + the response).
_KL_POSITIONS_BOUND = 64
_SEQUENCE_BOUND = 512


@dataclass
class LoadedModel:
    """A causal LM ready for activations, ablation and generation."""

    model: Any  # transformers PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    identity: str  # what the weights are (hub commit, folder or file signature): cache keys use it
    device: torch.device
    system_prompt: str | None = None
    disable_thinking: bool = True
    batch_size: int = 16  # prompts per forward pass / generate call


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    # a composed config holds a Dtype; a dtype passed from Python may be a plain string
    if parse_choice(Dtype, dtype, "model.dtype", ValueError) == Dtype.auto:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def choose_batch_size(model: Any, device: torch.device, free_bytes: int | None = None) -> int:
    """Prompts per forward pass / ``generate`` call when ``model.batch_size=0``.

    CPU: ``CPU_BATCH_SIZE``. GPU: the largest power of two up to ``MAX_BATCH_SIZE`` whose
    estimated working set fits half the free memory (the rest is headroom for the allocator and
    the weight edits): per sequence, 2 x 4 bytes x vocabulary x 64 KL positions plus
    4 x hidden x layers x 512 tokens x bytes per parameter. On a 139 GiB H200 this gives 128 for a
    Qwen3.5-2B-sized model, i.e. a study's evaluation sets in one or two batches.

    Args:
        model: the loaded transformers model.
        device: where it runs.
        free_bytes: free device memory; read from the device when None.
    """
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    text = model.config.get_text_config()
    bytes_per_parameter = next(model.parameters()).element_size()
    per_sequence = 2 * 4 * text.vocab_size * _KL_POSITIONS_BOUND + (
        4 * text.hidden_size * text.num_hidden_layers * _SEQUENCE_BOUND * bytes_per_parameter
    )
    fits = max(1, int(free_bytes // 2 // per_sequence))
    return 1 << (min(fits, MAX_BATCH_SIZE).bit_length() - 1)  # largest power of two <= both


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (last prompt token at position -1 for every row), and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_chat_template(tokenizer, tokenizer.name_or_path)
    return tokenizer


def check_chat_template(tokenizer: PreTrainedTokenizerBase, path: Any) -> None:
    """Raise ConfigError when the tokenizer has no chat template (a base, not a chat, model)."""
    if tokenizer.chat_template is None:
        raise ConfigError(
            f"model.path={str(path)!r}: its tokenizer has no chat template; abliteration measures "
            "an instruction-tuned model's refusals, so use a chat model (or give the tokenizer a "
            "chat_template)"
        )


def _gguf_location(cfg: ModelConfig) -> tuple[Path, str]:
    """(directory, file name) of a ``source: gguf`` model, checked to exist."""
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        if not cfg.gguf_file:
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ConfigError(
                f"model.path={cfg.path!r} is a directory; set model.gguf_file to one of its "
                f"GGUF files ({', '.join(found) or 'it holds none'})"
            )
        if not (path / cfg.gguf_file).is_file():
            raise ConfigError(f"model.gguf_file={cfg.gguf_file!r}: no such file in {cfg.path}")
        return path, cfg.gguf_file
    if not path.is_file():
        raise ConfigError(f"model.path={cfg.path!r}: no such GGUF file (model.source=gguf)")
    return path.parent, path.name


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_hub_path(cfg: ModelConfig) -> None:
    """A ``source: hub`` path is an existing directory or a valid hub repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(cfg.path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"model.path={cfg.path!r} is a file; model.source=hub needs a model directory "
                "or a hub repo id (model.source=gguf for a .gguf file)"
            )
        return
    try:
        validate_repo_id(str(cfg.path))
    except HFValidationError:
        raise ConfigError(
            f"model.path={cfg.path!r}: no such directory, and not a hub repo id (org/name)"
        ) from None


def _unreachable(cfg: ModelConfig, error: Exception) -> ConfigError:
    """The message for a hub id (or a directory) whose config.json cannot be read."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if Path(cfg.path).expanduser().is_dir():
        return ConfigError(
            f"model.path={cfg.path!r} is not a transformers model directory (its config.json "
            f"cannot be read: {first_line})"
        )
    revision = f" at model.revision={cfg.revision!r}" if cfg.revision else ""
    if _hub_offline():
        return ConfigError(
            f"model.path={cfg.path!r}{revision} is neither a local directory nor in the local "
            "Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it; download it "
            f"where the hub is reachable (hf download {cfg.path}) or set model.path to a "
            "local directory"
        )
    return ConfigError(
        f"model.path={cfg.path!r}{revision} is not a local directory and could not be read "
        f"from the Hugging Face hub: {first_line}"
    )


def read_model_config(cfg: ModelConfig) -> Any:
    """The model's transformers config, read without loading weights (for early validation).

    Raises:
        ConfigError: the path does not exist, a hub id is neither cached nor reachable (names
            ``HF_HUB_OFFLINE``), or a GGUF file's architecture is one transformers cannot read.
    """
    if cfg.source == "gguf":
        directory, file = _gguf_location(cfg)
        try:
            return AutoConfig.from_pretrained(directory, gguf_file=file)
        except ValueError as error:
            if "not supported" not in str(error):
                raise
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) & set(GGUF_MODEL_TYPES))
            raise ConfigError(
                f"model.path={cfg.path!r}: {error} (transformers reads GGUF files of "
                f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}; abliterate supports "
                f"{', '.join(supported)})"
            ) from None
    _check_hub_path(cfg)
    try:
        return AutoConfig.from_pretrained(
            cfg.path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except OSError as error:
        raise _unreachable(cfg, error) from None
    except ValueError as error:
        if "trust_remote_code" in str(error):  # the checkpoint ships its own code
            raise ConfigError(
                f"model.path={cfg.path!r} needs its own Python code to load (config auto_map); "
                "it is never run unless asked: set model.trust_remote_code=true only for code "
                "you have read"
            ) from None
        if not Path(cfg.path).expanduser().is_dir():
            raise
        # a directory whose config.json is not a transformers config
        raise _unreachable(cfg, error) from None


# GGUF architectures (llama.cpp names, as transformers maps them) whose model classes
# abliterate.architectures supports
GGUF_MODEL_TYPES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "gemma3",
)


def model_class_name(config: Any, trust_remote_code: bool = False) -> str | None:
    """The class ``AutoModelForCausalLM`` instantiates for ``config`` (it goes by
    ``model_type``, not by ``config.architectures``); None when it has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return str(auto_map["AutoModelForCausalLM"]).rsplit(".", 1)[-1]
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(getattr(config, "model_type", "")))


def check_architecture(config: Any, cfg: ModelConfig) -> str:
    """The model class ``cfg`` would load, checked against the residual-writer registry from the
    config alone (an unsupported model used to fail only after its weights had loaded).

    Raises:
        ConfigError: naming the model type, its class and the supported classes.
    """
    from abliterate.architectures import ARCHITECTURES

    name = model_class_name(config, bool(cfg.trust_remote_code))
    model_type = getattr(config, "model_type", None)
    declared = getattr(config, "architectures", None)
    supported = ", ".join(sorted(ARCHITECTURES))
    if name is None:
        raise ConfigError(
            f"model.path={cfg.path!r} is a {model_type!r} model (architectures {declared}), which "
            f"transformers cannot load as a causal language model; supported: {supported}"
        )
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"model.path={cfg.path!r} loads as {name} (model_type {model_type!r}), whose "
            f"residual-stream writers abliterate does not know; supported: {supported} (add an "
            "ArchitectureSpec to abliterate.architectures.ARCHITECTURES)"
        )
    return name


def read_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase | None:
    """The configured model's tokenizer without its weights; None for the embedded model (its
    tokenizer exists only once it is built)."""
    if cfg.source == "embedded":
        return None
    if cfg.source == "gguf":
        directory, file = _gguf_location(cfg)
        return AutoTokenizer.from_pretrained(directory, gguf_file=file)
    try:
        return AutoTokenizer.from_pretrained(
            cfg.path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except OSError as error:
        raise _unreachable(cfg, error) from None


def context_length(config: Any) -> int | None:
    """Positions the model was trained for (``max_position_embeddings`` of its text config);
    None when the config does not say."""
    value = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


@dataclass(frozen=True)
class PromptLengthCheck:
    """Prompts that must fit the model's context, and what is generated after each."""

    name: str  # the set's config key, e.g. data.harmful_eval
    prompts: Sequence[str]
    new_tokens: int = 0  # tokens generated or teacher-forced after each prompt (0: extraction)
    new_tokens_key: str | None = None  # the config key that sets them
    indexed_in: Sequence[str] | None = None  # the loaded set whose positions messages name


def check_prompt_lengths(
    tokenizer: PreTrainedTokenizerBase,
    context: int | None,
    checks: Sequence[PromptLengthCheck],
    system_prompt: str | None = None,
    disable_thinking: bool = True,
) -> None:
    """Every prompt, as the chat template renders it, fits the model's context together with
    the tokens generated after it. Prompts are never truncated.

    Args:
        tokenizer: the model's tokenizer (with its chat template).
        context: ``context_length`` of the model's config (None: nothing is checked).
        checks: the sets to check.
        system_prompt, disable_thinking: as the model config's (they change the rendering).

    Raises:
        ConfigError: naming the set, the prompt's index (0-based, in the set as loaded) and
            start, its length, the new tokens and the context.
    """
    if context is None:
        return
    for check in checks:
        if not len(check.prompts):
            continue
        texts = format_chat(tokenizer, list(check.prompts), system_prompt, disable_thinking)
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for prompt, length in zip(check.prompts, lengths, strict=True):
            if length + check.new_tokens <= context:
                continue
            index = (check.indexed_in or check.prompts).index(prompt)
            key = check.new_tokens_key
            extra = f" + {key}={check.new_tokens}" if key else ""
            raise ConfigError(
                f"{check.name}: prompt {index} ({prompt[:40]!r}) is {length} tokens with the "
                f"chat template{extra} = {length + check.new_tokens}, more than the model's "
                f"context of {context} tokens (max_position_embeddings); prompts are never "
                "truncated: shorten or remove it" + (f", or lower {key}" if key else "")
            )


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_option(cfg: ModelConfig) -> dict[str, Any]:
    """``model.device_map`` as a ``from_pretrained`` option, checked before any weights load.

    null: the whole model on ``model.device``. Otherwise accelerate places the layers: one of
    DEVICE_MAPS (spread over every visible GPU, then the CPU) or one device (``cpu``, ``cuda:1``).
    """
    device_map = getattr(cfg, "device_map", None)
    if device_map is None:
        return {}
    if cfg.source == "gguf":
        raise ConfigError(
            f"model.device_map={device_map!r} is for model.source=hub or embedded; a GGUF model "
            "loads on model.device (set model.device_map=null)"
        )
    if device_map not in DEVICE_MAPS:
        try:
            torch.device(device_map)
        except (RuntimeError, TypeError):
            raise ConfigError(
                f"model.device_map={device_map!r} is not valid; choose one of "
                f"{', '.join(DEVICE_MAPS)}, a device (cpu, cuda, cuda:N) or null"
            ) from None
    return {"device_map": device_map}


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Parse a GGUF file once, and build gguf-py's name table once, while a model loads.

    transformers reads the file anew for the config, for the weights and for the tokenizer (each
    a full ``gguf.GGUFReader`` parse of SmolLM2-135M's 49k-token vocabulary, about 5 s on 2
    cores, then every field converted to Python values), and maps tensor names once per module
    of the model, each call rebuilding gguf-py's full name table (397 rebuilds). All of it
    depends only on the file (and on (architecture, number of blocks)) and is only read, so
    inside this context the reader, the metadata read and the table are made once (measured in
    fresh processes: SmolLM2's model and tokenizer load in 11.5-13 s instead of 16-22 s); the
    weights and the tokenizer that load are the same.
    """
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original_map, original_reader = gguf.get_tensor_name_map, gguf.GGUFReader
    original_checkpoint = gguf_utils.load_gguf_checkpoint
    readers: dict[tuple[str, str], Any] = {}
    metadata: dict[str, dict] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)  # type: ignore[arg-type]
        return readers[key]

    def checkpoint(
        path: Any, return_tensors: bool = False, model_to_load: Any = None, **kwargs: Any
    ) -> dict:
        # the metadata-only reads (config, tokenizer) convert every field to Python values:
        # once per file, each caller getting its own copy
        if return_tensors or model_to_load is not None:
            return original_checkpoint(path, return_tensors, model_to_load, **kwargs)
        key = str(Path(path).resolve())
        if key not in metadata:
            metadata[key] = original_checkpoint(path, False, **kwargs)
        return copy.deepcopy(metadata[key])

    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    gguf.GGUFReader = reader  # type: ignore[misc,assignment]
    gguf_utils.load_gguf_checkpoint = checkpoint  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original_map
        gguf.GGUFReader = original_reader  # type: ignore[misc]
        gguf_utils.load_gguf_checkpoint = original_checkpoint
        readers.clear()
        metadata.clear()


def load_gguf_as_plain_model(path: Path, gguf_file: str | None, dtype: torch.dtype) -> Any:
    """Load a GGUF file, dequantized, as an ordinary (saveable, editable) transformers model.

    transformers flags a GGUF-loaded model as quantized, which blocks ``save_pretrained``; the
    weights are already dequantized, so the model is rebuilt from its config and state dict.
    """
    directory, file = (path, gguf_file) if path.is_dir() else (path.parent, path.name)
    with _gguf_parsed_once():
        gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=dtype)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # transformers' stubs type the decorated .to() wrongly
    model = type(gguf_model)(config).to(dtype)  # type: ignore[arg-type]
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head is absent from the state dict of some checkpoints; anything else is an error.
    missing = [
        name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")
    ]
    if missing or unexpected:
        raise RuntimeError(f"rebuilding {file}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def load_gguf_with_tokenizer(path: Path, gguf_file: str | None, dtype: torch.dtype) -> tuple:
    """(model, tokenizer) from one GGUF file (``path``: the file, or its directory with
    ``gguf_file``), the file parsed once for both (``load_gguf_as_plain_model``)."""
    directory, file = (path, gguf_file) if path.is_dir() else (path.parent, path.name)
    if file is None:
        raise ConfigError(f"{path} is a directory: name its GGUF file (model.gguf_file)")
    with _gguf_parsed_once():
        model = load_gguf_as_plain_model(path, gguf_file, dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    return model, tokenizer
