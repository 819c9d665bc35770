"""The deployment files in deploy/: Orthanc with exactly the shipped configuration and Lua forwarding
stable CT series to a real node and receiving its SEG and SR back (without bouncing them to the
node again), and static checks of the Dockerfile, docker-compose.yml, config.docker.toml and the
systemd unit (with `docker compose config` / `systemd-analyze verify` where those tools exist)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import storescu
from orthanc import OrthancProcess

from dicom_ai_node.config import load_config
from dicom_ai_node.phantom import CTPhantom

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ORTHANC_DIR = DEPLOY / "orthanc"


@pytest.fixture
def database_url(tmp_path) -> str:
    """SQLite only here: what is tested is the Orthanc integration, not the database (tested elsewhere)."""
    return f"sqlite:///{tmp_path}/node.sqlite"


# --- Orthanc <-> node, end to end ----------------------------------------------------------------------


def _orthanc_config_folder(tmp_path: Path, orthanc: OrthancProcess, node_port: int) -> Path:
    """deploy/orthanc/ as shipped, except site.json, which is replaced by one with the same keys
    pointing at this test's ports, storage and node (Orthanc refuses a key defined in two files)."""
    folder = tmp_path / "orthanc-config"
    folder.mkdir()
    for path in ORTHANC_DIR.iterdir():
        if path.name != "site.json":
            shutil.copy2(path, folder / path.name)
    shipped = json.loads((ORTHANC_DIR / "site.json").read_text())
    site = {
        "// site": "written by tests/test_deploy.py",
        "DicomAet": "ORTHANC",
        "DicomPort": orthanc.dicom_port,
        "HttpPort": orthanc.http_port,
        "StorageDirectory": str(orthanc.workdir / "storage"),
        "IndexDirectory": str(orthanc.workdir / "index"),
        "RegisteredUsers": orthanc.users,
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "StableAge": 2,
        "DicomModalities": {
            "ai-node": {**shipped["DicomModalities"]["ai-node"], "AET": "AI_NODE", "Host": "127.0.0.1", "Port": node_port}
        },
    }
    assert site.keys() == shipped.keys(), "the test's site.json must mirror deploy/orthanc/site.json"
    (folder / "site.json").write_text(json.dumps(site, indent=2))
    return folder


def _lua_lines(orthanc: OrthancProcess) -> list[str]:
    return [line.split("Lua says: ", 1)[1] for line in orthanc.log().splitlines() if "Lua says: ai-node forward" in line]


def _wait(predicate, timeout: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{log()[-6000:]}")


def test_orthanc_forwards_stable_ct_to_node_and_receives_results_without_loop(node_factory, tmp_path):
    orthanc = OrthancProcess(tmp_path / "orthanc", users={"admin": "test-password"})
    node = node_factory(
        workers={"processes": 1},
        destinations={"orthanc": {"kind": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                  "port": orthanc.dicom_port}},
        routes=[{"name": "ct", "modality": "CT", "min_slices": 3, "models": ["ct-tissue"],
                 "destinations": ["orthanc"]}],
        delivery={"initial_backoff_seconds": 1.0, "max_backoff_seconds": 3.0},
    )
    orthanc.config_path = _orthanc_config_folder(tmp_path, orthanc, node.port)  # a folder: Orthanc reads every *.json
    orthanc.start()
    try:
        node.start()
        assert any('series go to modality "ai-node" (AE title AI_NODE)' in line for line in _lua_lines(orthanc))

        phantom = CTPhantom(slices=24, rows=96, columns=96, pixel_spacing=(4.0, 4.0), slice_spacing=10.0)
        paths = phantom.write(tmp_path / "ct")
        sent = storescu(orthanc.dicom_port, *paths, called="ORTHANC", calling="CT_SCANNER")
        assert sent.returncode == 0, sent.stderr

        def both_logs() -> str:
            return f"--- orthanc ---\n{orthanc.log()}\n--- node ---\n{node.log()}"

        # Orthanc: CT stable -> Lua -> store job to the node; node: SEG + SR -> C-STORE back to Orthanc.
        _wait(lambda: orthanc.count_instances() >= 26, 180, "24 CT + SEG + SR in Orthanc", both_logs)
        # The SEG and SR series become stable in Orthanc too; the Lua must decline both.
        def declined_lines() -> list[str] | None:
            lines = [line for line in _lua_lines(orthanc) if "not forwarded" in line]
            return lines if len(lines) >= 2 else None

        declined = _wait(declined_lines, 30, "the Lua declining the SEG and SR series", both_logs)
        time.sleep(3)  # room for a (wrong) forward of the results to reach the node

        assert orthanc.count_instances() == 26
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in orthanc.get("/series?expand"))
        assert modalities == ["CT", "SEG", "SR"]
        assert {re.search(r"not forwarded: modality (\w+)", l).group(1) for l in declined} == {"SEG", "SR"}
        forwarded = [l for l in _lua_lines(orthanc) if "forwarding to modality" in l]
        assert len(forwarded) == 1 and phantom.series_uid in forwarded[0], _lua_lines(orthanc)
        jobs = [orthanc.get(f"/jobs/{job}") for job in orthanc.get("/jobs")]
        assert [(j["Type"], j["State"]) for j in jobs] == [("DicomModalityStore", "Success")]

        # The node received the CT series only: no SEG or SR came back to it.
        (study,) = node.json("studies")
        assert study["StudyInstanceUID"] == phantom.study_uid
        assert study["NumberOfStudyRelatedInstances"] == 24
        (series,) = node.json("series", phantom.study_uid)
        assert series["SeriesInstanceUID"] == phantom.series_uid
        assert series["NumberOfSeriesRelatedInstances"] == 24
        received = {e.get("SeriesInstanceUID") for e in node.json("events") if e.get("SeriesInstanceUID")}
        assert received == {phantom.series_uid}
        results = node.json("job", "show", str(node.json("jobs")[0]["id"]))["results"]
        assert len(results) == 2 and {r["SeriesInstanceUID"] for r in results}.isdisjoint(received)
        (delivery,) = node.json("deliveries", "--state", "delivered")
        assert delivery["destination"] == "orthanc"
    finally:
        orthanc.kill()


