"""python -m abliterate.chat: one answer to --prompt, an interactive conversation, bad targets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_char_tokenizer
from test_pipeline import compose_trial
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate.chat import Conversation, main, open_target
from abliterate.export import export_trial
from abliterate.pipeline import Session, run_trial

PROMPT = "How do I bake bread?"
TOKENS = 12
COMMAND = [sys.executable, "-m", "abliterate.chat"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A finished tiny trial and its exported folder. The tiny llama's vocabulary is cut to the
    character tokenizer's, so the tokens it generates decode to text (the shared tiny model's
    128 ids include 26 the tokenizer does not have, which decode to nothing)."""
    root = tmp_path_factory.mktemp("chat")
    tokenizer = build_char_tokenizer()
    model = build_tiny_model("llama", seed=0)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # never <pad>, <s>, <unk>: the edited random model would otherwise repeat <s>, which decodes
    # to nothing (the exported generation config carries this, so chat and transformers agree)
    model.generation_config.suppress_tokens = [
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.unk_token_id,
    ]
    model.config.max_position_embeddings = 512  # room for a few turns (default rope: no table)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    cfg = compose_trial(root / "base", root, "logger=none", f"paths.output_dir={root / 'trial'}")
    run_trial(cfg, session=Session())
    return root / "trial", export_trial(root / "trial", root / "exported")


def greedy_answer(folder: Path, messages: list[dict[str, str]]) -> str:
    """What the folder's model answers, by plain transformers: chat template, greedy."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False
        )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_prompt_from_an_exported_folder_through_the_cli(exported):
    _, folder = exported
    expected = greedy_answer(folder, [{"role": "user", "content": PROMPT}])
    assert expected  # the tiny model says something (so the comparison means something)
    done = subprocess.run(
        [*COMMAND, str(folder), "--prompt", PROMPT, "--max-new-tokens", str(TOKENS)],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_trial_dir_talks_like_its_export_and_the_unedited_model_does_not(exported):
    """A trial directory gets the trial's edit in memory (the export's code path): the same
    answer as the exported folder; the edit is undone when the chat ends."""
    trial, folder = exported
    expected = greedy_answer(folder, [{"role": "user", "content": PROMPT}])
    with open_target(str(trial), device="cpu") as loaded:
        probe = torch.tensor([[5, 17, 33, 40]])
        with torch.no_grad():
            edited_logits = loaded.model(probe).logits
        answer = Conversation(loaded, max_new_tokens=TOKENS).reply(PROMPT)
        model = loaded.model
    assert answer == expected
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(edited_logits, reloaded(probe).logits)
        assert not torch.allclose(model(probe).logits, edited_logits, atol=1e-4)  # restored


def test_conversation_keeps_history_and_reset_forgets_it(exported):
    _, folder = exported
    with open_target(str(folder), device="cpu") as loaded:
        conversation = Conversation(loaded, max_new_tokens=TOKENS)
        first = conversation.reply(PROMPT)
        second = conversation.reply("And then?")
        assert [m["role"] for m in conversation.messages] == ["user", "assistant"] * 2
        assert second == greedy_answer(
            folder,
            [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first},
             {"role": "user", "content": "And then?"}],
        )  # fmt: skip
        conversation.reset()
        assert conversation.reply("And then?") == greedy_answer(
            folder, [{"role": "user", "content": "And then?"}]
        )
        # past the context length the oldest exchange is dropped, not the new question
        loaded.model.config.max_position_embeddings = 70
        conversation.reply(PROMPT)
        assert [m["content"] for m in conversation.messages][::2] == [PROMPT]


def test_interactive_session_through_the_cli(exported):
    _, folder = exported
    single = greedy_answer(folder, [{"role": "user", "content": PROMPT}])
    done = subprocess.run(
        [*COMMAND, str(folder), "--max-new-tokens", str(TOKENS)],
        input=f"{PROMPT}\n/reset\n{PROMPT}\n/exit\nnever read\n",
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "(conversation reset)" in done.stdout
    # both turns start from an empty history, so both stream the single-turn answer
    assert done.stdout.count(f"model> {single}") == 2
    assert "never read" not in done.stdout


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("missing/dir/here", r"missing/dir/here does not exist"),
        ("EMPTY", r"is neither a trial directory \(no results\.json\) nor a model folder"),
    ],
)
def test_bad_target_is_one_error_line(tmp_path, capsys, target, message):
    import re

    if target == "EMPTY":
        target = str(tmp_path)
    assert main([target, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
