"""A real headless Chromium for tests: load a page as a person's browser would and read back what it showed.

Debian's `chromium` is installed with apt-get when it is missing (CI runs as root with Debian's mirror); where
that cannot be done the test fails saying so, never skips. A page is loaded twice from a copy that carries two
scripts of the test's own: one first in <head> that records every error and console message into a list, one last
in <body> that, after the page's own script has run, measures each plot (its box, its drawn marks on every x
axis the page offers) and writes all of it into the DOM, which `--dump-dom` prints. The second load takes a
screenshot of the whole page at the height the first one measured, with the incident markers hidden so that what
is left coloured inside a plot is its data.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy
import pytest

WIDTH = 1400
# Installing waits for another apt-get (a helper or CI job on the machine) instead of failing on its lock.
APT = ["apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=600"]

HOOK = """<script>
window.__seen = [];
window.addEventListener("error", function (e) {
  __seen.push("uncaught: " + (e.message || ("failed to load " + (e.target.src || e.target.href))));
}, true);
window.addEventListener("unhandledrejection", function (e) { __seen.push("unhandled rejection: " + e.reason); });
["error", "warn", "log", "info"].forEach(function (level) {
  const original = console[level];
  console[level] = function () {
    __seen.push("console." + level + ": " + Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
});
</script>"""

PROBE = """<script>
(function () {
  const out = {seen: window.__seen, height: document.documentElement.scrollHeight, panels: {}, modes: {}, tips: 0};
  function marks() {
    const counts = {};
    document.querySelectorAll("figure.panel").forEach(function (f) {
      counts[f.id] = Array.prototype.filter.call(f.querySelectorAll(".chart svg path, .chart svg polygon, "
        + ".chart svg g[clip-path] circle"), function (e) {
          return (e.getAttribute("d") || e.getAttribute("points") || e.getAttribute("r") || "").length > 2;
        }).length;
    });
    return counts;
  }
  try {
    document.querySelectorAll("figure.panel").forEach(function (f) {  // a reader's hover and legend clicks
      const area = f.querySelector('.chart svg rect[fill="transparent"]');
      if (!area) return;
      const at = area.getBoundingClientRect();
      area.dispatchEvent(new MouseEvent("mousemove", {clientX: at.left + at.width / 2, clientY: at.top + 5}));
      const tip = f.querySelector(".tip");
      out.tips += tip && tip.style.display === "block" && tip.textContent.length > 0 ? 1 : 0;
      area.dispatchEvent(new MouseEvent("mouseleave"));
      const item = f.querySelector(".legend li");
      item.click();
      item.click();
    });
    const buttons = Array.prototype.slice.call(document.querySelectorAll("#xaxis button"));
    const first = buttons.filter(function (b) { return b.className === "on"; })[0];
    buttons.forEach(function (b) { b.click(); out.modes[b.dataset.mode] = marks(); });
    if (first) first.click();
    document.querySelectorAll("figure.panel").forEach(function (f) {
      const plot = f.querySelector(".chart svg clipPath rect");
      const svg = f.querySelector(".chart svg");
      if (!plot || !svg) { out.panels[f.id] = null; return; }
      const at = svg.getBoundingClientRect();
      out.panels[f.id] = [at.left + window.scrollX + +plot.getAttribute("x"),
        at.top + window.scrollY + +plot.getAttribute("y"), +plot.getAttribute("width"), +plot.getAttribute("height")];
    });
  } catch (e) {
    out.seen.push("probe: " + e.message);
  }
  document.body.setAttribute("data-probe", JSON.stringify(out));
})();
</script>"""


def chromium() -> str:
    """The path of Debian's chromium, installed first if missing; the calling test fails when it cannot be."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(
            "these tests render the report in headless Chromium: install Debian's `chromium` package "
            "(as root: apt-get install chromium)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}  # CI has no terminal for debconf to ask on
    install = subprocess.run([*APT, "install", "chromium"], capture_output=True, text=True, env=env)
    if install.returncode != 0:  # a fresh machine has no package lists yet, or old ones
        subprocess.run([*APT, "update"], capture_output=True, text=True, env=env)
        install = subprocess.run([*APT, "install", "chromium"], capture_output=True, text=True, env=env)
    found = shutil.which("chromium")
    if not found:
        tail = (install.stderr or install.stdout).strip().splitlines()[-3:]
        pytest.fail(f"`apt-get install chromium` failed, and the report tests need it: {' | '.join(tail)}")
    return found


@dataclass(frozen=True)
class Rendered:
    """What the browser showed: errors and console output, plot boxes, marks per x axis, and the screenshot."""

    seen: list[str]  # uncaught errors, failed loads and console messages, from the page's hook and from Chromium
    panels: dict[str, list[float] | None]  # figure id -> the plot area's box (x, y, width, height) in page pixels
    modes: dict[str, dict[str, int]]  # x axis -> figure id -> drawn lines, areas and points
    tips: int  # plots that showed their values under a hovering pointer
    dom: str
    screenshot: Path | None


def _run(binary: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-extensions",
        "--enable-logging=stderr",
        "--v=0",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: any request for another host fails, and is logged
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
        page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def render(page: Path, work: Path, screenshot: bool = True) -> Rendered:
    """Load `page` (a copy with the test's hook and probe, beside it) in headless Chromium and read it back."""
    binary = chromium()
    text = page.read_text(encoding="utf-8")
    copy = page.with_name(page.stem + ".probed.html")
    copy.write_text(text.replace("<head>", "<head>" + HOOK, 1).replace("</body>", PROBE + "</body>", 1), "utf-8")
    dumped = _run(binary, copy, work / "profile", f"--window-size={WIDTH},900", "--dump-dom")
    found = re.search(r'data-probe="([^"]*)"', dumped.stdout)
    assert found, f"the page never finished its script; Chromium said: {dumped.stderr[-2000:]}"
    probe = json.loads(html.unescape(found.group(1)))
    console = [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line]
    shot = None
    if screenshot:
        shot = work / "report.png"
        hidden = copy.read_text(encoding="utf-8").replace("</head>", "<style>g.markers{display:none}</style></head>", 1)
        copy.write_text(hidden, encoding="utf-8")
        taken = _run(binary, copy, work / "profile", f"--window-size={WIDTH},{probe['height']}", f"--screenshot={shot}")
        assert shot.is_file(), f"no screenshot; Chromium said: {taken.stderr[-2000:]}"
    seen = probe["seen"] + console
    return Rendered(seen, probe["panels"], probe["modes"], probe["tips"], html.unescape(dumped.stdout), shot)


def coloured_pixels(screenshot: Path, box: list[float]) -> tuple[int, float]:
    """(pixels of strong colour, standard deviation of brightness) inside `box` of the screenshot.

    The page's grid, axes and text are grey; the data are drawn in saturated colours.
    """
    from PIL import Image

    with Image.open(screenshot) as image:
        x, y, w, h = (round(v) for v in box)
        area = image.convert("RGB").crop((x + 1, y + 1, x + w - 1, y + h - 1))
        pixels = numpy.asarray(area, dtype=numpy.int16)
        strong = int((pixels.max(axis=2) - pixels.min(axis=2) > 60).sum())
        return strong, float(numpy.asarray(area.convert("L"), dtype=numpy.float64).std())
