"""``python -m orchestration.partition_range``: the run tags that make one run cover every registered raw shard.

Prints ``{"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}`` over the
``source_shards`` partitions of the instance in ``$DAGSTER_HOME``, in the order they were registered (the
``sample_world`` asset registers its world's shards), for ``dagster job execute --tags``. Exits 2 when none is
registered.
"""

import json
import sys

import dagster as dg

from assets.partitions import source_shards
from orchestration.jobs import partition_range_tags


def main() -> int:
    with dg.DagsterInstance.get() as instance:
        keys = instance.get_dynamic_partitions(source_shards.name)
    if not keys:
        print(f"no {source_shards.name} partitions registered in this instance: materialize sample_world first",
              file=sys.stderr)
        return 2
    print(json.dumps(partition_range_tags(keys)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
