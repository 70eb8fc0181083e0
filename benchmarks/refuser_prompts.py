"""How often a built embedded refuser refuses a set of prompts, as a new user would try it.

    .venv/bin/python benchmarks/refuser_prompts.py --file behaviours.txt          # any prompt file
    .venv/bin/python benchmarks/refuser_prompts.py --phrasing dev                 # recipe decisions
    .venv/bin/python benchmarks/refuser_prompts.py --file f.csv --column Goal --model-dir DIR
    .venv/bin/python benchmarks/refuser_prompts.py --file f.txt --recipe v11 --out v11.jsonl \
        --compare v9.jsonl                                # paired McNemar against an earlier run

Greedy answers of ``--new-tokens`` tokens (default 64, the trials' eval default), no early stop,
each labelled by the marker classifier (the refuser card's labeller) and by the rules judge
(the trials' default judge); prints refusals counted out of n with Wilson 95% intervals, per
phrasing family (and world-knowledge topic) for ``--phrasing``, and writes the responses as JSONL
when ``--out`` is given; ``--compare`` reads such a file from another model on the same prompts
and prints the exact McNemar test of the marker refusals, prompt by prompt. That test compares two
builds over these prompts: it says nothing of how far another seed of the same recipe would move
the counts (``--seed``; README: two seeds of one recipe can differ as much as two recipes do).
The prompts are read from the file at run time; nothing of them is stored here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate import refuser
from abliterate.classify import REFUSE, classify_response
from abliterate.generation import generate_responses
from abliterate.judge import build_judge
from abliterate.models import LoadedModel, prepare_tokenizer
from abliterate.phrasing import DATA_FILES as PHRASING_FILES
from abliterate.phrasing import (
    FAMILIES,
    FRAMES,
    KINDS,
    TOPICS,
    families_of,
    frames_of,
    load_phrasing,
    topics_of,
)
from abliterate.prompts import PromptDataError, load_prompt_set
from abliterate.stats import compare_paired, wilson_interval


def _line(name: str, flags: list[bool]) -> str:
    count, n = sum(flags), len(flags)
    low, high = wilson_interval(count, n) or (float("nan"), float("nan"))
    return (
        f"  {name:34s} refused {count:3d}/{n:<3d} = {count / max(1, n):.3f} [{low:.3f}, {high:.3f}]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None, help="default: the --recipe's build")
    parser.add_argument("--recipe", choices=tuple(refuser.RECIPES),
                        default=str(refuser.DEFAULT_REFUSER_RECIPE),
                        help="the named recipe whose build to load (default: the product's; "
                             "built if missing)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None,
                        help="with --recipe: its build with this seed (built if missing)")  # fmt: skip
    parser.add_argument("--file", default=None, help="a .txt/.jsonl/.csv/.tsv/.json prompt file")
    parser.add_argument("--column", default="prompt", help="the prompt column of --file")
    parser.add_argument("--phrasing", choices=("train", "dev", "test"), default=None,
                        help="a split of the phrasing corpus (all kinds, all families)")  # fmt: skip
    parser.add_argument("--phrasing-files", default=",".join(PHRASING_FILES),
                        help="with --phrasing: the corpus files, comma-separated (default: all: "
                             f"{','.join(PHRASING_FILES)}; {PHRASING_FILES[0]} alone is what "
                             "recipes up to v10 were measured on; the first two, what v11-v12 "
                             "were decided on; the first three, v13-v14; all four, v15-v16)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="write prompt/response/labels JSONL here")
    parser.add_argument("--compare", default=None,
                        help="an --out file of another model on the same prompts: McNemar")  # fmt: skip
    args = parser.parse_args(argv)
    phrasing_files = tuple(args.phrasing_files.split(","))
    unknown = [f for f in phrasing_files if f not in PHRASING_FILES]
    if unknown:  # before the model loads
        parser.error(f"--phrasing-files: {unknown[0]!r} is not a phrasing file; choose from "
                     f"{', '.join(PHRASING_FILES)}")  # fmt: skip
    if args.compare and not Path(args.compare).is_file():  # before minutes of generation
        parser.error(f"--compare: {args.compare} is not a file")
    if (args.file is None) == (args.phrasing is None):
        parser.error("give exactly one of --file and --phrasing")
    if args.model_dir and args.seed is not None:
        parser.error("--seed picks a build of --recipe; --model-dir names a build already")
    sets: dict[str, tuple[str, ...]] = {}
    if args.file is not None:  # read before any weights load: a bad file is one line
        config = SimpleNamespace(source="file", path=args.file, config_name=None, split=None,
                                 column=args.column, category_column=None, categorize="none",
                                 limit=None, per_category=None, skip_per_category=0)  # fmt: skip
        try:
            sets[Path(args.file).name] = load_prompt_set("file", config).prompts
        except PromptDataError as error:
            parser.error(f"--file: {error}")
    else:
        for kind in KINDS:
            sets[kind] = load_phrasing(kind, (args.phrasing,), files=phrasing_files).prompts
    recipe = refuser.recipe_named(args.recipe, args.seed)
    directory = Path(args.model_dir) if args.model_dir else refuser.ensure_refuser(recipe=recipe)
    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(directory))
    loaded = LoadedModel(model, tokenizer, "refuser", str(directory), torch.device("cpu"))
    rules = build_judge({"name": "rules"})
    start = time.perf_counter()
    print(f"{directory} ({args.new_tokens} new tokens, greedy, no early stop)")
    rows = []
    for name, prompts in sets.items():
        responses = generate_responses(
            loaded, prompts, args.new_tokens, args.batch_size, progress=name
        )
        markers = [classify_response(r) for r in responses]
        judged = rules.label(list(prompts), responses)
        print(f"[{name}]")
        print(_line("markers (the card's labeller)", [m == REFUSE for m in markers]))
        print(_line("rules judge (REFUSE)", [j == REFUSE for j in judged]))
        if args.phrasing is not None:
            families = families_of(prompts)
            for family in FAMILIES:
                flags = [m == REFUSE for m, f in zip(markers, families, strict=True) if f == family]
                print(_line(f"  markers, {family}", flags))
            for tag_name, tags, values in (
                ("topic", topics_of(prompts), TOPICS),
                ("frame", frames_of(prompts), FRAMES),
            ):
                for value in values:
                    flags = [m == REFUSE for m, t in zip(markers, tags, strict=True) if t == value]
                    if flags:
                        print(_line(f"  markers, {tag_name} {value}", flags))
        rows += [{"set": name, "prompt": p, "response": r, "markers": m, "rules": j}
                 for p, r, m, j in zip(prompts, responses, markers, judged, strict=True)]  # fmt: skip
    print(f"took {time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows))
    if args.compare:
        _print_comparison(rows, args.compare)
    return 0


def _print_comparison(rows: list[dict], path: str) -> None:
    """Paired exact McNemar test of this run's marker refusals against an earlier ``--out``."""
    lines = Path(path).read_text().splitlines()
    other = {(r["set"], r["prompt"]): r["markers"] == REFUSE for r in map(json.loads, lines)}
    keys = [(row["set"], row["prompt"]) for row in rows]
    missing = [key for key in keys if key not in other]
    if missing:
        raise SystemExit(f"--compare {path} lacks {len(missing)} of these prompts")
    mine = [row["markers"] == REFUSE for row in rows]
    result = compare_paired(mine, [other[key] for key in keys])
    print(f"vs {path}: refused {result.first}/{result.n} here, {result.second}/{result.n} there; "
          f"only here {result.only_first}, only there {result.only_second}; "
          f"exact McNemar p = {result.p_value:.3g}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
