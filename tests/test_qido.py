"""QIDO-RS against a real node subprocess over real HTTP: every required matching key of PS3.18 Table 10.6.1-5
with each matching type of PS3.4 C.2.2.2, 400 for keys the node cannot match, the required return attributes of
Tables 10.6.3-3/4/5, includefield, fuzzymatching, an index from before migration 0008, and the same queries
answered by Orthanc's DICOMweb plugin holding the same studies."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import requests
from conftest import storescu
from dicomweb_client.api import DICOMwebClient
from orthanc import orthanc_servers
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from sqlalchemy import update
from test_web import AUTH, TOKEN, dicomweb, stow, web_settings

from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.store.db import make_engine
from dicom_ai_node.store.models import Instance, RequestAttribute, Series, Study

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"

# Three patients' studies with distinct values of every matching key (A has a CT and an MR series).
STUDIES = {
    "A": {"PatientID": "PAT-A", "PatientName": "Alpha^Anna", "StudyID": "S100", "StudyTime": "083000.25",
          "StudyDate": "20240105", "ReferringPhysicianName": "House^Gregory", "AccessionNumber": "ACC-A",
          "PatientBirthDate": "19700101", "PatientSex": "F", "InstitutionName": "North Hospital"},
    "B": {"PatientID": "PAT-B", "PatientName": "Beta^Bob", "StudyID": "S200", "StudyTime": "141500",
          "StudyDate": "20240610", "ReferringPhysicianName": "Wilson^James", "AccessionNumber": "ACC-B",
          "PatientBirthDate": "19800202", "PatientSex": "M", "InstitutionName": "South Hospital"},
    "C": {"PatientID": "PAT-C", "PatientName": "Müller^Jürgen", "StudyID": "S300", "StudyTime": "23",
          "StudyDate": "20231231", "SpecificCharacterSet": "ISO_IR 100", "AccessionNumber": "ACC-C",
          "InstitutionName": "East Hospital"},
}
SERIES = {  # series name -> (study, modality, series number, its own attributes, request attribute items)
    "A1": ("A", "CT", 1, {"PerformedProcedureStepStartDate": "20240105", "PerformedProcedureStepStartTime": "0830"},
           [("SPS-A1", "RP-A")]),
    "A2": ("A", "MR", 7, {}, []),
    "B1": ("B", "CT", 3, {"PerformedProcedureStepStartDate": "20240610", "PerformedProcedureStepStartTime": "141000"},
           [("SPS-B1", "RP-B"), ("SPS-B2", "RP-X")]),
    "C1": ("C", "CT", 1, {}, []),
}
SLICES = 2


def _dataset_files(folder: Path) -> tuple[dict[str, str], dict[str, str], list[Path]]:
    """Write the studies; returns (study name -> UID, series name -> UID, files)."""
    study_uids = {name: generate_uid() for name in STUDIES}
    series_uids: dict[str, str] = {}
    files: list[Path] = []
    for name, (study, modality, number, own, items) in SERIES.items():
        phantom = CTPhantom(slices=SLICES, rows=16, columns=16, pixel_spacing=(10.0, 10.0), slice_spacing=10.0,
                            study_uid=study_uids[study], series_number=number)
        series_uids[name] = phantom.series_uid
        for path in phantom.write(folder / name):
            ds = pydicom.dcmread(path)
            for keyword, value in {**STUDIES[study], **own}.items():
                setattr(ds, keyword, value)
            ds.Modality = modality
            if modality == "MR":
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
            if items:
                ds.RequestAttributesSequence = Sequence([_item(step, procedure) for step, procedure in items])
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return study_uids, series_uids, files


def _item(step: str, procedure: str) -> Dataset:
    item = Dataset()
    item.ScheduledProcedureStepID = step
    item.RequestedProcedureID = procedure
    return item


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[dict[str, str], dict[str, str], list[Path]]:
    return _dataset_files(tmp_path_factory.mktemp("qido-data"))


@pytest.fixture
def qido_node(node_factory, dataset):
    node = node_factory(web=web_settings())
    node.start()
    response = stow(node, [path.read_bytes() for path in dataset[2]])
    assert response.status_code == 200, response.text
    return node


def search(node, path: str, params=None) -> requests.Response:
    return requests.get(dicomweb(node) + path, params=params, headers=AUTH, timeout=30)


def found(node, path: str, tag: str, params=None) -> set[str]:
    response = search(node, path, params)
    assert response.status_code == 200, (path, params, response.status_code, response.text)
    return {item[tag]["Value"][0] for item in response.json()}


def test_every_required_matching_key_and_matching_type(qido_node, dataset):
    """Each key of PS3.18 Table 10.6.1-5 narrows the answer exactly; unknown keys were ignored before (all
    studies, other patients' too, with a 299 warning)."""
    studies, series, _ = dataset
    study = {uid: name for name, uid in studies.items()}
    named = {uid: name for name, uid in series.items()}

    def studies_where(**params) -> set[str]:
        return {study[uid] for uid in found(qido_node, "/studies", STUDY_UID, params)}

    def series_where(path="/series", **params) -> set[str]:
        return {named[uid] for uid in found(qido_node, path, SERIES_UID, params)}

    # The defect: keys the node ignored returned every study.
    for key, value in (("StudyID", "S999"), ("StudyTime", "0000-0001"), ("ReferringPhysicianName", "Nobody")):
        assert studies_where(**{key: value}) == set(), key
    assert series_where(SeriesNumber="99") == set()

    study_cases = [
        ({"StudyID": "S100"}, {"A"}), ({"00200010": "S200"}, {"B"}), ({"StudyID": "S?00"}, {"A", "B", "C"}),
        ({"StudyID": "s100"}, set()),  # single value and wildcard matching are case-sensitive outside PN
        ({"ReferringPhysicianName": "house*"}, {"A"}), ({"ReferringPhysicianName": "WILSON^JAMES"}, {"B"}),
        ({"StudyTime": "0800-0900"}, {"A"}), ({"StudyTime": "1415"}, {"B"}), ({"StudyTime": "083000.25"}, {"A"}),
        ({"StudyTime": "083000.2-083000.3"}, {"A"}), ({"StudyTime": "083000.3-"}, {"B", "C"}),
        ({"StudyTime": "-0830"}, {"A"}), ({"StudyTime": "-082959"}, set()), ({"StudyTime": "2300-"}, {"C"}),
        ({"StudyDate": "20240101-20241231"}, {"A", "B"}), ({"StudyDate": "-20231231"}, {"C"}),
        ({"StudyDate": "20240610"}, {"B"}),
        ({"AccessionNumber": "ACC-?"}, {"A", "B", "C"}), ({"AccessionNumber": "ACC-B"}, {"B"}),
        ({"PatientID": "PAT-A"}, {"A"}), ({"PatientID": "PAT-*"}, {"A", "B", "C"}),
        ({"PatientName": "müller*"}, {"C"}), ({"PatientName": "*^bob"}, {"B"}),
        ({"ModalitiesInStudy": "MR"}, {"A"}), ({"ModalitiesInStudy": "CT"}, {"A", "B", "C"}),
        ({"ModalitiesInStudy": "MR,SEG"}, {"A"}),
        ({"StudyInstanceUID": f"{studies['A']},{studies['B']}"}, {"A", "B"}),
        ({"StudyInstanceUID": f"{studies['C']}\\{studies['B']}"}, {"B", "C"}),
        ({"StudyDescription": "Synthetic*"}, {"A", "B", "C"}), ({"StudyDescription": "synthetic*"}, set()),
        ({"StudyID": "S100", "PatientID": "PAT-B"}, set()),  # keys combine with AND
        ({"StudyID": "", "PatientID": "*"}, {"A", "B", "C"}),  # universal matching
    ]
    for params, expected in study_cases:
        assert studies_where(**params) == expected, params

    series_cases = [
        ({"Modality": "MR"}, {"A2"}), ({"Modality": "CT"}, {"A1", "B1", "C1"}), ({"SeriesNumber": "3"}, {"B1"}),
        ({"00200011": "1"}, {"A1", "C1"}), ({"PatientID": "PAT-B"}, {"B1"}), ({"StudyID": "S100"}, {"A1", "A2"}),
        ({"SeriesInstanceUID": f"{series['A2']},{series['C1']}"}, {"A2", "C1"}),
        ({"PerformedProcedureStepStartDate": "20240101-"}, {"A1", "B1"}),
        ({"PerformedProcedureStepStartDate": "20240105"}, {"A1"}),
        ({"PerformedProcedureStepStartTime": "0800-0900"}, {"A1"}),
        ({"PerformedProcedureStepStartTime": "14"}, {"B1"}),
        ({"RequestAttributeSequence.ScheduledProcedureStepID": "SPS-B2"}, {"B1"}),
        ({"RequestAttributesSequence.ScheduledProcedureStepID": "SPS-*"}, {"A1", "B1"}),
        ({"00400275.00401001": "RP-A"}, {"A1"}),
        # Sequence matching: both keys must match the same item (PS3.4 C.2.2.2.6).
        ({"00400275.00400009": "SPS-B2", "00400275.00401001": "RP-X"}, {"B1"}),
        ({"00400275.00400009": "SPS-B1", "00400275.00401001": "RP-X"}, set()),
        ({"ModalitiesInStudy": "MR"}, {"A1", "A2"}),
    ]
    for params, expected in series_cases:
        assert series_where(**params) == expected, params
    assert series_where(f"/studies/{studies['A']}/series", Modality="CT") == {"A1"}
    assert series_where(f"/studies/{studies['A']}/series", SeriesNumber="3") == set()

    instances = found(qido_node, "/instances", SOP_UID, {"SOPClassUID": MR_IMAGE_STORAGE})
    assert len(instances) == SLICES
    (one,) = found(qido_node, "/instances", SOP_UID, {"SeriesNumber": "7", "InstanceNumber": "2"})
    assert one in instances
    assert found(qido_node, "/instances", SOP_UID, {"SOPInstanceUID": one}) == {one}
    assert len(found(qido_node, "/instances", SOP_UID, {"StudyID": "S200", "PatientName": "beta*"})) == SLICES
    assert len(found(qido_node, "/instances", SOP_UID, {"InstanceNumber": "1"})) == len(SERIES)
    assert len(found(qido_node, f"/studies/{studies['A']}/instances", SOP_UID, {"Modality": "CT"})) == SLICES


def test_keys_the_node_cannot_match_are_400_naming_them(qido_node):
    for path, params, named in (
        ("/studies", {"InstitutionName": "x*"}, "InstitutionName"),
        ("/studies", {"00080080": "x*"}, "InstitutionName"),
        ("/studies", {"Modality": "CT"}, "Modality"),  # a series key at /studies
        ("/studies", {"SeriesNumber": "1"}, "SeriesNumber"),
        ("/series", {"InstanceNumber": "1"}, "InstanceNumber"),
        ("/instances", {"BodyPartExamined": "CHEST"}, "BodyPartExamined"),
        ("/studies", {"NoSuchKeyword": "1"}, "NoSuchKeyword"),
        ("/studies", {"\u20ac": "1"}, "\\u20ac"),
        ("/series", {"RequestAttributesSequence.AccessionNumber": "1"}, "RequestAttributesSequence.AccessionNumber"),
    ):
        response = search(qido_node, path, params)
        assert response.status_code == 400, (path, params, response.text)
        assert named in response.json()["error"] and "StudyID" in response.json()["error"], response.text
    for path, params in (("/studies", {"StudyDate": "2024"}), ("/studies", {"StudyTime": "2500x"}),
                         ("/series", {"SeriesNumber": "one"}), ("/studies", {"fuzzymatching": "maybe"}),
                         ("/studies", {"includefield": "NoSuchKeyword"})):
        assert search(qido_node, path, params).status_code == 400, params
    # An empty value asks for the attribute (universal matching): never a 400, nothing narrowed.
    response = search(qido_node, "/studies", {"InstitutionName": ""})
    assert response.status_code == 200 and len(response.json()) == len(STUDIES)


STUDY_RETURN = {  # PS3.18 Table 10.6.3-3 (TimezoneOffsetFromUTC only if present)
    "00080020", "00080030", "00080050", "00080056", "00080061", "00080090", "00081190", "00100010", "00100020",
    "00100030", "00100040", "0020000D", "00200010", "00201206", "00201208",
}
SERIES_RETURN = {  # Table 10.6.3-4
    "00080056", "00080060", "0008103E", "00081190", "0020000E", "00200011", "00201209", "00400244", "00400245",
    "00400275",
}
INSTANCE_RETURN = {  # Table 10.6.3-5
    "00080016", "00080018", "00080056", "00081190", "00200013", "00280010", "00280011", "00280100", "00280008",
}


def test_required_return_attributes_include_field_and_fuzzy_matching(qido_node, dataset):
    studies, series, _ = dataset
    (a,) = search(qido_node, "/studies", {"PatientID": "PAT-A"}).json()
    assert STUDY_RETURN <= a.keys(), STUDY_RETURN - a.keys()
    assert a["00200010"]["Value"] == ["S100"] and a["00100040"]["Value"] == ["F"]
    assert a["00100030"]["Value"] == ["19700101"] and a["00080090"]["Value"] == [{"Alphabetic": "House^Gregory"}]
    assert a["00080056"]["Value"] == ["ONLINE"] and sorted(a["00080061"]["Value"]) == ["CT", "MR"]
    (c,) = search(qido_node, "/studies", {"PatientID": "PAT-C"}).json()
    assert c["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]  # Latin-1 in the file, Unicode here
    assert c["00080005"]["Value"] == ["ISO_IR 192"]

    (b1,) = search(qido_node, "/series", {"SeriesNumber": "3"}).json()
    assert SERIES_RETURN <= b1.keys(), SERIES_RETURN - b1.keys()
    assert [(item["00400009"]["Value"][0], item["00401001"]["Value"][0]) for item in b1["00400275"]["Value"]] == [
        ("SPS-B1", "RP-B"), ("SPS-B2", "RP-X")]
    assert b1["00400244"]["Value"] == ["20240610"] and b1["00400245"]["Value"] == ["141000"]
    instance = search(qido_node, f"/studies/{studies['B']}/series/{series['B1']}/instances").json()[0]
    assert INSTANCE_RETURN <= instance.keys(), INSTANCE_RETURN - instance.keys()
    assert instance["00280100"]["Value"] == [16]

    # includefield: a keyword, a tag, a comma-separated list, repeated, and all; read from a stored file.
    for params in ({"includefield": "InstitutionName"}, {"includefield": "00080080"},
                   {"includefield": "PatientSex,InstitutionName"},
                   [("includefield", "00100040"), ("includefield", "InstitutionName")],
                   {"InstitutionName": ""}):
        (item,) = search(qido_node, "/studies", [*(params.items() if isinstance(params, dict) else params),
                                                  ("PatientID", "PAT-B")]).json()
        assert item["00080080"]["Value"] == ["South Hospital"], params
    (plain,) = search(qido_node, "/studies", {"PatientID": "PAT-B"}).json()
    assert "00080080" not in plain
    (everything,) = search(qido_node, "/instances", {"SOPInstanceUID": instance[SOP_UID]["Value"][0],
                                                     "includefield": "all"}).json()
    assert everything["00180050"]["Value"] and everything["00200032"]["Value"]  # SliceThickness, position
    assert "7FE00010" not in everything
    (series_all,) = search(qido_node, "/series", {"SeriesNumber": "3", "includefield": "all"}).json()
    assert series_all["00080080"]["Value"] == ["South Hospital"] and "00200032" not in series_all

    # fuzzymatching: not supported, so the Warning PS3.18 8.3.4.2 requires; literal matching still applies.
    fuzzy = search(qido_node, "/studies", {"PatientName": "Alpha^Anna", "fuzzymatching": "true"})
    assert fuzzy.status_code == 200 and len(fuzzy.json()) == 1
    assert fuzzy.headers["warning"] == (
        f'299 {dicomweb(qido_node)} "The fuzzymatching parameter is not supported. Only literal matching has '
        'been performed."'
    )
    assert "warning" not in search(qido_node, "/studies", {"fuzzymatching": "false"}).headers

    client = DICOMwebClient(dicomweb(qido_node), headers={"Authorization": f"Bearer {TOKEN}"})
    assert [item[STUDY_UID]["Value"][0] for item in client.search_for_studies(search_filters={"StudyID": "S200"})] == [
        studies["B"]]
    assert len(client.search_for_series(search_filters={"SeriesNumber": 7})) == 1
    assert client.search_for_studies(search_filters={"ReferringPhysicianName": "Nobody"}) == []
    (with_field,) = client.search_for_studies(search_filters={"PatientID": "PAT-A"}, fields=["InstitutionName"])
    assert with_field["00080080"]["Value"] == ["North Hospital"]


def test_an_index_from_before_0008_answers_after_the_upgrade(node_factory, dataset):
    """Rows indexed before the migration have NULL in its columns: the start-up backfill reads them from the
    files (one per series), and QIDO-RS reads Bits Allocated of old images from their file."""
    studies, series, files = dataset
    node = node_factory(web=web_settings())
    node.start()
    assert storescu(node.port, *files).returncode == 0
    node.stop()
    engine = make_engine(node.database_url)
    with engine.begin() as connection:  # what 0008 leaves on rows indexed before it
        connection.execute(update(Study).values(study_id=None, referring_physician_name=None, patient_sex=None,
                                                patient_birth_date=None, specific_character_set=None))
        connection.execute(update(Series).values(performed_procedure_step_start_date=None,
                                                 performed_procedure_step_start_time=None,
                                                 query_attributes_indexed=None))
        connection.execute(update(Instance).values(bits_allocated=None))
        connection.execute(RequestAttribute.__table__.delete())
    engine.dispose()
    node.start()
    assert found(node, "/studies", STUDY_UID, {"StudyID": "S200"}) == {studies["B"]}
    assert found(node, "/studies", STUDY_UID, {"ReferringPhysicianName": "house*"}) == {studies["A"]}
    assert found(node, "/series", SERIES_UID, {"00400275.00400009": "SPS-B2"}) == {series["B1"]}
    assert found(node, "/series", SERIES_UID, {"PerformedProcedureStepStartTime": "0830"}) == {series["A1"]}
    (c,) = search(node, "/studies", {"PatientID": "PAT-C"}).json()
    assert c["00080005"]["Value"] == ["ISO_IR 192"]
    instance = search(node, "/instances", {"limit": "1"}).json()[0]
    assert instance["00280100"]["Value"] == [16]
    assert "filled the QIDO-RS attributes of 4 series" in node.log()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_same_answers_as_orthanc_where_orthanc_follows_the_standard(qido_node, dataset, tmp_path):
    """Orthanc 1.10's DICOMweb plugin with the same studies: the same studies and series for each key."""
    studies, series, files = dataset
    with orthanc_servers(tmp_path / "orthanc") as make:
        orthanc = make()
        assert storescu(orthanc.dicom_port, *files, called=orthanc.aet).returncode == 0
        for path, params, tag in (
            ("/studies", {"StudyID": "S200"}, STUDY_UID),
            ("/studies", {"StudyID": "S999"}, STUDY_UID),
            # Not ReferringPhysicianName: Orthanc 1.10 answers [] to any value of it (measured); the standard
            # requires matching it, as test_every_required_matching_key_and_matching_type asserts.
            ("/studies", {"StudyDate": "20240101-20241231"}, STUDY_UID),
            ("/studies", {"StudyTime": "1400-1500"}, STUDY_UID),
            ("/studies", {"PatientID": "PAT-A"}, STUDY_UID),
            ("/studies", {"ModalitiesInStudy": "MR"}, STUDY_UID),
            ("/studies", {"AccessionNumber": "ACC-C"}, STUDY_UID),
            ("/series", {"SeriesNumber": "3"}, SERIES_UID),
            ("/series", {"Modality": "MR"}, SERIES_UID),
            ("/series", {"PatientID": "PAT-B"}, SERIES_UID),
            ("/series", {"PerformedProcedureStepStartDate": "20240105"}, SERIES_UID),
            ("/instances", {"SOPClassUID": MR_IMAGE_STORAGE}, SOP_UID),
        ):
            ours = found(qido_node, path, tag, params)
            answer = requests.get(orthanc.dicomweb_url + path, params=params, timeout=30)
            assert answer.status_code == 200, answer.text
            theirs = {item[tag]["Value"][0] for item in answer.json()}
            assert ours == theirs, (path, params, ours, theirs)
        (ours,) = search(qido_node, "/studies", {"PatientID": "PAT-A"}).json()
        (theirs,) = requests.get(orthanc.dicomweb_url + "/studies", params={"PatientID": "PAT-A"}, timeout=30).json()
        for tag in ("00100010", "00100030", "00100040", "00200010", "00080090", "00080020", "00080030"):
            assert ours[tag].get("Value") == theirs[tag].get("Value"), tag
