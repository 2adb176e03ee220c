"""Every stage of weft's flow as plain functions (no Dagster): ``data`` (readers ... loader), ``sample_world``,
``training``, ``evaluation``; ``cli`` is the ``weft`` command over them."""
