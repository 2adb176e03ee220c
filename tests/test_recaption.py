"""Recaptioning: the BLIP-2 path with a tiny model loaded from disk, the world's captioner training,
and caption accuracy on noisy alt-text pairs before/after recaptioning (slow)."""

import io
import time

import pytest
import torch
from PIL import Image

from pipelines.compute import cpu_threads
from pipelines.data.errors import BadRecordError, BadRecordLog, reraise
from pipelines.data.packing import PackingConfig, tokenize_documents
from pipelines.data.recaption import CAPTION_FIELD, Captioner, model_digest, recaption_documents, recaptions_mapping
from pipelines.data.tokenizer import train_tokenizer
from pipelines.sample_world import WorldConfig, caption, generate_world
from pipelines.sample_world.captions import caption_facts, caption_scores, normalize_caption
from pipelines.sample_world.documents import world_documents, world_images, world_texts
from pipelines.sample_world.scenes import COLOURS
from pipelines.training.captioner import CaptionerTraining, captioner_training_world, evaluate_recaptioning, tiny_captioner, train_world_captioner


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(seed=3, n_pairs=12, n_stories=2, n_eval=2))


def test_tiny_random_blip2_from_disk_recaptions_pairs(world, tmp_path):
    tokenizer = train_tokenizer(world_texts(world))
    captioner = tiny_captioner(tokenizer, batch_size=4, max_new_tokens=6)
    captioner.save_pretrained(tmp_path / "blip2")
    loaded = Captioner.from_pretrained(tmp_path / "blip2", batch_size=4, max_new_tokens=6)
    assert loaded.model.config.num_query_tokens == captioner.model.config.num_query_tokens

    documents = world_documents(world)
    images = world_images(world)
    pairs = [d for d in documents if d["kind"] == "pair"]
    bad_key, gone_key = pairs[1]["elements"][0]["key"], pairs[4]["elements"][0]["key"]
    images[bad_key] = b"\xff\xd8 this is not a jpeg"
    del images[gone_key]
    log = BadRecordLog()
    rows = list(recaption_documents(documents, loaded, images, handler=log))

    # one row per good pair image (7 captioned in two batches of 4 and one of 3); stories untouched
    assert [r["doc_id"] for r in rows] == [d["doc_id"] for d in pairs if d["elements"][0]["key"] not in (bad_key, gone_key)]
    assert all(isinstance(r[CAPTION_FIELD], str) for r in rows)
    assert log.count == 2
    assert bad_key in log.records[0].reason and "undecodable" in log.records[0].reason
    assert gone_key in log.records[1].reason and "not available" in log.records[1].reason
    # the loaded model is the saved one: same greedy captions as in memory
    keys = [r["key"] for r in rows]
    assert loaded.caption([images[k] for k in keys]) == captioner.caption([images[k] for k in keys])
    with pytest.raises(BadRecordError, match=bad_key):
        list(recaption_documents(documents, loaded, images, handler=reraise))

    # packing consumes the mapping: a pair found in it is packed with its recaption
    recaptions = recaptions_mapping(rows)
    config = PackingConfig(num_image_tokens=4)
    tokenized = {d.doc_id: d for d in tokenize_documents(pairs, tokenizer, config, images=images,
                                                         recaptions=recaptions, handler=BadRecordLog())}
    for doc_id, text in recaptions.items():
        decoded = tokenizer.decode(tokenized[doc_id].tokens, skip_special_tokens=True)
        assert normalize_caption(decoded) == normalize_caption(text.lower())


def test_caption_scores_exact_and_facts(world):
    pair = world.pairs[0]
    truth = caption(pair.scene)
    shouted = truth.upper().replace(",", " ,")
    assert caption_scores([shouted, "red circle stock photo"], [truth, truth]) == {"accuracy": 0.5, "fact_f1": 0.5, "n": 2}
    facts = caption_facts("A small red circle at the top left and a large blue square in the center, with the digit 7 at the bottom.")
    assert facts == {("small", "red", "circle", "top left"), ("large", "blue", "square", "center"), ("digit", "7", "bottom")}


def test_tiny_captioner_starts_with_distinct_queries_that_see_the_image(world):
    """transformers starts every BLIP-2 query token at 0 (pretrained checkpoints overwrite them): identical
    queries get identical gradients, and trained from there the model barely looks at the image."""
    captioner = tiny_captioner(train_tokenizer(world_texts(world)))
    model = captioner.model
    images = world_images(world)
    pixels = captioner.pixel_values([Image.open(io.BytesIO(images[p.image_id])).convert("RGB")
                                     for p in world.pairs[:2]])
    with torch.no_grad():
        patches = model.vision_model(pixel_values=pixels).last_hidden_state
        queries = model.qformer(query_embeds=model.query_tokens.expand(2, -1, -1),
                                encoder_hidden_states=patches).last_hidden_state  # (2, Q, D)
    assert (queries[0] - queries[1]).abs().max() > 1e-3  # two images, two representations
    assert (queries[:, 0] - queries[:, 1]).abs().max() > 1e-3  # queries are not copies of each other


