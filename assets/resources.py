"""Resources: where data lives, where images, tokenizer, CLIP scorer and captioner come from, and where torch runs.

Each is a typed ``ConfigurableResource`` whose fields are derived from a stage's dataclass in ``pipelines/``
(:mod:`assets.settings`) and whose ``get()`` hands that dataclass to the stage; the behaviour is the stage's.
Where there are two, the sample world's small one and the real one are both real code:

- :class:`Storage`: the storage root and the watched folder of raw shards (:class:`pipelines.data.layout.DataLayout`).
- :class:`SampleWorld`: the embedded sample world's size, seed and raw shard sizes.
- Image sources (``images``): :class:`WebImages` fetches the URLs as written (public hosts only),
  :class:`SampleWorldImages` serves the sample world over loopback HTTP with the web's faults.
- Tokenizer sources (``tokenizer_source``): :class:`SampleWorldTokenizer` (a BPE trained on the world's texts),
  :class:`PretrainedTokenizer` (an LLM's tokenizer from a local directory).
- CLIP scorers (``clip_scorer_source``): :class:`SampleWorldClipScorer` (the tiny scorer trained on a world of
  another seed), :class:`PretrainedClipScorer` (an open_clip checkpoint on local disk).
- Captioners (``captioner_source``): :class:`SampleWorldCaptioner` (a tiny BLIP-2 trained on a world of another
  seed), :class:`PretrainedCaptioner` (a BLIP-2 directory on local disk).
- Evaluation splits that training data is decontaminated against (``evaluation_splits``):
  :class:`SampleWorldEvaluationSplits` (the world's held-out splits), :class:`BenchmarkEvaluationSplits` (real
  benchmark files on local disk).
- :class:`Compute`: the device and CPU threads of every stage that runs torch.
- :class:`QualityBounds`: the bounds the asset checks hold the data to.
"""

from typing import Any

import dagster as dg
from pydantic import Field

from assets.settings import StageResource, stage_fields
from pipelines import compute
from pipelines.data.clip_score import PretrainedClip
from pipelines.data.downloaded_images import WebImages as WebImageSource
from pipelines.data.hosts import HostPolicy
from pipelines.data.layout import DataLayout
from pipelines.data.recaption import PretrainedBlip2
from pipelines.data.tokenizer import PretrainedTokenizer as PretrainedTokenizerSource
from pipelines.evaluation.contamination import BenchmarkSplits
from pipelines.sample_world.contamination import WorldEvaluationSplits
from pipelines.sample_world.formats import ShardSizes
from pipelines.sample_world.images import SampleWorldImages as SampleWorldImageSource
from pipelines.sample_world.instructions import InstructionConfig
from pipelines.sample_world.tokenizer import WorldTokenizer
from pipelines.sample_world.world import SampleWorld as World
from pipelines.sample_world.world import WorldConfig, generate_world
from pipelines.training.captioner import WorldCaptioner
from pipelines.training.clip_scorer import WorldScorer


class Storage(dg.ConfigurableResource):
    """The storage root and the watched folder of raw metadata shards (local paths or ``file://`` URLs)."""

    root: str = Field(default="data", description="Storage root for every stage's output.")
    raw_dir: str = Field(default="", description="Watched folder of raw metadata shards (<source>/<file>); "
                                                 "default <root>/raw.")

    @property
    def layout(self) -> DataLayout:
        return DataLayout.at(self.root, self.raw_dir)


class SampleWorld(stage_fields(WorldConfig, ShardSizes, InstructionConfig, base=StageResource)):
    """Seed and size of the embedded sample world (:class:`pipelines.sample_world.world.WorldConfig`), how its
    metadata is cut into raw shards and which instruction items it writes."""

    def config(self) -> WorldConfig:
        return self.to(WorldConfig)

    def shard_sizes(self) -> ShardSizes:
        return self.to(ShardSizes)

    def instructions(self) -> InstructionConfig:
        return self.to(InstructionConfig)

    def generate(self) -> World:
        return generate_world(self.config())


class SampleWorldSource(StageResource):
    """A source of the sample world's own: its stage dataclass takes the world's config."""

    world: SampleWorld

    def get(self) -> Any:
        return self.to(self.stage, world=self.world.config())


class WebImages(stage_fields(HostPolicy, base=StageResource)):
    """Image URLs fetched as written in the metadata, under a host policy (public hosts only by default)."""

    def get(self) -> WebImageSource:
        return WebImageSource(self.to(HostPolicy))


class SampleWorldImages(stage_fields(SampleWorldImageSource, exclude=("world",), base=SampleWorldSource)):
    """The sample world's images over loopback HTTP with the web's faults (a server started per download, or the
    running one at ``server_url``)."""


class SampleWorldTokenizer(stage_fields(WorldTokenizer, exclude=("world",), base=SampleWorldSource)):
    """The tiny preset's tokenizer: a byte-level BPE trained on the sample world's texts."""


class PretrainedTokenizer(stage_fields(PretrainedTokenizerSource, base=StageResource)):
    """An LLM's tokenizer from a local directory (no hub access), with the model's image tokens added."""


class SampleWorldClipScorer(stage_fields(WorldScorer, exclude=("world",), base=SampleWorldSource)):
    """The sample world's scorer: a tiny open_clip model trained on a world of another seed."""


class PretrainedClipScorer(stage_fields(PretrainedClip, base=StageResource)):
    """An open_clip model by name with weights from a local file (never downloaded)."""


class SampleWorldCaptioner(stage_fields(WorldCaptioner, exclude=("world",), base=SampleWorldSource)):
    """The sample world's captioner: a tiny BLIP-2 trained on a world of another seed."""


class PretrainedCaptioner(stage_fields(PretrainedBlip2, base=StageResource)):
    """A BLIP-2 directory (``save_pretrained`` layout) on local disk, never downloaded."""


class SampleWorldEvaluationSplits(stage_fields(WorldEvaluationSplits, exclude=("world",), base=SampleWorldSource)):
    """The sample world's held-out evaluation splits (images and texts), which training data is checked against."""


class BenchmarkEvaluationSplits(stage_fields(BenchmarkSplits, base=StageResource)):
    """Real benchmark files on local disk (COCO Karpathy, VQAv2, OK-VQA, TextVQA), which training data is checked
    against."""


class Compute(stage_fields(compute.Compute, base=StageResource)):
    """Where the stages that run torch run: device and CPU threads (:class:`pipelines.compute.Compute`)."""


class QualityBounds(dg.ConfigurableResource):
    """Bounds the asset checks hold the data to."""

    min_parse_rate: float = Field(default=0.9, description="Raw records that parse, per run.")
    min_download_success_rate: float = Field(default=0.5, description="Image URLs downloaded.")
    min_filter_pass_rate: float = Field(default=0.05, description="Documents kept by filtering.")
    max_filter_pass_rate: float = Field(default=1.0, description="Documents kept by filtering.")
    max_dedup_rate: float = Field(default=0.5, description="Images dropped as duplicates (URL, sha256, perceptual "
                                                            "hash) of the images deduplicated.")
