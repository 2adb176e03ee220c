"""Real benchmarks on local disk as decontamination checks training data against them: every image and every text
(reference captions, questions) of the benchmark files :mod:`pipelines.evaluation.benchmarks` reads."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipelines.data.decontamination import EvaluationSplits
from pipelines.evaluation.benchmarks import BenchmarkFiles, CaptionItem, read_benchmark

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkSplits:
    """The benchmarks a lab reports scores on (COCO Karpathy test, VQAv2, OK-VQA, TextVQA files)."""

    benchmarks: tuple[BenchmarkFiles, ...] = ()
    """Each benchmark's files (:class:`pipelines.evaluation.benchmarks.BenchmarkFiles`); none: nothing is checked
    (a warning says so)."""

    def build(self) -> EvaluationSplits:
        if not self.benchmarks:
            logger.warning("no evaluation benchmark is configured: decontamination checks the training data against "
                           "nothing (set the evaluation_splits resource's benchmarks)")
        images: dict[tuple[str, str], bytes] = {}
        texts: list[tuple[str, str, str]] = []
        for files in self.benchmarks:
            for item in read_benchmark(files):
                if isinstance(item, CaptionItem):
                    texts += [(files.name, item.image_id, reference) for reference in item.references]
                    item_id = item.image_id
                else:
                    texts.append((files.name, item.question_id, item.question))
                    item_id = item.image_path.name
                if (files.name, item_id) not in images:
                    images[(files.name, item_id)] = item.image_path.read_bytes()
        names = ", ".join(f"{f.name} ({f.split})" if f.name == "coco" else f.name for f in self.benchmarks)
        return EvaluationSplits.build(names or "no benchmark", ((s, i, data) for (s, i), data in images.items()), texts)
