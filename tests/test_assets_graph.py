"""The whole data graph in process on a small sample world: assets, checks, metadata, re-filtering and
a corrupted shard. One module-scoped run of the graph is shared; the destructive test runs last."""

import contextlib
import json
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from assets.resources import SampleWorldImages
from orchestration.definitions import build_definitions
from orchestration.jobs import partition_range_tags, preset_run_config, weekly_refilter
from pipelines.data.documents import IMAGE_STATUS_OK, read_documents
from pipelines.data.loader import sequence_dataset
from pipelines.data.recaption import CAPTION_FIELD
from pipelines.data.shards import read_index, verify_shards
from pipelines.data.tokenizer import load_tokenizer
from pipelines.evaluation.ablation import VARIANTS
from pipelines.files import tar_keys
from pipelines.sample_world.captions import normalize_caption
from pipelines.sample_world.image_server import ImageServer
from small_platform import FAULTS, WORLD, small_resources

pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")

DATA_ASSETS = ["raw_documents", "downloaded_images", "clip_scorer", "clip_scores", "filtered_documents", "captioner",
               "recaptions", "deduplicated_documents", "decontaminated_documents", "tokenizer", "packed_sequences"]
PRESET_OPS = ("downloaded_images", "filtered_documents", "recaptions", "deduplicated_documents", "decontaminated_documents",
              "packed_sequences")
CHECKS = {"raw_documents_shards_readable", "raw_documents_parse_rate", "deduplicated_documents_rate",
          "downloaded_images_shard_integrity", "downloaded_images_success_rate",
          "filtered_documents_pass_rate", "packed_sequences_shard_integrity", "packed_sequences_max_tokens"}


class Graph:
    """The running test platform: instance, definitions, the loopback server and the keys."""

    def __init__(self, instance, defs, server, root):
        self.instance, self.defs, self.server, self.root = instance, defs, server, root
        self.keys: list[str] = []
        self.result = None

    def run(self, job: str, run_config: dict | None = None, **kwargs) -> dg.ExecuteInProcessResult:
        """Run ``job`` over every shard, with the sample-world preset's op config unless given, but with CC-12M
        recaptioned and the scorer's calibrated pair threshold (:func:`graph_run_config`)."""
        if run_config is None:
            run_config = graph_run_config()
        return self.defs.resolve_job_def(job).execute_in_process(
            instance=self.instance, tags=partition_range_tags(self.keys), run_config=run_config, **kwargs)

    def materializations(self, asset: str) -> list:
        records = self.instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
        return [r.asset_materialization for r in records]


def graph_run_config() -> dict:
    """The sample-world preset's op config with the paper's recaptioning of CC-12M and the scorer's calibrated pair
    threshold: the preset turns both off for the tiny captioner's sake (``sample_world.yaml``), but the graph's
    recaption and calibration paths are what these tests exercise."""
    config = preset_run_config("sample_world", PRESET_OPS)
    config["ops"]["recaptions"]["config"]["sources"] = ["cc12m"]
    config["ops"]["filtered_documents"]["config"]["pair_min_similarity"] = None
    return config


@contextlib.contextmanager
def _platform(root: Path, dagster_home: Path):
    """A clone of the platform: its own storage root, instance and loopback server (another port) on the same small
    world, with the sample world written and the data job run once."""
    with ImageServer(WORLD.generate().routes(), SampleWorldImages(world=WORLD, faults=FAULTS).get().faults) as server, \
            dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        resources = small_resources(str(root), server.base_url)
        g = Graph(instance, build_definitions("sample_world", resources), server, root)
        world_run = g.defs.get_implicit_global_asset_job_def().execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("sample_world")])
        assert world_run.success
        g.keys = instance.get_dynamic_partitions("source_shards")
        g.result = g.run("sample_world_data")
        yield g


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    with _platform(tmp_path_factory.mktemp("weft_data"), tmp_path_factory.mktemp("dagster_home")) as g:
        yield g


def test_sample_world_registers_one_partition_per_raw_shard(graph):
    assert graph.keys == ["mmc4/docs_shard_0_v2.jsonl.zip", "laion/part-00000.parquet", "cc12m/cc12m-00000.tsv"]
    for key in graph.keys:
        assert (graph.root / "raw" / key).is_file()
    # each written shard is reported as a materialization of the external raw_shards asset, with its file and size
    written = {m.partition: m.metadata for m in graph.materializations("raw_shards")}
    assert set(written) == set(graph.keys)
    for key, metadata in written.items():
        assert metadata["path"].value == str(graph.root / "raw" / key)
        assert metadata["bytes"].value == (graph.root / "raw" / key).stat().st_size