# --- static checks -----------------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _container_ports(service: dict) -> set[int]:
    return {int(str(port).split(":")[-1].split("/")[0]) for port in service.get("ports", [])}


def test_orthanc_folder_splits_integration_and_site_settings():
    integration = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
    site = json.loads((ORTHANC_DIR / "site.json").read_text())
    assert not integration.keys() & site.keys(), "Orthanc refuses a key defined in two files of its folder"
    assert {p.name for p in ORTHANC_DIR.iterdir()} == {"orthanc.json", "site.json", "forward-to-ai-node.lua"}
    assert integration["LuaScripts"] == ["forward-to-ai-node.lua"]
    assert integration["DicomWeb"]["Enable"] is True
    assert integration["AiNode"]["Modality"] in site["DicomModalities"]
    assert set(integration["AiNode"]["ForwardModalities"]) == {"CT", "MR"}
    lua = (ORTHANC_DIR / "forward-to-ai-node.lua").read_text()
    for needle in ("OnStableSeries", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7",
                   "1.2.840.10008.5.1.4.1.1.88.", "'dicom-ai-node'", "SEG = true", "SR = true", "Asynchronous = true"):
        assert needle in lua


def test_compose_file_references_are_consistent():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "db-upgrade", "dicom-ai-node", "orthanc", "ohif"}
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["orthanc"]["image"].split(":")[0] in {"jodogne/orthanc-plugins", "orthancteam/orthanc"}
    assert services["ohif"]["image"].startswith("ohif/app:")
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
    node, orthanc, postgres = services["dicom-ai-node"], services["orthanc"], services["postgres"]
    assert (DEPLOY / node["build"]["context"] / node["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert services["db-upgrade"]["command"] == ["db", "upgrade"]
    assert node["depends_on"]["db-upgrade"]["condition"] == "service_completed_successfully"

    config = load_config(DEPLOY / "config.docker.toml")
    site = json.loads((ORTHANC_DIR / "site.json").read_text())
    integration = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
    # The node: its port published, its storage on the named volume, PostgreSQL by service name.
    assert config.dimse.port in _container_ports(node)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in node["volumes"]}
    assert mounts["/etc/dicom-ai-node/config.toml"] == "./config.docker.toml"
    data = next(target for target, source in mounts.items() if source == "node-data")
    assert str(config.storage.path).startswith(data) and str(config.logging.file).startswith(data)
    url = config.database.url
    assert re.match(r"postgresql(\+psycopg)?://dicom_ai_node@postgres(:5432)?/dicom_ai_node$", url), url
    assert postgres["environment"]["POSTGRES_USER"] == "dicom_ai_node"
    assert postgres["environment"]["POSTGRES_DB"] == "dicom_ai_node"
    assert "PGPASSWORD" in node["environment"]
    assert float(node["stop_grace_period"].rstrip("s")) > config.node.shutdown_grace_seconds
    # Orthanc: knows the node by its service name, port and AE title; the node sends results to it.
    entry = site["DicomModalities"][integration["AiNode"]["Modality"]]
    assert (entry["AET"], entry["Host"], entry["Port"]) == (config.node.ae_title, "dicom-ai-node", config.dimse.port)
    destination = config.destinations["orthanc"]
    assert (destination.kind, destination.ae_title, destination.host, destination.port) == (
        "dimse", site["DicomAet"], "orthanc", site["DicomPort"])
    assert {site["DicomPort"], site["HttpPort"]} <= _container_ports(orthanc)
    assert {"./orthanc:/etc/orthanc:ro"} <= set(orthanc["volumes"])
    assert any(v.split(":")[1] == site["StorageDirectory"] for v in orthanc["volumes"])
    assert "ORTHANC" in {c.ae_title for c in config.dimse.allowed_callers}
    # OHIF: Orthanc's DICOMweb proxied under the viewer's origin.
    template = (DEPLOY / "ohif" / "default.conf.template").read_text()
    assert f"proxy_pass http://orthanc:{site['HttpPort']}{integration['DicomWeb']['Root']};" in template
    assert "${PORT}" in template and services["ohif"]["environment"]["PORT"] == "80"
    assert "'/dicom-web'" in (DEPLOY / "ohif" / "app-config.js").read_text()


def test_docker_compose_config_passes():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    if subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode != 0:
        pytest.skip("the docker compose plugin is not installed (`docker compose version` fails)")
    result = subprocess.run(
        [docker, "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "POSTGRES_PASSWORD": "only-for-the-test"},
    )
    assert result.returncode == 0, result.stderr


def test_docker_config_validates_with_routes_back_to_orthanc():
    config = load_config(DEPLOY / "config.docker.toml")
    assert {route.modality: route.destinations for route in config.routes} == {"CT": ["orthanc"], "MR": ["orthanc"]}
    assert config.database.url.startswith("postgresql") and ":" not in config.database.url.split("//")[1].split("@")[0]
    # The Dockerfile copies models/ to /opt/dicom-ai-node/models: every bundle path must exist in the repository.
    for name, model in config.models.items():
        if model.path is not None:
            relative = model.path.relative_to("/opt/dicom-ai-node")
            assert (DEPLOY.parent / relative).exists(), f"models.{name}.path {model.path} is not in the image"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string((DEPLOY / "dicom-ai-node.service").read_text())
    return parser


def test_systemd_unit_is_hardened_and_drains():
    unit = _unit()
    service = unit["Service"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert service["ExecStart"].endswith("dicom-ai-node serve")
    assert service["ExecStartPre"].endswith("dicom-ai-node db upgrade")
    assert service["Restart"] == "on-failure"
    grace = load_config(DEPLOY / "config.docker.toml").node.shutdown_grace_seconds
    assert float(service["TimeoutStopSec"]) > grace
    assert service["KillMode"] == "mixed"
    assert service.get("User") or service.get("DynamicUser") == "yes"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():
        assert service[key] == value, key
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert {"/var/lib/dicom-ai-node", "/var/log/dicom-ai-node"} <= set(service["ReadWritePaths"].split())
    for forbidden in ("MemoryDenyWriteExecute", "PrivateDevices"):  # torch JIT; the GPU's /dev/nvidia*
        assert forbidden not in service


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit names /opt/dicom-ai-node/.venv; verify checks that ExecStart exists, so point it at this venv.
    executable = Path(sys.executable).parent / "dicom-ai-node"
    assert executable.exists(), executable
    text = (DEPLOY / "dicom-ai-node.service").read_text().replace("/opt/dicom-ai-node/.venv/bin/dicom-ai-node",
                                                                   str(executable))
    unit = tmp_path / "dicom-ai-node.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "dicom-ai-node" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_runs_as_non_root_with_healthcheck():
    instructions = _dockerfile_instructions()
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert any(op == "HEALTHCHECK" and "dicom-ai-node status" in arg for op, arg in final)
    assert {"11112", "8080"} <= {port for op, arg in final if op == "EXPOSE" for port in arg.split()}
    assert any(op == "VOLUME" and "/var/lib/dicom-ai-node" in arg for op, arg in final)
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["BASE_IMAGE"].startswith("python:3.11")
    # Every COPY source from the build context exists and is let through by Dockerfile.dockerignore.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from"):
            *sources, _ = arg.split()
            for source in sources:
                assert (DEPLOY.parent / source).exists(), source
                assert f"!{source.rstrip('/')}" in ignore, f"{source} is excluded from the build context"
