import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import latest_checkpoint
from pipelines.sample_world.world import WorldConfig
from pipelines.training.schedule import lr_factor
from pipelines.training.train import TrainConfig, build_model, train
from world_shards import write_world_shards

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small packed shard set of the sample world (8 image tokens, the tiny preset) and its tokenizer."""
    out = tmp_path_factory.mktemp("train_data")
    index = write_world_shards(out, WorldConfig(seed=2, n_pairs=40, n_stories=10), maxcount=4)
    assert len(index.shards) >= 4
    return out


def _config(data, run_dir, **overrides) -> TrainConfig:
    fields = dict(run_dir=str(run_dir), shards=str(data / "shards"), tokenizer=str(data / "tokenizer"), max_steps=4,
                  batch_size=1, lr=1e-3, decoder_lr=1e-3, warmup_steps=1, checkpoint_every=2, zero_stage=2,
                  shuffle_buffer=8, progress=False, torch_threads=1)
    return TrainConfig(**{**fields, **overrides})


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT)}


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model" / "model.safetensors"))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_schedule_warms_up_then_decays():
    kw = dict(warmup_steps=4, max_steps=14)
    assert [lr_factor(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, **kw) == 1.0
    assert lr_factor(9, **kw) == pytest.approx(0.5)
    assert lr_factor(14, **kw) == pytest.approx(0.0) and lr_factor(100, **kw) == pytest.approx(0.0)
    assert lr_factor(14, **kw, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(10, **kw, schedule="constant") == 1.0
    assert lr_factor(0, warmup_steps=0, max_steps=10) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, warmup_steps=0, max_steps=1, schedule="linear")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"warmup_steps": 10, "max_steps": 5}, "warmup_steps"),
        ({"zero_stage": 3}, "zero_stage"),
        ({"precision": "int8"}, "precision"),
        ({"schedule": "linear"}, "schedule"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"lr": 0.0}, "lr"),
        ({"resampled": True}, "epoch_samples"),
        ({"shards": []}, "shards"),
        ({"model": "no/such/config.json"}, "model"),
        ({"source_rates": {"laion": -1}}, r"source_rates.*\{'laion': -1\}"),
        ({"source_rates": {"mmc4": "2"}}, "source_rates"),
    ],
)
def test_config_is_checked(tmp_path, overrides, message):
    fields = {"run_dir": str(tmp_path), "shards": str(tmp_path), "max_steps": 10, "warmup_steps": 1, **overrides}
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_optimizer_defaults_are_the_releases(tmp_path):
    """AdamW (0.9, 0.995) with eps 1e-6; 1e-4 for new modules (the decoder's too), 1e-5 for the UNet and every
    sampling offset; and what the model's groups get is what the config says."""
    config = TrainConfig(run_dir=str(tmp_path), shards=str(tmp_path), offsets_lr=None, new_decoder_lr=2e-3)
    assert TrainConfig.eps == 1e-6 and TrainConfig.betas == (0.9, 0.995)
    assert (TrainConfig.lr, TrainConfig.decoder_lr, TrainConfig.new_decoder_lr, TrainConfig.offsets_lr) == (1e-4, 1e-5, None, 1e-5)
    groups = config.optimizer_groups()
    assert (groups.lr, groups.decoder_lr, groups.new_decoder_lr, groups.offsets_lr, groups.weight_decay) == (1e-4, 1e-5, 2e-3, None, 0.05)


def test_nan_loss_skips_the_micro_batch_and_is_logged(data, tmp_path):
    config = _config(data, tmp_path / "run", max_steps=3, checkpoint_every=3)
    model = build_model(config)
    forward = model.forward
    calls = []

    def nan_on_second_call(batch):
        out = forward(batch)
        calls.append(1)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    model.forward = nan_on_second_call
    result = train(config, model=model)
    assert result.step == 3 and result.skipped_batches == 1 and len(calls) == 4
    events = [m for m in _metrics(tmp_path / "run") if m.get("event") == "skipped_batch"]
    assert events == [{"event": "skipped_batch", "step": 2, "reason": "non_finite_loss", "ranks": 1, "loss": "nan"}]
    assert all(torch.isfinite(t).all() for t in _weights(result.checkpoint).values())
    assert all(math.isfinite(m["loss"]) for m in result.metrics)


def test_killed_run_resumes_to_the_same_parameters(data, tmp_path):
    reference = train(_config(data, tmp_path / "reference"))
    assert reference.step == 4

    config = _config(data, tmp_path / "killed")
    (tmp_path / "cfg.json").write_text(json.dumps(config.to_dict()))
    process = subprocess.Popen([str(PYTHON), "-m", "pipelines.training.train", "--config", str(tmp_path / "cfg.json")], cwd=ROOT,
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and '"event": "checkpoint"' in metrics.read_text()):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)  # a crash mid-run, right after the step-2 checkpoint
    assert process.wait() == -signal.SIGKILL
    process.stderr.close()
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000002"

    resumed = train(config)
    assert resumed.step == 4 and [m["step"] for m in resumed.metrics] == [3, 4]
    expected, got = _weights(reference.checkpoint), _weights(resumed.checkpoint)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    steps = [m["step"] for m in _metrics(tmp_path / "killed") if "event" not in m]
    assert steps == [1, 2, 3, 4]  # records of the killed run past its checkpoint were dropped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(nodes: int, config: Path) -> None:
    """Train on two ranks: one torchrun with two processes, or two torchruns as two nodes (one process each,
    rendezvous at node 0 on localhost), the cluster's launch on one machine."""
    torchrun = [str(PYTHON.parent / "torchrun")]
    script = ["-m", "pipelines.training.train", "--config", str(config)]
    if nodes == 1:
        commands = [[*torchrun, "--standalone", "--nproc_per_node", "2", *script]]
    else:
        port = str(_free_port())
        commands = [[*torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr",
                     "127.0.0.1", "--master_port", port, *script] for rank in (0, 1)]
    launched = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for c in commands]
    for process in launched:
        stderr = process.communicate(timeout=600)[1]
        assert process.returncode == 0, stderr[-4000:]


