"""Header extraction on the receive path: character sets, encodings, truncation."""

from __future__ import annotations

import hashlib
import struct
import zlib
from io import BytesIO
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_ai_node.ingest.parse import RejectedDataset, parse_header, split_part10
from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.store.files import FileRange, InstanceStore


def _encode(ds, implicit: bool = False, little: bool = True) -> bytes:
    """The dataset as it travels on the wire (no File Meta)."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = little, implicit
    write_dataset(out, ds)
    return out.getvalue()


@pytest.mark.parametrize(
    ("charset", "name"),
    [("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "Ødegård^Zoë"), ("ISO_IR 192", "山田^太郎")],
)
def test_patient_name_in_specific_character_set(charset, name):
    ds = CTPhantom(slices=1, rows=8, columns=8).dataset(0)
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.StudyDescription = name.replace("^", " ")
    header = parse_header(_encode(ds), "1.2.840.10008.1.2.1")
    assert header.patient_name == name and header.study_description == name.replace("^", " ")
    assert header.image_type == "ORIGINAL\\PRIMARY\\AXIAL" and header.rows == 8 and header.series_number == 1


def test_implicit_and_big_endian_headers_match():
    ds = CTPhantom(slices=1, rows=8, columns=8).dataset(0)
    implicit = parse_header(_encode(ds, implicit=True), ImplicitVRLittleEndian)
    big = parse_header(_encode(ds, little=False), ExplicitVRBigEndian)
    assert (implicit.rows, implicit.columns, implicit.sop_instance_uid) == (8, 8, ds.SOPInstanceUID)
    assert (big.rows, big.columns, big.instance_number) == (8, 8, 1)


def test_deflated_dataset_is_inflated_and_bad_deflate_refused():
    import zlib

    ds = CTPhantom(slices=1, rows=8, columns=8).dataset(0)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(_encode(ds)) + compressor.flush()
    assert parse_header(deflated, DeflatedExplicitVRLittleEndian).modality == "CT"
    with pytest.raises(RejectedDataset, match="cannot be inflated"):
        parse_header(b"not deflate at all", DeflatedExplicitVRLittleEndian)


def test_mismatching_affected_sop_instance_uid():
    ds = CTPhantom(slices=1, rows=8, columns=8).dataset(0)
    with pytest.raises(RejectedDataset, match="differs from the C-STORE request") as caught:
        parse_header(_encode(ds), "1.2.840.10008.1.2.1", "1.2.3.4")
    assert caught.value.status == 0xA900


@pytest.mark.parametrize("series_uid", ["1.2.3/../../etc", "..", "a" * 64, "1.2.abc", "1.2..3", "C:\\x"])
def test_invalid_uid_is_kept_as_sent_and_never_becomes_a_path(tmp_path, series_uid):
    """Issue 10.8b: an instance whose UID is not a UID is stored (kept as sent), under a digest name."""
    ds = CTPhantom(slices=1, rows=8, columns=8).dataset(0)
    ds.SeriesInstanceUID = series_uid
    header = parse_header(_encode(ds), "1.2.840.10008.1.2.1")
    assert header.series_instance_uid == series_uid
    store = InstanceStore(tmp_path, 0)
    relative = store.relative_path(header.study_instance_uid, series_uid, header.sop_instance_uid)
    study, series, instance = relative.split("/")
    assert (study, instance) == (ds.StudyInstanceUID, f"{ds.SOPInstanceUID}.dcm")
    assert series == "sha256-" + hashlib.sha256(series_uid.encode()).hexdigest()
    assert store.write_instance(relative, b"x") and (tmp_path / relative).read_bytes() == b"x"


@pytest.mark.parametrize("study_uid", ["1.2\x013", "1.2\x003", "1." + "2" * 64])
def test_uid_with_control_characters_or_too_long_is_refused(study_uid):
    ds = CTPhantom(slices=1, rows=8, columns=8).dataset(0)
    ds.StudyInstanceUID = study_uid
    with pytest.raises(RejectedDataset, match="is not a valid UID, nor one the node can keep") as caught:
        parse_header(_encode(ds), "1.2.840.10008.1.2.1")
    assert caught.value.status == 0xA900


@pytest.mark.parametrize("source_ae", ["STORESCU", "CT1", ""])
def test_part10_file_meta_matches_pydicom(source_ae):
    """The hand-built File Meta (hot path) is byte-identical to pydicom's encoding of the same."""
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from dicom_ai_node.ingest.part10 import part10

    ds = CTPhantom(slices=1, rows=8, columns=8).dataset(0)
    dataset = _encode(ds)
    built = part10(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1", source_ae, dataset)
    meta = create_file_meta(
        sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax="1.2.840.10008.1.2.1"
    )
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    assert built == b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + dataset


def _deflate(*chunks: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"".join([deflater.compress(chunk) for chunk in chunks] + [deflater.flush()])


def _pixel_data_header(length: int) -> bytes:
    """An explicit VR little endian Pixel Data (OW) element header claiming `length` bytes."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)


def test_deflate_bomb_refused_at_what_its_image_description_allows():
    """A 512x512 slice whose pixel data inflates to 1 GiB: refused near 64 MiB, the bytes never all inflated."""
    ds = CTPhantom(slices=1, rows=512, columns=512).dataset(0)
    del ds.PixelData
    zeros = bytes(1 << 20)
    bomb = _deflate(_encode(ds) + _pixel_data_header(1 << 30), *[zeros] * 1024)
    with pytest.raises(RejectedDataset, match="far more than the image it describes") as refused:
        parse_header(bomb, DeflatedExplicitVRLittleEndian)
    assert refused.value.status == 0xC210


def test_large_deflated_object_without_pixels_is_held_only_to_the_configured_cap():
    """An Encapsulated PDF of 70 MiB is not a bomb: only storage.max_inflated_mb applies to it."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.1", "1.2.3.2", "1.2.3.3"
    ds.Modality = "DOC"
    document = struct.pack("<HH2sHI", 0x0042, 0x0011, b"OB", 0, 70 << 20)  # Encapsulated Document
    deflated = _deflate(_encode(ds) + document, *[bytes(1 << 20)] * 70)
    assert parse_header(deflated, DeflatedExplicitVRLittleEndian).sop_instance_uid == "1.2.3.1"
    with pytest.raises(RejectedDataset, match=r"storage.max_inflated_mb") as refused:
        parse_header(deflated, DeflatedExplicitVRLittleEndian, max_inflated_bytes=32 << 20)
    assert refused.value.status == 0xA700


def test_truncated_deflate_stream_is_refused():
    ds = CTPhantom(slices=1, rows=16, columns=16).dataset(0)
    deflated = _deflate(_encode(ds))
    with pytest.raises(RejectedDataset, match="deflated stream ends before its end marker"):
        parse_header(deflated[: len(deflated) // 2], DeflatedExplicitVRLittleEndian)


def test_acr_nema_dates_and_times_are_indexed_in_the_dicom_form():
    """pydicom-data's retired-class ultrasound has StudyDate "1994.11.05": 10 characters, refused by PostgreSQL's
    index column (0x0110, re-sent for ever) until rewritten as DICOM's 19941105 (PS3.5 §6.2, DA and TM)."""
    ds = CTPhantom(slices=1, rows=8, columns=8).dataset(0)
    ds.StudyDate, ds.StudyTime = "1994.11.05", "11:20:00"
    header = parse_header(_encode(ds), "1.2.840.10008.1.2.1")
    assert (header.study_date, header.study_time) == ("19941105", "112000")
    ds.StudyDate, ds.StudyTime = "20260102", "0930"
    header = parse_header(_encode(ds), "1.2.840.10008.1.2.1")
    assert (header.study_date, header.study_time) == ("20260102", "0930")


def _in_file(tmp_path, data: bytes, lead: bytes = b"x" * 300):
    """`data` as a range of a file after other bytes (a STOW-RS part after its File Meta)."""
    path = tmp_path / "part"
    path.write_bytes(lead + data)
    return FileRange(path, len(lead), len(data))


@pytest.mark.parametrize("where", ["memory", "file"])
def test_long_values_are_checked_without_being_read(tmp_path, where):
    """Pixel data past 64 KiB is skipped, not read (a STOW-RS part never passes through memory), yet a
    truncation is refused as before, and a long text the index keeps is read all the same."""
    ds = CTPhantom(slices=1, rows=512, columns=512).dataset(0)
    ds.StudyDescription = "D" * 70_000  # longer than the skip threshold: read anyway (an odd sender's)
    whole = _encode(ds)

    def parse(data: bytes):
        return parse_header(data if where == "memory" else _in_file(tmp_path, data), "1.2.840.10008.1.2.1")

    header = parse(whole)
    assert (header.rows, header.columns, header.study_description) == (512, 512, "D" * 70_000)
    with pytest.raises(RejectedDataset, match=r"element \(7FE0,0010\) has 523288 of its 524288 bytes"):
        parse(whole[:-1000])


@pytest.mark.parametrize("where", ["memory", "file"])
def test_long_encapsulated_pixel_data_is_walked_fragment_by_fragment(tmp_path, where):
    ds = CTPhantom(slices=1, rows=8, columns=8).dataset(0)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
    ds.PixelData = encapsulate([b"\x01" * 40_000, b"\x02" * 40_000])  # 80 kB: skipped, not read
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    whole = _encode(ds)

    def parse(data: bytes):
        return parse_header(data if where == "memory" else _in_file(tmp_path, data), "1.2.840.10008.1.2.4.70")

    assert parse(whole).sop_instance_uid == ds.SOPInstanceUID
    assert parse(whole[:-4]).sop_instance_uid == ds.SOPInstanceUID  # the delimiter's zero length may be missing
    for cut in (whole[:-8], whole[:-20_000]):  # without its delimiter; mid-fragment
        with pytest.raises(RejectedDataset, match="truncated|cannot be parsed") as refused:
            parse(cut)
        assert refused.value.status == 0xC210


def test_file_meta_reads_as_pydicom_reads_it_for_every_file_pydicom_ships():
    """split_part10 reads the File Meta element by element (a STOW-RS part's check is benchmarked); on every
    Part-10 file of pydicom's and pydicom-data's test sets it finds what pydicom's own reader finds."""
    import data_store  # pydicom-data's package
    import pydicom.data

    folders = [Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"]
    compared = 0
    for path in (path for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()):
        with open(path, "rb") as file:
            data = file.read(1 << 16)  # the File Meta is in the first 64 KiB, as split_part10 reads it
        if data[128:132] != b"DICM":
            continue
        stream = BytesIO(data)
        stream.seek(132)
        try:
            expected = _read_file_meta_info(stream)
        except Exception:  # a file pydicom cannot read either
            continue
        if "TransferSyntaxUID" not in expected:
            with pytest.raises(ValueError, match="no TransferSyntaxUID"):
                split_part10(data)
            continue
        meta = split_part10(data)
        assert (meta.transfer_syntax_uid, meta.sop_class_uid, meta.sop_instance_uid, meta.dataset_offset) == (
            expected.TransferSyntaxUID, expected.get("MediaStorageSOPClassUID") or None,
            expected.get("MediaStorageSOPInstanceUID") or None, stream.tell()), path
        compared += 1
    assert compared > 100
