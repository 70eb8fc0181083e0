"""How the outcomes change with the response length (issue 14): 32, 64 and 128 new tokens.

Short generations hide delayed refusals ("Sure, here is... Actually, I can't") and late
degeneration (an answer that falls into a loop after 40 tokens); long ones cost decoding steps.
This runs the same trial (by default the embedded model, unmatched, layer 22, w = 1) at each
length, in one process (the model and activations are loaded once), and prints the unedited and
the edited model's outcome counts with Wilson intervals:

    python benchmarks/generation_length.py                       # 32, 64, 128 tokens
    python benchmarks/generation_length.py --lengths 32 64 --out /tmp/lengths.json -- layer=18

Everything after ``--`` is passed to the trial as Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from abliterate.config import register_configs
from abliterate.judge import OUTCOMES
from abliterate.pipeline import Session, run_trial
from abliterate.stats import wilson_interval

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _counts(block: dict) -> str:
    n = block["n_harmful"]
    parts = []
    for outcome in OUTCOMES:
        count = block["outcomes"][outcome]
        low, high = wilson_interval(count, n)
        parts.append(f"{outcome} {count}/{n} [{low:.2f}, {high:.2f}]")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the trial")
    args = parser.parse_args(argv)
    register_configs()
    session, rows = Session(), []
    with tempfile.TemporaryDirectory() as scratch:
        for length in args.lengths:
            with initialize_config_dir(config_dir=CONF, version_base="1.3"):
                cfg = compose(
                    "config",
                    overrides=[
                        "logger=none",
                        "layer=22",
                        "eval.harmful_per_category=8",
                        f"eval.max_new_tokens={length}",
                        f"paths.output_dir={scratch}/len{length}",
                        *args.overrides,
                    ],
                )
            start = time.perf_counter()
            results = run_trial(cfg, session=session)
            rows.append(
                {
                    "max_new_tokens": length,
                    "unedited": results["baseline_eval"],
                    "edited": {
                        key: results["eval"][key]
                        for key in ("n_harmful", "outcomes", "refusals_removed", "kl_divergence")
                    },
                    "trial": results["trial"],
                    "seconds": time.perf_counter() - start,
                }
            )
            print(f"max_new_tokens={length} ({rows[-1]['seconds']:.0f} s)", flush=True)
            print(f"  unedited  {_counts(results['baseline_eval'])}", flush=True)
            print(
                f"  edited    {_counts(results['eval'])}  removed "
                f"{results['eval']['refusals_removed']}",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
