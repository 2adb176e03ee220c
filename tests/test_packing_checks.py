"""The packed_sequences checks on shards written by the real writer: a sequence longer than the run packed for
fails the max-tokens check whatever the paper's 2048 says, and a tampered shard fails integrity."""

import numpy as np
import pytest

from assets.packing import packed_sequences_max_tokens, packed_sequences_shard_integrity
from pipelines.data.packed_sequences import PackedSequences
from pipelines.data.packing import PackingConfig, PackingStats
from pipelines.data.shards import write_shards
from pipelines.data.tokenizer import TokenIds


def _packed(tmp_path, lengths: list[int], max_length: int) -> PackedSequences:
    """Shards with one sequence of each length (token ids only), as a run packed for ``max_length`` would record."""
    samples = [{"__key__": f"{i:09d}", "input_ids.npy": np.arange(n, dtype=np.int32),
                "cu_seqlens.npy": np.array([0, n], dtype=np.int32)} for i, n in enumerate(lengths)]
    packing = PackingConfig(max_length=max_length, num_image_tokens=8)
    index = write_shards(samples, tmp_path, maxcount=2, prefix="seq", meta={"packing": packing.to_dict()})
    return PackedSequences(str(tmp_path), index.urls(tmp_path), index.samples, index.bytes, packing,
                           TokenIds(bos=1, eos=2, pad=3, boi=4, image=5), index.meta, PackingStats(sequences=len(lengths)))


@pytest.mark.parametrize(("longest", "passed"), [(320, True), (321, False)])
def test_max_tokens_check_holds_sequences_to_the_length_they_were_packed_for(tmp_path, longest, passed):
    result = packed_sequences_max_tokens(packed_sequences=_packed(tmp_path, [100, longest, 7], max_length=320))
    assert result.passed is passed
    assert (result.metadata["longest_sequence"].value, result.metadata["limit"].value) == (longest, 320)
    assert result.metadata["sequences"].value == 3


def test_max_tokens_check_fails_without_sequences(tmp_path):
    assert not packed_sequences_max_tokens(packed_sequences=_packed(tmp_path, [], max_length=320)).passed


def test_integrity_check_catches_a_changed_shard(tmp_path):
    packed = _packed(tmp_path, [10, 20, 30], max_length=320)
    assert packed_sequences_shard_integrity(packed_sequences=packed).passed
    shard = tmp_path / "seq-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # one bit of the first sample's ids: same size, another sha256
    shard.write_bytes(bytes(data))
    result = packed_sequences_shard_integrity(packed_sequences=packed)
    assert not result.passed and "seq-000000.tar" in result.metadata["problems"].value
