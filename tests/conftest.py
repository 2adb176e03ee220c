"""Test-wide settings: offline hubs, quiet optional phone-homes, reproducible hypothesis, the `gpu` marker."""

import os

# Nothing in the test suite may reach a model hub or an update server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# The default run replays the same examples every time, so a commit's CI result is its own;
# `HYPOTHESIS_PROFILE=explore make test` searches fresh random examples (run it before landing
# changes to packing or tokenization, and add what it finds as an explicit example).
settings.register_profile("default", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
