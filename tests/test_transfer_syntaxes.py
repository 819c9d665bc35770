"""Compressed and legacy transfer syntaxes are received and stored exactly as sent.

The source files are made here from the synthetic phantom with dcmtk's own
encoders (and OpenJPEG through pydicom for JPEG 2000); dcmtk's storescu sends
each in its own syntax.
"""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom import uid

from conftest import dcmtk, storescu
from test_ingest import _dataset_bytes

from dicom_ai_node.phantoms import CTPhantom

# (name, how to encode, storescu option proposing that syntax, expected transfer syntax)
CASES = [
    ("implicit-le", ("dcmconv", "+ti"), "-xi", uid.ImplicitVRLittleEndian),
    ("explicit-be", ("dcmconv", "+tb"), "-xb", uid.ExplicitVRBigEndian),
    ("deflate", ("dcmconv", "+td"), "-xd", uid.DeflatedExplicitVRLittleEndian),
    ("jpeg-baseline", ("dcmcjpeg", "+eb"), "-xy", uid.JPEGBaseline8Bit),
    ("jpeg-extended", ("dcmcjpeg", "+ee"), "-xx", uid.JPEGExtended12Bit),
    ("jpeg-lossless-sv1", ("dcmcjpeg", "+e1"), "-xs", uid.JPEGLosslessSV1),
    ("jpeg-ls-lossless", ("dcmcjpls", "+el"), "-xt", uid.JPEGLSLossless),
    ("jpeg-ls-near", ("dcmcjpls", "+en"), "-xu", uid.JPEGLSNearLossless),
    ("jpeg-2000-lossless", ("pydicom", uid.JPEG2000Lossless), "-xv", uid.JPEG2000Lossless),
    ("rle", ("dcmcrle",), "-xr", uid.RLELossless),
]


def _encode(source: Path, target: Path, how: tuple) -> None:
    if how[0] == "pydicom":
        ds = pydicom.dcmread(source)
        ds.compress(how[1], encoding_plugin="pylibjpeg")
        ds.save_as(target, enforce_file_format=True)
        return
    program, *options = how
    subprocess.run([dcmtk(program), *options, str(source), str(target)], check=True, capture_output=True)


@pytest.fixture
def encoded(tmp_path) -> list[tuple[str, Path, str, str]]:
    phantom = CTPhantom(slices=len(CASES), rows=128, columns=128, pixel_spacing=(2.5, 2.5), slice_spacing=3.0)
    sources = phantom.write(tmp_path / "source")
    cases = []
    for (name, how, option, syntax), source in zip(CASES, sources):
        target = tmp_path / f"{name}.dcm"
        _encode(source, target, how)
        assert pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        cases.append((name, target, option, syntax))
    return cases


def _inflate(data: bytes) -> bytes:
    return zlib.decompress(data, -zlib.MAX_WBITS)


def test_transfer_syntaxes_stored_byte_identical(node, encoded):
    for name, path, option, syntax in encoded:
        result = storescu(node.port, path, extra=[option])
        assert result.returncode == 0, f"{name}: {result.stderr}"

        source = pydicom.dcmread(path, stop_before_pixels=True)
        stored_path = node.storage / source.StudyInstanceUID / source.SeriesInstanceUID / f"{source.SOPInstanceUID}.dcm"
        stored = pydicom.dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == syntax, name
        sent, kept = _dataset_bytes(path), _dataset_bytes(stored_path)
        if syntax == uid.DeflatedExplicitVRLittleEndian:
            # storescu re-deflates on the wire; the node keeps that stream, which inflates to the same dataset.
            sent, kept = _inflate(sent), _inflate(kept)
        assert kept == sent, f"{name}: stored dataset differs from what was sent"
        # And the stored file is a readable instance in its own syntax.
        assert stored.pixel_array.shape == (128, 128), name

    (series,) = node.json("series", pydicom.dcmread(encoded[0][1]).StudyInstanceUID)
    assert series["NumberOfSeriesRelatedInstances"] == len(CASES)
