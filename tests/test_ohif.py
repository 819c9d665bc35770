"""What a radiologist sees: the OHIF viewer in a real (headless) Chromium shows the node's SEG over the CT, and
lists the SR's measurements.

A CT phantom, compressed (JPEG Lossless SV1 by dcmtk, JPEG 2000 lossless by pydicom) as PACS store it, goes to
the node, which makes its SEG and SR and serves all three from its own DICOMweb
server.  One small HTTP server in this process serves the prebuilt OHIF viewer (`@ohif/app`'s dist/,
installed by tests/ohif/install.sh) with an app-config.js that has a single DICOMweb data source, and
reverse-proxies the node's DICOMweb root under the same origin (adding the viewer's bearer token), so
the browser needs no CORS and never sees a credential.

tests/ohif/drive.mjs (playwright-core driving Debian's /usr/bin/chromium, every request outside
127.0.0.1 refused) opens the study, loads the SEG the way a reader does (its thumbnail, double-click,
the viewer's own "load" prompt), reads the segmentation panel and screenshots the page.  The test
checks the panel lists Lungs and Bone and that the viewport shows them in their SEG colours of distinct hues.
Then it opens the SR, takes its measurements into the measurement panel (the viewer's "continue tracking?"),
clicks each one (the viewer jumps to its slice) and checks the panel lists one outline per segment, on the
image the SR draws it on, with the area the SR gives.  The phantom has two nodules, which the built-in detector's
SR gives as boxes: a second browser session opens that SR and checks the panel lists both, likewise.
Screenshots: test-artifacts/ohif-seg.png, ohif-sr.png and ohif-sr-nodules.png (ohif-failure.png on failure).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import numpy as np
import pydicom
import pytest
import requests
from conftest import dcmtk, free_port, storescu
from pydicom import uid

from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.phantoms.ct import PhantomGeometry
from dicom_ai_node.results.sr import OHIF_FREEHAND_OUTLINE, OHIF_RECTANGLE

REPO = Path(__file__).resolve().parent.parent
OHIF = Path(__file__).resolve().parent / "ohif"
VIEWER = OHIF / "viewer"  # @ohif/app's dist/, unpacked by tests/ohif/install.sh
DRIVER = OHIF / "drive.mjs"
PLAYWRIGHT = OHIF / "node_modules" / "playwright-core" / "package.json"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
SEGMENT_LABELS = ["Lungs", "Bone"]
TISSUE_SR, NODULES_SR = "builtin-ct-tissue measurements", "builtin-ct-lung-nodules findings"
NODULES = ((-70.0, -5.0, 10.0, 8.0), (75.0, 10.0, -30.0, 6.0))  # in the phantom's lungs: (x, y, z, radius) mm
PIXEL_MM = 3.0  # the body is outlined in the SR, not painted in the SEG
# What the measurement panel lists for the SR: one outline per segment, under its finding type.
MEASUREMENT_LABELS = ["Entire body", "Lung", "Bone"]

_missing = [
    reason
    for present, reason in [
        (CHROMIUM.exists(), f"{CHROMIUM} is missing (apt-get install -y chromium)"),
        ((VIEWER / "index.html").exists(), f"the OHIF viewer is missing at {VIEWER} (run tests/ohif/install.sh)"),
        (PLAYWRIGHT.exists(), f"playwright-core is missing under {OHIF} (run tests/ohif/install.sh)"),
        (shutil.which("node") is not None, "node is missing (apt-get install -y nodejs)"),
    ]
    if not present
]
# Skipped where the browser or the viewer is absent; in CI (CI=true), where scripts/test.sh installs both, a
# missing one is a failure rather than a silent skip.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(bool(_missing) and os.environ.get("CI") != "true", reason="; ".join(_missing)),
]


# --- the viewer's web server ------------------------------------------------------------------------------


def app_config(dicomweb_root: str) -> str:
    """OHIF's app-config.js with one DICOMweb data source at `dicomweb_root` (same origin as the viewer)."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "dicom-ai-node test PACS",
            "name": "dicomweb",
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "wadoUriRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "studyPrefetcher": {"enabled": False},
        "maxNumRequests": {"interaction": 100, "thumbnail": 10, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class DicomwebViewer:
    """OHIF's dist/ on a free loopback port, app-config.js generated, and a reverse proxy of `upstream`.

    `upstream` is the DICOMweb root of the PACS or of the node (http://127.0.0.1:PORT/dicom-web), and
    `upstream_headers` go with every proxied request (credentials stay out of the browser).  The
    proxy answers under the same path as the upstream (/dicom-web/...) and passes the browser's Host
    header on, so the absolute BulkDataURIs a server builds from Host come back through the proxy too.
    """

    def __init__(self, viewer_dir: Path, upstream: str, upstream_headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(upstream.rstrip("/"))
        assert parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost"), upstream
        self.viewer_dir = viewer_dir
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.prefix = parts.path or ""  # "/dicom-web"
        self.upstream_headers = upstream_headers or {}  # e.g. the node's {"Authorization": "Bearer ..."}
        assert self.prefix.startswith("/") and self.prefix != "/", "the DICOMweb root needs a path of its own"
        self.requests: list[tuple[str, int]] = []  # (path, status) of every proxied request, for failure reports
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="ohif-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def dicomweb_root(self) -> str:
        return self.url + self.prefix

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        viewer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: failures are reported from viewer.requests
                pass

            def do_GET(self) -> None:
                self._dispatch()

            def do_HEAD(self) -> None:
                self._dispatch()

            def do_POST(self) -> None:
                self._dispatch()

            def _dispatch(self) -> None:
                path = urlsplit(self.path).path
                try:
                    if path == viewer.prefix or path.startswith(viewer.prefix + "/"):
                        self._proxy()
                    else:
                        self._static(path)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the browser gave up on a request (navigation, cancelled prefetch)

            def _static(self, path: str) -> None:
                if path == "/app-config.js":
                    return self._send(200, "application/javascript", app_config(viewer.dicomweb_root).encode())
                file = (viewer.viewer_dir / path.lstrip("/")).resolve()
                if not file.is_relative_to(viewer.viewer_dir.resolve()) or not file.is_file():
                    if "." in path.rsplit("/", 1)[-1]:
                        return self._send(404, "text/plain", b"not found")
                    file = viewer.viewer_dir / "index.html"  # a route of the single-page app: /viewer, /
                self._send(200, _content_type(file), file.read_bytes())

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["X-Forwarded-Host"] = self.headers.get("Host", "")
                headers["X-Forwarded-Proto"] = "http"
                headers.update(viewer.upstream_headers)
                upstream = http.client.HTTPConnection(viewer.upstream_host, viewer.upstream_port, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                viewer.requests.append((self.path, response.status))
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "accept-encoding"}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "application/javascript", ".mjs": "application/javascript",
          ".css": "text/css", ".json": "application/json", ".wasm": "application/wasm", ".svg": "image/svg+xml",
          ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2", ".jsonc": "application/json"}


def _content_type(path: Path) -> str:
    return _TYPES.get(path.suffix, "application/octet-stream")


# --- the browser --------------------------------------------------------------------------------------------


def drive_viewer(viewer: DicomwebViewer, study_uid: str, seg_series_uid: str, screenshot: Path, sr: dict,
                 sr_only: bool = False, timeout: float = 300) -> dict:
    """Run tests/ohif/drive.mjs: open the study, load the SEG, read the panel, screenshot (unless `sr_only`); then
    open the SR described by `sr` ({description, count, screenshot}), take its measurements into the measurement
    panel, click each, screenshot.  Returns its JSON."""
    request = {
        "chromium": str(CHROMIUM),
        "url": f"{viewer.url}/viewer?StudyInstanceUIDs={study_uid}",
        "studyInstanceUID": study_uid,
        "segSeriesInstanceUID": seg_series_uid,
        "labels": SEGMENT_LABELS,
        "jumpTo": "Lungs",  # a click on a segment in the panel shows its middle slice
        "screenshot": str(screenshot),
        "sr": sr,
        "srOnly": sr_only,
        "failureScreenshot": str(screenshot.with_name("ohif-failure.png")),
        "timeoutMs": int(timeout * 1000) - 20_000,
    }
    started = time.monotonic()
    result = subprocess.run(["node", str(DRIVER), json.dumps(request)], capture_output=True, text=True,
                            timeout=timeout, cwd=OHIF, check=False)
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    report["seconds"] = round(time.monotonic() - started, 1)
    report["driver_log"] = result.stderr[-6000:]
    return report


# --- the data ---------------------------------------------------------------------------------------------


@pytest.fixture
def database_url(tmp_path) -> str:
    """SQLite only: the browser test is about what the viewer shows, not about the database."""
    return f"sqlite:///{tmp_path}/node.sqlite"


TOKEN = "ohif-viewer-test-token"


# How the CT reaches the node: compressed as PACS and scanners store it (the viewer then gets each frame's
# stored bitstream, PS3.18 §8.7), with the storescu option proposing that transfer syntax.
COMPRESSIONS = {
    "jpeg-lossless": (("dcmcjpeg", "+e1"), "-xs"),
    "jpeg-2000": ((uid.JPEG2000Lossless,), "-xv"),
}


def compress(files: list[Path], folder: Path, how: tuple) -> list[Path]:
    folder.mkdir()
    compressed = []
    for path in files:
        target = folder / path.name
        if how[0] == uid.JPEG2000Lossless:
            ds = pydicom.dcmread(path)
            ds.compress(uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
            ds.save_as(target, enforce_file_format=True)
        else:
            subprocess.run([dcmtk(how[0]), *how[1:], str(path), str(target)], check=True, capture_output=True)
        compressed.append(target)
    return compressed


@pytest.fixture(params=list(COMPRESSIONS))
def processed_study(request, node_factory, tmp_path) -> dict:
    """A compressed CT the node received and processed, served by the node's own DICOMweb with its SEG and SR."""
    web_port = free_port()
    node = node_factory(
        workers={"processes": 1},
        models={"ct-tissue": {"kind": "builtin"}, "nodules": {"kind": "builtin", "model": "ct-lung-nodules"}},
        routes=[{"name": "ct", "modality": "CT", "min_slices": 3, "models": ["ct-tissue", "nodules"]}],
        web={"enabled": True, "port": web_port,
             "clients": [{"name": "ohif", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "write": False}]},
    )
    node.start()
    phantom = CTPhantom(slices=40, rows=128, columns=128, pixel_spacing=(PIXEL_MM, PIXEL_MM),
                        slice_spacing=5.0, geometry=PhantomGeometry(nodules=NODULES))
    how, option = COMPRESSIONS[request.param]
    files = compress(phantom.write(tmp_path / "ct"), tmp_path / request.param, how)
    sent = storescu(node.port, *files, extra=["-R", option])
    assert sent.returncode == 0, sent.stderr
    node.wait_for(lambda: len(node.json("jobs", "--state", "done")) == 2 or None, timeout=180,
                  what="SEG and SRs made")
    root = f"http://127.0.0.1:{web_port}/dicom-web"
    series = requests.get(f"{root}/studies/{phantom.study_uid}/series", timeout=10,
                          headers={"Authorization": f"Bearer {TOKEN}"}).json()
    by_modality = {item["00080060"]["Value"][0]: item["0020000E"]["Value"][0] for item in series
                   if item["00080060"]["Value"][0] != "SR"}
    srs = {}
    for item in series:
        if item["00080060"]["Value"][0] == "SR":
            (sr_file,) = (node.storage / phantom.study_uid / item["0020000E"]["Value"][0]).glob("*.dcm")
            sr = pydicom.dcmread(sr_file)
            srs[sr.SeriesDescription] = sr
    assert set(by_modality) >= {"CT", "SEG"} and set(srs) == {TISSUE_SR, NODULES_SR}, \
        f"the node serves {sorted(by_modality)} and the SRs {sorted(srs)}"
    return {"study": phantom.study_uid, "ct": by_modality["CT"], "seg": by_modality["SEG"], "dicomweb": root,
            "srs": srs, "storage": node.storage / phantom.study_uid}


# --- the test -----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _browser_prerequisites() -> None:
    """Reached with something missing only in CI (see pytestmark): fail before any server starts."""
    if _missing:
        pytest.fail("; ".join(_missing))


def test_ohif_shows_the_seg_over_the_ct(processed_study):
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot, sr_screenshot = ARTIFACTS / "ohif-seg.png", ARTIFACTS / "ohif-sr.png"
    nodules_screenshot = ARTIFACTS / "ohif-sr-nodules.png"
    for stale in (screenshot, sr_screenshot, nodules_screenshot, ARTIFACTS / "ohif-failure.png"):
        stale.unlink(missing_ok=True)

    # The token stays in the test's proxy; the browser never sees it.
    with DicomwebViewer(VIEWER, processed_study["dicomweb"], {"Authorization": f"Bearer {TOKEN}"}) as viewer:
        report = drive_viewer(viewer, processed_study["study"], processed_study["seg"], screenshot,
                              {"description": TISSUE_SR, "count": 3, "screenshot": str(sr_screenshot)})
        nodules = drive_viewer(viewer, processed_study["study"], processed_study["seg"], screenshot,
                               {"description": NODULES_SR, "count": len(NODULES),
                                "screenshot": str(nodules_screenshot)}, sr_only=True)

    failed = [f"{status} {path}" for path, status in viewer.requests if status >= 400]
    context = (f"\ndriver: {json.dumps({k: v for k, v in report.items() if k != 'driver_log'}, indent=1)}"
               f"\nDICOMweb errors: {failed[:20]}\ndriver log:\n{report['driver_log']}"
               f"\nscreenshot on failure: {ARTIFACTS / 'ohif-failure.png'}")
    assert report.get("ok"), f"the viewer did not show the SEG: {report.get('error')}{context}"
    assert set(SEGMENT_LABELS) <= set(report["segmentLabels"]), \
        f"the segmentation panel lists {report['segmentLabels']}, the viewer holds {report.get('serviceSegments')}"
    assert screenshot.exists(), context

    overlay = overlay_pixels(screenshot, report["viewport"])
    summary = f"{overlay}\nscreenshot: {screenshot}"
    assert overlay["body_pixels"] >= 20_000, f"no CT in the viewport (black: its frames were not decoded): {summary}"
    assert overlay["overlay_fraction"] <= 0.6, f"the overlay covers the body, not lungs and bone: {summary}"
    for rgb, drawn in overlay["recommended_colour_pixels"].items():
        assert drawn >= 100, f"segment colour {rgb} (the SEG's recommended one) is not drawn: {summary}"
    hues = {_hue(rgb) for rgb, _ in overlay["flat_colours"]}
    assert len(hues) >= 2, f"the segments are not filled in distinct hues: {summary}"

    measurements = {m["finding"]: m for m in report["measurements"]}
    assert sorted(measurements) == sorted(MEASUREMENT_LABELS), \
        f"the measurement panel lists {sorted(measurements)}, not one outline per segment{context}"
    instance_numbers = {path.stem: int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber)
                        for path in (processed_study["storage"] / processed_study["ct"]).glob("*.dcm")}
    outlines = sr_regions(processed_study["srs"][TISSUE_SR], OHIF_FREEHAND_OUTLINE)
    assert_listed(report, outlines, "PlanarFreehandROI", instance_numbers)
    assert sr_screenshot.exists(), context

    # The detector's SR: each nodule in the panel as a rectangle, on the image nearest its centre.
    context = f"\ndriver: {json.dumps({k: v for k, v in nodules.items() if k != 'driver_log'}, indent=1)}"
    assert nodules.get("ok"), f"the viewer did not list the nodules: {nodules.get('error')}{context}"
    boxes = sr_regions(processed_study["srs"][NODULES_SR], OHIF_RECTANGLE)
    assert [m["finding"] for m in nodules["measurements"]] == ["Nodule"] * len(NODULES), context
    assert_listed(nodules, boxes, "RectangleROI", instance_numbers)


def assert_listed(report: dict, regions: dict[str, list[tuple[float, str]]], tool: str,
                  instance_numbers: dict[str, int]) -> None:
    """Each measurement the panel lists is one of the SR's regions (by finding), drawn by `tool` on the image the SR
    names, with the area of the SR's region; a click on it showed that image (after the driver scrolled away)."""
    unmatched = {finding: list(found) for finding, found in regions.items()}
    for row, measurement in enumerate(report["measurements"]):
        assert measurement["toolName"] == tool, measurement
        shown = float(measurement["primary"][0].split()[0].replace(",", ""))
        candidates = unmatched.get(measurement["finding"], [])
        match = next(((area, source) for area, source in candidates
                      if source in measurement["referencedImageId"] and shown == pytest.approx(area, rel=0.01)), None)
        assert match is not None, f"{measurement} is none of the SR's {candidates}"
        candidates.remove(match)
        slice_shown = report["measurementSlices"][row]
        assert slice_shown.startswith(f"I:{instance_numbers[match[1]]} "), \
            f"a click on {measurement['finding']} shows {slice_shown}, not the image its region is drawn on"
    assert not any(unmatched.values()), f"not listed: {unmatched}"
    assert report["sliceBeforeMeasurements"] not in report["measurementSlices"], f"the viewer did not scroll: {report}"


def sr_regions(sr: pydicom.Dataset, tracking_identifier: str) -> dict[str, list[tuple[float, str]]]:
    """Finding type -> [(area in mm2 enclosed, SOP Instance UID of the image it is drawn on)] of the SR's regions
    (outlines, boxes) in the groups named `tracking_identifier`, the area computed from the SR's polyline."""
    import highdicom as hd

    from dicom_ai_node.results.contours import polygon_area

    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    regions: dict[str, list[tuple[float, str]]] = {}
    for group in report.get_image_measurement_groups():
        if group.tracking_identifier == tracking_identifier:
            (first, *_) = group.get_measurements()
            (scoord,) = first.referenced_coordinates
            source = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            area_pixels = polygon_area(np.asarray(scoord.value))
            regions.setdefault(group.finding_type.meaning, []).append((area_pixels * PIXEL_MM**2, source))
    return regions


def _hue(rgb: tuple[int, int, int]) -> int:
    """The hue of a colour in 30-degree steps: fills of one segment over different grey levels share it."""
    import colorsys

    return round(colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 12) % 12


# The SEG's RecommendedDisplayCIELabValue, as RGB (dicom_ai_node/inference/builtin.py): lungs, bone.
RECOMMENDED_RGB = [(0, 130, 200), (255, 225, 25)]


def overlay_pixels(png: Path, box: dict) -> dict:
    """What the viewport shows, from the screenshot's pixels.

    The CT is drawn in grey, so inside the body (the non-black pixels of the viewport, its margins with
    OHIF's text left out) a coloured pixel is overlay.  Segments are filled flat, so each shows up as
    one exact colour covering many pixels: `flat_colours` are the coloured ones with >= 1000 pixels.
    OHIF draws outlines at full opacity, so the SEG's recommended colours themselves appear too.
    """
    from PIL import Image

    image = Image.open(png).convert("RGB")
    scale = image.width / box["pageWidth"]
    inset_x, inset_y = box["width"] * 0.12, box["height"] * 0.12
    region = [int((box["x"] + inset_x) * scale), int((box["y"] + inset_y) * scale),
              int((box["x"] + box["width"] - inset_x) * scale), int((box["y"] + box["height"] - inset_y) * scale)]
    counts: dict[tuple[int, int, int], int] = {}
    crop = image.crop(region)
    for pixel in crop.get_flattened_data() if hasattr(crop, "get_flattened_data") else crop.getdata():
        if max(pixel) >= 30:  # black is outside the body
            counts[pixel] = counts.get(pixel, 0) + 1
    body = sum(counts.values())
    coloured = {rgb: n for rgb, n in counts.items() if max(rgb) - min(rgb) >= 12}
    recommended = {ref: sum(n for rgb, n in coloured.items() if sum((a - b) ** 2 for a, b in zip(rgb, ref)) <= 64)
                   for ref in RECOMMENDED_RGB}
    return {
        "body_pixels": body,
        "overlay_fraction": round(sum(coloured.values()) / body, 3) if body else 0.0,
        "flat_colours": sorted(((rgb, n) for rgb, n in coloured.items() if n >= 1000), key=lambda item: -item[1]),
        "recommended_colour_pixels": recommended,
        "region": region,
    }
