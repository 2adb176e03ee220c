"""A Dagster code location for the scale-out tests: the project's definitions (``build_definitions``) over the small
world of :mod:`small_platform`, for Dagster's own processes (CLI runs, the daemon, the multiprocess executor's steps),
which load it by file. Its storage root and image server come from ``WEFT_DATA_ROOT`` and ``WEFT_IMAGE_SERVER_URL``
when a run starts; the refilter schedule ticks every minute, so a daemon fires it within a test."""

import dagster as dg

from orchestration.definitions import build_definitions
from orchestration.jobs import refilter_schedule
from small_platform import small_resources

defs = build_definitions("sample_world",
                         small_resources(dg.EnvVar("WEFT_DATA_ROOT"), dg.EnvVar("WEFT_IMAGE_SERVER_URL")),
                         schedule=refilter_schedule("refilter_every_minute", "* * * * *"))
