"""The pages in a real browser (Debian's Chromium, headless, through Playwright): every kind of page from a tiny
pipeline opens from file:// with no network request outside its folder, the 3D viewer draws, tables sort, samples
show their conditions, and NiiVue places each volume with its file's affine."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

from medldm.data.dataset import read_manifest
from medldm.view import write_page

from .conftest import train_age_range

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# software WebGL: CI machines have no GPU and no display
ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
        "--disable-background-networking", "--disable-component-update", "--no-first-run"]
SHOTS = Path(__file__).parents[1] / ".pytest_cache" / "view-screenshots"  # looked at by hand; not kept in git


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs it): page tests skipped")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]'): page tests skipped")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def pipeline(dataset, ae_run, ldm_run, tmp_path_factory):
    """A tiny pipeline's folders, copied (the session's runs stay as they were), with a page each and an index.

    The dataset copy has a failed scan (flags first) and its test scans on the reference grid, as a registered
    dataset's scans are: a sample then overlays a real scan of its age voxel for voxel."""
    from medldm.config import load_config
    from medldm.data.dataset import read_dataset_info, read_manifest
    from medldm.data.io import load_volume, save_volume
    from medldm.evaluation.report import evaluate
    from medldm.inference.sample import sample_run

    root = tmp_path_factory.mktemp("pages")
    data = root / "dataset"
    shutil.copytree(dataset, data)
    summary = (data / "qc" / "summary.csv").read_text().splitlines()
    status = summary[0].split(",").index("qc_status")
    failed = summary[2].split(",")
    failed[status] = "fail"
    (data / "qc" / "summary.csv").write_text("\n".join([summary[0], summary[1], ",".join(failed), *summary[3:]]) + "\n")
    reference = np.asarray(read_dataset_info(data)["reference"]["affine"])
    for row in read_manifest(data):
        if row["split"] == "test":
            save_volume(data / row["image"], load_volume(data / row["image"])[0], reference)
    shutil.copytree(ae_run, root / "autoencoder", ignore=shutil.ignore_patterns("latents"))
    shutil.copytree(ldm_run, root / "diffusion")
    age = min(train_age_range(data)) + 1
    sample_run(ldm_run, root / "samples", num=2, steps=2, conditions={"age": f"{age}", "sex": "F"})
    evaluate(data, root / "report", load_config("evaluate"), samples=root / "samples")
    pages = write_page(root, data_dir=data)  # the copy, not the dataset the runs were trained on
    return {"root": root, "age": age, "failed": failed[0], "pages": pages}


class Page:
    """One page in the browser, with every request it makes."""

    def __init__(self, browser, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1000, "height": 720})
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)

    def wait_for_viewer(self, opened: int = 1) -> dict:
        self.page.wait_for_function(f"() => window.medldmViewer.state().loaded >= {opened} "
                                    "|| window.medldmViewer.state().error", timeout=30000)
        self.page.wait_for_timeout(500)  # a frame after the last volume
        state = self.page.evaluate("window.medldmViewer.state()")
        assert state["error"] is None, state["error"]
        return state

    def canvases(self, name: str = "") -> list[np.ndarray]:
        """The viewer panels' canvases as RGB arrays, cut from one screenshot of the page (one screenshot per canvas
        costs seconds each under software WebGL); the screenshot is kept for a person to look at."""
        png = self.page.screenshot()
        if name:
            SHOTS.mkdir(parents=True, exist_ok=True)
            (SHOTS / f"{name}.png").write_bytes(png)
        rgb = iio.imread(io.BytesIO(png))[..., :3]
        scale = rgb.shape[1] / self.page.viewport_size["width"]
        out = []
        for box in self.page.eval_on_selector_all("#viewer canvas", "(cs) => cs.filter((c) => c.isConnected)"
                                                  ".map((c) => c.getBoundingClientRect().toJSON())"):
            x0, y0 = int(box["x"] * scale), int(box["y"] * scale)
            out.append(rgb[y0 : y0 + int(box["height"] * scale), x0 : x0 + int(box["width"] * scale)])
        return out

    def close(self, allowed: str) -> None:
        self.page.close()
        assert not self.errors, self.errors
        outside = [u for u in self.requests if not u.startswith(allowed)]
        assert not outside, f"requests outside {allowed}: {outside}"


