"""Reliability and safety (issue 8): bad input gets a clear answer, faults lose nothing.

Bad input goes through the real entrypoint (`python run.py ...` in a subprocess) on a tiny
random-init model saved to disk, and must end in a non-zero exit, a one-line message naming the
key or file position, and no results.json. Faults are injected for real: trials are SIGKILLed at
stage boundaries and relaunched, and the disk "fills up" under the results writer. The README's
"Reliability: what was tried and what happens" table points at the test for each row.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from abliterate import records
from abliterate.config import ConfigError, register_configs
from abliterate.pipeline import Session, run_trial
from abliterate.prompts import PromptDataError

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")
SECRET = "sentinel0secret0do0not0write0me0anywhere"  # 40 characters, like a W&B key
TINY = [
    "model=hub",
    "model.name=tiny-llama",
    "model.default_layer=1",
    "model.dtype=float32",
    "model.device=cpu",
    "eval=quick",
    "eval.max_new_tokens=8",
    "extraction=diff_in_means",
    "data.harmful_train.per_category=4",
    "data.matched_train.per_category=4",
    "data.unmatched_train.limit=24",
]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def unloadable_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's config and tokenizer with garbage weights: a check that still reports its
    own message here ran before any weights were read."""
    directory = tmp_path_factory.mktemp("garbage-weights")
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, directory / file.name)
    (directory / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 8)
    return directory


@pytest.fixture(scope="module")
def pickled_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its weights only as a pickle (pytorch_model.bin)."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("pickled")
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, directory / file.name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


@pytest.fixture()
def previous_trial(tmp_path):
    """A complete results.json of an earlier trial, which nothing may touch."""
    directory = tmp_path / "previous"
    directory.mkdir()
    path = records.write_results(directory, {"trial": {"model": "earlier"}})
    return path, path.read_bytes(), path.stat().st_mtime_ns


def compose_trial(model_dir: Path, tmp_path: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                *TINY,
                f"model.path={model_dir}",
                "logger=none",
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path / 'out'}",
                *overrides,
            ],
        )


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_SILENT="true",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        **extra,
    )
    return env


def cli_command(model_dir: Path, tmp_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "run.py",
        *TINY,
        f"model.path={model_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    ]


def run_cli(model_dir: Path, tmp_path: Path, *overrides: str, **env: str):
    if not any(o.startswith("logger=") for o in overrides):
        overrides = ("logger=none", *overrides)
    return subprocess.run(
        cli_command(model_dir, tmp_path, *overrides),
        cwd=REPO,
        env=cli_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_clean_failure(done, pattern: str, tmp_path: Path, previous_trial) -> str:
    """Non-zero exit, the message on stderr without a traceback, nothing written as if done."""
    import re

    assert done.returncode != 0, done.stdout + done.stderr
    assert re.search(pattern, done.stderr), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error: ")], done.stderr
    written = [p for p in tmp_path.rglob(records.RESULTS_FILE) if p != previous_trial[0]]
    assert not written, written
    path, content, mtime = previous_trial
    assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime
    return done.stderr


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prompts_of(category: str, count: int, stem: str) -> list[dict]:
    return [
        {"prompt": f"{stem} {category} {chr(97 + i)}", "category": category} for i in range(count)
    ]


# ---------------------------------------------------------------- 1. bad input, real CLI


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["ablation.combine=average"],
         r"ablation\.combine='average' is not valid; choose one of merged, sum, sequential"),
        (["ablation.weight=-0.5"], r"ablation\.weight=-0\.5 must be a finite number >= 0"),
        (["ablation.weight=nan"], r"ablation\.weight=nan must be a finite number >= 0"),
        (["baseline.name=topic"], r"baseline\.name='topic' is not valid; choose one of matched"),
        (["layer=7"], r"layer=7 is outside this model's layers; valid: 0\.\.2 \(or -3\.\.-1\)"),
        (["data.harmful_train.limit=0"], r"data\.harmful_train\.limit=0 must be >= 1"),
        (["data.harmful_train.source=file", "data.harmful_train.path=/no/such/prompts.jsonl"],
         r"data\.harmful_train\.path='/no/such/prompts\.jsonl': no such file"),
    ],
    ids=["choice", "negative-weight", "nan-weight", "baseline", "layer", "limit", "missing-file"],
)  # fmt: skip
def test_bad_config_fails_before_any_weights_load(
    unloadable_model_dir, tmp_path, previous_trial, overrides, pattern
):
    # garbage weights: had the model been loaded, the error would be a safetensors one
    done = run_cli(unloadable_model_dir, tmp_path, *overrides)
    assert_clean_failure(done, pattern, tmp_path, previous_trial)
    assert not (tmp_path / "cache" / "activations").exists()


