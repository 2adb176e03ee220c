"""The text tokenizer of the data stages: a BPE trained on the sample world (tiny preset) or the
LLM's own tokenizer from a local directory (paper preset), always with the model's image tokens.

Token names come from the model's config (``LanguageConfig.boi_token`` / ``image_token``; the tiny
preset uses ``<BoI>`` and ``<image>``, the paper preset ``<|beginofimage|>`` and ``<|image|>``), and
the tokens are added with :func:`model.tokenizer.add_multimodal_tokens`, the same function the
model uses, so the ids the packer writes are the ids the model reads.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from model.tokenizer import add_multimodal_tokens
from pipelines.files import atomic_path, fingerprint, sha256

TINY_BOI_TOKEN = "<BoI>"
TINY_IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class TokenIds:
    """The ids the packer needs; ``pad`` is what collate writes after the last document."""

    bos: int
    eos: int
    pad: int
    boi: int
    image: int


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (milliseconds for small corpora) with ``<s>``, ``</s>``, ``<pad>`` and
    ``<unk>``, wrapped as a Hugging Face fast tokenizer (it round-trips through ``AutoTokenizer``)."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 510,
    boi_token: str = TINY_BOI_TOKEN,
    image_token: str = TINY_IMAGE_TOKEN,
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on ``texts`` and add ``<BoI>`` and the image placeholder.

    ``vocab_size`` counts the BPE (with ``<unk> <s> </s> <pad>``); the two image tokens come on top
    (510 + 2 = the tiny preset's 512). With ``out_dir`` the tokenizer is saved there as a Hugging
    Face tokenizer directory (written to a temporary sibling and renamed, so a reader never sees a
    half-written one) and loads back with :func:`load_tokenizer` or ``AutoTokenizer``.
    """
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    add_multimodal_tokens(tokenizer, boi_token, image_token)
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> Path:
    """``tokenizer.save_pretrained(out_dir)``, atomically (:func:`pipelines.files.atomic_path`)."""
    with atomic_path(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def load_tokenizer(
    path: str | os.PathLike, *, boi_token: str = TINY_BOI_TOKEN, image_token: str = TINY_IMAGE_TOKEN
) -> PreTrainedTokenizerBase:
    """A local tokenizer directory (ours or an LLM's), with the image tokens added if it lacks them."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_multimodal_tokens(tokenizer, boi_token, image_token)
    return tokenizer


def token_ids(
    tokenizer: PreTrainedTokenizerBase, *, boi_token: str = TINY_BOI_TOKEN, image_token: str = TINY_IMAGE_TOKEN
) -> TokenIds:
    """Special-token ids, checked: a tokenizer without ``<s>``/``</s>`` or the image tokens is refused."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (boi_token, image_token) if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}; load it with load_tokenizer() or add_multimodal_tokens()")
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("tokenizer needs bos (<s>) and eos (</s>) tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenIds(tokenizer.bos_token_id, tokenizer.eos_token_id, pad, vocab[boi_token], vocab[image_token])


class TokenizerSource(Protocol):
    """Where the tokenizer comes from (:class:`PretrainedTokenizer`, or the sample world's
    :class:`pipelines.sample_world.tokenizer.WorldTokenizer`)."""

    boi_token: str
    image_token: str

    def build(self) -> PreTrainedTokenizerBase:
        ...

    def describe(self) -> dict[str, Any]:
        ...


@dataclass(frozen=True)
class PretrainedTokenizer:
    """An LLM's tokenizer from a local directory (no hub access), with the model's image tokens added."""

    path: str
    boi_token: str = TINY_BOI_TOKEN
    image_token: str = TINY_IMAGE_TOKEN

    def build(self) -> PreTrainedTokenizerBase:
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"tokenizer directory {self.path!r} does not exist")
        return load_tokenizer(self.path, boi_token=self.boi_token, image_token=self.image_token)

    def describe(self) -> dict[str, Any]:
        return {"kind": "pretrained", "path": self.path, "boi_token": self.boi_token, "image_token": self.image_token}


@dataclass(frozen=True)
class TokenizerManifest:
    """The saved tokenizer the packer and the model use, and the ids of its special tokens."""

    path: str
    vocab_size: int
    token_ids: TokenIds
    boi_token: str
    image_token: str
    source: dict[str, Any]
    """What it was built from (:meth:`TokenizerSource.describe`)."""

    @property
    def version(self) -> str:
        """The saved files' content and the special tokens (not where they are saved, nor the source's paths)."""
        files = sorted(p for p in Path(self.path).rglob("*") if p.is_file())
        return fingerprint(sha256(*files, root=self.path), self.vocab_size, asdict(self.token_ids), self.boi_token,
                           self.image_token)

    def load(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.path, boi_token=self.boi_token, image_token=self.image_token)