def test_every_asset_materializes_and_every_check_passes(graph):
    result = graph.result
    assert result.success
    materialized = {(e.asset_key.to_user_string(), e.partition) for e in result.get_asset_materialization_events()}
    for asset in ("raw_documents", "downloaded_images", "clip_scores", "filtered_documents", "recaptions"):
        assert {(asset, k) for k in graph.keys} <= materialized
    assert {("clip_scorer", None), ("captioner", None), ("tokenizer", None), ("packed_sequences", None)} <= materialized
    evaluations = result.get_asset_check_evaluations()
    assert {e.check_name for e in evaluations} == CHECKS
    assert all(e.passed for e in evaluations), [(e.check_name, e.metadata) for e in evaluations if not e.passed]
    assert graph.server.request_count > 0


def test_materializations_carry_metadata_and_data_versions(graph):
    world = graph.materializations("sample_world")[0].metadata
    assert world["pairs"].value == 16 and world["preview"].value.count("data:image/jpeg;base64,") == 3
    raw = graph.materializations("raw_documents")[0]
    assert raw.metadata["documents"].value == 6 + 16 and raw.metadata["parse_rate"].value == 1.0
    images = graph.materializations("downloaded_images")[0].metadata
    counts = images["status_counts"].value
    assert counts["ok"] == images["ok"].value and sum(counts.values()) == images["urls"].value
    assert 0.5 < images["success_rate"].value < 1.0  # the server's faults are visible, not hidden
    assert images["preview"].value.count("data:image/jpeg;base64,") == 4
    assert images["urls_per_second"].value > 0
    scorer = graph.materializations("clip_scorer")[0].metadata
    assert 0.0 <= scorer["roc_auc"].value <= 1.0 and scorer["kind"].value == "sample_world_tiny_clip"
    scores = graph.materializations("clip_scores")[0].metadata
    assert scores["images_scored"].value > 0 and scores["scorer_threshold"].value == scorer["threshold"].value
    filtered = graph.materializations("filtered_documents")[0].metadata
    assert filtered["thresholds"].value["min_similarity"] == scorer["threshold"].value  # null in the preset
    assert "similarity" in filtered["image_drops_by_rule"].value or "download" in filtered["image_drops_by_rule"].value
    captioner = graph.materializations("captioner")[0].metadata
    assert captioner["kind"].value == "sample_world_tiny_blip2" and captioner["training_seconds"].value > 0
    assert captioner["final_loss"].value < captioner["initial_loss"].value
    assert captioner["evaluated_pairs"].value > 0 and captioner["accuracy_before"].value == 0.0
    assert "| alt-text | recaption | truth |" in captioner["examples"].value
    recaptions = graph.materializations("recaptions")[0].metadata
    assert recaptions["documents"].value == recaptions["captioned"].value > 0 and recaptions["reused"].value == 0
    assert recaptions["sources"].value == ["cc12m"] and "| source text | recaption |" in recaptions["preview"].value
    dedup = graph.materializations("deduplicated_documents")[0].metadata
    assert 0 < dedup["images_kept"].value <= dedup["images_in"].value == filtered["images_kept"].value
    assert dedup["config"].value["phash_max_distance"] == "off"  # the preset: the world's scenes share pHashes
    clean = graph.materializations("decontaminated_documents")[0].metadata
    assert clean["checked_against"].value["name"] == "sample world (seed 0, 2 items a split)"
    assert clean["images_in"].value == dedup["images_kept"].value and clean["eval_texts_checked"].value > 0
    packed = graph.materializations("packed_sequences")[0].metadata
    assert packed["sequences"].value >= 1 and packed["tokens"].value > 0 and ".tar" in packed["shards"].value
    assert packed["recaptioned_shards"].value == ["cc12m/cc12m-00000.tsv"]
    for asset in DATA_ASSETS:
        tags = graph.materializations(asset)[0].tags or {}
        assert tags.get("dagster/data_version"), asset


