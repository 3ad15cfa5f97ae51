"""The report as a person sees it: the page rendered by headless Chromium (Debian's `chromium` package) to a
screenshot, which must show the charts' curves in the runs' colours, not broken images or an empty page."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from finetune.report import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def screenshot(page: Path, png: Path, profile: Path, size: tuple[int, int] = (1400, 4200)) -> Path:
    """Render `page` headless to `png` (a fresh browser profile; no network is touched)."""
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
           f"--window-size={size[0]},{size[1]}", page.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return png


def _share_of_colour(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> float:
    pixels = (image[..., :3] * 255).round().astype(int)
    return float((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tol).mean())


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_page_renders_with_its_charts_in_chromium(tmp_path, wandb_run, plain_run):
    result = report([str(wandb_run), str(plain_run)], str(tmp_path / "report"), wandb=False, echo=lambda *a: None)
    png = screenshot(result.page, tmp_path / "page.png", tmp_path / "profile")
    image = mpimg.imread(png)
    assert image.shape[:2] == (4200, 1400)
    # matplotlib's first two colours (tab:blue, tab:orange) are run-a's and run-b's curves: the embedded charts
    # were decoded and drawn (a broken image would show neither), and the page is not blank.
    assert _share_of_colour(image, (31, 119, 180)) > 1e-3
    assert _share_of_colour(image, (255, 127, 14)) > 1e-3
    assert _share_of_colour(image, (255, 255, 255)) < 0.97
