"""Prompt sets: the builtin corpus, its deterministic splits, and user sources (hub, file).

The builtin corpus (``abliterate/data/*.jsonl``) holds harmful requests in 9 categories, topic-
matched harmless requests per category, and a pool of generic (unmatched) harmless instructions.
Each is split deterministically into three disjoint parts: ``refuser_train`` (fine-tuning the
embedded refusing model), ``extraction`` (refusal directions) and ``evaluation`` (held out).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from abliterate.categorize import describe, keyword_categories
from abliterate.config import (
    BuiltinPromptSet,
    BuiltinSplit,
    Categorize,
    PromptSetConfig,
    PromptSource,
    parse_choice,
)

BUILTIN_KINDS: tuple[str, ...] = tuple(kind.value for kind in BuiltinPromptSet)
SPLITS: tuple[str, ...] = tuple(split.value for split in BuiltinSplit)
# Fractions of each category (or of the unmatched pool) that go to each split, in SPLITS order.
SPLIT_FRACTIONS = (1 / 3, 0.4, None)  # None: the rest

log = logging.getLogger(__name__)


class PromptDataError(ValueError):
    """A prompt source is malformed; the message names the file and line (or dataset/column)."""


@dataclass(frozen=True)
class PromptSet:
    """An ordered list of prompts with an optional category per prompt."""

    name: str
    prompts: tuple[str, ...]
    categories: tuple[str | None, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.categories:
            object.__setattr__(self, "categories", (None,) * len(self.prompts))
        if len(self.categories) != len(self.prompts):
            raise ValueError(
                f"{self.name}: {len(self.prompts)} prompts but {len(self.categories)} categories"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def by_category(self) -> dict[str, list[str]]:
        """Prompts grouped by category, in corpus order (uncategorised prompts under '')."""
        grouped: dict[str, list[str]] = defaultdict(list)
        for prompt, category in zip(self.prompts, self.categories, strict=True):
            grouped[category or ""].append(prompt)
        return dict(grouped)

    def category_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for category in self.categories:
            if category is not None:
                seen.setdefault(category, None)
        return list(seen)

    def fingerprint(self) -> str:
        """A content hash of prompts and categories (cache keys use it)."""
        digest = hashlib.sha256()
        for prompt, category in zip(self.prompts, self.categories, strict=True):
            digest.update(prompt.encode())
            digest.update(b"\x1f")
            digest.update((category or "").encode())
            digest.update(b"\x1e")
        return digest.hexdigest()[:16]

    def select(
        self,
        *,
        per_category: int | None = None,
        limit: int | None = None,
        skip_per_category: int = 0,
    ) -> PromptSet:
        """A stratified subset: at most ``per_category`` per category, then at most ``limit`` in all,
        taken round-robin over categories so every category stays represented."""
        grouped: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        for prompt, category in zip(self.prompts, self.categories, strict=True):
            grouped[category or ""].append((prompt, category))
        grouped = {key: items[skip_per_category:] for key, items in grouped.items()}
        if per_category is not None:
            grouped = {key: items[:per_category] for key, items in grouped.items()}
        rows: list[tuple[str, str | None]] = []
        queues = [list(items) for items in grouped.values()]
        while any(queues) and (limit is None or len(rows) < limit):
            for queue in queues:
                if queue and (limit is None or len(rows) < limit):
                    rows.append(queue.pop(0))
        return PromptSet(self.name, tuple(p for p, _ in rows), tuple(c for _, c in rows))


def _read_builtin_rows(kind: str | None) -> list[dict[str, Any]]:
    if kind not in BUILTIN_KINDS:
        raise PromptDataError(
            f"builtin prompt set {kind!r} does not exist; choose one of {', '.join(BUILTIN_KINDS)}"
        )
    text = resources.files("abliterate.data").joinpath(f"{kind}.jsonl").read_text(encoding="utf-8")
    return _parse_jsonl(text, f"abliterate/data/{kind}.jsonl")


def _lines(text: str) -> list[str]:
    """Lines as a text editor numbers them: split on newlines only (``str.splitlines`` also
    splits on U+2028, U+0085 and other separators that JSON strings may hold unescaped)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parse_jsonl(text: str, origin: str) -> list[dict[str, Any]]:
    rows = []
    for line_number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptDataError(
                f"{origin}:{line_number}: not valid JSON ({error.msg})"
            ) from error
        except (ValueError, RecursionError) as error:  # e.g. an over-long integer, deep nesting
            raise PromptDataError(
                f"{origin}:{line_number}: not valid JSON ({type(error).__name__}: {error})"
            ) from error
        if not isinstance(row, dict):
            raise PromptDataError(
                f"{origin}:{line_number}: expected a JSON object, got {type(row).__name__}"
            )
        row["_line"] = line_number
        rows.append(row)
    return rows


