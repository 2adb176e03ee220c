import pytest
from transformers import AutoTokenizer

from model.config import MMInterleavedConfig
from pipelines.data.tokenizer import load_tokenizer, token_ids, train_bpe_tokenizer, train_tokenizer
from pipelines.sample_world.documents import world_texts
from pipelines.sample_world.world import WorldConfig, generate_world


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


from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pipelines.data.tokenizer import TextEncoder  # noqa: E402


def _world_tokenizer():
    return train_tokenizer(world_texts(generate_world(WorldConfig(seed=0, n_pairs=60, n_stories=10))))


_TOKENIZER = _world_tokenizer()
_PIECES = st.one_of(st.sampled_from(list("abcXYZ019 '\t\n\r.,!?_-") + ["'s", "'ll", "</s>", "<BoI>", "<s", "é", "東",
                                                                    "\x00", "\x1c", "\x85", "\xa0", "  "]),
                    st.characters(exclude_categories=("Cs",)))  # documents are UTF-8: no lone surrogates
_TEXT = st.lists(_PIECES, max_size=20).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXT, min_size=1, max_size=12))
# texts are joined with NUL for the word cache: whitespace, punctuation and contractions at either side of a join
@example(texts=["a  ", " b", "x.", "'s", "", "\t", "end ", "?!", "  ", "7"])
@example(texts=["a\x00b", "c "])
def test_text_encoder_matches_one_by_one_encoding_in_every_mode(texts):
    encoder = TextEncoder(_TOKENIZER.backend_tokenizer, token_ids(_TOKENIZER).eos)
    assert encoder.mode == "words"  # byte-level BPE: the pre-token cache
    expected = [_TOKENIZER.backend_tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert encoder(texts) == expected
    assert encoder(texts) == expected  # with a warm cache
    encoder.mode = "joined"
    assert encoder(texts) == expected
    encoder.mode = "separate"
    assert encoder(texts) == expected


def test_text_encoder_on_world_texts_and_other_tokenizers():
    texts = world_texts(generate_world(WorldConfig(seed=5, n_pairs=100, n_stories=20)))
    encoder = TextEncoder(_TOKENIZER.backend_tokenizer, token_ids(_TOKENIZER).eos)
    assert encoder(texts) == encoder.separate(texts)
    # a tokenizer the word cache does not apply to (a normalizer, Metaspace pre-tokenizer): still exact
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    other = TextEncoder(backend, backend.token_to_id("</s>"))
    assert other.mode in ("joined", "separate")
    probe = texts[:50] + [" x", "y ", "A  B", "</s> inside"]
    assert other(probe) == [backend.encode(t, add_special_tokens=False).ids for t in probe]


_PLAIN_TEXT = st.lists(st.sampled_from(list("abcXYZ019 '\t\n\r.,!?_-") + ["'s", "'ll", "'d", "  ", " \n"]), max_size=12).map("".join)


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(_PLAIN_TEXT, min_size=1, max_size=8))
def test_joined_pre_tokenization_matches_the_byte_level_pre_tokenizer_per_text(texts):
    """The word cache's contract: pre-tokenizing plain texts joined with NUL gives, between the NULs,
    each text's pre-tokens exactly as the Rust ByteLevel pre-tokenizer splits it alone (whatever
    the vocabulary, so a tokenizer without merges over whitespace cannot hide a difference)."""
    from tokenizers.pre_tokenizers import ByteLevel

    from pipelines.data.tokenizer import _ASCII_BYTE_LEVEL, _TEXT_END

    def byte_level(word):  # GPT-2's byte-to-unicode map on plain ASCII: controls and space move up by 256
        return "".join(chr(ord(c) + 256) if ord(c) <= 32 else c for c in word)

    words = _ASCII_BYTE_LEVEL.findall(_TEXT_END.join(texts))
    per_text, current = [], []
    for word in words:
        if word == _TEXT_END:
            per_text.append(current)
            current = []
        else:
            current.append(byte_level(word))
    per_text.append(current)
    reference = ByteLevel(add_prefix_space=False, use_regex=True)
    assert per_text == [[w for w, _ in reference.pre_tokenize_str(t)] for t in texts]


def test_text_encoder_says_when_a_shortcut_does_not_reproduce_the_tokenizer():
    """A Metaspace pre-tokenizer that marks only a text's first word (``prepend_scheme="first"``) cannot be encoded
    joined: the encoder falls back to one text at a time, and says so instead of falling back silently."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = world_texts(generate_world(WorldConfig(seed=5, n_pairs=20, n_stories=4)))
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    with pytest.warns(RuntimeWarning, match="'joined' shortcut does not reproduce this tokenizer"):
        encoder = TextEncoder(backend, backend.token_to_id("</s>"))
    assert encoder.mode == "separate"
    assert encoder(texts[:5]) == [backend.encode(t, add_special_tokens=False).ids for t in texts[:5]]
