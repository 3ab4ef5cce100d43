"""`oomguard report DIR --html FILE` of a real demo run (injected OOM and NaN), rendered by a real headless
Chromium started here: every chart is drawn (each SVG's polylines have real coordinates in the DOM
Chromium built), the screenshot is not blank, and the page references nothing outside itself.

Chromium comes from Debian's `chromium` package (.ci/run installs it). Without it the test skips, except
under CI (env CI set), where it fails.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from _shared import shared_demo

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STEP_CHARTS = ("memory", "loss", "learning_rate", "grad_norm")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND")

pytestmark = pytest.mark.slow


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is missing on CI: .ci/run installs it (apt-get install -y chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def browse(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A real `oomguard demo` run (default 24 steps), started outside the checkout: the one test_demo.py
    checks, shared (one demo run per test session)."""
    code, stderr, rd = shared_demo(tmp_path_factory)
    assert code == 0, stderr[-3000:]
    return rd


@pytest.fixture(scope="module")
def page(demo_run) -> Path:
    out = demo_run.parent / "report.html"
    r = subprocess.run([sys.executable, "-m", "oomguard", "report", str(demo_run), "--html", str(out)],
                       capture_output=True, text=True, check=False, timeout=120, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("oomguard: run finished after 3 attempts, 2 recoveries")  # the summary stays
    assert f"HTML report written to {out}" in r.stderr
    return out


class Dom(HTMLParser):
    """Per chart: the drawn series (polyline points, circles), bars, marks; and every URL-bearing attribute."""

    def __init__(self):
        super().__init__()
        self.charts: dict[str, dict[str, list]] = {}
        self.current: str | None = None
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.refs += [f"{k}={v}" for k, v in attrs if k in ("src", "href", "xlink:href", "action", "srcset") and v]
        if tag == "svg" and "chart" in (a.get("class") or ""):
            self.current = a["id"]
            self.charts[self.current] = {"lines": [], "rects": [], "marks": 0}
            return
        if self.current is None:
            return
        chart = self.charts[self.current]
        if tag == "polyline" and a.get("class") == "series":
            chart["lines"].append([tuple(map(float, p.split(","))) for p in a["points"].split()])
        elif tag == "g" and "mark" in (a.get("class") or ""):
            chart["marks"] += 1
        elif tag == "rect" and a.get("width"):
            chart["rects"].append(float(a["width"]))

    def handle_endtag(self, tag):
        if tag == "svg":
            self.current = None


def test_every_chart_is_drawn_in_chromium(page, tmp_path):
    r = browse(page, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=2000")
    assert r.returncode == 0 and "</html>" in r.stdout, r.stderr[-2000:]
    dom = Dom()
    dom.feed(r.stdout)
    assert set(dom.charts) == {*STEP_CHARTS, "timeline"}, dom.charts.keys()
    for name in STEP_CHARTS:
        chart = dom.charts[name]
        assert chart["lines"], f"{name}: no series drawn"
        for points in chart["lines"]:
            assert len(points) >= 2 and all(math.isfinite(x) and math.isfinite(y) for x, y in points), name
            assert len({x for x, _ in points}) == len(points), f"{name}: points do not advance along x"
        want = 3 if name == "memory" else 4  # memory marks the OOM only, the others the NaN too
        assert chart["marks"] >= want, f"{name}: want 2 rung rules and the failure points, got {chart['marks']}"
    loss = dom.charts["loss"]["lines"]
    assert len(loss) >= 3, "loss: one line per attempt (3 attempts)"
    assert len([w for w in dom.charts["timeline"]["rects"] if w > 1]) >= 3, "timeline: a bar per attempt"


def test_the_page_references_nothing_outside_itself(page, tmp_path):
    text = page.read_text()
    dom = Dom()
    dom.feed(text)
    assert dom.refs == [] and not ({"script", "link", "img", "iframe", "object", "embed"} & dom.tags)
    assert not re.search(r"(?i)(https?:|ftp:)//|url\(|@import", text)


def test_the_screenshot_shows_the_plots(page, tmp_path):
    shot = tmp_path / "report.png"
    r = browse(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1100,2400")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    image = pytest.importorskip("PIL.Image").open(shot).convert("RGB")
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    for hex_colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):  # attempts 1-3 (loss, lr, grad norm)
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        assert rgb in colours, f"{hex_colour} not drawn"


def test_html_to_stdout(demo_run):
    r = subprocess.run([sys.executable, "-m", "oomguard", "report", str(demo_run), "--html", "-"],
                       capture_output=True, text=True, check=False, timeout=120, cwd=ROOT, env=ENV)
    assert r.returncode == 0 and r.stdout.startswith("<!DOCTYPE html>") and r.stdout.rstrip().endswith("</html>")


def test_a_run_without_the_guard_gets_its_timeline_and_an_unwritable_file_is_exit_2(tmp_path):
    fake, policy = ROOT / "tests/integration/fake_child.py", ROOT / "tests/integration/policies/fast.yaml"
    rd = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(rd),
                        "--quiet", "--", sys.executable, str(fake), "--oom_over", "1024", "--max_steps", "4",
                        "--fail_at", "2"], capture_output=True, text=True, check=False, timeout=120, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "sub" / "r.html"  # a missing folder is made
    r = subprocess.run([sys.executable, "-m", "oomguard", "report", str(rd), "--json", "--html", str(out)],
                       capture_output=True, text=True, check=False, timeout=120, cwd=ROOT, env=ENV)
    assert r.returncode == 0 and r.stdout.lstrip().startswith("{"), r.stderr  # --json still prints the document
    dom = Dom()
    dom.feed(out.read_text())
    assert set(dom.charts) == {"timeline"} and len(dom.charts["timeline"]["rects"]) >= 2
    (tmp_path / "file").write_text("")
    r = subprocess.run([sys.executable, "-m", "oomguard", "report", str(rd), "--html", str(tmp_path / "file" / "x")],
                       capture_output=True, text=True, check=False, timeout=120, cwd=ROOT, env=ENV)
    assert r.returncode == 2 and "oomguard: error: --html" in r.stderr and "Traceback" not in r.stderr
