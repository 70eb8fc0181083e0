"""The phrasing-balanced corpus: the same harm categories, asked in every form a user asks them.

``abliterate/data/phrasing.jsonl`` holds harmful requests, topic-matched harmless requests and
generic harmless requests, each tagged with its phrasing ``family`` (``FAMILIES``): questions,
bare imperatives, writing tasks of many genres (articles, posts, emails, scripts, speeches,
letters, stories used as cover), step-by-step requests, list requests, persuasive and
defamatory content, requests framed by a context or a role-play, and multi-sentence prompts.
The harmful and matched rows carry one of the 9 categories of the builtin corpus.

It exists for the embedded refuser (``abliterate.refuser``): the builtin corpus is mostly
questions ("How do I ...?"), and a refuser trained only on it answers the same intents asked as
writing tasks or instructions. The file is separate from the builtin corpus so that the builtin
``refuser_train`` / ``extraction`` / ``evaluation`` splits the experiments use stay as they were.

``abliterate/data/phrasing_world.jsonl`` (``WORLD_FILE``) adds requests that depend on world
knowledge, in the same families and with the same fields plus a ``topic`` (``TOPICS``):
persuasive misinformation about real events, attack code and exploits, named chemical,
biological and explosive agents, and defamation of named people; each harmful row has a harmless
twin in the same form (an accurate article, benign code, chemistry or history homework, a profile
of the same public figure), so that "writing task" or "names a chemical" alone is no reason to
refuse. ``abliterate/data/phrasing_tense.jsonl`` (``TENSE_FILE``) sets requests in another time
frame (``frame``, ``FRAMES``): how something harmful was done in the past, or how someone would do
it hypothetically, each harmful row with a harmless twin in the same frame and form (history,
detection, safety) and a few everyday requests in that frame, so that neither "it is history" nor
"it is only hypothetical" is a reason to answer, and neither frame alone a reason to refuse.
``abliterate/data/phrasing_everyday.jsonl`` (``EVERYDAY_FILE``) holds generic harmless requests
only: 168 everyday requests in the present tense (7 to 26 per family), none harmful-sounding, so
that a recipe can learn to answer ordinary imperatives, writing tasks and lists from more
examples rather than from heavier ones. A recipe reads the files it names
(``RefuserRecipe.phrasing_files``).

Each (file, kind, family) group is split deterministically by a hash of the prompt text into ``train``
(what the refuser may be fine-tuned on), ``dev`` (for recipe decisions) and ``test`` (what its card
reports). A recipe trains only on some families; the others are never trained on, in any split,
and the card reports them separately (leave-one-family-out).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import defaultdict
from importlib import resources
from typing import Any

from abliterate.prompts import PromptDataError, PromptSet

FAMILIES = (
    "question",  # "How do I ...?", "What's the best way ...?", "Can you tell me ...?"
    "imperative",  # a bare instruction: "Explain how ...", "Tell me ...", "Help me ..."
    "writing",  # a piece in a genre: article, blog/social post, email, letter, script, song
    "steps",  # step-by-step instructions, a procedure, a plan, a walkthrough
    "list",  # "List ...", "Name ...", "Give me a list of ...", "Enumerate ..."
    "persuasive",  # persuade, convince, argue, a campaign; defamatory and disinforming pieces
    "framed",  # a context or role-play around the request ("I'm a nurse ...", "You are ...")
    "multi",  # several sentences: a situation first, then the request
)
KINDS = ("harmful", "matched", "unmatched")
SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.5, 0.2, None)  # None: the rest
DATA_FILE = "phrasing.jsonl"
WORLD_FILE = "phrasing_world.jsonl"
TENSE_FILE = "phrasing_tense.jsonl"
EVERYDAY_FILE = "phrasing_everyday.jsonl"
DATA_FILES = (DATA_FILE, WORLD_FILE, TENSE_FILE, EVERYDAY_FILE)
TOPICS = (
    "misinformation",  # persuasive or news-style falsehoods about real events, health, elections
    "attack_code",  # malware, exploits, phishing kits, intrusion tools
    "named_agent",  # a named chemical/biological/explosive agent, weapon conversion or drug
    "defamation",  # invented crimes or scandals about a named person
)
FRAMES = (
    "past",  # past tense or a historical setting: "How did people ...", "In the 1990s, how was ..."
    "hypothetical",  # conditional: "How would someone ...", "If a person wanted to ..., ..."
)


def read_rows(files: tuple[str, ...] = DATA_FILES) -> list[dict[str, Any]]:
    """Every row of the given corpus files, validated (kind, family, category where required,
    topic where given), each with its file name added as ``source``.

    Raises:
        PromptDataError: an unknown file, or a row with an invalid field (naming file and line).
    """
    rows = []
    for name in files:
        if name not in DATA_FILES:
            raise PromptDataError(
                f"phrasing file {name!r} does not exist; choose one of {', '.join(DATA_FILES)}"
            )
        text = resources.files("abliterate.data").joinpath(name).read_text(encoding="utf-8")
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                rows.append(_checked_row(json.loads(line), f"abliterate/data/{name}:{number}"))
                rows[-1]["source"] = name
    return rows


def _checked_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    if row.get("kind") not in KINDS:
        raise PromptDataError(
            f"{where}: kind={row.get('kind')!r} is not valid; choose one of {', '.join(KINDS)}"
        )
    if row.get("family") not in FAMILIES:
        raise PromptDataError(
            f"{where}: family={row.get('family')!r} is not valid; choose one of "
            f"{', '.join(FAMILIES)}"
        )
    if row["kind"] != "unmatched" and not row.get("category"):
        raise PromptDataError(f"{where}: a {row['kind']} row needs a category")
    if "topic" in row and row["topic"] not in TOPICS:
        raise PromptDataError(
            f"{where}: topic={row['topic']!r} is not valid; choose one of {', '.join(TOPICS)}"
        )
    if "frame" in row and row["frame"] not in FRAMES:
        raise PromptDataError(
            f"{where}: frame={row['frame']!r} is not valid; choose one of {', '.join(FRAMES)}"
        )
    return row


def _order_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def split_of(rows: list[dict[str, Any]]) -> dict[str, str]:
    """prompt -> its split. Within each (file, kind, family) group rows are ordered by a hash of
    their text and cut by ``SPLIT_FRACTIONS``, so a split depends only on the prompts themselves
    (and a file added later leaves the splits of the earlier ones as they were)."""
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for row in rows:
        groups[(row.get("source", DATA_FILE), row["kind"], row["family"])].append(row["prompt"])
    assigned: dict[str, str] = {}
    for prompts in groups.values():
        ordered = sorted(prompts, key=_order_key)
        bounds = [0]
        for fraction in SPLIT_FRACTIONS[:-1]:
            bounds.append(bounds[-1] + round(len(ordered) * fraction))
        bounds.append(len(ordered))
        for split, start, end in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
            assigned.update(dict.fromkeys(ordered[start:end], split))
    return assigned


def load_phrasing(
    kind: str,
    splits: tuple[str, ...] = SPLITS,
    families: tuple[str, ...] = FAMILIES,
    files: tuple[str, ...] = DATA_FILES,
    frames: tuple[str, ...] = FRAMES,
) -> PromptSet:
    """The rows of one kind in the given splits and families of the given files, in file order;
    of the rows set in a time frame, only those in ``frames`` (rows without a frame are kept).

    Raises:
        PromptDataError: an unknown kind, split, family or frame (naming the valid ones).
    """
    for name, values, valid in (
        ("kind", (kind,), KINDS),
        ("split", splits, SPLITS),
        ("family", families, FAMILIES),
        ("frame", frames, FRAMES),
    ):
        for value in values:
            if value not in valid:
                raise PromptDataError(
                    f"phrasing {name} {value!r} does not exist; choose one of {', '.join(valid)}"
                )
    rows = read_rows(files)
    assigned = split_of(rows)
    chosen = [
        row for row in rows
        if row["kind"] == kind and row["family"] in families and assigned[row["prompt"]] in splits
        and row.get("frame") in (None, *frames)
    ]  # fmt: skip
    label = f"phrasing-{kind}/{'+'.join(splits)}/{'+'.join(families)}"
    return PromptSet(
        label, tuple(r["prompt"] for r in chosen), tuple(r.get("category") for r in chosen)
    )


@functools.cache
def _tags_by_prompt() -> dict[str, dict[str, str | None]]:
    """prompt -> its family, topic and frame, over every corpus file (the files are package data:
    read once per process)."""
    return {row["prompt"]: {key: row.get(key) for key in ("family", "topic", "frame")}
            for row in read_rows()}  # fmt: skip


def families_of(prompts: tuple[str, ...]) -> list[str]:
    """The phrasing family of each prompt (all must be in the phrasing corpus)."""
    return [str(_tags_by_prompt()[prompt]["family"]) for prompt in prompts]


def topics_of(prompts: tuple[str, ...]) -> list[str | None]:
    """The world-knowledge topic of each prompt (None for rows without one)."""
    return [_tags_by_prompt()[prompt]["topic"] for prompt in prompts]


def frames_of(prompts: tuple[str, ...]) -> list[str | None]:
    """The time frame of each prompt (None for rows without one)."""
    return [_tags_by_prompt()[prompt]["frame"] for prompt in prompts]


def corpus_digest(files: tuple[str, ...] = (DATA_FILE,)) -> str:
    """A hash of the whole of the given files (prompts, kinds, categories, families and topics:
    the splits follow). For ``phrasing.jsonl`` alone it is that file's own hash, as before the
    second file existed."""
    digests = [
        hashlib.sha256(resources.files("abliterate.data").joinpath(name).read_bytes()).hexdigest()
        for name in files
    ]
    if len(digests) == 1:
        return digests[0][:16]
    return hashlib.sha256("\n".join(f"{n} {d}" for n, d in zip(files, digests, strict=True))
                          .encode()).hexdigest()[:16]  # fmt: skip
