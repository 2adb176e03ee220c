"""Resources on their own: storage paths, the sample world's image source, the scorer's thread cap."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestration.resources import (
    SAMPLE_WORLD_BASE_URL, SampleWorld, SampleWorldImages, Storage, _forget_other_server, _torch_threads,
)
from pipelines.documents import read_documents
from pipelines.download import DownloadConfig
from pipelines.image_server import ImageServer
from pipelines.readers import read_source
from pipelines.sample_world import write_metadata


def test_partition_paths_stay_under_the_stage_folder(tmp_path):
    storage = Storage(root=str(tmp_path))
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
    _forget_other_server(out, "http://127.0.0.1:1111")
    assert out.exists()  # same server: resumable, kept
    _forget_other_server(out, "http://127.0.0.1:2222")
    assert not out.exists()


def test_sample_world_images_download_over_loopback_with_faults(tmp_path):
    world = SampleWorld(n_pairs=8, n_stories=1, n_eval=1)
    written = write_metadata(world.generate(), tmp_path / "raw", SAMPLE_WORLD_BASE_URL)
    images = SampleWorldImages(world=world, not_found=0.25, server_error=0.0, truncated=0.0, not_image=0.0,
                               transient=0.0)
    documents = list(read_source(written["laion"][0]))
    with ImageServer(world.generate().routes(), images.faults()) as server:
        source = SampleWorldImages(world=world, server_url=server.base_url, not_found=0.25, server_error=0.0,
                                   truncated=0.0, not_image=0.0, transient=0.0)
        result = source.download(documents, tmp_path / "out", DownloadConfig(image_size=64, resize_mode="no",
                                                                             retry_passes=0))
        assert server.request_count == len(documents)
        base_url = server.base_url
    assert sum(result.counts.values()) == len(documents) and 0 < result.counts["ok"] < len(documents)
    downloaded = list(read_documents(tmp_path / "out" / "documents.parquet"))
    assert all(d["elements"][0]["url"].startswith(base_url + "/images/") for d in downloaded)


def test_torch_threads_are_restored(tmp_path):
    before = torch.get_num_threads()
    with _torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
