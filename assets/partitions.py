"""Partitions: one per raw metadata shard, keyed ``<source>/<file>`` (e.g. ``laion/part-00000.parquet``).

Dynamic: keys are added by the raw-shard sensor when a file appears in the watched folder, and by
the ``sample_world`` asset for the shards it writes (the sample world's own small partition set).
"""

import dagster as dg

source_shards = dg.DynamicPartitionsDefinition(name="source_shards")

single_run = dg.BackfillPolicy.single_run()
"""Every partitioned asset takes a range of shards in one run (the CLI's --partition-range needs it)."""
