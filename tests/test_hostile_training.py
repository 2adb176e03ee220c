"""A run folder as a hostile source or a careless second user finds it: no pickle runs on resume, one writer per
folder, and a training that listens on loopback only."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.checkpoint import latest_checkpoint
from model.engine_state import METADATA_KEY, UnsafeEngineState, decode, encode
from pipelines.sample_world.world import WorldConfig
from pipelines.training.run_lock import RunFolderLocked, run_folder_lock
from pipelines.training.train import TrainConfig, train
from world_shards import write_world_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile_train_data")
    write_world_shards(out, WorldConfig(seed=3, n_pairs=24, n_stories=6), maxcount=4)
    return out


def _config(data, run_dir, **overrides) -> TrainConfig:
    fields = dict(run_dir=str(run_dir), shards=str(data / "shards"), tokenizer=str(data / "tokenizer"), max_steps=2,
                  batch_size=1, lr=1e-3, decoder_lr=1e-3, warmup_steps=1, checkpoint_every=2, zero_stage=1,
                  shuffle_buffer=4, progress=False, torch_threads=1)
    return TrainConfig(**{**fields, **overrides})


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class _Exploit:
    """Unpickling it opens (creates) ``marker``: what a crafted checkpoint does to whoever loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A run folder with a step-2 checkpoint (ZeRO-1: model states and optimizer partitions), and the listening
    sockets the training process had while it trained."""
    run_dir = tmp_path_factory.mktemp("hostile_run") / "run"
    seen: set[tuple[str, str]] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(_listening_sockets())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = train(_config(data, run_dir))
    finally:
        done.set()
        watcher.join()
    return {"run_dir": run_dir, "result": result, "listening": seen}


def _listening_sockets() -> set[tuple[str, str]]:
    """``(table, local address)`` of every TCP socket of this process in LISTEN state (/proc/net/tcp, tcp6)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add((table, fields[1]))
    return found


def _is_loopback(table: str, address: str) -> bool:
    host = address.split(":")[0]
    if table == "tcp":
        return host.endswith("7F")  # little-endian hex: 127.x.y.z
    return host in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")  # ::1, ::ffff:127.0.0.1


def test_single_machine_training_listens_on_loopback_only(trained):
    listening = trained["listening"]
    assert listening, "the rendezvous store listens while training: the watcher must have seen it"
    assert all(_is_loopback(table, address) for table, address in listening), listening


def test_engine_state_is_safetensors_optimizer_included(trained):
    state = latest_checkpoint(trained["run_dir"]) / "engine" / "state"
    files = sorted(p.name for p in state.iterdir())
    assert files == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    for name in files:
        with safe_open(str(state / name), framework="pt") as f:
            assert METADATA_KEY in f.metadata() and list(f.keys())


def test_engine_state_round_trips_deepspeed_values():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1.0, delayed_shift=2,
                               consecutive_hysteresis=False, raise_error_at_min_scale=True, dtype=torch.float16)
    value = {"stage": ZeroStageEnum.gradients, 3: [torch.arange(4), (1.5, float("inf"))], "scaler": scaler,
             "slices": {"w": fragment_address(numel=4, start=8)}, "shape": torch.Size([2, 3]), "none": None}
    tensors: dict = {}
    back = decode(encode(value, tensors), tensors, "test")
    assert back["stage"] is ZeroStageEnum.gradients and torch.equal(back[3][0], torch.arange(4))
    assert back[3][1] == (1.5, float("inf")) and back["slices"]["w"] == fragment_address(numel=4, start=8)
    assert vars(back["scaler"]) == vars(scaler) and back["shape"] == torch.Size([2, 3])
    with pytest.raises(TypeError, match="cannot store a"):
        encode({"x": object()}, {})
    with pytest.raises(UnsafeEngineState, match="not one an engine state may hold"):
        decode({"object": "os:system", "fields": {}}, {}, "crafted")


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_crafted_pickle_in_engine_state_is_refused_not_executed(data, trained, tmp_path, name):
    run_dir = tmp_path / "copied_run"
    subprocess.run(["cp", "-r", str(trained["run_dir"]), str(run_dir)], check=True)
    marker = tmp_path / "pwned"
    state = latest_checkpoint(run_dir) / "engine" / "state" / name
    torch.save({"optimizer_state_dict": _Exploit(marker), "module": _Exploit(marker)}, state)
    with pytest.raises(UnsafeEngineState, match=f"{name} is a pickle"):
        train(_config(data, run_dir, max_steps=3))
    assert not marker.exists()


def test_second_training_on_a_locked_run_folder_exits_and_changes_nothing(data, trained, tmp_path):
    run_dir = trained["run_dir"]
    config = tmp_path / "train.json"
    config.write_text(json.dumps(_config(data, run_dir, max_steps=4).to_dict()))
    with run_folder_lock(run_dir):  # what the first training holds while it runs
        before = _snapshot(run_dir)
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--config", str(config)], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=300)
        after = _snapshot(run_dir)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith(f"{run_dir} is in use by pid {os.getpid()} on ")
    assert "one training per run folder" in lines[0]
    assert after == before


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipelines.training.run_lock import run_folder_lock\n"
                               "with run_folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)",
         str(tmp_path)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderLocked, match=f"in use by pid {holder.pid} "):
            with run_folder_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    with run_folder_lock(tmp_path) as lock:  # the kernel dropped the dead holder's lock
        assert f'"pid": {os.getpid()}' in lock.read_text()
    with run_folder_lock(tmp_path), run_folder_lock(tmp_path):  # the same thread may take it again
        pass
