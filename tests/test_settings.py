"""Dagster config derived from the stages' dataclasses: the same fields, defaults and docs, and back again."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from assets.download import DownloadSettings
from assets.resources import SampleWorld, SampleWorldClipScorer, WebImages
from assets.settings import stage_fields
from assets.training import TrainingSettings
from pipelines.data.download import DownloadConfig
from pipelines.data.hosts import HostPolicy
from pipelines.training.checkpoint import ModelChoice
from pipelines.training.clip_scorer import ScorerTraining, WorldScorer
from pipelines.training.train import TrainConfig


@dataclass(frozen=True)
class Inner:
    size: int = 3
    """How big."""
    names: tuple[str, ...] = ("a", "b")


@dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    folder: Path | None = None
    hosts: frozenset[str] = frozenset({"x"})


class OuterSettings(stage_fields(Outer)):
    """Test settings."""


def test_fields_defaults_and_docs_come_from_the_dataclass():
    fields = TrainingSettings.model_fields
    assert {f.name for f in dataclasses.fields(TrainConfig)} - set(fields) == {
        "run_dir", "shards", "tokenizer", "model", "torch_threads", "betas"}  # set from the inputs, or not config
    assert {f.name for f in dataclasses.fields(ModelChoice)} <= set(fields)
    assert fields["warmup_steps"].default == TrainConfig.warmup_steps and fields["lr"].default == TrainConfig.lr
    assert fields["warmup_steps"].description == "Linear warmup steps."
    assert DownloadSettings().to(DownloadConfig) == DownloadConfig()


def test_values_round_trip_through_nested_lists_and_paths():
    settings = OuterSettings(inner={"size": 5, "names": ["c"]}, folder="/tmp/x", hosts=["y", "z"])
    assert settings.to(Outer) == Outer(Inner(5, ("c",)), Path("/tmp/x"), frozenset({"y", "z"}))
    assert OuterSettings().to(Outer) == Outer()
    assert OuterSettings.model_fields["inner"].annotation.model_fields["size"].description == "How big."
    assert WebImages(allowed_hosts=["127.0.0.1:80"]).get().policy == HostPolicy(allowed_hosts=frozenset({"127.0.0.1:80"}))


def test_a_resource_hands_its_stage_the_worlds_config():
    world = SampleWorld(n_pairs=4, n_stories=1, n_eval=1)
    source = SampleWorldClipScorer(world=world, training={"steps": 7}, training_pairs=9).get()
    assert source == WorldScorer(world.config(), ScorerTraining(steps=7), training_pairs=9)


def test_run_config_is_validated_against_the_derived_fields():
    @dg.asset
    def probe(config: OuterSettings) -> int:
        return config.to(Outer).inner.size

    assert dg.materialize([probe], run_config={"ops": {"probe": {"config": {"inner": {"size": 9}}}}}).output_for_node(
        "probe") == 9
    with pytest.raises(dg.DagsterInvalidConfigError, match="sise"):
        dg.materialize([probe], run_config={"ops": {"probe": {"config": {"inner": {"sise": 9}}}}})


def test_two_stages_with_one_field_name_are_refused():
    with pytest.raises(TypeError, match="ScorerTraining.steps"):
        stage_fields(ScorerTraining, ScorerTraining)


def test_the_checkpoint_settings_choose_whether_the_presets_vit_trains():
    assert not ModelChoice().model_config(8).vision.train_vit
    chosen = TrainingSettings(train_vit=True).to(ModelChoice)
    assert chosen.train_vit and chosen.model_config(8).vision.train_vit