def _split_order_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def split_rows(
    rows: list[dict[str, Any]], split: str, key: str = "category"
) -> list[dict[str, Any]]:
    """The rows of one deterministic split.

    Within each category (or the whole pool when rows have no category), rows are ordered by a
    hash of their text and cut by ``SPLIT_FRACTIONS``; the split therefore depends only on the
    prompt text, not on file order, and the three splits are disjoint by construction.
    """
    if split not in SPLITS:
        raise PromptDataError(f"split {split!r} does not exist; choose one of {', '.join(SPLITS)}")
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row.get(key) or ""].append(row)
    index = SPLITS.index(split)
    chosen: list[dict[str, Any]] = []
    for group in grouped.values():
        ordered = sorted(group, key=lambda row: _split_order_key(row["prompt"]))
        bounds = [0]
        for fraction in SPLIT_FRACTIONS[:-1]:
            bounds.append(bounds[-1] + round(len(ordered) * fraction))
        bounds.append(len(ordered))
        chosen.extend(ordered[bounds[index] : bounds[index + 1]])
    return chosen


def load_builtin(
    kind: str | None, split: str | None, categories: list[str] | None = None
) -> PromptSet:
    """A builtin prompt set (``harmful``, ``matched`` or ``unmatched``), one split or all of it."""
    rows = _read_builtin_rows(kind)
    if split is not None:
        rows = split_rows(rows, split)
    if categories is not None and kind != "unmatched":
        rows = [row for row in rows if row.get("category") in categories]
    name = f"{kind}/{split or 'all'}"
    return PromptSet(name, tuple(r["prompt"] for r in rows), tuple(r.get("category") for r in rows))


def load_refusal_texts() -> list[str]:
    """The hand-written refusals the embedded refuser is trained to give."""
    text = resources.files("abliterate.data").joinpath("refusals.jsonl").read_text(encoding="utf-8")
    return [row["text"] for row in _parse_jsonl(text, "abliterate/data/refusals.jsonl")]


def _rows_from_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PromptDataError(f"prompt file {str(path)!r} does not exist")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PromptDataError(f"{path}: cannot be read ({error.strerror or error})") from error
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not part of the header
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PromptDataError(
            f"{path}:{line}: not valid UTF-8 (byte offset {error.start})"
        ) from error
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _parse_jsonl(text, str(path))
    if suffix == ".json":
        return _rows_from_json(text, path)
    if suffix in (".csv", ".tsv"):
        return _rows_from_csv(text, path, "\t" if suffix == ".tsv" else ",")
    if suffix in (".txt", ""):
        return [
            {"prompt": line, "_line": i + 1} for i, line in enumerate(_lines(text)) if line.strip()
        ]
    raise PromptDataError(
        f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .tsv or .txt"
    )


