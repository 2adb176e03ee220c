import pytest
from transformers import AutoTokenizer

from model.config import MMInterleavedConfig
from model.tokenizer import train_bpe_tokenizer
from pipelines.sample_world.world import WorldConfig, generate_world
from pipelines.tokenizer import load_tokenizer, token_ids, train_tokenizer, world_texts


def test_world_tokenizer_round_trip(tmp_path):
    world = generate_world(WorldConfig(seed=0, n_pairs=40, n_stories=5))
    texts = world_texts(world)
    tokenizer = train_tokenizer(texts, tmp_path / "tok")
    tiny = MMInterleavedConfig.tiny()
    assert len(tokenizer) <= tiny.language.llm_config["vocab_size"]

    loaded = load_tokenizer(tmp_path / "tok", boi_token=tiny.language.boi_token, image_token=tiny.language.image_token)
    assert len(loaded) == len(tokenizer)
    ids = token_ids(loaded)
    assert len({ids.bos, ids.eos, ids.pad, ids.boi, ids.image}) == 5
    # the image tokens are single, special tokens; text never produces them
    assert loaded("<BoI>", add_special_tokens=False)["input_ids"] == [ids.boi]
    for text in texts[:20]:
        encoded = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids.boi not in encoded and ids.image not in encoded
        assert loaded.decode(encoded) == text
    # also plain AutoTokenizer: the saved directory is self-contained
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert auto.convert_tokens_to_ids("<image>") == ids.image
    assert not any(p.name.startswith(".tok") for p in tmp_path.iterdir())


def test_token_ids_refuses_tokenizer_without_image_tokens():
    with pytest.raises(ValueError, match="lacks"):
        token_ids(train_bpe_tokenizer(["a red circle"], vocab_size=64))
