"""Partitions: one per raw metadata shard, keyed ``<source>/<file>`` (e.g. ``laion/part-00000.parquet``), and one per
variant of the MMFS ablation.

Raw shards are dynamic: keys are added by the raw-shard sensor when a file appears in the watched folder, and by
the ``sample_world`` asset for the shards it writes (the sample world's own small partition set).
"""

import dagster as dg

from pipelines.evaluation.ablation import VARIANTS

source_shards = dg.DynamicPartitionsDefinition(name="source_shards")

ablation_variants = dg.StaticPartitionsDefinition(list(VARIANTS))
"""The paper's MMFS ablation variants (:data:`pipelines.evaluation.ablation.VARIANTS`)."""

single_run = dg.BackfillPolicy.single_run()
"""Every partitioned asset takes a range of partitions in one run (the CLI's --partition-range needs it)."""