def provide_tokenizer(source: TokenizerSource, out_dir: str | os.PathLike) -> TokenizerManifest:
    """The tokenizer stage: build the tokenizer ``source`` describes and save it to ``out_dir``."""
    built = source.build()
    out = save_tokenizer(built, out_dir)
    ids = token_ids(built, boi_token=source.boi_token, image_token=source.image_token)
    return TokenizerManifest(str(out), len(built), ids, source.boi_token, source.image_token, source.describe())


# fast encoding of many short texts ----------------------------------------------------------------
# GPT-2's byte-level pre-tokenizer pattern, as the `tokenizers` ByteLevel pre-tokenizer applies it,
# written for ASCII text (\p{L} = [A-Za-z], \p{N} = [0-9], \s = [\t\n\v\f\r ] there), plus one
# character it never sees in plain text, NUL, as a pre-token of its own that ends the text before it
# as the end of the string would (no other class takes it; whitespace before it is "not followed by
# \S"). So pre-tokenizing many plain texts joined with NUL gives each text's pre-tokens, NUL between.
_TEXT_END = "\x00"
_ASCII_BYTE_LEVEL = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\x00\t\n\x0b\x0c\r A-Za-z0-9]+"
    r"|[\t\n\x0b\x0c\r ]+(?![^\x00\t\n\x0b\x0c\r ])|[\t\n\x0b\x0c\r ]+|\x00")
_NOT_PLAIN_ASCII = re.compile(r"[^\x20-\x7e\t\n\r]")
_NOT_PLAIN_ASCII_OR_TEXT_END = re.compile(r"[^\x00\x20-\x7e\t\n\r]")
_PROBE_TEXTS = ("a red circle", " leading space", "trailing space ", "  two  spaces  ", "Then the red circle moves.",
                "\ttab\nnewline\n", "x", "Ünïcödé ß 東京 🙂", "IMG_1234.jpg", "don't", "'s", "42", " ", "a  b",
                "x \n y", "it's 3.14 -- ok?!", "CAPS and MiXeD", "__init__")


