"""Front-door errors: every mistake a user can make in a command line or a config file is one line that names the
file and the key (and what it accepts), with no traceback, and leaves nothing half-made."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from assets.download import DownloadSettings
from orchestration.check_config import config_problems, load_run_config
from orchestration.definitions import defs
from pipelines.cli import main
from pipelines.data.download import DownloadConfig
from pipelines.training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _exit_message(argv) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    message = str(exited.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def train_json(tmp_path):
    def write(content) -> Path:
        path = tmp_path / "train.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path
    return write


FIELDS = {"run_dir": "runs/a", "shards": "shards/", "warmup_steps": 0}


def test_train_config_missing_file_exits_naming_it_without_traceback(tmp_path):
    missing = tmp_path / "nope.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--config", str(missing)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == f"{missing}: cannot read the config (No such file or directory)"


@pytest.mark.parametrize("content, expected", [
    ([FIELDS], "expected a JSON object of TrainConfig fields, got a list"),
    ({**FIELDS, "max_steps": [5]}, "max_steps: expected an integer, got [5]"),
    ({**FIELDS, "max_steps": "five"}, "max_steps: expected an integer, got 'five'"),
    ({**FIELDS, "schedule": "linear"}, "schedule: must be one of 'cosine', 'constant', got 'linear'"),
    ({**FIELDS, "batch_size": 0}, "batch_size: must be >= 1, got 0"),
    ({**FIELDS, "resume": "False"}, "resume: expected true or false, got 'False'"),
    ({"shards": "s/"}, "missing required TrainConfig keys ['run_dir']"),
    ("{\"run_dir\": ", "not JSON"),
])
def test_train_config_errors_name_the_file_and_the_key(train_json, content, expected):
    path = train_json(content)
    message = _exit_message(["train", "--config", str(path)])
    assert message.startswith(f"{path}") and expected in message, message


def test_set_reads_booleans_as_booleans(train_json):
    path = train_json(FIELDS)
    assert TrainConfig.from_json(path, {"resume": "False"}).resume is False
    assert TrainConfig.from_json(path, {"resume": "true"}).resume is True
    message = _exit_message(["train", "--config", str(path), "--set", "resume=maybe"])
    assert message == f"{path}: resume: expected true or false, got 'maybe'"


def test_generate_on_a_folder_that_is_no_checkpoint_exits_naming_it(tmp_path):
    message = _exit_message(["generate", "--checkpoint", str(tmp_path), "--prompt", "a cat", "--out",
                             str(tmp_path / "out")])
    assert message == f"--checkpoint {tmp_path}: not a model folder (no config.json), a step-* checkpoint or a run folder"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_eval_on_a_missing_or_empty_eval_dir_exits_naming_it(tmp_path, kind):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    eval_dir = tmp_path / "eval"
    if kind == "empty":
        eval_dir.mkdir()
    message = _exit_message(["eval", "--checkpoint", str(tmp_path / "model"), "--eval-dir", str(eval_dir), "--out",
                             str(tmp_path / "report")])
    assert message.startswith(f"--eval-dir {eval_dir}: ") and "world=" not in message
    assert ("no such folder" if kind == "missing" else "not a sample world eval folder") in message
    assert not (tmp_path / "report").exists()


def test_download_config_refuses_bad_values_naming_the_key():
    with pytest.raises(ValueError, match=r"^thread_count: must be >= 1, got -1$"):
        DownloadConfig(thread_count=-1)
    with pytest.raises(ValueError, match=r"^resize_mode: must be one of 'no', 'border'"):
        DownloadConfig(resize_mode="sideways")
    # the Dagster config carries the same range: refused before the asset runs (no image folder is made)
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 1"):
        DownloadSettings(thread_count=-1)


@pytest.mark.parametrize("ops, expected", [
    ({"downloaded_images": {"config": {"thread_count": -1}}},
     "ops.downloaded_images.config.thread_count: Input should be greater than or equal to 1, got -1"),
    ({"downloaded_images": {"config": {"resize_mode": "sideways"}}},
     "ops.downloaded_images.config.resize_mode: Value not in enum type Literal['no', 'border', 'keep_ratio', "
     "'keep_ratio_largest', 'center_crop'] got sideways"),
    ({"checkpoint": {"config": {"max_steps": "five"}}},
     "ops.checkpoint.config.max_steps: Invalid scalar. Value \"five\" of type \"<class 'str'>\" is not valid for "
     "expected type \"Int\"."),
    ({"packed_sequences": {"config": {"no_such_key": 1}}}, "ops.packed_sequences.config: Received unexpected config entry"),
])
def test_run_config_problems_are_one_line_per_key(ops, expected):
    problems = config_problems(defs().resolve_job_def("sample_world_main"), {"ops": ops})
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_run_config_check_command_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ops:\n  downloaded_images:\n    config:\n      thread_count: -1\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "orchestration.check_config", "sample_world_main", str(bad)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"{bad}: ops.downloaded_images.config.thread_count: Input should be greater than or "
                                   "equal to 1, got -1")
    presets = ROOT / "orchestration" / "presets"
    assert config_problems(defs().resolve_job_def("sample_world_main"),
                           load_run_config([str(presets / "sample_world.yaml")])) == []


def test_run_config_files_that_are_not_a_mapping_are_named(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- ops\n")
    with pytest.raises(ValueError, match=f"^{listed}: a run config is a mapping"):
        load_run_config([str(listed)])
    with pytest.raises(ValueError, match=r"cannot read the run config \(No such file or directory\)"):
        load_run_config([str(tmp_path / "missing.yaml")])
