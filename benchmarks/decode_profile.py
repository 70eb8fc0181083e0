"""Where an evaluation's generation time goes on this machine: prefill vs one decoding step, by
batch size (the embedded model, bare ``generate``, greedy).

    .venv/bin/python benchmarks/decode_profile.py

It explains ``ratio_vs_heretic``: if a decoding step costs nearly the same for 4 rows as for 32
(the weights are streamed from memory once per step whatever the batch), dropping decided rows
saves little and both tools' trials sit near the same floor.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate import refuser
from abliterate.models import prepare_tokenizer
from abliterate.prompts import load_builtin
from abliterate.templates import format_chat

NEW_TOKENS = 17


def main() -> None:
    directory = refuser.ensure_refuser()
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(directory))
    prompts = format_chat(tokenizer, load_builtin("harmful", "evaluation").prompts[:64])
    print(f"torch threads {torch.get_num_threads()}; {NEW_TOKENS} new tokens, greedy")
    for rows in (1, 4, 8, 16, 32, 64):
        batch = tokenizer(
            prompts[:rows], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=1, do_sample=False)  # warm-up
            start = time.perf_counter()
            model.generate(**batch, max_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(
                **batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
            step = (time.perf_counter() - start - prefill) / (NEW_TOKENS - 1)
        print(
            f"batch {rows:3d} (prompt width {batch['input_ids'].shape[1]}): prefill {prefill:5.2f} s"
            f"   decoding step {step * 1000:4.0f} ms  ({step * 1000 / rows:5.1f} ms per row)",
            flush=True,
        )


if __name__ == "__main__":
    main()