def drawn(rgb: np.ndarray) -> bool:
    """A canvas with a volume on it: many pixels off the black background, in many grey levels (a blank or
    single-colour canvas has neither)."""
    grey = rgb.mean(axis=2)
    return (grey > 20).mean() > 0.03 and len(np.unique(grey.round())) > 30 and grey.std() > 10


def column(page, key: str) -> list[str]:
    index = page.page.eval_on_selector_all("thead th", "(hs, key) => hs.findIndex((h) => h.dataset.key === key)", key)
    return page.page.eval_on_selector_all(f"tbody tr td:nth-child({index + 1})",
                                          "(tds) => tds.map((t) => t.textContent)")


def test_dataset_page_sorts_flags_first_and_draws_a_scan(browser, pipeline):
    root = pipeline["root"]
    p = Page(browser, (root / "dataset" / "index.html").as_uri())
    assert column(p, "image")[0] == pipeline["failed"]  # flags first
    p.page.click('th[data-key="foreground_ml"]')
    values = [float(v) for v in column(p, "foreground_ml")]
    assert values == sorted(values) and len(set(values)) > 1
    p.page.click('th[data-key="foreground_ml"]')
    assert [float(v) for v in column(p, "foreground_ml")] == sorted(values, reverse=True)
    p.page.click('th[data-key="subject_id"]')
    subjects = column(p, "subject_id")
    assert subjects == sorted(subjects)
    assert p.page.locator("canvas").count() == 0  # the viewer starts at the first click
    p.page.locator("tbody tr").first.click()
    state = p.wait_for_viewer()
    (canvas,) = p.canvases("dataset")
    assert drawn(canvas), "the viewer's canvas is blank"
    image = state["panels"][0]["label"]
    volume = state["panels"][0]["volumes"][0]
    expected = nib.load(root / "dataset" / image)
    assert volume["dims"] == list(expected.shape)
    np.testing.assert_allclose(volume["affine"], expected.affine, atol=1e-3)  # NiiVue reads the file's geometry
    assert p.page.url.endswith("#open=" + urllib.parse.quote(image, safe="")), "the address bar links to the scan"
    p.close(allowed=(root / "dataset").as_uri() + "/")
    wanted = next(r["image"] for r in read_manifest(root / "dataset") if r["image"] != image)
    linked = Page(browser, (root / "dataset" / "index.html").as_uri() + "#open=" + urllib.parse.quote(wanted, safe=""))
    state = linked.wait_for_viewer()  # a shared link opens that scan, with no click
    assert state["panels"][0]["label"] == wanted
    linked.close(allowed=(root / "dataset").as_uri() + "/")


def test_samples_page_lists_conditions_and_shows_a_sample_beside_and_over_real_scans(browser, pipeline):
    root, age = pipeline["root"], pipeline["age"]
    p = Page(browser, (root / "samples" / "index.html").as_uri())
    cards = p.page.locator(".card")
    assert cards.count() == 2
    text = cards.first.inner_text()
    assert f"age {age:g}" in text and "sex F" in text and "nearest training" in text
    cards.first.click()
    state = p.wait_for_viewer()
    labels = [panel["label"] for panel in state["panels"]]
    assert len(labels) == 3 and "nearest training volume" in labels[1] and "real test scan like it" in labels[2]
    panels = p.canvases("samples")
    assert len(panels) == 3 and all(drawn(c) for c in panels), "a viewer panel is blank"
    sample = nib.load(root / "samples" / "sample_0000.nii.gz")
    np.testing.assert_allclose(state["panels"][0]["volumes"][0]["affine"], sample.affine, atol=1e-3)
    p.page.select_option("#viewer select", "overlay")
    state = p.wait_for_viewer(opened=2)
    (panel,) = state["panels"]
    under, over = panel["volumes"]  # the sample, then the real scan over it
    assert over["opacity"] == pytest.approx(0.45) and over["dims"] == under["dims"]
    np.testing.assert_allclose(over["affine"], under["affine"], atol=1e-3)  # the same world grid: an exact overlay
    (rgb,) = p.canvases("samples-overlay")
    assert drawn(rgb) and (rgb[..., 0].astype(int) - rgb[..., 1] > 40).mean() > 0.01, "no red overlay drawn"
    p.close(allowed=(root / "samples").as_uri() + "/")