def test_unknown_key_and_wrong_type_fail_at_compose_time(tiny_model_dir, tmp_path, previous_trial):
    done = run_cli(tiny_model_dir, tmp_path, "ablation.wieght=0.5")
    assert done.returncode != 0 and "ablation.wieght" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    done = run_cli(tiny_model_dir, tmp_path, "layer=middle")
    assert done.returncode != 0 and "layer" in done.stderr and "middle" in done.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("results.json"))


def _matched_files(tmp_path: Path) -> tuple[Path, Path]:
    harmful = write_lines(
        tmp_path / "harmful.jsonl",
        prompts_of("violence_weapons", 4, "build a")
        + prompts_of("hacking_cybersecurity", 4, "break a"),
    )
    matched = write_lines(tmp_path / "matched.jsonl", prompts_of("violence_weapons", 4, "cook a"))
    return harmful, matched


def test_matched_baseline_without_matched_prompts_names_the_category(
    tiny_model_dir, tmp_path, previous_trial
):
    harmful, matched = _matched_files(tmp_path)
    done = run_cli(
        tiny_model_dir, tmp_path, "baseline=matched",
        "data.harmful_train.source=file", f"data.harmful_train.path={harmful}",
        "data.matched_train.source=file", f"data.matched_train.path={matched}",
    )  # fmt: skip
    stderr = assert_clean_failure(
        done, r"baseline=matched needs matched prompts .* missing \['hacking_cybersecurity'\]",
        tmp_path, previous_trial,
    )  # fmt: skip
    assert "violence_weapons" in stderr


def test_eval_split_overlapping_extraction_split_is_refused(
    tiny_model_dir, tmp_path, previous_trial
):
    done = run_cli(tiny_model_dir, tmp_path, "data.harmful_eval.split=extraction")
    assert_clean_failure(
        done,
        r"data\.harmful_eval shares \d+ prompts with data\.harmful_train .* must be held out",
        tmp_path,
        previous_trial,
    )