def _per_cell_colour_accuracy(captioner: Captioner, world, steps: int = 300) -> float:
    """Train the captioner's ViT + Q-Former (with a linear head on the query outputs) to name every grid cell's
    colour (or empty); held-out per-cell accuracy. Only what the Q-Former passes on can be read."""
    model = captioner.model
    images = world_images(world)
    keys = [p.image_id for p in world.pairs]
    pixels = captioner.pixel_values([Image.open(io.BytesIO(images[k])).convert("RGB") for k in keys])
    labels = torch.zeros(len(keys), 9, dtype=torch.long)
    for i, pair in enumerate(world.pairs):
        for o in pair.scene.objects:
            labels[i, o.row * 3 + o.col] = 1 + list(COLOURS).index(o.colour)
    queries, width = model.config.num_query_tokens, model.config.qformer_config.hidden_size
    head = torch.nn.Linear(queries * width, 9 * (1 + len(COLOURS)))

    def logits(index):
        patches = model.vision_model(pixel_values=pixels[index]).last_hidden_state
        out = model.qformer(query_embeds=model.query_tokens.expand(len(index), -1, -1),
                            encoder_hidden_states=patches).last_hidden_state
        return head(out.flatten(1)).view(len(index), 9, -1)

    train, held_out = torch.arange(len(keys) - 500), torch.arange(len(keys) - 500, len(keys))
    parameters = [*model.vision_model.parameters(), *model.qformer.parameters(), model.query_tokens, *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (32,), generator=generator)]
        loss = torch.nn.functional.cross_entropy(logits(batch).flatten(0, 1), labels[batch].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return (logits(held_out).argmax(-1) == labels[held_out]).float().mean().item()


def test_tiny_captioners_q_former_learns_where_things_are():
    """The Q-Former must pass on *where* each colour is, not just which colours an image holds. With the ViT's
    position embeddings at transformers' initializer_range (0.02) it does not within 300 steps (the captioner
    then never learns positions); at the captioner's unit scale it does. Measured (2026-11-29): 0.935 held-out
    per-cell accuracy vs 0.773 at 0.02 and 0.780 for "all empty" (0.969 before the patch embedding was drawn at
    fan-in scale, which slows this probe a little and speeds the captioner up a lot)."""
    world = captioner_training_world(WorldConfig(seed=5), 2500)
    tokenizer = train_tokenizer(world_texts(world))
    empty = 1 - sum(len(p.scene.objects) for p in world.pairs) / (9 * len(world.pairs))  # "every cell empty" scores this
    with cpu_threads(2):
        fixed = _per_cell_colour_accuracy(tiny_captioner(tokenizer), world)
        shrunk = tiny_captioner(tokenizer)
        with torch.no_grad():
            shrunk.model.vision_model.embeddings.position_embedding.normal_(0.0, shrunk.model.config.initializer_range)
        stalled = _per_cell_colour_accuracy(shrunk, world)
    print(f"per-cell colour accuracy: unit-scale positions {fixed:.3f}, 0.02 positions {stalled:.3f}, all-empty {empty:.3f}")
    assert fixed >= 0.90, (fixed, empty)
    assert stalled < empty + 0.05, (stalled, empty)


def test_world_captioner_loss_falls_and_reloads(world, tmp_path):
    with cpu_threads(1):
        captioner, report = train_world_captioner(world, tmp_path / "captioner",
                                                  CaptionerTraining(steps=25, batch_size=16, warmup=5))
    assert report["final_loss"] < 0.7 * report["initial_loss"], report
    loaded = Captioner.from_pretrained(tmp_path / "captioner", max_new_tokens=8)
    image = world_images(world)[world.pairs[0].image_id]
    assert loaded.caption([image]) == Captioner(captioner.model, captioner.processor, max_new_tokens=8).caption([image])
    # the version names the weights, not the run: saving the loaded model again gives the same digest
    assert model_digest(loaded.save_pretrained(tmp_path / "again")) == model_digest(tmp_path / "captioner")
    assert model_digest(tiny_captioner(captioner.processor.tokenizer).save_pretrained(tmp_path / "untrained")) \
        != model_digest(tmp_path / "captioner")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recaptioning_fixes_noisy_alt_texts(tmp_path, seed):
    """The demo's captioner (default training, ~3 min on one core) trained on one world's clean pairs,
    recaptioning a different world's alt-text pairs. Seeds 0-2 (one thread, 2026-11-29, 1200 steps at lr 1.5e-3
    with the patch embedding at fan-in scale): exact match 0 -> 0.129 / 0.121 / 0.061, fact F1 0 -> 0.463 /
    0.311 / 0.235 (600 steps at lr 3e-3 with transformers' patch init: 0.107 / 0.043 / 0.022). The spread between
    seeds is the captioner's, not the test's."""
    start = time.perf_counter()
    train = captioner_training_world(WorldConfig(seed=1000 + seed), 12_000)  # never the evaluation world's seed
    with cpu_threads(1):
        _, report = train_world_captioner(train, tmp_path / "captioner", CaptionerTraining(seed=seed))
    evaluation_world = generate_world(WorldConfig(seed=1))
    result = evaluate_recaptioning(Captioner.from_pretrained(tmp_path / "captioner"), evaluation_world)
    print(f"\nseed {seed}: training {report['seconds']:.0f} s, loss {report['initial_loss']:.2f} -> "
          f"{report['final_loss']:.2f}; alt-text pairs: {result['pairs']}, before {result['before']}, "
          f"after {result['after']}, {time.perf_counter() - start:.0f} s")
    assert result["before"] == {"accuracy": 0.0, "fact_f1": 0.0, "n": result["pairs"]}  # alt-texts state no facts
    assert result["after"]["fact_f1"] >= 0.15
