"""--status --html FILE: the status page of a finished pipeline, rendered in headless Chromium."""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import struct
import subprocess
import urllib.request
import zlib

import pytest

pytestmark = pytest.mark.e2e

FOLDERS = ("Photos", "Tom & Jerry", "<script>alert(1)", "Ünïcode")


def chromium() -> str:
    tool = shutil.which("chromium") or shutil.which("chromium-browser")
    if tool:
        return tool
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is missing: .ci/run must install it (apt-get install -y chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); in CI this test fails instead")


def render(tool: str, page: str, tmp: str, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on the file, with a profile of its own (tests may run side by side)."""
    argv = [tool, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp}/chromium-profile",
            *args, "file://" + page]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp)


class FolderCells(html.parser.HTMLParser):
    """The text of every ``<span class="folder">`` and the tags of the DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.folders: list[str] = []
        self.tags: set[str] = set()
        self._in = False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self._in = tag == "span" and ("class", "folder") in attrs
        if self._in:
            self.folders.append("")

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.folders[-1] += data


def png_pixels(path: str) -> set[bytes]:
    """The distinct pixels of an 8-bit RGB or RGBA PNG (standard library only: zlib, struct)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6), f"unexpected PNG format depth={depth} colour={colour}"
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * channels
    pixels: set[bytes] = set()
    prev = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b, c = prev[x], prev[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels.update(bytes(line[i:i + channels]) for i in range(0, stride, channels * 7))
        prev = line
    return pixels


def test_status_page_renders_every_folder(env):
    tool = chromium()
    for i, name in enumerate(FOLDERS):
        os.makedirs(os.path.join(env.source, name))
        for j in range(3):
            with open(os.path.join(env.source, name, f"f{j}.txt"), "wb") as fh:
                fh.write(os.urandom(200 + 50 * i + j))
    with open(os.path.join(env.source, "top.txt"), "wb") as fh:
        fh.write(b"a file directly in SOURCE")
    for script in ("master_mapper.py", "python_zipper.py", "python_unzipper.py"):
        proc = env.run(script)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-3000:]}"

    page = os.path.join(env.tmp, "status.html")
    proc = env.run("python_unzipper.py", "--status", "--html", page, SOURCE="", DESTINATION="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "status page written" in proc.stderr
    text = open(page, encoding="utf-8").read()
    assert "http" not in text.lower() and env.vars["AWS_SECRET_ACCESS_KEY"] not in text
    assert env.endpoint.split("//")[1] not in text
    beats = [k for k in env.objects() if k.startswith(f"{env.prefix}_status/") and k.count("/") == 3]
    assert len(beats) == 3, beats  # one worker of each stage
    for key in beats:
        beat = json.loads(env.get(key))
        assert 2 <= len(beat["history"]) <= 288 and beat["history"][-1][1] >= beat["history"][0][1]

    dom = render(tool, page, env.tmp, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    cells = FolderCells()
    cells.feed(dom.stdout)
    assert sorted(cells.folders) == sorted([*FOLDERS, "(files directly in SOURCE)"]), cells.folders
    assert "script" not in cells.tags
    assert "svg" in cells.tags or "no throughput history" in dom.stdout

    shot = os.path.join(env.tmp, "status.png")
    proc = render(tool, page, env.tmp, f"--screenshot={shot}", "--window-size=800,1200", "--hide-scrollbars")
    assert proc.returncode == 0 and os.path.getsize(shot) > 0, proc.stderr[-2000:]
    assert len(png_pixels(shot)) > 20  # text, bars and table lines: a blank page is one colour

    # migrate.py passes --status --html FILE through; --html alone is refused, naming it.
    other = os.path.join(env.tmp, "migrate.html")
    proc = env.run("migrate.py", "--status", "--html", other, SOURCE="", DESTINATION="")
    assert proc.returncode == 0 and os.path.getsize(other) > 0, proc.stderr[-2000:]
    proc = env.run("python_zipper.py", "--html", other)
    assert proc.returncode == 2 and "--html FILE is accepted only with --status" in proc.stderr


def test_status_html_publishes_the_page_behind_a_presigned_link(env):
    os.makedirs(os.path.join(env.source, "Tom & Jerry"))
    with open(os.path.join(env.source, "Tom & Jerry", "a.txt"), "wb") as fh:
        fh.write(b"some bytes")
    assert env.run("master_mapper.py").returncode == 0
    proc = env.run("python_zipper.py", STATUS_HTML="1", STATUS_LINK_HOURS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    links = re.findall(r"status page: (\S+) \(anyone holding this link can read the page for 1 h", proc.stderr)
    assert len(links) == 1, proc.stderr[-3000:]  # once per run, not once per heartbeat
    url = links[0]
    assert url.startswith(env.endpoint + "/") and "X-Amz-Expires=3600" in url and "X-Amz-Signature=" in url
    assert env.vars["AWS_SECRET_ACCESS_KEY"] not in proc.stderr
    with urllib.request.urlopen(url, timeout=30) as resp:  # moto on 127.0.0.1, no credentials sent
        assert resp.headers["Content-Type"].startswith("text/html")
        page = resp.read().decode()
    assert "Tom &amp; Jerry" in page and "http" not in page.lower()
