"""The data stages, in flow order: readers -> download -> clip scores -> filtering -> recaptions -> tokenizer
-> packing -> shards -> loader (plain functions over records; no Dagster)."""
