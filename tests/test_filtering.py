from pipelines.data.documents import image_element, make_document, text_element
from pipelines.data.filtering import FilterConfig, FilterReport, filter_documents, hash_fraction
from pipelines.sample_world.documents import world_documents, world_truth
from pipelines.sample_world.world import WorldConfig, generate_world


def _doc(doc_id, sims, statuses=None):
    elements = []
    for i, sim in enumerate(sims):
        image = image_element(f"http://x/{doc_id}/{i}.jpg", matched_text_index=i, matched_sim=sim)
        image.update(key=f"{doc_id}-{i}", status=(statuses or {}).get(i, "ok"))
        elements += [image, text_element(f"sentence {i}", i)]
    return make_document(doc_id=doc_id, source="mmc4", kind="interleaved", elements=elements)


def _run(documents, config=FilterConfig(), scores=None):
    report = FilterReport(config)
    kept = list(filter_documents(documents, config, scores=scores, report=report))
    return kept, report


def test_mmc4_rules_with_reasons():
    many = _doc("many", [0.3, 0.25, 0.5, 0.1, 0.26, 0.27, 0.28, 0.29, 0.31])
    failed = _doc("failed", [0.3, 0.3], statuses={0: "failed_to_download"})
    none_left = _doc("none", [0.1, 0.2])
    kept, report = _run([many, failed, none_left])
    kept = {d["doc_id"]: d for d in kept}
    # many: 0.1 dropped by threshold; of the 8 left, the 6 highest stay, in reading order
    sims = [e["matched_sim"] for e in kept["many"]["elements"] if e["type"] == "image"]
    assert sims == [0.3, 0.5, 0.27, 0.28, 0.29, 0.31]
    assert len([e for e in kept["many"]["elements"] if e["type"] == "text"]) == 9  # text is untouched
    assert "none" not in kept
    one_image = hash_fraction("failed", FilterConfig().hash_salt) < 0.5
    assert ("failed" in kept) != one_image
    assert report.rule_counts("image") == {"similarity": 3, "max_images": 2, "download": 1, **({"one_image": 1} if one_image else {})}
    assert report.rule_counts("document") == {"no_images": 1, **({"one_image": 1} if one_image else {})}
    assert all(d.reason for d in report.drops)
    assert report.images_in == 13
    meta = report.metadata()
    assert meta["config"]["min_similarity"] == 0.24 and meta["config"]["max_images_per_document"] == 6
    # every input image is either kept or has exactly one drop record
    image_drops = [d for d in report.drops if d.element_index is not None]
    assert report.images_kept + len(image_drops) == report.images_in
    assert report.drops_table().num_rows == len(report.drops)


def test_one_image_documents_drop_half_by_hash_and_runs_agree():
    documents = [_doc(f"d{i}", [0.3]) for i in range(400)]
    kept, report = _run(documents)
    assert 0.4 < len(kept) / 400 < 0.6
    assert report.rule_counts("document") == report.rule_counts("image") == {"one_image": 400 - len(kept)}
    assert {d["doc_id"] for d in kept} == {f"d{i}" for i in range(400) if hash_fraction(f"d{i}", FilterConfig().hash_salt) >= 0.5}
    again, report2 = _run(list(reversed(documents)))
    assert {d["doc_id"] for d in again} == {d["doc_id"] for d in kept}
    assert sorted(map(str, report2.drops)) == sorted(map(str, report.drops))
    # pairs are never subject to the one-image rule
    pair = make_document(doc_id="p", source="laion", kind="pair",
                         elements=[dict(image_element("http://x/p.jpg", matched_sim=0.3), status="ok"), text_element("c", 0)])
    assert len(_run([pair])[0]) == 1
    assert len(_run([pair], FilterConfig(pair_min_similarity=0.35))[0]) == 0


def test_sample_world_source_similarities_remove_the_mismatched_images():
    world = generate_world(WorldConfig(seed=4, n_pairs=100, n_stories=20))
    truth = world_truth(world)
    stories = [d for d in world_documents(world) if d["kind"] == "interleaved"]
    config = FilterConfig(one_image_drop_fraction=0.0)
    kept, report = _run(stories, config)
    kept_keys = {e["key"] for d in kept for e in d["elements"] if e["type"] == "image"}
    mismatched = {k for k, t in truth.items() if t["mismatched"] and t["text_kind"] != "caption" and k[0] == "s"}
    assert mismatched and not mismatched & kept_keys
    assert all(d.rule == "similarity" for d in report.drops)
    assert report.images_in - len(mismatched) == report.images_kept
    # deterministic across runs
    assert [d["doc_id"] for d in _run(stories, config)[0]] == [d["doc_id"] for d in kept]
