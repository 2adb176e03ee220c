"""img2dataset with weft's :class:`~pipelines.data.fetch_guard.FetchGuard`: its resizer refuses an image over
``max_image_area`` pixels from the header, before anything decodes it, and its downloader fetches through the
guarded opener in whatever process runs it (img2dataset pickles the downloader to every worker, whichever
distributor runs them)."""

from __future__ import annotations

import functools
import importlib
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

# albumentations (imported by img2dataset) phones home on import unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.data.fetch_guard import REFUSED, FetchGuard, guarded_opener  # noqa: E402


class GuardedResizer(Resizer):
    """img2dataset's resizer, refusing an image whose header gives more than ``max_image_area`` pixels before
    anything decodes it (OpenCV's own header check, for formats PIL cannot read, is set to the same bound by
    :class:`GuardedDownloader`)."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        try:
            with Image.open(img_stream) as image:  # reads the header only
                width, height = image.size
        except Exception:  # noqa: BLE001 (a format PIL cannot read: OpenCV decides, under its own header check)
            width = height = 0
        if width * height > self.max_image_area:
            return (None, None, None, None, None,
                    f"{REFUSED}image area {width}x{height} = {width * height} px over max_image_area {self.max_image_area}")
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


class GuardedDownloader(Downloader):
    """img2dataset's downloader, fetching under ``guard`` in whatever process runs it."""

    def __init__(self, *, guard: FetchGuard, **kwargs) -> None:
        super().__init__(**kwargs)
        self.guard = guard

    def __call__(self, row):
        # OpenCV reads this at its first decode and then refuses larger images from their header.
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(int(self.guard.max_image_area))
        # The resizer judges the area with the configured bound; PIL's own (a warning, or an error past 179 MP)
        # would only replace its reason. Nothing else decodes with PIL in a worker.
        Image.MAX_IMAGE_PIXELS = None
        urllib.request.install_opener(guarded_opener(self.guard))
        return super().__call__(row)


@contextmanager
def guarded_img2dataset(guard: FetchGuard) -> Iterator[None]:
    """Within the block, ``img2dataset.download`` builds a :class:`GuardedDownloader` and a :class:`GuardedResizer`.

    img2dataset has no hook for its fetch; ``download`` looks both classes up as globals of ``img2dataset.main``
    when it starts, so they are swapped there for the block. img2dataset runs on the main thread only (it
    installs a SIGINT handler), so no other download starts in between."""
    main = importlib.import_module("img2dataset.main")  # the package's ``main`` attribute is the CLI function
    previous = main.Downloader, main.Resizer
    main.Downloader, main.Resizer = functools.partial(GuardedDownloader, guard=guard), GuardedResizer
    try:
        yield
    finally:
        main.Downloader, main.Resizer = previous
