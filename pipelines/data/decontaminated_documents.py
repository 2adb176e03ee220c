"""The decontaminated_documents stage: the deduplicated documents checked against the evaluation splits
(:mod:`pipelines.data.decontamination`) before packing; what was removed, and why, is written beside the documents
and recorded in the packed shards' lineage, which the evaluation report shows.

Outputs, in a folder named by the fingerprint of the settings, the evaluation splits and the inputs::

    decontaminated_documents/<fingerprint>/<source>/<shard>.parquet          the kept documents
    decontaminated_documents/<fingerprint>/<source>/<shard>.drops.parquet    every removal: rule and reason
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipelines.data.decontamination import (
    Contamination,
    DecontaminationConfig,
    EvaluationSplitsSource,
    decontaminate_documents,
)
from pipelines.data.deduplicated_documents import DeduplicatedDocuments, DocumentCounts, write_drops
from pipelines.data.documents import read_documents, write_documents
from pipelines.data.filtered_documents import FilteredShard
from pipelines.data.filtering import Drop
from pipelines.data.layout import DataLayout
from pipelines.data.recaptions import RecaptionedShard
from pipelines.files import fingerprint

logger = logging.getLogger(__name__)
EXAMPLES = 20


@dataclass(frozen=True)
class DecontaminatedDocuments:
    """The training documents without evaluation items: per partition the kept documents and the removals."""

    version: str
    shards: dict[str, FilteredShard]
    """Per partition: the kept documents (``path``), every removal with its rule and reason (``drops``), the
    filter's thresholds (carried on for the packed shards' lineage) and the counts in and out."""
    splits: dict[str, Any]
    """What was checked against (:meth:`pipelines.data.decontamination.EvaluationSplits.describe`)."""
    config: DecontaminationConfig
    drops_by_rule: dict[str, int] = field(default_factory=dict)
    counts: DocumentCounts = field(default_factory=DocumentCounts)
    texts_checked: int = 0
    """Evaluation texts long enough to be matched."""
    examples: list[str] = field(default_factory=list)
    """The first removals, as ``doc_id: rule: reason``."""
    seconds: float = 0.0

    def lineage(self) -> dict[str, Any]:
        """What the packed shards' index (and so the evaluation report) records of this stage."""
        return {"checked_against": self.splits, "config": asdict(self.config), "texts_checked": self.texts_checked,
                "removed": self.drops_by_rule, **asdict(self.counts), "examples": self.examples,
                "drops": {k: m.drops for k, m in self.shards.items()}}


def decontaminate_shards(deduplicated: DeduplicatedDocuments, recaptions: Mapping[str, RecaptionedShard],
                         splits_source: EvaluationSplitsSource,
                         config: DecontaminationConfig, layout: DataLayout,
                         log: Callable[[str], None] = logger.info) -> DecontaminatedDocuments:
    """Remove the evaluation splits' images and texts from every deduplicated shard (images matched by the hashes the
    dedup stage wrote; a recaptioned pair checked by its recaption, the text it is trained on) into
    ``decontaminated_documents/<fingerprint>/``."""
    start = time.perf_counter()
    splits = splits_source.build()
    contamination = Contamination(splits, config)
    version = fingerprint(asdict(config), asdict(splits), deduplicated.version,
                          {k: m.path for k, m in recaptions.items() if m.recaptioned})
    shards: dict[str, FilteredShard] = {}
    total = DocumentCounts()
    rules: Counter[str] = Counter()
    examples: list[str] = []
    for key in deduplicated.order:
        drops: list[Drop] = []
        counts = DocumentCounts()
        hashes = {r["key"]: (r["sha256"], None if r["phash"] is None else int(r["phash"], 16))
                  for r in pq.read_table(deduplicated.hashes[key]).to_pylist() if r["key"] is not None}
        recaptioned = recaptions.get(key)
        trained_texts = recaptioned.captions() if recaptioned is not None and recaptioned.recaptioned else None
        out = layout.partition_path(f"decontaminated_documents/{version}", key, ".parquet")
        kept = decontaminate_documents(
            counts.counted(read_documents(deduplicated.shards[key].path), "in"), contamination, drops.append,
            image_hashes=hashes, trained_texts=trained_texts)
        write_documents(counts.counted(kept, "kept"), out)
        drops_path = out.with_name(out.name.replace(".parquet", ".drops.parquet"))
        write_drops(drops, drops_path)
        shards[key] = FilteredShard(str(out), str(drops_path), deduplicated.shards[key].thresholds,
                                    counts.documents_in, counts.documents_kept, counts.images_in, counts.images_kept)
        total.add(counts)
        rules.update(d.rule for d in drops)
        examples += [f"{d.doc_id}: {d.rule}: {d.reason}" for d in drops][: EXAMPLES - len(examples)]
        log(f"{key}: removed {dict(Counter(d.rule for d in drops))}")
    return DecontaminatedDocuments(version, shards, splits.describe(), config, dict(rules), total,
                                   contamination.texts_checked, examples, time.perf_counter() - start)
