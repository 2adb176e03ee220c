"""The Dagster code location of weft (loaded by ``workspace.yaml``).

Assets, jobs, schedules and sensors are added here as the data stages become assets.
"""

import dagster as dg

defs = dg.Definitions(assets=[])