class TextEncoder:
    """Token ids of many short texts, as ``backend.encode(text, add_special_tokens=False).ids``, faster.

    Encoding sentences one by one through the Rust tokenizer costs a fixed overhead per text (its
    ``Encoding`` object, offsets, masks) on top of a regex pre-tokenizer, ~0.6 M tokens/s per core
    here. Two exact shortcuts, each enabled only after it reproduces one-by-one encoding on probe
    texts:

    - ``words`` (byte-level BPE without normalizer, e.g. the tiny preset's and GPT-2-style
      tokenizers): plain-ASCII texts are joined with NUL and split with the same pre-tokenizer regex
      in Python in one call, each pre-token's ids come from a cache filled by the Rust tokenizer on
      first sight (BPE never merges across pre-tokens, so a pre-token's ids do not depend on its
      context), and the concatenated ids are cut at the NULs. Texts with non-ASCII or control
      characters (NUL included), or holding an added token's text (``</s>``, ``<BoI>``, ...), go to
      the Rust tokenizer unchanged. Per text this leaves only a C-level cut: ~4.5x the one-by-one
      rate on the sample world's sentences (``python -m pipelines.bench packing``).
    - ``joined`` (otherwise, where it matches): the texts are joined with the ``</s>`` special token,
      encoded as a few long strings and cut at the separators (special tokens are split out before
      normalization and pre-tokenization, so each segment is tokenized as if alone). A chunk whose
      separator count is off (a text holding ``</s>``) is re-encoded one by one.
    - ``separate``: one by one (``encode_batch_fast``, no offsets).
    """

    chunk_chars = 1 << 16
    max_cached_words = 1 << 20

    def __init__(self, backend: Tokenizer, separator_id: int) -> None:
        self.backend = backend
        self.separator_id = separator_id
        self.separator = backend.id_to_token(separator_id)
        added = [t.content for t in backend.get_added_tokens_decoder().values()]
        self._added = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
        self._words: dict[str, list[int]] = {_TEXT_END: [-1]}
        self.mode = "separate"
        for mode in ("words", "joined"):
            if not self._mode_allowed(mode):
                continue
            self.mode = mode
            mismatch = self._mismatch(_PROBE_TEXTS)
            if mismatch is None:
                break
            warnings.warn(f"TextEncoder: the {mode!r} shortcut does not reproduce this tokenizer ({mismatch}); "
                          "encoding one text at a time instead (slower)", RuntimeWarning, stacklevel=2)
            self.mode = "separate"

    def _mode_allowed(self, mode: str) -> bool:
        if mode == "joined":
            return self.separator is not None
        config = json.loads(self.backend.to_str())
        pre = config.get("pre_tokenizer") or {}
        model = config.get("model") or {}
        return (config.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                and not pre.get("add_prefix_space") and model.get("type") == "BPE" and model.get("dropout") is None)

    def _mismatch(self, texts) -> str | None:
        """Why the current mode does not reproduce one-by-one encoding on ``texts`` (None: it does). A shortcut
        whose cut points do not line up raises ``ValueError`` (a separator missing from the ids); any other
        error is a real one and propagates."""
        texts = list(texts)
        try:
            batches = [texts, texts[::-1], [t + t for t in texts], *([t] for t in texts)]
            for batch in batches:
                if self(batch) != self.separate(batch):
                    return f"{batch[:2]!r}... encode differently"
            return None
        except ValueError as error:
            return f"ValueError: {error}"
        finally:
            self.clear_cache()

    def clear_cache(self) -> None:
        """Forget the pre-tokens seen so far (``words`` mode)."""
        self._words = {_TEXT_END: [-1]}

    def separate(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def _is_plain(self, text: str, unusual: re.Pattern = _NOT_PLAIN_ASCII) -> bool:
        """No character ``unusual`` finds (non-ASCII, controls) and no added token's text."""
        return not unusual.search(text) and (self._added is None or not self._added.search(text))

    def _by_words(self, texts: list[str]) -> list[list[int]]:
        joined = _TEXT_END.join(texts)
        # a text holding NUL shows as an extra separator; otherwise a match in a text is one in `joined`
        if joined.count(_TEXT_END) == len(texts) - 1 and self._is_plain(joined, _NOT_PLAIN_ASCII_OR_TEXT_END):
            return self._plain_by_words(joined, len(texts))
        # some text is not plain: those go to the Rust tokenizer one by one, the rest as above
        out: list[list[int] | None] = [None] * len(texts)
        plain = [i for i, t in enumerate(texts) if self._is_plain(t)]
        if plain:
            for i, ids in zip(plain, self._plain_by_words(_TEXT_END.join([texts[i] for i in plain]), len(plain))):
                out[i] = ids
        slow = [i for i, ids in enumerate(out) if ids is None]
        for i, ids in zip(slow, self.separate([texts[i] for i in slow])):
            out[i] = ids
        return out  # type: ignore[return-value]

    def _plain_by_words(self, joined: str, n_texts: int) -> list[list[int]]:
        """Ids of ``n_texts`` plain texts joined with NUL: pre-tokenize once, look each pre-token up
        in the cache (filled from the Rust tokenizer), cut at the NULs (cached as id -1)."""
        cache = self._words
        words = _ASCII_BYTE_LEVEL.findall(joined)
        missing = set(words).difference(cache)
        if missing:
            if len(cache) + len(missing) > self.max_cached_words:
                self.clear_cache()
                cache = self._words
            missing_list = list(missing)
            cache.update(zip(missing_list, self.separate(missing_list)))
        ids = list(itertools.chain.from_iterable(map(cache.__getitem__, words)))
        out: list[list[int]] = []
        find, start = ids.index, 0
        for _ in range(n_texts - 1):
            end = find(-1, start)
            out.append(ids[start:end])
            start = end + 1
        out.append(ids[start:])
        return out

    def _joined(self, texts: list[str]) -> list[list[int]]:
        chunks: list[list[str]] = []
        size = 0
        for text in texts:
            if not chunks or size + len(text) > self.chunk_chars:
                chunks.append([])
                size = 0
            chunks[-1].append(text)
            size += len(text) + 1
        encoded = self.backend.encode_batch_fast([self.separator.join(c) for c in chunks], add_special_tokens=False)
        out: list[list[int]] = []
        sep = self.separator_id
        for chunk, encoding in zip(chunks, encoded):
            ids = encoding.ids
            pieces: list[list[int]] | None = []
            start = 0
            try:
                for _ in range(len(chunk) - 1):
                    end = ids.index(sep, start)
                    pieces.append(ids[start:end])
                    start = end + 1
            except ValueError:
                pieces = None  # fewer separators than joins
            if pieces is None or sep in ids[start:]:  # a text holds the separator itself
                out.extend(self.separate(chunk))
                continue
            pieces.append(ids[start:])
            out.extend(pieces)
        return out

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.mode == "words":
            return self._by_words(texts)
        if self.mode == "joined":
            return self._joined(texts)
        return self.separate(texts)
