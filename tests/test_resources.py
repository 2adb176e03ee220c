"""Resources and what they hand the stages: storage paths, the sample world's image source, the thread cap, the
pretrained captioner's directory."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from assets.resources import PretrainedCaptioner, SampleWorld, SampleWorldImages, Storage
from pipelines.compute import cpu_threads
from pipelines.data.documents import read_documents
from pipelines.data.download import DownloadConfig
from pipelines.data.readers import read_source
from pipelines.data.tokenizer import train_tokenizer
from pipelines.sample_world import write_metadata
from pipelines.sample_world.documents import world_images, world_texts
from pipelines.sample_world.image_server import ImageServer
from pipelines.sample_world.images import METADATA_BASE_URL, forget_other_server
from pipelines.training.captioner import provide_captioner, tiny_captioner


def test_partition_paths_stay_under_the_stage_folder(tmp_path):
    storage = Storage(root=str(tmp_path)).layout
    assert storage.raw_file("laion/part-00000.parquet") == tmp_path / "raw" / "laion" / "part-00000.parquet"
    path = storage.partition_path("images", "mmc4/docs_shard_0_v2.jsonl.zip", ".abc")
    assert path == tmp_path / "images" / "mmc4" / "docs_shard_0_v2_jsonl_zip.abc" and path.parent.is_dir()
    for bad in ("laion", "other/x.parquet", "laion/a/b.parquet", "laion/"):
        with pytest.raises(ValueError):
            storage.raw_file(bad)


def test_download_folder_of_another_server_is_started_again(tmp_path):
    out = tmp_path / "images"
    out.mkdir()
    pq.write_table(pa.table({"url": ["http://127.0.0.1:1111/images/a.jpg"], "url_id": ["x"]}), out / "urls.parquet")
    forget_other_server(out, "http://127.0.0.1:1111")
    assert out.exists()  # same server: resumable, kept
    forget_other_server(out, "http://127.0.0.1:2222")
    assert not out.exists()


def test_sample_world_images_download_over_loopback_with_faults(tmp_path):
    world = SampleWorld(n_pairs=8, n_stories=1, n_eval=1)
    written = write_metadata(world.generate(), tmp_path / "raw", METADATA_BASE_URL)
    faults = {"not_found": 0.25, "server_error": 0.0, "truncated": 0.0, "not_image": 0.0, "transient": 0.0}
    images = SampleWorldImages(world=world, faults=faults).get()
    documents = list(read_source(written["laion"][0]))
    with ImageServer(world.generate().routes(), images.faults) as server:
        source = SampleWorldImages(world=world, server_url=server.base_url, faults=faults).get()
        result = source.download(documents, tmp_path / "out", DownloadConfig(image_size=64, resize_mode="no",
                                                                             retry_passes=0))
        assert server.request_count == len(documents)
        base_url = server.base_url
    assert sum(result.counts.values()) == len(documents) and 0 < result.counts["ok"] < len(documents)
    downloaded = list(read_documents(tmp_path / "out" / "documents.parquet"))
    assert all(d["elements"][0]["url"].startswith(base_url + "/images/") for d in downloaded)


def test_torch_threads_are_restored_even_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), cpu_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_pretrained_captioner_is_a_local_directory_named_by_its_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        provide_captioner(PretrainedCaptioner(path=str(tmp_path / "missing")).get(), tmp_path / "unused")
    world = SampleWorld(n_pairs=4, n_stories=1, n_eval=1).generate()
    saved = tiny_captioner(train_tokenizer(world_texts(world)), max_new_tokens=4).save_pretrained(tmp_path / "blip2")
    source = PretrainedCaptioner(path=str(saved), captioning={"batch_size": 2, "max_new_tokens": 4}).get()
    manifest = provide_captioner(source, tmp_path / "unused")
    assert manifest.kind == "pretrained" and "config.json" in manifest.files
    assert provide_captioner(source, tmp_path / "unused").version == manifest.version  # unchanged files, same version
    assert not (tmp_path / "unused").exists()
    image = world_images(world)[world.pairs[0].image_id]
    loaded = manifest.load()
    assert (loaded.batch_size, loaded.max_new_tokens) == (2, 4) and len(loaded.caption([image, image])) == 2
    (saved / "config.json").touch()
    assert provide_captioner(source, tmp_path / "unused").version != manifest.version