def test_packed_shards_are_webdataset_with_an_intact_index(graph):
    manifest = json.loads((graph.root / "_manifests" / "packed_sequences" / "manifest.json").read_text())
    assert verify_shards(manifest["path"]) == []
    index = read_index(manifest["path"])
    assert index.complete and index.samples == manifest["samples"]
    threshold = graph.materializations("clip_scorer")[0].metadata["threshold"].value
    assert index.meta["filter_thresholds"]["mmc4/docs_shard_0_v2.jsonl.zip"]["min_similarity"] == threshold
    keys = tar_keys(Path(manifest["urls"][0]))
    assert keys and all("." not in k for k in keys)


def test_packed_pairs_of_recaptioned_sources_carry_their_recaption(graph):
    manifests = graph.root / "_manifests"
    recaptions = {k: json.loads((manifests / "recaptions" / f"{k}.json").read_text()) for k in graph.keys}
    assert [k for k, m in recaptions.items() if m["path"] is not None] == ["cc12m/cc12m-00000.tsv"]
    rows = pq.read_table(recaptions["cc12m/cc12m-00000.tsv"]["path"]).to_pylist()
    assert rows and all(r[CAPTION_FIELD].strip() for r in rows)
    recaption = {r["doc_id"]: r[CAPTION_FIELD] for r in rows}
    source_text = {r["doc_id"]: r["caption"] for r in rows}
    packed = json.loads((manifests / "packed_sequences" / "manifest.json").read_text())
    tokenizer_manifest = json.loads((manifests / "tokenizer" / "manifest.json").read_text())
    tokenizer = load_tokenizer(tokenizer_manifest["path"], boi_token=tokenizer_manifest["boi_token"],
                               image_token=tokenizer_manifest["image_token"])
    texts: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for sample in sequence_dataset(packed["urls"], image_size=(64, 64), shuffle_buffer=1):
        ids, bounds, info = sample["input_ids"], sample["cu_seqlens"], sample["info"]
        for i, (doc_id, kind) in enumerate(zip(info["doc_ids"], info["kinds"])):
            segment = ids[bounds[i]: bounds[i + 1]].tolist()
            texts[doc_id] = texts.get(doc_id, "") + " " + tokenizer.decode(segment, skip_special_tokens=True)
            kinds[doc_id] = kind
    cc12m_pairs = [d for d, kind in kinds.items() if kind == "pair" and d.startswith("cc12m:")]
    laion_pairs = [d for d, kind in kinds.items() if kind == "pair" and d.startswith("laion:")]
    assert cc12m_pairs and laion_pairs
    for doc_id in cc12m_pairs:  # packed text is the recaption
        assert normalize_caption(texts[doc_id]) == normalize_caption(recaption[doc_id].lower()), doc_id
    assert any(normalize_caption(texts[d]) != normalize_caption(source_text[d].lower()) for d in cc12m_pairs)
    assert not set(laion_pairs) & set(recaption)  # LAION keeps its own text


def test_recaptioned_pairs_are_judged_by_their_recaption(graph):
    """Every downloaded CC-12M pair is recaptioned before filtering, scored against its recaption, and kept or
    dropped on that score (the alt-text it replaces no longer decides); LAION's pairs keep their own text."""
    manifests = graph.root / "_manifests"
    key = "cc12m/cc12m-00000.tsv"
    recaptions = json.loads((manifests / "recaptions" / f"{key}.json").read_text())
    recaptioned = {r["doc_id"] for r in pq.read_table(recaptions["path"]).to_pylist()}
    downloaded = json.loads((manifests / "downloaded_images" / f"{key}.json").read_text())
    assert recaptioned == {d["doc_id"] for d in read_documents(downloaded["documents"])
                           if d["elements"][0].get("status") == IMAGE_STATUS_OK}
    rows = pq.read_table(json.loads((manifests / "clip_scores" / f"{key}.json").read_text())["path"]).to_pylist()
    assert {r["doc_id"] for r in rows if r["similarity_recaption"] is not None} == recaptioned
    assert any(r["similarity_recaption"] != r["similarity"] for r in rows)
    laion = json.loads((manifests / "clip_scores" / "laion/part-00000.parquet.json").read_text())
    assert all(r["similarity_recaption"] is None for r in pq.read_table(laion["path"]).to_pylist())
    filtered = json.loads((manifests / "filtered_documents" / f"{key}.json").read_text())
    assert filtered["thresholds"]["pair_caption"] == "blip2"
    threshold = filtered["thresholds"]["pair_min_similarity"]
    kept = {d["doc_id"] for d in read_documents(filtered["path"])}
    assert rows
    for r in rows:
        assert (r["doc_id"] in kept) == (r["similarity_recaption"] >= threshold), r


