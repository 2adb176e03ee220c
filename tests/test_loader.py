import pytest
import torch

from model.batch import ImageLayout
from pipelines.data.loader import collate_sequences, make_loader, sequence_dataset
from pipelines.data.packing import PackingConfig, pack_documents
from pipelines.data.shards import write_shards
from pipelines.data.tokenizer import token_ids, train_tokenizer
from pipelines.sample_world.documents import world_documents, world_images, world_texts
from pipelines.sample_world.world import WorldConfig, generate_world

N_IMAGE_TOKENS = 8
IMAGE_SIZE = (32, 32)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    world = generate_world(WorldConfig(seed=2, n_pairs=40, n_stories=10))
    tok = train_tokenizer(world_texts(world))
    config = PackingConfig(max_length=96, num_image_tokens=N_IMAGE_TOKENS, seed=0)
    sequences = list(pack_documents(world_documents(world), tok, config, images=world_images(world)))
    out = tmp_path_factory.mktemp("packed")
    index = write_shards((s.to_sample(f"seq{i:06d}") for i, s in enumerate(sequences)), out, maxcount=2,
                         meta={"packing": config.to_dict()})
    assert len(index.shards) >= 8
    return tok, sequences, index.urls(out)


def _keys_of_rank(urls, rank, world_size, monkeypatch):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    dataset = sequence_dataset(urls, image_size=IMAGE_SIZE, shuffle_buffer=8, seed=5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    return [sample["__key__"] for sample in loader]


def test_two_ranks_two_workers_read_disjoint_samples_covering_the_set(shard_set, monkeypatch):
    _, sequences, urls = shard_set
    rank0 = _keys_of_rank(urls, 0, 2, monkeypatch)
    rank1 = _keys_of_rank(urls, 1, 2, monkeypatch)
    assert len(rank0) == len(set(rank0)) and len(rank1) == len(set(rank1))
    assert not set(rank0) & set(rank1)
    assert set(rank0) | set(rank1) == {f"seq{i:06d}" for i in range(len(sequences))}
    assert rank0 and rank1
    # the same seed gives the same split and order; samples were shuffled within a worker
    assert _keys_of_rank(urls, 0, 2, monkeypatch) == rank0


def test_collated_batch_matches_the_model_contract_and_feeds_the_model(shard_set):
    tok, sequences, urls = shard_set
    ids = token_ids(tok)
    loader = make_loader(urls, batch_size=3, image_size=IMAGE_SIZE, pad_token_id=ids.pad, shuffle_buffer=1, seed=0)
    batches = list(loader)
    assert sum(b.input_ids.shape[0] for b in batches) == len(sequences)
    by_tokens = {tuple(s.input_ids.tolist()): s for s in sequences}
    for batch in batches:
        layout = ImageLayout.from_tokens(batch.input_ids, batch.document_ids, ids.boi, ids.image, N_IMAGE_TOKENS)
        assert layout.num_images == batch.images.shape[0]
        assert batch.images.shape[1:] == (3, *IMAGE_SIZE) and 0 <= batch.images.min() and batch.images.max() <= 1
        for row in range(batch.input_ids.shape[0]):
            valid = batch.document_ids[row] >= 0
            original = by_tokens[tuple(batch.input_ids[row][valid].tolist())]
            assert (batch.input_ids[row][~valid] == ids.pad).all()
            docs = batch.document_ids[row][valid]
            assert (docs[1:] >= docs[:-1]).all()
            # a document change exactly at each stored boundary
            changes = (torch.nonzero(docs[1:] != docs[:-1]).flatten() + 1).tolist()
            assert changes == original.cu_seqlens[1:-1].tolist()

    from model.config import MMInterleavedConfig
    from model.mm_interleaved import MMInterleaved

    torch.manual_seed(0)
    model = MMInterleaved.from_config(MMInterleavedConfig.tiny(num_visual_tokens=N_IMAGE_TOKENS), tok)
    assert (model.boi_token_id, model.image_token_id) == (ids.boi, ids.image)
    assert tuple(model.image_size) == IMAGE_SIZE
    output = model(batches[0])
    assert torch.isfinite(output.loss)


def test_resampled_reads_epoch_samples_and_collate_checks_length(shard_set):
    tok, sequences, urls = shard_set
    dataset = sequence_dataset(urls, image_size=IMAGE_SIZE, resampled=True, epoch_samples=25, shuffle_buffer=4)
    assert len(list(dataset)) == 25
    with pytest.raises(ValueError, match="epoch_samples"):
        sequence_dataset(urls, image_size=IMAGE_SIZE, resampled=True)
    samples = list(sequence_dataset(urls[:1], image_size=IMAGE_SIZE, shuffle_buffer=1))
    with pytest.raises(ValueError, match="pad_to"):
        collate_sequences(samples, pad_token_id=0, pad_to=4)
    batch = collate_sequences(samples, pad_token_id=0, pad_to=96)
    assert batch.input_ids.shape == (len(samples), 96)


def _epoch_keys(urls, seed, rates):
    dataset = sequence_dataset(urls, image_size=IMAGE_SIZE, shuffle_buffer=1, seed=seed, source_rates=rates)
    return [sample["__key__"] for sample in dataset]


def test_source_rates_repeat_and_drop_rows_by_their_corpus(shard_set):
    _, sequences, urls = shard_set
    sources_of = {f"seq{i:06d}": s.sources for i, s in enumerate(sequences)}
    rates = {"laion": 2.5, "mmc4": 0.0}  # cc12m unlisted: 1
    keys = _epoch_keys(urls, seed=3, rates=rates)
    fractional = 0
    for key, sources in sources_of.items():
        rate = sum(rates.get(source, 1.0) for source in sources) / len(sources)  # a mixed row: the mean
        assert keys.count(key) in (int(rate), int(rate) + 1), (key, sources)
        if set(sources) == {"mmc4"}:
            assert key not in keys  # rate 0 leaves the corpus out
        if set(sources) == {"cc12m"}:
            assert keys.count(key) == 1
        if set(sources) == {"laion"}:
            assert keys.count(key) in (2, 3)  # every row twice, a third time on its coin
        fractional += rate - int(rate)
    assert {"mmc4", "laion", "cc12m"} == {source for sources in sources_of.values() for source in sources}
    extra = len(keys) - sum(int(sum(rates.get(s, 1.0) for s in v) / len(v)) for v in sources_of.values())
    assert abs(extra - fractional) < 4 * fractional ** 0.5 + 1  # coins land heads at the fractional rates
    # the same epoch seed draws the same coins (every rank, every resume); another epoch draws again
    assert _epoch_keys(urls, seed=3, rates=rates) == keys
    assert sorted(_epoch_keys(urls, seed=4, rates=rates)) != sorted(keys)


def test_source_rates_need_rows_that_name_their_sources(tmp_path, shard_set):
    _, sequences, _ = shard_set
    sample = sequences[0].to_sample("old000")
    del sample["json"]["sources"]  # a row packed before row format 2
    index = write_shards([sample], tmp_path, maxcount=4, meta={})
    with pytest.raises(ValueError, match=r"old000 has no 'sources'.*re-run packing"):
        _epoch_keys(index.urls(tmp_path), seed=0, rates={"laion": 2})
    assert _epoch_keys(index.urls(tmp_path), seed=0, rates={}) == ["old000"]  # without rates nothing reads them