@pytest.mark.parametrize("nodes", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["one_node", "two_nodes"])
def test_two_cpu_processes_zero2_then_resume_in_one(data, tmp_path, nodes):
    config = _config(data, tmp_path / "run", max_steps=4)
    (tmp_path / "cfg.json").write_text(json.dumps(config.to_dict()))
    _launch_two_ranks(nodes, tmp_path / "cfg.json")

    keys = []
    for rank in (0, 1):
        lines = [json.loads(line) for line in (tmp_path / "run" / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines if "keys" in line] == [1, 2, 3, 4]
        keys.append({k for line in lines for k in line.get("keys", line.get("skipped", []))})
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    # ZeRO-2 needs the same autograd graph on every rank: micro-batches where the ranks differ
    # (one without images, say) are skipped on both ranks and logged, never reduced mismatched.
    skipped = [m for m in _metrics(tmp_path / "run") if m.get("event") == "skipped_batch"]
    assert all(m["reason"] == "graph_mismatch" and len(m["graphs"]) > 1 for m in skipped)

    metrics = [m for m in _metrics(tmp_path / "run") if "event" not in m]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["samples"] == 2 for m in metrics)  # one sequence from each rank per step
    assert metrics[-1]["loss"] < metrics[0]["loss"] and metrics[-1]["text_loss"] < metrics[0]["text_loss"]
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2

    resumed = train(_config(data, tmp_path / "run", max_steps=6))
    assert resumed.step == 6 and [m["step"] for m in resumed.metrics] == [5, 6]
    assert all(m["samples"] == 1 for m in resumed.metrics)
    events = [m for m in _metrics(tmp_path / "run") if m.get("event") == "resume"]
    assert events and events[-1]["step"] == 4 and events[-1]["world_size"] == 1
    before, after = _weights(checkpoint), _weights(resumed.checkpoint)
    assert any(not torch.equal(before[k], after[k]) for k in before)