def test_instruction_sequences_read_the_sample_worlds_instruction_data_with_the_preset(graph):
    """The sample world wrote raw/instructions/ (not a raw-shard partition), where the SFT data is read by default."""
    assert "instructions" not in {k.split("/")[0] for k in graph.keys}
    world = graph.materializations("sample_world")[0].metadata
    assert world["instruction_items"].value > 0
    config = preset_run_config("sample_world", ("instruction_sequences",))
    result = graph.defs.get_implicit_global_asset_job_def().execute_in_process(
        instance=graph.instance, run_config=config, asset_selection=[dg.AssetKey("instruction_sequences")])
    assert result.success
    sequences = result.output_for_node("instruction_sequences")
    packed = json.loads((graph.root / "_manifests" / "packed_sequences" / "manifest.json").read_text())
    assert sequences.counts.items == world["instruction_items"].value and sequences.counts.malformed == 0
    assert sequences.packing.max_length == packed["packing"]["max_length"] == 320  # packed as the pretraining data
    assert verify_shards(sequences.path) == [] and sequences.counts.losses.trained_tokens > 0


@pytest.mark.slow
def test_mmfs_ablation_packs_trains_finetunes_and_reports_every_variant_in_the_graph(graph):
    """Before the refilter test: the variants are packed from the documents the preset's thresholds keep."""
    config = {"ops": {
        "ablation_sequences": {"config": {"max_length": 640, "num_image_tokens": 32, "many_image_tokens": 256,
                                          "samples_per_shard": 64}},
        "ablation_checkpoints": {"config": {"max_steps": 2, "warmup_steps": 0, "zero_stage": 0, "checkpoint_every": 2,
                                            "vae_steps": 2, "train_vit": True}},
        "ablation_finetuned_checkpoints": {"config": {"max_steps": 1, "warmup_steps": 0, "zero_stage": 0,
                                                      "checkpoint_every": 1}},
        "mmfs_ablation_report": {"config": {"tasks": ["captioning", "text_to_image"], "limit": 1,
                                            "num_inference_steps": 2, "max_new_tokens": 4}},
    }}
    result = graph.defs.resolve_job_def("mmfs_ablation").execute_in_process(
        instance=graph.instance, run_config=config, tags=partition_range_tags(list(VARIANTS)))
    assert result.success
    sequences = result.output_for_node("ablation_sequences")
    assert {k: s.packing.num_image_tokens for k, s in sequences.items()} == {
        "mmfs": 32, "no_mmfs": 32, "many_tokens_no_mmfs": 256}
    instructions = result.output_for_node("ablation_instruction_sequences")
    assert {k: s.packing for k, s in instructions.items()} == {k: s.packing for k, s in sequences.items()}
    checkpoints = result.output_for_node("ablation_checkpoints")
    assert all(c.step == 2 for c in checkpoints.values())
    tuned = result.output_for_node("ablation_finetuned_checkpoints")
    assert all(t.step == 1 and t.pretrained.version == checkpoints[k].version for k, t in tuned.items())
    for key, variant in VARIANTS.items():  # MMFS in the image decoder exactly where the variant has it
        model_config = json.loads(Path(tuned[key].model_dir, "config.json").read_text())
        assert (model_config["decoder"]["mmfs"] is not None) == variant.mmfs, key
        assert model_config["vision"]["train_vit"], key  # the model settings the variants share
    report = result.output_for_node("mmfs_ablation_report")
    names = ["32 tokens, MMFS", "32 tokens, no MMFS", "256 tokens, no MMFS"]
    assert list(report.scores) == names
    text = (Path(report.path) / "report.md").read_text()
    assert all(name in text for name in names) and (Path(report.path) / "loss.png").is_file()
    lineage = json.loads((Path(report.path) / "results.json").read_text())["lineage"]
    assert lineage["variants"]["256 tokens, no MMFS"] == {"num_visual_tokens": 256, "mmfs": False}
    assert lineage["instruction shards"]["32 tokens, MMFS"] == instructions["mmfs"].path


def _data_versions(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str | None], str]:
    return {(e.asset_key.to_user_string(), e.partition): e.step_materialization_data.materialization.tags["dagster/data_version"]
            for e in result.get_asset_materialization_events()}


