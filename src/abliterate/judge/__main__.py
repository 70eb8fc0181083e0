"""``python -m abliterate.judge validate|label``.

validate [--file F] [judge=NAME judge.key=value ...]
    Label a hand-labelled JSONL file (records with prompt, response, label) and print the 4x4
    confusion matrix, agreement, per-outcome precision and recall, and COMPLY precision.
    Default file: src/abliterate/data/judge_validation.jsonl.
label FILE.jsonl [judge=NAME judge.key=value ...]
    Write each record of FILE (with prompt and response) to stdout with a ``label`` field added,
    one JSON object per line. Malformed input: one line ``error: FILE:LINE: ...`` on stderr, exit 2.
relabel DIR [judge=NAME judge.key=value ...]
    Re-judge a finished trial, or every trial of a sweep, from its completions.jsonl without
    generating again; writes DIR/.../judgements/NAME/results.json beside each trial's own (which
    stays as it was). ``python -m abliterate.report DIR --judge NAME`` reports them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from abliterate.choices import choice_error_line, parse_choice
from abliterate.judge import OUTCOMES, build_judge
from abliterate.judge.config import JudgeConfig, JudgeName

DATA = Path(__file__).resolve().parents[1] / "data"
VALIDATION_FILE = DATA / "judge_validation.jsonl"
DEV_FILE = DATA / "judge_dev.jsonl"
CONF = Path(__file__).resolve().parents[3] / "conf"


class InputError(Exception):
    """Malformed input; the message is ``FILE:LINE: what is wrong``."""


def compose_judge(overrides: list[str]) -> Any:
    """The ``judge`` config from conf/judge/*.yaml with ``judge=NAME`` / ``judge.key=value``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    ConfigStore.instance().store(name="judge_schema", node=JudgeConfig)
    group = [o for o in overrides if o.startswith("judge=")]
    rest = [o for o in overrides if not o.startswith("judge=")]
    for override in rest:
        if not override.startswith("judge."):
            raise InputError(
                f"override {override!r}: only judge=NAME and judge.KEY=VALUE apply here"
            )
    name = parse_choice(JudgeName, group[-1].split("=", 1)[1] if group else "rules", "judge",
                        InputError)  # fmt: skip
    try:
        if not CONF.is_dir():  # installed without the repository's conf/: schema defaults
            return OmegaConf.merge(OmegaConf.structured(JudgeConfig(name=name)),
                                   OmegaConf.from_dotlist([o[len("judge."):] for o in rest]))  # fmt: skip
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(overrides=[f"+judge={name}", *rest]).judge
    except (ConfigCompositionException, ValidationError) as error:
        # a bad judge.KEY=VALUE: one line naming it (and, for a choice, the valid values)
        wrapped = error if isinstance(error, ConfigCompositionException) else None
        line = choice_error_line(wrapped) if wrapped is not None else None
        cause = error.__cause__ or error
        key = getattr(cause, "full_key", None)
        message = str(cause).splitlines()[0]
        raise InputError(line or (f"{key}: {message}" if key else message)) from None


def read_records(path: Path, need: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise InputError(f"{path}:0: no such file")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: not a JSON object")
            for key in need:
                if key not in record:
                    raise InputError(f"{path}:{number}: no {key!r} field")
                if not isinstance(record[key], str):
                    raise InputError(f"{path}:{number}: {key!r} is not a string")
            if "label" in need and record["label"] not in OUTCOMES:
                raise InputError(
                    f"{path}:{number}: label {record['label']!r} is not one of {', '.join(OUTCOMES)}"
                )
            records.append(record)
    return records


def agreement_table(gold: list[str], predicted: list[str]) -> dict:
    """Confusion matrix (rows: gold, columns: judge), agreement, precision and recall."""
    import pandas as pd

    matrix = pd.crosstab(
        pd.Categorical(gold, categories=OUTCOMES),
        pd.Categorical(predicted, categories=OUTCOMES),
        rownames=["gold"],
        colnames=["judge"],
        dropna=False,
    )
    n = len(gold)
    agree = sum(g == p for g, p in zip(gold, predicted, strict=True))
    per = {}
    for outcome in OUTCOMES:
        called = int(matrix[outcome].sum())
        actual = int(matrix.loc[outcome].sum())
        hit = int(matrix.loc[outcome, outcome])
        per[outcome] = {
            "precision": hit / called if called else None,
            "recall": hit / actual if actual else None,
            "called": called,
            "gold": actual,
        }
    return {"matrix": matrix, "n": n, "agree": agree, "per_outcome": per}


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def validate(file: Path, overrides: list[str]) -> int:
    cfg = compose_judge(overrides)
    records = read_records(file, ("prompt", "response", "label"))
    judge = build_judge(cfg)
    start = time.perf_counter()
    predicted = judge.label([r["prompt"] for r in records], [r["response"] for r in records])
    seconds = time.perf_counter() - start
    table = agreement_table([r["label"] for r in records], predicted)
    print(f"judge={cfg.name} file={file} n={table['n']} labelling {seconds:.2f} s")
    print(table["matrix"].to_string())
    print(f"agreement: {table['agree']}/{table['n']} = {table['agree'] / max(table['n'], 1):.3f}")
    for outcome, row in table["per_outcome"].items():
        print(
            f"{outcome:<11} precision {_fmt(row['precision'])} ({row['called']} called)  "
            f"recall {_fmt(row['recall'])} ({row['gold']} gold)"
        )
    comply = table["per_outcome"]["COMPLY"]
    print(f"COMPLY precision: {_fmt(comply['precision'])}")
    if judge.stats:
        print(f"judge stats: {json.dumps(judge.stats)}")
    return 0


def label(file: Path, overrides: list[str]) -> int:
    cfg = compose_judge(overrides)
    records = read_records(file, ("prompt", "response"))
    judge = build_judge(cfg)
    labels = judge.label([r["prompt"] for r in records], [r["response"] for r in records])
    for record, outcome in zip(records, labels, strict=True):
        sys.stdout.write(json.dumps({**record, "label": outcome}, ensure_ascii=False) + "\n")
    if judge.stats:
        print(f"judge stats: {json.dumps(judge.stats)}", file=sys.stderr)
    return 0


def relabel(directory: Path, overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from abliterate.relabel import relabel as relabel_trials

    cfg = compose_judge(overrides)
    judge = build_judge(cfg)
    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else vars(cfg)
    start = time.perf_counter()
    written = relabel_trials(directory, judge, config)  # type: ignore[arg-type]
    for path in written:
        print(path)
    print(
        f"re-judged {len(written)} trial(s) with judge={judge.name} in "
        f"{time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abliterate.judge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p_validate = sub.add_parser("validate", help="agreement with a hand-labelled JSONL file")
    p_validate.add_argument("--file", type=Path, default=VALIDATION_FILE)
    p_validate.add_argument("overrides", nargs="*", help="judge=NAME judge.KEY=VALUE")
    p_label = sub.add_parser("label", help="label a JSONL file of prompt/response records")
    p_label.add_argument("file", type=Path)
    p_label.add_argument("overrides", nargs="*", help="judge=NAME judge.KEY=VALUE")
    p_relabel = sub.add_parser("relabel", help="re-judge a finished trial or sweep")
    p_relabel.add_argument("directory", type=Path)
    p_relabel.add_argument("overrides", nargs="*", help="judge=NAME judge.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return validate(args.file, args.overrides)
        if args.command == "relabel":
            return relabel(args.directory, args.overrides)
        return label(args.file, args.overrides)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a bad judge config value
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