def _rows_from_json(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptDataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    except (ValueError, RecursionError) as error:
        raise PromptDataError(
            f"{path}: not valid JSON ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(data, list):
        raise PromptDataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise PromptDataError(
                f"{path}: item {index + 1} of the list is a {type(row).__name__}, not an object"
            )
    return [dict(row, _line=f"item {i + 1}") for i, row in enumerate(data)]


def _rows_from_csv(text: str, path: Path, delimiter: str) -> list[dict[str, Any]]:
    """Rows keyed by the header; ``_line`` is the line where each record starts (quoted fields
    may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[dict[str, Any]] = []
    try:
        header = next(reader, None)
        if header is None:
            return rows
        start = reader.line_num + 1
        for record in reader:
            if any(field.strip() for field in record):
                if len(record) > len(header):
                    raise PromptDataError(
                        f"{path}:{start}: {len(record)} fields but the header has {len(header)}"
                    )
                row: dict[str, Any] = dict(zip(header, record, strict=False))
                row["_line"] = start
                rows.append(row)
            start = reader.line_num + 1
    except csv.Error as error:
        raise PromptDataError(f"{path}:{reader.line_num}: not valid CSV ({error})") from error
    return rows


def _rows_from_hub(path: str, split: str | None, config_name: str | None) -> list[dict[str, Any]]:
    """The rows of one split of a hub dataset (a repo id, or a local folder laid out as one)."""
    import datasets  # imported lazily: only hub sources need it

    try:
        dataset = datasets.load_dataset(path, config_name, split=split or "train")
    except Exception as error:  # network, missing dataset, bad config or split: all end alike
        config = f"config {config_name!r}, " if config_name else ""
        raise PromptDataError(
            f"hub dataset {path!r} ({config}split {split!r}) could not be loaded: {error}"
        ) from error
    return [dict(row, _line=i + 1) for i, row in enumerate(dataset)]


def _column_values(
    rows: list[dict[str, Any]],
    column: str,
    category_column: str | None,
    origin: str,
    allow_duplicates: bool = False,
) -> tuple[list[str], list[str | None]]:
    """The prompt (and category) of every row; duplicates raise, or warn when allowed (public hub
    datasets used as published, e.g. Alpaca, repeat some instructions)."""
    prompts: list[str] = []
    categories: list[str | None] = []
    first_seen: dict[str, Any] = {}
    duplicates: list[str] = []
    for row in rows:
        where = f"{origin}:{row.get('_line', '?')}"
        available = sorted(str(k) for k in row if k != "_line")
        if column not in row:
            raise PromptDataError(f"{where}: no column {column!r}; columns are {available}")
        value = row[column]
        if not isinstance(value, str) or not value.strip():
            raise PromptDataError(f"{where}: column {column!r} is empty or not text")
        prompt = value.strip()
        if prompt in first_seen:
            # a repeated prompt counts twice in every mean and can sit in two splits at once
            message = (
                f"{where}: duplicate prompt (same text as {first_seen[prompt]}): {prompt[:60]!r}"
            )
            if not allow_duplicates:
                raise PromptDataError(message)
            duplicates.append(message)
        first_seen.setdefault(prompt, row.get("_line", "?"))
        prompts.append(prompt)
        if category_column is not None:
            if category_column not in row:
                raise PromptDataError(
                    f"{where}: no category column {category_column!r}; columns are {available}"
                )
            category = row[category_column]
            if category is None or not str(category).strip():
                raise PromptDataError(f"{where}: category column {category_column!r} is empty")
            categories.append(str(category))
        else:
            categories.append(None)
    if duplicates:
        log.warning(
            "%s: %d duplicate prompts kept (first: %s)", origin, len(duplicates), duplicates[0]
        )
    return prompts, categories


def _keep_categories(
    name: str, prompt_set: PromptSet, categories: list[str], origin: str
) -> PromptSet:
    """``data.categories`` applied to a categorised hub or file set, as to a builtin one.

    Raises:
        PromptDataError: none of the set's categories is in ``data.categories`` (it would be
            empty; ``data.categories=[]`` takes the set's own categories).
    """
    own = prompt_set.category_names()
    dropped = [c for c in own if c not in categories]
    if not dropped:
        return prompt_set
    if len(dropped) == len(own):
        raise PromptDataError(
            f"data.{name}: none of the categories of {origin} ({', '.join(own)}) is in "
            f"data.categories ({', '.join(categories)}); set data.categories=[] to take the "
            "set's own categories, or list the ones to keep"
        )
    kept = [(p, c) for p, c in zip(prompt_set.prompts, prompt_set.categories, strict=True)
            if c in categories]  # fmt: skip
    log.warning(
        "data.%s: %d prompts of categories %s not in data.categories left out",
        name, len(prompt_set) - len(kept), dropped,
    )  # fmt: skip
    return PromptSet(name, tuple(p for p, _ in kept), tuple(c for _, c in kept))


def refuser_training_prompts() -> dict[str, frozenset[str]]:
    """The builtin ``refuser_train`` split of each kind: what the embedded refuser was fine-tuned
    on (a superset: the build uses the first ``RefuserRecipe.unmatched_examples`` generic ones)."""
    return {kind: frozenset(load_builtin(kind, "refuser_train").prompts) for kind in BUILTIN_KINDS}


def check_overlaps(
    train: dict[str, PromptSet], evaluation: dict[str, PromptSet], embedded: bool = False
) -> list[str]:
    """Prompts shared between the sets of one trial.

    - a prompt in a training set (``data.*_train``: the means the directions come from) and in
      an evaluation set (the prompts actually evaluated): an error, the evaluation must be held
      out;
    - with the embedded model, an evaluated prompt in its own fine-tuning split
      (``refuser_training_prompts``): an error, its refusals there were trained, not measured;
    - anything else (a prompt in two training sets, e.g. harmful and matched, or in two
      evaluation sets; a training prompt the embedded model was fine-tuned on): a warning,
      returned and logged.

    Args:
        train: ``data`` set name (``harmful_train``...) -> the loaded set.
        evaluation: ``data`` set name (``harmful_eval``...) -> the prompts evaluated from it.
        embedded: the trial's model is the embedded refuser.

    Raises:
        PromptDataError: naming both sets, the number shared and one example.
    """

    def shared(a: PromptSet, b: Any) -> list[str]:
        other = set(b)
        return [p for p in dict.fromkeys(a.prompts) if p in other]

    for eval_name, eval_set in evaluation.items():
        for train_name, train_set in train.items():
            common = shared(eval_set, train_set.prompts)
            if common:
                raise PromptDataError(
                    f"data.{eval_name} shares {len(common)} prompts with data.{train_name} "
                    f"(e.g. {common[0]!r}); evaluation prompts must be held out"
                )
    refuser = refuser_training_prompts() if embedded else {}
    if refuser:
        for eval_name, eval_set in evaluation.items():
            for kind, trained in refuser.items():
                common = shared(eval_set, trained)
                if common:
                    raise PromptDataError(
                        f"data.{eval_name} shares {len(common)} prompts with the embedded "
                        f"model's fine-tuning data (builtin {kind}, split refuser_train; e.g. "
                        f"{common[0]!r}); its refusals there were trained, not measured: "
                        "evaluate on split=evaluation"
                    )
    warnings = []
    for group in (train, evaluation):
        names = list(group)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                common = shared(group[first], group[second].prompts)
                if common:
                    warnings.append(
                        f"data.{first} and data.{second} share {len(common)} prompts "
                        f"(e.g. {common[0]!r})"
                    )
    for train_name, train_set in train.items():
        for kind, trained in refuser.items():
            common = shared(train_set, trained)
            if common:
                warnings.append(
                    f"data.{train_name} shares {len(common)} prompts with the embedded model's "
                    f"fine-tuning data (builtin {kind}, split refuser_train; e.g. {common[0]!r})"
                )
    for message in warnings:
        log.warning("%s", message)
    return warnings


def load_prompt_set(
    name: str, cfg: PromptSetConfig, categories: list[str] | None = None
) -> PromptSet:
    """Load one configured prompt set (a ``PromptSetConfig``) from builtin, hub or file.

    Args:
        name: the set's name in the ``data`` group (for messages), e.g. ``harmful_eval``.
        cfg: its config (source, path, config_name, split, column, category_column, categorize,
            limit, per_category, skip_per_category).
        categories: keep only the prompts of these categories (``data.categories``), for every
            source; a set without categories (the generic harmless pool) is kept whole. None (or
            ``data.categories=[]``): every category the set has.

    Raises:
        PromptDataError: naming the source and the position of the bad row.
    """
    # plain strings from Python (a SimpleNamespace, a dataclass); a composed config holds members
    source = parse_choice(PromptSource, cfg.source, f"data.{name}.source", PromptDataError)
    if source == PromptSource.builtin:
        prompt_set = load_builtin(cfg.path, cfg.split, categories)
    else:
        if not cfg.path:
            raise PromptDataError(
                f"data.{name}.path is required when data.{name}.source={cfg.source}"
            )
        # fields added later are read with their defaults, for configs built without them
        config_name = getattr(cfg, "config_name", None)
        categorize = getattr(cfg, "categorize", "none")
        if cfg.source == "hub":
            subset = f"{config_name}/" if config_name else ""
            rows = _rows_from_hub(cfg.path, cfg.split, config_name)
            origin = f"{cfg.path}[{subset}{cfg.split or 'train'}]"
        else:
            rows, origin = _rows_from_file(Path(cfg.path).expanduser()), str(cfg.path)
        prompts, cats = _column_values(
            rows, cfg.column, cfg.category_column, origin, allow_duplicates=cfg.source == "hub"
        )
        if not prompts:
            raise PromptDataError(f"data.{name}: {origin} holds no prompts")
        key = f"data.{name}.categorize"
        if parse_choice(Categorize, categorize, key, PromptDataError) == Categorize.keywords:
            if cfg.category_column is not None:
                raise PromptDataError(
                    f"data.{name}: categorize=keywords assigns categories only to a set without "
                    f"them; category_column={cfg.category_column!r} is set"
                )
            assigned = keyword_categories(prompts)
            log.info("data.%s: keyword categories of %s: %s", name, origin, describe(assigned))
            cats = list(assigned)
        prompt_set = PromptSet(name, tuple(prompts), tuple(cats))
        if categories is not None and prompt_set.category_names():
            prompt_set = _keep_categories(name, prompt_set, categories, origin)
    if cfg.per_category is not None or cfg.limit is not None or cfg.skip_per_category:
        # `limit` may drop whole categories on purpose; skipping must not empty one silently
        kept = prompt_set.select(skip_per_category=cfg.skip_per_category).category_names()
        emptied = [c for c in prompt_set.category_names() if c not in kept]
        if emptied:
            raise PromptDataError(
                f"data.{name}: categories {emptied} have no prompts left after "
                f"skip_per_category={cfg.skip_per_category}"
            )
        prompt_set = prompt_set.select(
            per_category=cfg.per_category, limit=cfg.limit, skip_per_category=cfg.skip_per_category
        )
    if not prompt_set.prompts:
        raise PromptDataError(f"data.{name}: no prompts (source={cfg.source}, path={cfg.path!r})")
    return PromptSet(name, prompt_set.prompts, prompt_set.categories)