BAD_FILES = {
    "malformed-jsonl": ("bad.jsonl", b'{"prompt": "fine one"}\n{"prompt": "broken"\n',
                        r"bad\.jsonl:2: not valid JSON"),
    "missing-column": ("cols.csv", b"text,category\nhello there,x\n",
                       r"cols\.csv:2: no column 'prompt'; columns are \['category', 'text'\]"),
    "empty-prompt": ("empty.jsonl", b'{"prompt": "fine"}\n\n{"prompt": "   "}\n',
                     r"empty\.jsonl:3: column 'prompt' is empty"),
    "non-utf8": ("latin.txt", b"fine\nalso fine\ncaf\xe9 au lait\n",
                 r"latin\.txt:3: not valid UTF-8"),
    "duplicate": ("dup.csv", b"prompt\nsame thing\nother thing\nsame thing\n",
                  r"dup\.csv:4: duplicate prompt \(same text as 2\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_prompt_file_names_file_and_line(tiny_model_dir, tmp_path, previous_trial, case):
    name, content, pattern = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    done = run_cli(
        tiny_model_dir, tmp_path, "data.unmatched_train.source=file",
        f"data.unmatched_train.path={path}", "data.unmatched_train.category_column=null",
    )  # fmt: skip
    assert_clean_failure(done, pattern, tmp_path, previous_trial)


@pytest.mark.parametrize("case", ["malformed-file", "matched-coverage", "overlap"])
def test_prompt_checks_run_before_weights_load(unloadable_model_dir, tmp_path, monkeypatch, case):
    import abliterate.pipeline as pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the prompt sets were checked")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    harmful, matched = _matched_files(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{oops\n')
    overrides = {
        "malformed-file": ["data.harmful_train.source=file", f"data.harmful_train.path={bad}"],
        "matched-coverage": ["baseline=matched", "data.harmful_train.source=file",
                             f"data.harmful_train.path={harmful}",
                             "data.matched_train.source=file",
                             f"data.matched_train.path={matched}"],
        "overlap": ["data.harmful_eval.split=extraction"],
    }[case]  # fmt: skip
    cfg = compose_trial(unloadable_model_dir, tmp_path, *overrides)
    with pytest.raises((ConfigError, PromptDataError)):
        run_trial(cfg, session=Session())


# ---------------------------------------------------------------- 2. degenerate science is data


@pytest.mark.parametrize(
    ("extraction", "degenerate", "count"), [("som_per_class", 1, 1), ("diff_in_means", 1, 0)]
)
def test_matched_mean_equal_to_harmful_mean_is_a_recorded_degenerate_direction(
    tiny_model_dir, tmp_path, extraction, degenerate, count
):
    # violence_weapons: its one harmful prompt is also its matched prompt, so h - m_c = 0 exactly
    # (batch size 1: no padding, so equal prompts give bit-equal activations). som_per_class
    # drops that category's direction and keeps the other; diff_in_means over that category alone
    # has nothing left, and the trial still completes, evaluating the unedited model.
    same = prompts_of("violence_weapons", 1, "build a")
    other = prompts_of("hacking_cybersecurity", 4, "break a") if count else []
    harmful = write_lines(tmp_path / "harmful.jsonl", same + other)
    matched = write_lines(
        tmp_path / "matched.jsonl", same + prompts_of("hacking_cybersecurity", 4, "fix a")
    )
    cfg = compose_trial(
        tiny_model_dir, tmp_path, "baseline=matched", "model.batch_size=1",
        f"extraction={extraction}", "extraction.iterations=100",
        "data.harmful_train.source=file", f"data.harmful_train.path={harmful}",
        "data.matched_train.source=file", f"data.matched_train.path={matched}",
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="degenerate"):
        results = run_trial(cfg, session=Session())
    written = records.read_complete_results(tmp_path / "out")
    assert written is not None and written["directions"]["degenerate"] == degenerate
    assert written["directions"]["count"] == count
    if count:
        assert written["directions"]["labels"] == ["hacking_cybersecurity"]
    else:
        assert results["eval"]["refusal_rate"] == results["baseline_eval"]["refusal_rate"]
    assert results["eval"]["n_harmful"] > 0


# ---------------------------------------------------------------- 3. faults


def _first(pattern: str, root: Path) -> Path | None:
    return next(iter(sorted(root.glob(pattern))), None) if root.exists() else None


KILL_POINTS = {
    # glob under the cache that marks the stage, and what is running when it appears
    # first entry written (its own name, not the staging it is renamed from); others computing
    "activations": "activations/" + "?" * 20 + "/activations.safetensors",
    "baseline-evaluation": "baseline_eval/*.lock",  # the unedited model is generating
    # baseline stored, ablated model running; the entry's own name (a 20-character key), not
    # the staging directory it is renamed from ("<key>.tmp-<pid>"), where a kill would come
    # before the rename and the relaunch could not reuse the baseline
    "ablated-evaluation": "baseline_eval/" + "?" * 20 + "/sets.json",
}


def test_sigkill_at_any_stage_leaves_nothing_complete_and_a_relaunch_finishes(
    tiny_model_dir, tmp_path
):
    command = cli_command(tiny_model_dir, tmp_path, "logger=none", "eval.max_new_tokens=16")
    run_dir = tmp_path / "run"
    for stage, pattern in KILL_POINTS.items():
        process = subprocess.Popen(
            command, cwd=REPO, env=cli_env(tmp_path), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while _first(pattern, tmp_path / "cache") is None and process.poll() is None:
            assert time.monotonic() < deadline, f"stage {stage} never started"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL, f"{stage}: finished first\n{stderr}"
        assert records.read_complete_results(run_dir) is None, stage
        if (run_dir / records.RESULTS_FILE).exists():
            status = json.loads((run_dir / records.RESULTS_FILE).read_text()).get("status")
            assert status != "complete", stage
    done = subprocess.run(
        command, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    results = records.read_complete_results(run_dir)
    assert results is not None and results["cache"]["activations"] == "hit"
    assert results["cache"]["baseline_eval"] == "hit"  # the killed runs' finished work is reused
    # and a second relaunch finds the trial complete and skips it
    again = subprocess.run(
        command, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and "is complete; skipping" in again.stdout + again.stderr
    assert records.read_complete_results(run_dir)["timing_s"] == results["timing_s"]


def _fail_writes_of(monkeypatch, file_name: str) -> None:
    real_replace = os.replace

    def full_disk(source, destination, *args, **kwargs):
        if Path(destination).name == file_name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)


def test_full_disk_while_writing_results_is_clear_and_loses_nothing(
    tiny_model_dir, tmp_path, monkeypatch
):
    session = Session()
    earlier = compose_trial(tiny_model_dir, tmp_path, f"paths.output_dir={tmp_path / 'earlier'}")
    run_trial(earlier, session=session)
    before = (tmp_path / "earlier" / records.RESULTS_FILE).read_bytes()

    _fail_writes_of(monkeypatch, records.RESULTS_FILE)
    cfg = compose_trial(tiny_model_dir, tmp_path, "ablation.weight=0.5")
    with pytest.raises(OSError, match=r"could not write .*results\.json: No space left") as error:
        run_trial(cfg, session=session)
    assert error.value.errno == errno.ENOSPC
    out = tmp_path / "out"
    assert not (out / records.RESULTS_FILE).exists()
    assert not list(out.glob(".*tmp*")), list(out.iterdir())  # no temporary left behind
    assert (tmp_path / "earlier" / records.RESULTS_FILE).read_bytes() == before
    # a forced rerun of the earlier trial first moves its results.json aside (so nothing claims
    # `complete` beside the rerun's new files); hitting the full disk then loses nothing: the
    # earlier results are kept, byte for byte, as results.json.superseded
    forced = compose_trial(
        tiny_model_dir, tmp_path, f"paths.output_dir={tmp_path / 'earlier'}", "force=true"
    )
    with pytest.raises(OSError, match="No space left"):
        run_trial(forced, session=session)
    assert not (tmp_path / "earlier" / records.RESULTS_FILE).exists()
    superseded = tmp_path / "earlier" / f"{records.RESULTS_FILE}.superseded"
    assert superseded.read_bytes() == before


def test_full_disk_while_writing_completions_leaves_no_partial_file(tmp_path, monkeypatch):
    (tmp_path / records.COMPLETIONS_FILE).write_text('{"earlier": true}\n')
    _fail_writes_of(monkeypatch, records.COMPLETIONS_FILE)
    with pytest.raises(OSError, match="could not write .*completions.jsonl"):
        records.write_completions(tmp_path, [{"prompt": "p", "response": "r"}])
    assert (tmp_path / records.COMPLETIONS_FILE).read_text() == '{"earlier": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == [records.COMPLETIONS_FILE]


def test_failed_forced_rerun_leaves_no_complete_results_beside_new_companions(
    tiny_model_dir, tmp_path, monkeypatch
):
    session = Session()
    run_trial(compose_trial(tiny_model_dir, tmp_path), session=session)
    companions = (records.COMPLETIONS_FILE, records.DIRECTIONS_FILE)
    before = {name: (tmp_path / "out" / name).read_bytes() for name in companions}
    _fail_writes_of(monkeypatch, records.RESULTS_FILE)
    cfg = compose_trial(tiny_model_dir, tmp_path, "force=true", "baseline=matched")
    with pytest.raises(OSError):
        run_trial(cfg, session=session)
    still_complete = records.read_complete_results(tmp_path / "out") is not None
    unchanged = all((tmp_path / "out" / n).read_bytes() == before[n] for n in companions)
    assert not still_complete or unchanged


# ---------------------------------------------------------------- 4. safety of what is loaded


def test_pickled_weights_are_refused_unless_allowed(pickled_model_dir, tmp_path):
    from abliterate.loading import load_model

    cfg = compose_trial(pickled_model_dir, tmp_path)
    assert cfg.model.allow_pickle is False
    with pytest.raises(
        ConfigError, match=r"only pickle weights \(\.bin\).*model\.allow_pickle=true"
    ):
        load_model(cfg.model, tmp_path / "cache")
    allowed = compose_trial(pickled_model_dir, tmp_path, "model.allow_pickle=true")
    assert load_model(allowed.model, tmp_path / "cache").model.config.num_hidden_layers == 3


def test_remote_code_is_off_by_default_and_never_runs(tiny_model_dir, tmp_path):
    from abliterate.models import read_model_config

    for option in sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")):
        register_configs()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=[f"model={option}"])
        assert cfg.model.trust_remote_code is False, option
    # a checkpoint that ships its own code: with the default, the code is never imported
    directory = tmp_path / "remote-code"
    shutil.copytree(tiny_model_dir, directory)
    marker = tmp_path / "remote_code_ran"
    (directory / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
    )
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (directory / "config.json").write_text(json.dumps(config))
    cfg = compose_trial(directory, tmp_path)
    try:
        read_model_config(cfg.model)
    except ValueError as error:  # transformers may refuse outright: also fine
        assert "trust_remote_code" in str(error)
    assert not marker.exists()


def test_every_torch_load_in_src_uses_weights_only():
    offenders = []
    for path in sorted((REPO / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(getattr(func, "value", None), "id", "")
            if (owner, name) in (("pickle", "load"), ("pickle", "loads"), ("dill", "load")):
                offenders.append(f"{path}:{node.lineno}: {owner}.{name}")
            if (owner, name) == ("torch", "load"):
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    offenders.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert not offenders, offenders


def test_no_secret_is_written_by_a_tracked_trial(tiny_model_dir, tmp_path):
    done = run_cli(
        tiny_model_dir, tmp_path, "logger=wandb", "logger.mode=offline",
        WANDB_API_KEY=SECRET, HF_TOKEN=SECRET, HUGGING_FACE_HUB_TOKEN=SECRET,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "run"
    assert records.read_complete_results(run_dir) is not None
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run was written"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert SECRET not in done.stdout + done.stderr
    leaks = [
        str(path.relative_to(tmp_path))
        for path in tmp_path.rglob("*")
        if path.is_file() and SECRET.encode() in path.read_bytes()
    ]
    assert not leaks, leaks


# ---------------------------------------------------------------- 5. second round (issue 19)
# Each case through `python run.py` where a user meets it. The model directories below have the
# tiny model's config and tokenizer but garbage weights, so a check that still reports its own
# message ran before any weights were read; "nothing written" is checked by assert_clean_failure
# (no results.json) and by the caches and W&B directories asserted absent.


def _garbage_copy(tiny_model_dir: Path, directory: Path) -> Path:
    directory.mkdir(parents=True)
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, directory / file.name)
    (directory / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 8)
    return directory


def _nothing_computed(tmp_path: Path) -> None:
    for stage in ("activations", "baseline_eval", "models"):
        assert not (tmp_path / "cache" / stage).exists(), stage
    assert not list(tmp_path.rglob("offline-run-*")), "a W&B run was started"


def test_model_path_that_does_not_exist_is_one_line(tmp_path, previous_trial):
    done = run_cli(tmp_path / "no" / "such-model", tmp_path)
    assert_clean_failure(
        done, r"model\.path='[^']*no/such-model': no such directory, and not a hub repo id",
        tmp_path, previous_trial,
    )  # fmt: skip
    _nothing_computed(tmp_path)


def test_offline_hub_id_not_in_the_cache_names_hf_hub_offline(tmp_path, previous_trial):
    # an empty Hugging Face cache: the id cannot be there
    done = run_cli(
        Path("nobody-h5/not-a-cached-model"), tmp_path, HF_HOME=str(tmp_path / "hf-home")
    )
    assert_clean_failure(
        done,
        r"model\.path='nobody-h5/not-a-cached-model' is neither a local directory nor in the "
        r"local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it",
        tmp_path, previous_trial,
    )  # fmt: skip
    _nothing_computed(tmp_path)


def test_model_without_chat_template_fails_before_weights(tiny_model_dir, tmp_path, previous_trial):
    directory = _garbage_copy(tiny_model_dir, tmp_path / "base-model")
    (directory / "chat_template.jinja").unlink()
    done = run_cli(directory, tmp_path)
    assert_clean_failure(
        done, r"model\.path='[^']*base-model': its tokenizer has no chat template",
        tmp_path, previous_trial,
    )  # fmt: skip
    _nothing_computed(tmp_path)


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"model_type": "gpt2", "n_layer": 3, "n_embd": 64, "n_head": 4, "vocab_size": 128},
         r"loads as GPT2LMHeadModel \(model_type 'gpt2'\), whose residual-stream writers "
         r"abliterate does not know; supported: Gemma3ForCausalLM, "),
        ({"model_type": "t5", "num_layers": 3, "d_model": 64, "vocab_size": 128},
         r"is a 't5' model \(architectures \['T5ForConditionalGeneration'\]\), which transformers "
         r"cannot load as a causal language model"),
    ],
    ids=["gpt2", "t5"],
)  # fmt: skip
def test_unsupported_model_class_fails_from_its_config_alone(
    tiny_model_dir, tmp_path, previous_trial, config, pattern
):
    directory = _garbage_copy(tiny_model_dir, tmp_path / "other-model")
    if config["model_type"] == "t5":
        config = {**config, "architectures": ["T5ForConditionalGeneration"]}
    (directory / "config.json").write_text(json.dumps(config))
    done = run_cli(directory, tmp_path)
    assert_clean_failure(done, pattern, tmp_path, previous_trial)
    _nothing_computed(tmp_path)


def _tiny_gguf(path: Path, architecture: str) -> Path:
    """A GGUF file with an architecture's metadata and one tensor (its other weights missing: a
    load past the config would fail with transformers' own error, not ours)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{architecture}")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_tensor("token_embd.weight", np.zeros((128, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("architecture", "pattern"),
    [
        ("rwkv6", r"model\.path='[^']*rwkv6\.gguf': GGUF model with architecture rwkv6 is not "
                  r"supported yet\. \(transformers reads GGUF files of .*; abliterate supports "
                  r"gemma3, llama, mistral, qwen2, qwen2_moe, qwen3, qwen3_moe\)"),
        ("phi3", r"model\.path='[^']*phi3\.gguf' loads as Phi3ForCausalLM \(model_type 'phi3'\), "
                 r"whose residual-stream writers abliterate does not know"),
    ],
)  # fmt: skip
def test_unsupported_gguf_architecture_fails_before_dequantisation(
    tmp_path, previous_trial, architecture, pattern
):
    path = _tiny_gguf(tmp_path / f"{architecture}.gguf", architecture)
    done = run_cli(path, tmp_path, "model.source=gguf")
    assert_clean_failure(done, pattern, tmp_path, previous_trial)
    _nothing_computed(tmp_path)


def test_model_path_to_a_missing_gguf_file_is_one_line(tmp_path, previous_trial):
    done = run_cli(tmp_path / "missing.gguf", tmp_path, "model.source=gguf")
    assert_clean_failure(
        done, r"model\.path='[^']*missing\.gguf': no such GGUF file", tmp_path, previous_trial
    )


@pytest.mark.parametrize("where", ["train", "eval"])
def test_prompt_longer_than_the_context_is_refused_naming_it(
    unloadable_model_dir, tmp_path, previous_trial, where
):
    # the tiny model's context is 512 tokens, one per character (tests/conftest.py); the
    # ChatML template adds 19 tokens around a prompt
    if where == "train":
        long = "Describe a quiet walk by the river " + "and the trees " * 40  # 594 once stripped
        rows = [{"prompt": long}] + [{"prompt": f"Name a fruit, number {i}"} for i in range(30)]
        key, overrides = "data.unmatched_train", []
        pattern = (
            r"data\.unmatched_train: prompt 0 \('Describe a quiet walk by the river and t'\) is "
            r"613 tokens with the chat template = 613, more than the model's context of 512 "
            r"tokens \(max_position_embeddings\); prompts are never truncated: shorten or remove "
            r"it"
        )
    else:
        # 473 + 19 fits alone; with eval.max_new_tokens=64 it does not
        long = "Plan a picnic " * 33 + "menu for us"  # 473 characters
        rows = [{"prompt": long}] + [{"prompt": f"Name a colour, number {i}"} for i in range(40)]
        key, overrides = "data.unmatched_eval", ["eval.max_new_tokens=64"]
        pattern = (
            r"data\.unmatched_eval: prompt 0 \('Plan a picnic Plan a picnic Plan a picni'\) is "
            r"492 tokens with the chat template \+ eval\.max_new_tokens=64 = 556, more than the "
            r"model's context of 512 tokens .* or lower eval\.max_new_tokens"
        )
    path = write_lines(tmp_path / f"{where}.jsonl", rows)
    done = run_cli(
        unloadable_model_dir, tmp_path, f"{key}.source=file", f"{key}.path={path}",
        f"{key}.category_column=null", *overrides,
    )  # fmt: skip
    stderr = assert_clean_failure(done, pattern, tmp_path, previous_trial)
    assert re.search(pattern + "$", stderr, re.MULTILINE), stderr  # the whole line
    _nothing_computed(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["eval.kl_top_k=0"], r"eval\.kl_top_k=0 must be >= 1 .* or null \(the full vocabulary\)"),
        (["eval.kl_prompts=500"],
         r"eval\.n_unmatched=8 false-refusal prompts plus eval\.kl_prompts=500 KL prompts need "
         r"508 distinct prompts of prompt set 'unmatched_eval' but it holds 128"),
        (["eval.n_matched=1000"],
         r"eval\.n_matched=1000 asks for 1000 prompts of prompt set 'matched_eval' but only 144"),
        (["judge.max_length=0"], r"judge\.max_length=0 must be a whole number >= 1"),
        (["judge.name=oracle"], r"judge\.name='oracle' is not valid; choose one of rules, markers"),
        (["objectives=[eval.refusl_rate]"],
         r"objectives entry 'eval\.refusl_rate' is not a number of results\.json \(did you mean "
         r"eval\.refusal_rate\?\); valid: eval\.n_harmful, "),
    ],
    ids=["kl-top-k-0", "kl-prompts-pool", "n-matched-pool", "judge-max-length", "judge-name",
         "objective-typo"],
)  # fmt: skip
def test_bad_eval_judge_or_objective_setting_fails_before_weights_and_tracking(
    unloadable_model_dir, tmp_path, previous_trial, overrides, pattern
):
    # logger=wandb: the check comes before a W&B run is started for the trial
    done = run_cli(
        unloadable_model_dir, tmp_path, "logger=wandb", "logger.mode=offline", *overrides
    )
    assert_clean_failure(done, pattern, tmp_path, previous_trial)
    _nothing_computed(tmp_path)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("eval.kl_top_k=-2", r"eval\.kl_top_k=-2 must be >= 1"),
        ("judge.batch_size=0", r"judge\.batch_size=0 must be >= 1"),
        ("judge.max_new_tokens=0", r"judge\.max_new_tokens=0 must be a whole number >= 1"),
        ("judge.max_response_chars=-1", r"judge\.max_response_chars=-1 must be a whole number"),
        ("judge=classifier judge.model=null", r"judge=classifier needs judge\.model="),
        ("judge=llm", r"judge=llm needs judge\.model=<hub id or dir> or judge\.source=embedded"),
        ("logger.init_timeout_s=nan", r"logger\.init_timeout_s=nan must be a finite number >= 0"),
        ("logger.finish_timeout_s=-1", r"logger\.finish_timeout_s=-1\.0 must be a finite number"),
        ("objectives=[]", r"objectives=\[\] names no value"),
        ("objectives=[eval.refusal_rate,trial.layer]",
         r"objectives entry 'trial\.layer' is not a number of results\.json"),
    ],
)  # fmt: skip
def test_validate_config_names_each_bad_judge_logger_or_objective_value(
    tmp_path, override, pattern
):
    from abliterate.config import validate_config

    cfg = compose_trial(tmp_path, tmp_path, *override.split())
    with pytest.raises(ConfigError, match=pattern):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("judge.input=both", "judge.input='both' is not valid; choose one of response, pair"),
        ("judge.fallback=maybe", "judge.fallback='maybe' is not valid; choose one of rules, "
                                 "markers, REFUSE, EVASIVE, COMPLY, INCOHERENT"),
    ],
)  # fmt: skip
def test_a_bad_judge_choice_fails_at_compose_time_in_one_line(tmp_path, override, line):
    # judge choices are enums of the judge schema: composing fails, and the command line prints
    # choice_error_line's one line (as for every other choice field)
    from hydra.errors import ConfigCompositionException

    from abliterate.choices import choice_error_line

    with pytest.raises(ConfigCompositionException) as failure:
        compose_trial(tmp_path, tmp_path, override)
    assert choice_error_line(failure.value) == line


def test_sets_that_were_not_evaluated_are_null_with_n_zero(tiny_model_dir, tmp_path):
    done = run_cli(tiny_model_dir, tmp_path, "eval.n_unmatched=0", "eval.n_matched=0")
    assert done.returncode == 0, done.stderr
    results = records.read_complete_results(tmp_path / "run")
    assert results is not None
    for block in ("eval", "baseline_eval"):
        got = results[block]
        assert got["n_harmless"] == 0 and got["n_matched"] == 0, block
        for rate in ("harmless_refusal_rate", "matched_harmless_refusal_rate"):
            assert got[rate] is None and got[f"{rate}_ci95"] is None, (block, rate)
        assert got["n_harmful"] == 18 and got["refusal_rate"] is not None
    evaluated = results["eval"]
    assert evaluated["harmless_evasive_rate"] is None
    for key in ("harmless_outcomes", "harmless_refusals", "matched_outcomes",
                "matched_harmless_refusals"):  # fmt: skip
        assert evaluated[key] is None, key
    # KL still has its own prompts (after the n_unmatched=0 false-refusal ones)
    assert evaluated["n_kl_prompts"] == 8 and evaluated["kl_divergence"] is not None
    sets = [json.loads(line)["set"] for line in (tmp_path / "run" / "completions.jsonl").open()]
    assert sets == ["harmful"] * 18


def test_data_categories_is_honoured_for_file_sources(
    unloadable_model_dir, tmp_path, previous_trial
):
    harmful, _ = _matched_files(tmp_path)  # violence_weapons and hacking_cybersecurity
    done = run_cli(
        unloadable_model_dir, tmp_path, "data.harmful_train.source=file",
        f"data.harmful_train.path={harmful}", "data.categories=[self_harm,harassment]",
    )  # fmt: skip
    assert_clean_failure(
        done,
        r"data\.harmful_train: none of the categories of [^ ]*harmful\.jsonl \(violence_weapons, "
        r"hacking_cybersecurity\) is in data\.categories \(self_harm, harassment\); set "
        r"data\.categories=\[\] to take the set's own categories",
        tmp_path, previous_trial,
    )  # fmt: skip
    _nothing_computed(tmp_path)


def test_data_categories_keeps_only_the_listed_categories_of_a_file(tmp_path, caplog):
    from abliterate.pipeline import _load_prompt_sets

    harmful, _ = _matched_files(tmp_path)
    cfg = compose_trial(
        tmp_path, tmp_path, "data.harmful_train.source=file", f"data.harmful_train.path={harmful}",
        "data.categories=[violence_weapons,self_harm]",
    )  # fmt: skip
    sets = _load_prompt_sets(cfg, Session())
    assert set(sets["harmful_train"].categories) == {"violence_weapons"}
    assert len(sets["harmful_train"]) == 4
    assert set(sets["harmful_eval"].categories) == {"violence_weapons", "self_harm"}  # builtin
    assert "4 prompts of categories ['hacking_cybersecurity'] not in data.categories" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["data.matched_eval.split=extraction"],
         r"data\.matched_eval shares \d+ prompts with data\.matched_train \(e\.g\. .*\); "
         r"evaluation prompts must be held out"),
        (["data.unmatched_eval.split=extraction"],
         r"data\.unmatched_eval shares \d+ prompts with data\.unmatched_train"),
    ],
    ids=["matched", "unmatched"],
)  # fmt: skip
def test_train_and_eval_sharing_a_prompt_is_an_error(
    unloadable_model_dir, tmp_path, previous_trial, overrides, pattern
):
    done = run_cli(unloadable_model_dir, tmp_path, *overrides)
    assert_clean_failure(done, pattern, tmp_path, previous_trial)
    _nothing_computed(tmp_path)


def test_one_shared_prompt_between_file_sets_is_an_error(
    unloadable_model_dir, tmp_path, previous_trial
):
    train = write_lines(tmp_path / "train.jsonl", [{"prompt": f"Name a fruit, number {i}"}
                                                    for i in range(30)])  # fmt: skip
    held_out = write_lines(
        tmp_path / "eval.jsonl",
        [{"prompt": f"Name a colour, number {i}"} for i in range(30)]
        + [{"prompt": "Name a fruit, number 7"}],
    )
    done = run_cli(
        unloadable_model_dir, tmp_path,
        "data.unmatched_train.source=file", f"data.unmatched_train.path={train}",
        "data.unmatched_eval.source=file", f"data.unmatched_eval.path={held_out}",
        "eval.n_unmatched=8", "eval.kl_prompts=23",  # all 31 evaluated: the shared one too
    )  # fmt: skip
    assert_clean_failure(
        done,
        r"data\.unmatched_eval shares 1 prompts with data\.unmatched_train \(e\.g\. 'Name a "
        r"fruit, number 7'\)",
        tmp_path, previous_trial,
    )  # fmt: skip


def test_embedded_model_evaluated_on_its_own_training_split_is_refused_before_it_is_built(
    tmp_path, previous_trial
):
    command = [
        sys.executable, "run.py", "logger=none", "eval=quick",
        f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
        "data.harmful_eval.split=refuser_train",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert_clean_failure(
        done,
        r"data\.harmful_eval shares \d+ prompts with the embedded model's fine-tuning data "
        r"\(builtin harmful, split refuser_train; .*\); its refusals there were trained, not "
        r"measured: evaluate on split=evaluation",
        tmp_path, previous_trial,
    )  # fmt: skip
    _nothing_computed(tmp_path)  # the refuser was not built (no cache/models)


def test_overlaps_between_training_sets_warn(caplog):
    from abliterate.prompts import PromptSet, check_overlaps

    harmful = PromptSet("h", ("same", "a"), ("x", "x"))
    matched = PromptSet("m", ("same", "b"), ("x", "x"))
    warnings = check_overlaps(
        {"harmful_train": harmful, "matched_train": matched},
        {"harmful_eval": PromptSet("e", ("c",))},
    )
    assert warnings == ["data.harmful_train and data.matched_train share 1 prompts (e.g. 'same')"]
    with pytest.raises(PromptDataError, match="data.harmful_eval shares 1 prompts with data"):
        check_overlaps({"harmful_train": harmful}, {"harmful_eval": PromptSet("e", ("a",))})


def test_export_of_degenerate_directions_fails_right_after_the_directions(
    tiny_model_dir, tmp_path, previous_trial
):
    # the degenerate case of section 2 (diff_in_means over one category whose harmful and
    # matched prompt are the same: no direction is left), asked to export
    same = prompts_of("violence_weapons", 1, "build a")
    harmful = write_lines(tmp_path / "harmful.jsonl", same)
    matched = write_lines(tmp_path / "matched.jsonl", same)
    overrides = (
        "baseline=matched", "model.batch_size=1", "extraction=diff_in_means", "export=true",
        "data.harmful_train.source=file", f"data.harmful_train.path={harmful}",
        "data.matched_train.source=file", f"data.matched_train.path={matched}",
    )  # fmt: skip
    for attempt in ("first", "relaunch"):
        done = run_cli(tiny_model_dir, tmp_path, *overrides)
        assert_clean_failure(
            done,
            r"export=true but every direction at layer 1 is degenerate \(1 dropped, none "
            r"left\): the exported model would be the original; set export=false",
            tmp_path, previous_trial,
        )  # fmt: skip
        # the activations were computed (the directions need them); the evaluation never ran
        assert (tmp_path / "cache" / "activations").exists(), attempt
        assert not (tmp_path / "cache" / "baseline_eval").exists(), attempt
        assert not (tmp_path / "run" / "model").exists(), attempt


def test_objective_keys_are_numbers_of_a_real_results_file(tiny_model_dir, tmp_path):
    from abliterate.config import OBJECTIVE_KEYS
    from abliterate.pipeline import select_objective

    results = run_trial(compose_trial(tiny_model_dir, tmp_path), session=Session())
    for key in OBJECTIVE_KEYS:
        node = results
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, key
            node = node[part]
        assert node is None or isinstance(node, (int, float)) and not isinstance(node, bool), key
        select_objective(results, key)