def _model_files(root: Path) -> dict[Path, int]:
    """The trained scorer's and captioner's files, with their modification times."""
    return {p: p.stat().st_mtime_ns for stage in ("clip_scorer", "captioner") for p in (root / stage).rglob("*")
            if p.is_file()}


def test_a_second_clone_gets_the_same_data_versions_and_its_rerun_trains_no_model(graph, tmp_path_factory):
    """Before the refilter test (which re-materializes with other thresholds): data versions come from content and
    config, never from where the storage root lies or which port served the images."""
    with _platform(tmp_path_factory.mktemp("clone_data"), tmp_path_factory.mktemp("clone_home")) as clone:
        assert clone.server.base_url != graph.server.base_url and clone.root != graph.root
        versions = _data_versions(clone.result)
        assert {asset for asset, _ in versions} == set(DATA_ASSETS)
        assert versions == _data_versions(graph.result)
        models = _model_files(clone.root)
        assert any(p.suffix == ".safetensors" for p in models) and any(p.name == "manifest.json" for p in models)
        rerun = clone.run("sample_world_data")  # a second make demo
        assert rerun.success and _data_versions(rerun) == versions
        assert _model_files(clone.root) == models  # neither the scorer nor the captioner was trained again
        captioner = clone.materializations("captioner")
        assert len(captioner) == 2 and captioner[0].metadata["training_seconds"] == captioner[1].metadata["training_seconds"]


def test_weekly_schedule_requests_one_refilter_run_over_every_shard(graph):
    context = dg.build_schedule_context(instance=graph.instance, repository_def=graph.defs.get_repository_def())
    request = weekly_refilter(context)
    assert isinstance(request, dg.RunRequest)
    assert request.tags == partition_range_tags(graph.keys)
    assert request.run_config["ops"]["filtered_documents"]["config"]["min_similarity"] is None  # the scorer's


def test_refilter_reuses_downloads_and_records_both_thresholds(graph):
    requests_before = graph.server.request_count
    packed_before = json.loads((graph.root / "_manifests" / "packed_sequences" / "manifest.json").read_text())
    before = graph.materializations("filtered_documents")[0].metadata["min_similarity"].value
    stricter = round(before + 0.05, 4)
    config = preset_run_config("sample_world", ("deduplicated_documents", "decontaminated_documents"))
    config["ops"]["filtered_documents"] = {"config": {"min_similarity": stricter, "pair_min_similarity": stricter}}
    result = graph.run("refilter", run_config=config)
    assert result.success
    assert graph.server.request_count == requests_before  # no HTTP: the downloads were re-used
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    # every downloaded pair is captioned already
    assert materialized == {"filtered_documents", "deduplicated_documents", "decontaminated_documents", "packed_sequences"}
    thresholds = [m.metadata["min_similarity"].value for m in graph.materializations("filtered_documents")]
    assert stricter in thresholds and before in thresholds
    packed = json.loads((graph.root / "_manifests" / "packed_sequences" / "manifest.json").read_text())
    assert packed["path"] != packed_before["path"]
    assert {t["min_similarity"] for t in read_index(packed["path"]).meta["filter_thresholds"].values()} == {stricter}
    assert read_index(packed_before["path"]).complete  # the previous shards stay for lineage
    versions = [m.tags["dagster/data_version"] for m in graph.materializations("packed_sequences")]
    assert len(set(versions)) == len(versions)


def test_corrupted_download_shard_fails_integrity_and_blocks_downstream(graph):
    tar = sorted((graph.root / "images").glob("*/*/shards/*.tar"))[0]
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])
    requests_before = graph.server.request_count
    selection = [dg.AssetKey(a) for a in ("downloaded_images", "clip_scores", "filtered_documents", "recaptions",
                                          "deduplicated_documents", "decontaminated_documents", "packed_sequences")]
    result = graph.run("sample_world_data", asset_selection=selection, raise_on_error=False)
    assert not result.success
    integrity = [e for e in result.get_asset_check_evaluations()
                 if e.check_name == "downloaded_images_shard_integrity"]
    assert len(integrity) == 1 and not integrity[0].passed
    assert "unreadable" in integrity[0].metadata["problems"].value or "samples" in integrity[0].metadata["problems"].value
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"downloaded_images"}  # clip scores, filtering, recaptioning and packing were blocked
    assert graph.server.request_count == requests_before
