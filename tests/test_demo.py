"""`dicom-ai-node demo`: the newcomer's one-command tour works on its own and tells the truth.

The demo's own printout is checked (volumes against the phantom's analytic volumes,
SEG and SR paths that exist and pass dciodvfy), so a regression anywhere on the path
shows up the way a newcomer would see it.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import dciodvfy_errors
from rich.console import Console

from dicom_ai_node import demo
from dicom_ai_node.config import load_config
from dicom_ai_node.demo import demo_phantom, run_demo, write_demo_config
from dicom_ai_node.errors import NodeError

REPO = Path(__file__).resolve().parent.parent
LABELS = ("Body", "Lungs", "Bone")


def check_printout(output: str, workdir: Path) -> None:
    """What the demo printed: volumes within 5 % of the phantom's, valid SEG and SR, the commands to go on."""
    phantom = demo_phantom()
    analytic = phantom.geometry.analytic_volumes_ml(phantom.scan_length_mm)
    rows = re.findall(r"^\W*(Body|Lungs|Bone)\s+([\d.]+)\s+([\d.]+)\s+[-+][\d.]+ %", output, re.MULTILINE)
    assert sorted(label for label, _, _ in rows) == sorted(LABELS), output
    for label, measured, expected in rows:
        assert float(expected) == pytest.approx(analytic[label.lower()], abs=0.05), label
        assert float(measured) == pytest.approx(analytic[label.lower()], rel=0.05), label
    paths = re.findall(r"^(SEG|SR)\s+(\S+\.dcm)$", output, re.MULTILINE)
    assert sorted(kind for kind, _ in paths) == ["SEG", "SR", "SR", "SR"], output  # one model per task
    for kind, path in paths:
        assert Path(path).is_relative_to(workdir) and Path(path).is_file(), kind
        assert dciodvfy_errors(Path(path)) == [], kind
    nodules = r"^ct-lung-nodules \(job \d+\): Nodule 1 \(\d+%\), Nodule 2 \(\d+%\)$"
    assert re.search(nodules, output, re.MULTILINE), output
    assert re.search(r"^ct-contrast \(job \d+\): Contrast agent: Present \(\d+%\)$", output, re.MULTILINE), output
    config = workdir / "config.toml"
    study_uid = re.search(r"dicom-ai-node series (\S+) --config", output)[1]
    for command in ("studies", f"series {study_uid}", "jobs", "job show 1", "events"):
        assert f"dicom-ai-node {command} --config {config}" in output
    assert f"The demo folder {workdir} is kept" in output
    log = (workdir / "node.log").read_text()
    assert log.rstrip().endswith("dicom_ai_node.node: stopped"), log[-2000:]  # SIGTERM, clean shutdown


def test_demo_command_tours_a_fresh_node(tmp_path):
    """The real thing: `dicom-ai-node demo` as a newcomer runs it, with dcmtk's storescu as the scanner."""
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_ai_node", "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sent by dcmtk storescu" in result.stdout
    check_printout(result.stdout, workdir)


def test_run_demo_without_dcmtk_sends_with_pynetdicom(tmp_path, monkeypatch):
    """A machine without dcmtk: pynetdicom is the scanner; the summary returned matches the phantom."""
    monkeypatch.setattr(demo, "STORESCU", tmp_path / "no-dcmtk" / "storescu")
    workdir = tmp_path / "demo"
    output = io.StringIO()
    summary = run_demo(None, workdir, keep=True, console=Console(file=output, width=200))

    assert summary.workdir == workdir and summary.config_path == workdir / "config.toml"
    assert summary.log_path == workdir / "node.log" and summary.kept
    assert f"dicom-ai-node series {summary.study_uid} --config" in output.getvalue()
    assert sorted(job.model for job in summary.jobs) == ["ct-contrast", "ct-lung-nodules", "ct-tissue"]
    (job,) = [job for job in summary.jobs if job.model == "ct-tissue"]
    assert [segment.label for segment in job.segments] == list(LABELS)
    for segment in job.segments:
        assert segment.expected_ml is not None
        assert segment.measured_ml == pytest.approx(segment.expected_ml, rel=0.05), segment.label
    assert set(summary.timings) == {"start", "write", "receive", "complete", "inference", "results"}
    assert "sent by pynetdicom" in output.getvalue()
    check_printout(output.getvalue(), workdir)


def test_demo_phantom_holds_the_whole_body_and_lungs():
    """The analytic volumes assume the body fits the field of view and the lungs the scan length."""
    phantom = demo_phantom()
    geometry = phantom.geometry
    assert phantom.columns * phantom.pixel_spacing[1] > 2 * geometry.body_semi_axes[0] + 10
    assert phantom.rows * phantom.pixel_spacing[0] > 2 * geometry.body_semi_axes[1] + 10
    assert phantom.scan_length_mm > 2 * (geometry.lung_semi_axes[2] + abs(phantom.lung_z_centre)) + 10


def test_demo_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NodeError, match="not an empty folder"):
        run_demo(None, tmp_path, keep=True, console=Console(file=io.StringIO()))
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_demo_does_not_import_the_cli():
    """The CLI imports the demo, never the reverse: an import circle breaks whichever module loads first."""
    code = "import sys, dicom_ai_node.demo; sys.exit('dicom_ai_node.cli' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


def test_demo_config_takes_only_models_and_routes_from_the_admins_config(tmp_path):
    """`demo --config` runs the admin's models; port, storage, database and timing stay the demo's own."""
    settings = write_demo_config(tmp_path, REPO / "config.toml")
    shipped = load_config(REPO / "config.toml")
    assert settings.models == shipped.models  # model paths are absolute, so the copy resolves the same
    assert settings.routes == shipped.routes
    assert settings.dimse.bind == "127.0.0.1" and settings.dimse.port != shipped.dimse.port
    assert settings.storage.path == tmp_path / "storage"
    assert settings.database.url == f"sqlite:///{tmp_path}/dicom-ai-node.sqlite"
    assert settings.series.stable_seconds == demo.STABLE_SECONDS
