"""The Dagster UI as a user sees it: ``dagster dev`` on the project's workspace and local instance preset, after a
materialization made by Dagster's CLI, driven in a real browser (Playwright over Debian's chromium, offline).
Screenshots are kept in ``$WEFT_TEST_ARTIFACTS`` (default ``test-artifacts/``)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestration.jobs import PRESETS_DIR
from sessions import alive, descendants, stop_session

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = Path(os.environ.get("WEFT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
ASSETS = ["sample_world", "raw_shards", "raw_documents", "downloaded_images", "clip_scorer", "clip_scores", "filtered_documents",
          "captioner", "recaptions", "deduplicated_documents", "decontaminated_documents", "tokenizer",
          "packed_sequences", "checkpoint", "instruction_sequences", "finetuned_checkpoint", "evaluation_report",
          "ablation_sequences", "ablation_checkpoints", "ablation_instruction_sequences", "ablation_finetuned_checkpoints",
          "mmfs_ablation_report"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui(tmp_path):
    """``dagster dev`` (webserver, daemon, code server) in a session of its own, over an instance where the
    ``sample_world`` asset was materialized; all of it stopped at the end (only what this test started)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PRESETS_DIR / "dagster.yaml", home / "dagster.yaml")  # what make demo / make ui write
    env = {**os.environ, "DAGSTER_HOME": str(home), "WEFT_DATA_ROOT": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(BIN / "dagster"), "asset", "materialize", "-m", "orchestration.definitions", "--select",
                           "sample_world"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    port = _free_port()
    log = tmp_path / "dagster_dev.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(BIN / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port), "-w",
                                    str(ROOT / "workspace.yaml")], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(process, base, log)
        yield base
    finally:
        stop_session(process)


def _wait_until_serving(process: subprocess.Popen, base: str, log: Path, timeout: float = 180) -> None:
    """Until the UI at ``base`` answers; ``process`` (writing ``log``) must stay up meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"the UI exited with {process.returncode}: {log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(base + "/server_info", timeout=2).read()
            return
        except OSError:
            assert time.monotonic() < deadline, f"the UI did not answer within {timeout} s: {log.read_text()[-3000:]}"
            time.sleep(1)


def test_make_ui_stops_on_ctrl_c(tmp_path):
    """Ctrl-C in the terminal running ``make ui`` (SIGINT to its foreground process group) stops make, ``dagster
    dev`` and every process they started (webserver, daemon, code servers) within a minute, nothing killed."""
    port, log = _free_port(), tmp_path / "make_ui.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1",
           "WEFT_DATA_ROOT": str(tmp_path / "data")}
    with open(log, "w") as out:
        process = subprocess.Popen(["make", "ui", f"UI_PORT={port}", f"INSTANCE_DIR={tmp_path / 'dagster_home'}"],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started: set[int] = set()
    try:
        _wait_until_serving(process, f"http://127.0.0.1:{port}", log)
        started = descendants(process.pid) | {process.pid}
        assert len(started) >= 4, f"make, dagster dev, its webserver and daemon: {started}"
        os.killpg(process.pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while alive(started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive(started), f"still running 60 s after Ctrl-C: {alive(started)}\n{log.read_text()[-3000:]}"
    finally:
        for pid in alive(started):  # only if the test failed: what this test started, nothing else
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop_session(process)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise FileNotFoundError("no chromium on PATH (apt-get install chromium)")
    return found


def _open(page, url: str, first_visit: bool = False) -> None:
    """Go to ``url``; on the first visit, wait for the "Join the Dagster community" dialog, which can open after the
    page is idle and then takes every click, and skip it (Dagster remembers that)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(url)
    page.wait_for_load_state("networkidle")
    if first_visit:
        skip = page.get_by_role("button", name="Skip")
        try:
            skip.first.wait_for(state="visible", timeout=20_000)
        except PlaywrightTimeout:
            return
        skip.first.click()
        page.locator(".bp5-overlay-backdrop").first.wait_for(state="detached", timeout=20_000)


def test_ui_shows_the_asset_graph_an_asset_page_and_the_automation(ui):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1800, "height": 2000})
        _open(page, ui + "/asset-groups", first_visit=True)
        expand = page.get_by_role("img", name="unfold_more")  # the lineage graph opens with its groups folded
        expect(expand.first).to_be_visible(timeout=60_000)
        for _ in range(50):
            if not expand.count():
                break
            expand.first.click()
        expect(expand).to_have_count(0)
        page.wait_for_timeout(2000)  # the graph's layout settles
        page.screenshot(path=ARTIFACTS / "ui_asset_graph.png")

        _open(page, ui + "/assets")  # the catalog: every asset by its full name (the zoomed-out graph shortens them)
        for asset in ASSETS:
            expect(page.locator(f'a[href="/assets/{asset}"]').first).to_be_attached(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "ui_catalog.png")

        _open(page, ui + "/assets/sample_world")
        expect(page.get_by_text("Latest materialization").first).to_be_visible(timeout=60_000)
        shards = page.locator("table table", has_text="mmc4/docs_shard_0_v2.jsonl.zip")  # the markdown table, rendered
        expect(shards.first).to_be_attached(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "ui_sample_world.png")

        _open(page, ui + "/automation")
        for name in ("weekly_refilter", "raw_shard_sensor"):
            expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "ui_automation.png")
        browser.close()
    assert all((ARTIFACTS / f"ui_{name}.png").stat().st_size > 10_000 for name in
               ("asset_graph", "catalog", "sample_world", "automation"))
