"""WADO-RS rendered and thumbnail resources (PS3.18 §10.4.1.1.3-4, §8.3.5.1) against a real node over HTTP,
with requests and with dicomweb-client: exact 8-bit values of PNG renders from the phantom's known HU,
uncompressed and JPEG-lossless alike, MONOCHROME1, RGB and YBR, multi-frame, SEG, and what is refused."""

from __future__ import annotations

import copy
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from conftest import NodeProcess, dcmtk, storescu
from dicomweb_client.api import DICOMwebClient
from orthanc import orthanc_servers
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array
from pydicom.sr.codedict import codes
from pydicom.uid import (
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from test_web import AUTH, dicomweb, parts_of, stow, web_settings

from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.phantoms.ct import RESCALE_INTERCEPT


def _phantom(**kwargs) -> CTPhantom:
    """64x64 slices with noise, so that windows map many distinct HU values."""
    return CTPhantom(slices=4, rows=64, columns=64, pixel_spacing=(5.0, 5.0), slice_spacing=5.0, noise_hu=60.0,
                     **kwargs)


def stored_hu(phantom: CTPhantom, index: int) -> np.ndarray:
    """The HU a slice holds once stored (12 bits, so air noise below -1024 is clipped), the renders' truth."""
    return phantom.stored_values(index).astype(np.int32) + RESCALE_INTERCEPT


def linear_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 onto 0..255, written out from the standard independently of the node's code."""
    y = ((hu - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(hu <= center - 0.5 - (width - 1) / 2, 0, np.where(hu > center - 0.5 + (width - 1) / 2, 255, y))
    return np.rint(y).astype(np.uint8)


def _dataset(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def _blob(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _monochrome1(source: Path) -> Dataset:
    ds = copy.deepcopy(_dataset(source))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _color(study_uid: str, photometric: str) -> tuple[Dataset, np.ndarray]:
    """A 32-row, 48-column RGB secondary capture (stored as RGB or YBR_FULL) and its RGB truth."""
    rows, columns = np.mgrid[0:32, 0:48]
    rgb = np.stack([rows * 8, columns * 5, 255 - rows * 4 - columns * 2], axis=-1).astype(np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.ConversionType = "REND-RGB", "Colour^Test", "OT", "WSD"
    ds.InstanceNumber, ds.SeriesNumber = 1, 9
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 32, 48, 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = photometric
    stored = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", "YBR_FULL")
    ds.PixelData = stored.tobytes()
    return ds, rgb


def _text_sr(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientID, ds.Modality, ds.InstanceNumber, ds.SeriesNumber = "REND-CT", "SR", 1, 20
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.ContinuityOfContent = "SEPARATE"
    return ds


def _seg(sources: list[Path]) -> tuple[Dataset, np.ndarray]:
    """A BINARY SEG of the phantom's soft tissue on its slices, built with highdicom."""
    images = [_dataset(path) for path in sources]
    mask = np.stack([image.pixel_array.astype(np.int32) + RESCALE_INTERCEPT > 0 for image in images])
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="tissue", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.SoftTissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    return hd.seg.Segmentation(
        source_images=images, pixel_array=mask.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=generate_uid(), series_number=30,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1", omit_empty_frames=False,
    ), mask


class Archive:
    """The module's data as stored in one node, and the truth to compare renders with."""

    def __init__(self, node: NodeProcess, folder: Path) -> None:
        self.node = node
        self.base = dicomweb(node)
        self.ct = _phantom(patient_id="REND-CT")
        self.ct_files = self.ct.write(folder / "ct")
        assert stow(node, [path.read_bytes() for path in self.ct_files]).status_code == 200

        # The same pixels (same seed) as a JPEG Lossless SV1 series, sent by dcmtk in that syntax.
        self.jpeg = _phantom(patient_id="REND-JPEG", study_uid=self.ct.study_uid)
        compressed = []
        for path in self.jpeg.write(folder / "plain"):
            target = folder / f"jpeg-{path.name}"
            subprocess.run([dcmtk("dcmcjpeg"), "+e1", str(path), str(target)], check=True, capture_output=True)
            compressed.append(target)
        result = storescu(node.port, *compressed, extra=["-R", "-xs"])
        assert result.returncode == 0, result.stderr
        self.jpeg_files = compressed

        self.mono1 = _monochrome1(self.ct_files[1])
        self.rgb, self.rgb_truth = _color(self.ct.study_uid, "RGB")
        self.ybr, _ = _color(self.ct.study_uid, "YBR_FULL")
        self.sr = _text_sr(self.ct.study_uid)
        self.multiframe = _phantom(patient_id="REND-MF", study_uid=self.ct.study_uid).enhanced_dataset()
        self.seg, self.seg_mask = _seg(self.ct_files)
        extra = [self.mono1, self.rgb, self.ybr, self.sr, self.multiframe, self.seg]
        assert stow(node, [_blob(ds) for ds in extra]).status_code == 200

    def url(self, ds_or_path: Dataset | Path, suffix: str = "/rendered") -> str:
        ds = ds_or_path if isinstance(ds_or_path, Dataset) else _dataset(ds_or_path)
        return (f"{self.base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}{suffix}")

    def get(self, url: str, media: str | None = None, **params) -> requests.Response:
        """GET with `media` as the Accept header; `params` are the query parameters."""
        headers = {**AUTH, **({"Accept": media} if media else {})}
        return requests.get(url, params=params, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator[Archive]:
    """One node (SQLite) holding every object of this module; the index-dependent paths also run on
    PostgreSQL in test_series_and_study_rendered_and_thumbnails."""
    workdir = tmp_path_factory.mktemp("rendered-node")
    node = NodeProcess(workdir, f"sqlite:///{workdir}/node.sqlite", {"web": web_settings()})
    node.start()
    try:
        yield Archive(node, tmp_path_factory.mktemp("rendered-data"))
    finally:
        node.process.kill()
        node.process.wait()


def png(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_png_of_a_window_is_exact_uncompressed_and_jpeg_lossless(archive: Archive):
    for files, phantom in ((archive.ct_files, archive.ct), (archive.jpeg_files, archive.jpeg)):
        hu = stored_hu(phantom, 2)
        url = archive.url(files[2])
        # The object's own window (40/400 in the phantom's header) when the request has none.
        assert np.array_equal(png(archive.get(url, "image/png")), linear_window(hu, 40, 400))
        asked = png(archive.get(url, "image/png", window="-600,1500,linear"))
        assert np.array_equal(asked, linear_window(hu, -600, 1500))
        assert len(np.unique(asked)) > 20  # the noise spreads the values across the window
        exact = png(archive.get(url, "image/png", window="0,2000,linear-exact"))
        inside = (hu > -1000) & (hu <= 1000)
        assert np.array_equal(exact[inside], np.rint((hu[inside] / 2000 + 0.5) * 255).astype(np.uint8))
        sigmoid = png(archive.get(url, "image/png", window="40,400,sigmoid"))
        assert np.array_equal(sigmoid, np.rint(255 / (1 + np.exp(-4 * (hu - 40) / 400))).astype(np.uint8))


def test_jpeg_by_default_and_through_dicomweb_client(archive: Archive):
    url = archive.url(archive.ct_files[1])
    response = archive.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    expected = linear_window(stored_hu(archive.ct, 1), 40, 400).astype(int)
    decoded = np.asarray(Image.open(io.BytesIO(response.content)))
    assert decoded.shape == (64, 64) and np.abs(decoded.astype(int) - expected).mean() < 3

    client = DICOMwebClient(archive.base, headers=AUTH)
    ds = _dataset(archive.jpeg_files[1])
    uids = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    low = client.retrieve_instance_rendered(*uids, media_types=("image/jpeg",), params={"quality": 5})
    high = client.retrieve_instance_rendered(*uids, media_types=("image/jpeg",), params={"quality": 100})
    assert len(low) < len(high) and Image.open(io.BytesIO(low)).format == "JPEG"
    frame = client.retrieve_instance_frames_rendered(*uids, frame_numbers=[1], media_types=("image/png",),
                                                     params={"window": "40,400,linear"})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(frame))), linear_window(stored_hu(archive.jpeg, 1), 40, 400))
    gif = client.retrieve_instance_rendered(*uids, media_types=("image/gif",))
    assert Image.open(io.BytesIO(gif)).format == "GIF"


def test_monochrome1_is_inverted_and_colour_is_rgb(archive: Archive):
    mono1 = png(archive.get(archive.url(archive.mono1), "image/png"))
    assert np.array_equal(mono1, 255 - linear_window(stored_hu(archive.ct, 1), 40, 400))
    rgb = png(archive.get(archive.url(archive.rgb), "image/png", window="0,1,linear"))  # VOI: grayscale only
    assert rgb.shape == (32, 48, 3) and np.array_equal(rgb, archive.rgb_truth)
    ybr = png(archive.get(archive.url(archive.ybr), "image/png"))
    assert np.abs(ybr.astype(int) - archive.rgb_truth).max() <= 2  # YBR_FULL -> RGB rounds


def test_viewport_scales_cuts_and_flips(archive: Archive):
    url = archive.url(archive.ct_files[0])
    full = linear_window(stored_hu(archive.ct, 0), 40, 400)
    assert png(archive.get(url, "image/png", viewport="128,128")).shape == (128, 128)
    assert png(archive.get(url, "image/png", viewport="100,50")).shape == (50, 50)  # aspect ratio kept
    assert png(archive.get(archive.url(archive.rgb), "image/png", viewport="24,24")).shape == (16, 24, 3)
    region = png(archive.get(url, "image/png", viewport="16,32,8,0,16,32"))
    assert np.array_equal(region, full[0:32, 8:24])
    flipped = png(archive.get(url, "image/png", viewport="16,32,8,0,-16,-32"))
    assert np.array_equal(flipped, full[0:32, 8:24][::-1, ::-1])


def test_multiframe_frames_and_multipart(archive: Archive):
    mf = archive.multiframe
    truth = [linear_window(stored_hu(archive.ct, index), 40, 400) for index in range(4)]  # same seed and shape
    # Window 40/400 and rescale come from the functional groups of the enhanced CT.
    frame = png(archive.get(archive.url(mf, "/frames/3/rendered"), "image/png"))
    assert np.array_equal(frame, truth[2])
    response = archive.get(archive.url(mf, "/frames/4,2/rendered"), 'multipart/related; type="image/png"')
    assert response.status_code == 200 and 'type="image/png"' in response.headers["content-type"]
    parts = [np.asarray(Image.open(io.BytesIO(part))) for part in parts_of(response)]
    assert len(parts) == 2 and np.array_equal(parts[0], truth[3]) and np.array_equal(parts[1], truth[1])
    whole = archive.get(archive.url(mf))  # no Accept header: */*, so multipart of JPEG for several frames
    assert whole.status_code == 200 and len(parts_of(whole)) == 4
    assert whole.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    single = archive.get(archive.url(mf), "image/jpeg")
    assert single.status_code == 406 and "multipart/related" in single.json()["error"]
    assert archive.get(archive.url(mf, "/frames/5/rendered"), "image/png").status_code == 404
    thumbnail = png(archive.get(archive.url(mf, "/thumbnail"), "image/png"))
    assert np.array_equal(thumbnail, truth[2])  # the middle frame of four, 1-based 3


def test_seg_frames_render_as_0_and_255(archive: Archive):
    rendered = png(archive.get(archive.url(archive.seg, "/frames/2/rendered"), "image/png"))
    # highdicom orders frames by position: frame 2's source slice is the one its derivation names.
    derivation = archive.seg.PerFrameFunctionalGroupsSequence[1].DerivationImageSequence[0]
    source_uid = derivation.SourceImageSequence[0].ReferencedSOPInstanceUID
    slice_index = [_dataset(path).SOPInstanceUID for path in archive.ct_files].index(source_uid)
    assert np.array_equal(rendered, archive.seg_mask[slice_index].astype(np.uint8) * 255)
    assert set(np.unique(rendered)) == {0, 255}


def test_refusals(archive: Archive):
    url = archive.url(archive.ct_files[0])
    assert archive.get(url, "application/dicom").status_code == 406
    assert archive.get(url, "video/mp4").status_code == 406
    assert archive.get(url, "image/png", accept="image/jpeg").headers["content-type"] == "image/jpeg"  # query wins
    for bad in ({"window": "40,400"}, {"window": "40,0,linear"}, {"window": "a,400,linear"},
                {"window": "40,400,cubic"}, {"viewport": "0,10"}, {"viewport": "5000,5000"}, {"viewport": "10"}, {"viewport": "10,10,1,2"},
                {"viewport": "10,10,100,0,,"}, {"quality": "0"}, {"quality": "high"}):
        response = archive.get(url, "image/png", **bad)
        assert response.status_code == 400 and response.json()["error"], bad
    ignored = archive.get(url, "image/png", annotation="patient", iccprofile="yes")  # PS3.18 §8.3: ignored
    assert np.array_equal(png(ignored), linear_window(stored_hu(archive.ct, 0), 40, 400))
    sr = archive.get(archive.url(archive.sr), "image/png")
    assert sr.status_code == 406 and "no pixel data" in sr.json()["error"]
    assert archive.get(archive.url(archive.sr, "/thumbnail")).status_code == 406
    assert archive.get(url, "image/png", viewport="64,64,1,2,3,4").status_code == 200
    assert archive.get(archive.url(archive.ct_files[0], "/thumbnail"), viewport="64,64,1,2,3,4").status_code == 400
    unknown = url.replace(archive.ct.study_uid, "1.2.3.4")
    assert archive.get(unknown).status_code == 404
    assert requests.get(url, timeout=30).status_code == 401


def test_series_and_study_rendered_and_thumbnails(node_factory, tmp_path: Path):
    node = node_factory(web=web_settings())
    node.start()
    phantom = CTPhantom(slices=5, rows=160, columns=160, pixel_spacing=(2.0, 2.0), slice_spacing=5.0, noise_hu=60.0)
    files = phantom.write(tmp_path / "ct")
    sr = _text_sr(phantom.study_uid)
    assert stow(node, [_blob(sr)] + [path.read_bytes() for path in files]).status_code == 200
    base = f"{dicomweb(node)}/studies/{phantom.study_uid}"
    series = f"{base}/series/{phantom.series_uid}"

    response = requests.get(f"{series}/rendered", headers={**AUTH, "Accept": 'multipart/related; type="image/png"'},
                            timeout=60)
    parts = [np.asarray(Image.open(io.BytesIO(part))) for part in parts_of(response)]
    assert [part.shape for part in parts] == [(160, 160)] * 5
    truth = [linear_window(stored_hu(phantom, index), 40, 400) for index in range(5)]
    assert all(np.array_equal(part, expected) for part, expected in zip(parts, truth))
    study = requests.get(f"{base}/rendered", headers=AUTH, timeout=60)  # the SR is left out, not an error
    assert study.status_code == 200 and len(parts_of(study)) == 5
    assert requests.get(f"{series}/rendered", headers={**AUTH, "Accept": "image/png"}, timeout=60).status_code == 406

    for url in (f"{base}/thumbnail", f"{series}/thumbnail"):
        thumbnail = requests.get(url, headers={**AUTH, "Accept": "image/png"}, timeout=60)
        image = png(thumbnail)
        assert image.shape == (128, 128)  # fits the default 128 square, from the middle slice
        middle = np.asarray(Image.fromarray(linear_window(stored_hu(phantom, 2), 40, 400)).resize((128, 128)))
        assert np.abs(image.astype(int) - middle).mean() < 4
    sized = requests.get(f"{series}/thumbnail", params={"viewport": "64,32"}, headers=AUTH, timeout=60)
    assert sized.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(sized.content)).size == (32, 32)
    client = DICOMwebClient(dicomweb(node), headers=AUTH)
    single = client.retrieve_series_rendered(phantom.study_uid, phantom.series_uid)  # dicomweb-client: */*
    assert single.startswith(b"\r\n--") or single.startswith(b"--")


def test_pydicom_sample_files_palette_rle_and_jpeg_baseline(archive: Archive):
    """Real files shipped with pydicom: PALETTE COLOR (16-bit palette), 16-bit RGB in RLE, YBR_FULL JPEG
    baseline, a 30-frame YBR_FULL_422 JPEG ultrasound; each rendered as the RGB pydicom decodes, in 8 bits."""
    names = ("examples_palette.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm")
    paths = [Path(get_testdata_file(name)) for name in names]
    assert stow(archive.node, [path.read_bytes() for path in paths]).status_code == 200
    palette, rle16, jpeg, ybr = (_dataset(path) for path in paths)

    expected = np.rint(apply_color_lut(palette.pixel_array, palette) * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(png(archive.get(archive.url(palette), "image/png")), expected)
    expected = np.rint(rle16.pixel_array * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(png(archive.get(archive.url(rle16), "image/png")), expected)
    assert np.array_equal(png(archive.get(archive.url(jpeg), "image/png")), jpeg.pixel_array)
    frame = png(archive.get(archive.url(ybr, "/frames/5/rendered"), "image/png"))
    assert frame.shape == (240, 320, 3) and np.array_equal(frame, pixel_array(paths[3], index=4))


def test_windows_match_orthanc(archive: Archive, tmp_path: Path):
    """Orthanc 1.10's DICOMweb plugin implements the same PS3.3 VOI functions: the same 8-bit values for the
    same instance and window.  (Without `window` they differ: Orthanc ignores the object's own window,
    which PS3.4 N.2 applies and the node does.)"""
    ds = _dataset(archive.ct_files[2])
    path = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    with orthanc_servers(tmp_path) as make:
        orthanc = make()
        DICOMwebClient(orthanc.dicomweb_url).store_instances([ds])
        for window in ("40,400,linear", "-600,1500,linear", "40,400,sigmoid"):
            ours = png(archive.get(f"{archive.base}{path}/frames/1/rendered", "image/png", window=window))
            # Written out by hand: Orthanc 1.10 answers 400 to the percent-encoded commas requests would send.
            theirs = requests.get(f"{orthanc.dicomweb_url}{path}/frames/1/rendered?window={window}",
                                  headers={"Accept": "image/png"}, timeout=30)
            assert np.array_equal(png(theirs), ours), window