def test_run_pages_show_curves_and_previews(browser, pipeline):
    root = pipeline["root"]
    p = Page(browser, (root / "autoencoder" / "index.html").as_uri())
    tags = p.page.eval_on_selector_all(".curve", "(cs) => cs.map((c) => c.dataset.tag)")
    assert tags[0] == "train/loss" and any(t.startswith("val/") for t in tags)
    assert p.page.locator('.curve[data-tag="train/loss"] svg path').count() == 2  # logged and smoothed
    slider = p.page.locator('input[type="range"]').first
    first, last = slider.get_attribute("min"), slider.get_attribute("max")
    assert int(last) >= 1  # more than one preview over time
    image = p.page.locator(".previews img").first
    at_end = image.get_attribute("src")
    slider.fill(first)
    assert image.get_attribute("src") != at_end
    SHOTS.mkdir(parents=True, exist_ok=True)
    p.page.screenshot(path=str(SHOTS / "run.png"), full_page=True)
    p.close(allowed=(root / "autoencoder").as_uri() + "/")


def test_evaluation_page_shows_verdicts_and_each_sample_beside_its_nearest(browser, pipeline):
    root = pipeline["root"]
    p = Page(browser, (root / "report" / "index.html").as_uri())
    questions = p.page.eval_on_selector_all("h2", "(hs) => hs.map((h) => h.textContent)")
    assert "Verdicts" in questions
    verdicts = p.page.locator("table").first.inner_text()
    assert "Are the samples brains?" in verdicts and "Are they copies?" in verdicts
    row = p.page.locator("tbody tr", has_text="sample_0000").first
    row.click()
    state = p.wait_for_viewer()
    assert len(state["panels"]) == 2 and "nearest training volume" in state["panels"][1]["label"]
    assert all(drawn(c) for c in p.canvases("evaluation"))
    p.close(allowed=(root / "report").as_uri() + "/")


def test_index_page_links_every_page(browser, pipeline):
    root = pipeline["root"]
    p = Page(browser, (root / "index.html").as_uri())
    links = p.page.eval_on_selector_all("a[href$='index.html']", "(as) => as.map((a) => a.getAttribute('href'))")
    assert sorted(links) == sorted(f"{d}/index.html" for d in ("autoencoder", "dataset", "diffusion", "report",
                                                                "samples"))
    p.close(allowed=root.as_uri() + "/")


def test_served_page_reads_volumes_from_their_files(browser, pipeline):
    root = pipeline["root"]
    server = subprocess.Popen([sys.executable, "-m", "medldm", "view", str(root / "dataset"), "--max-volumes", "0",
                               "--serve", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = ""
        for line in server.stdout:
            if line.startswith("serving"):
                url = line.split(" at ")[1].split()[0]
                break
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        root_url = url[:url.index("/", len("http://"))] + "/index.html"  # another user of the node, without the path
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(root_url, timeout=10)
        p = Page(browser, url + "index.html")
        notes = p.page.locator(".warning").all_inner_texts()
        assert any("--max-volumes 0" in n for n in notes)  # nothing embedded ...
        p.page.locator("tbody tr").first.click()
        p.wait_for_viewer()  # ... yet served, every scan opens from its own file
        assert all(drawn(c) for c in p.canvases())
        assert any(u.endswith(".nii.gz") for u in p.requests)
        p.close(allowed=url)
        local = Page(browser, (root / "dataset" / "index.html").as_uri())  # the same page from file://
        local.page.locator("tbody tr").first.click()  # nothing embedded: a row is no link to a viewer that fails
        assert local.page.evaluate("getComputedStyle(document.querySelector('tbody tr')).cursor") != "pointer"
        assert local.page.locator("#viewer canvas").count() == 0
        local.close(allowed=root.as_uri() + "/")
    finally:
        server.terminate()
        server.wait(timeout=10)
