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
import orthanc as orthanc_module
from orthanc import OrthancProcess

from dicom_ai_node.config import Config, load_config
from dicom_ai_node.phantoms import CTPhantom

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ORTHANC_DIR = DEPLOY / "orthanc"
IMAGE_MODELS = "/opt/dicom-ai-node/models"  # where the Dockerfile copies models/


@pytest.fixture(scope="module")
def docker_config(tmp_path_factory) -> Config:
    """config.docker.toml as the image reads it: its model paths, which must exist at load, are the image's
    copy of models/, here the repository's."""
    text = (DEPLOY / "config.docker.toml").read_text()
    path = tmp_path_factory.mktemp("image") / "config.toml"
    path.write_text(text.replace(f'"{IMAGE_MODELS}/', f'"{DEPLOY.parent / "models"}/'))
    return load_config(path)


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
        "RegisteredUsers": shipped["RegisteredUsers"],  # as shipped: the password from ORTHANC_ADMIN_PASSWORD
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


def test_orthanc_forwards_stable_ct_to_node_and_receives_results_without_loop(node_factory, tmp_path, monkeypatch):
    # site.json's users as shipped: Orthanc takes the password from its environment (nothing shipped).
    (user,) = json.loads((ORTHANC_DIR / "site.json").read_text())["RegisteredUsers"]
    monkeypatch.setitem(orthanc_module.ORTHANC_ENV, "ORTHANC_ADMIN_PASSWORD", "test-password")
    orthanc = OrthancProcess(tmp_path / "orthanc", users={user: "test-password"})
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


def test_compose_file_references_are_consistent(docker_config):
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

    config = docker_config
    site = json.loads((ORTHANC_DIR / "site.json").read_text())
    integration = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
    # The node: its storage on the named volume, PostgreSQL by service name (its port: see the ports test).
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
    assert _container_ports(orthanc) == {site["DicomPort"]}
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


def test_docker_config_validates_with_routes_back_to_orthanc(docker_config):
    config = docker_config
    assert {route.modality: route.destinations for route in config.routes} == {"CT": ["orthanc"], "MR": ["orthanc"]}
    assert config.database.url.startswith("postgresql") and ":" not in config.database.url.split("//")[1].split("@")[0]
    # Its model paths exist (load_config checks them) once mapped as the image lays them out.
    assert f"COPY models {IMAGE_MODELS}\n" in (DEPLOY / "Dockerfile").read_text()
    assert IMAGE_MODELS in (DEPLOY / "config.docker.toml").read_text()


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string((DEPLOY / "dicom-ai-node.service").read_text())
    return parser


def test_systemd_unit_is_hardened_and_drains(docker_config):
    unit = _unit()
    service = unit["Service"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert service["ExecStart"].endswith("dicom-ai-node serve")
    assert service["ExecStartPre"].endswith("dicom-ai-node db upgrade")
    assert service["Restart"] == "on-failure"
    grace = docker_config.node.shutdown_grace_seconds
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


# --- compose: what is published, no shipped password, log rotation ---------------------------------------


def _published(service: dict) -> dict[int, int]:
    """Host port -> container port of a service's `ports` (short syntax, as the compose file uses)."""
    published = {}
    for port in service.get("ports", []):
        parts = str(port).split("/")[0].split(":")
        assert len(parts) >= 2, f"{port}: a port without a host port is published on a random one"
        published[int(parts[-2])] = int(parts[-1])
    return published


def test_compose_publishes_only_orthanc_dicom_and_the_viewer(docker_config):
    services = _compose()["services"]
    site = json.loads((ORTHANC_DIR / "site.json").read_text())
    published = {name: _published(service) for name, service in services.items() if service.get("ports")}
    # PostgreSQL, the node (Orthanc reaches it in the network) and Orthanc's REST API stay unpublished.
    assert published == {"orthanc": {site["DicomPort"]: site["DicomPort"]}, "ohif": {3000: 80}}
    for service in services.values():
        assert "network_mode" not in service and not service.get("expose"), service
    # Orthanc still reaches the node, and OHIF Orthanc's HTTP port, inside the network.
    config = docker_config
    assert site["DicomModalities"]["ai-node"]["Port"] == config.dimse.port
    assert f"http://orthanc:{site['HttpPort']}/" in (DEPLOY / "ohif" / "default.conf.template").read_text()


def test_compose_ships_no_password():
    compose_text = (DEPLOY / "docker-compose.yml").read_text()
    services = _compose()["services"]
    required = re.compile(r"^\$\{(\w+):\?[^}]+\}$")  # compose refuses to start while it is unset or empty
    secrets = {}
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN", key):
                match = required.match(str(value))
                assert match, f"{name}: {key} = {value!r} is not a required variable"
                secrets.setdefault(match.group(1), set()).add(name)
    assert secrets == {"POSTGRES_PASSWORD": {"postgres", "db-upgrade", "dicom-ai-node"},
                       "ORTHANC_ADMIN_PASSWORD": {"orthanc"}}
    # Orthanc's users take their passwords from its (required) environment: none is written in site.json.
    site = json.loads((ORTHANC_DIR / "site.json").read_text())
    for user, password in site["RegisteredUsers"].items():
        variable = re.fullmatch(r"\$\{(\w+)\}", password)
        assert variable and variable.group(1) in secrets, f"site.json: {user} has a literal password"
        assert "orthanc" in secrets[variable.group(1)]
    # Orthanc substitutes ${...} anywhere in its files: no other (e.g. in the comments) may be there.
    for path in ORTHANC_DIR.glob("*.json"):
        assert path.read_text().count("${") == (len(site["RegisteredUsers"]) if path.name == "site.json" else 0)
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert "change-me" not in path.read_text(errors="replace").lower(), path
    # The generated passwords are written to deploy/.env, which git must never take.
    assert "openssl rand" in compose_text and "openssl rand" in (DEPLOY / "README.md").read_text()
    ignored = (DEPLOY.parent / ".gitignore").read_text().split()
    assert {"deploy/.env", ".env", "*.env"} & set(ignored), "deploy/.env is not in .gitignore"


def test_logs_rotate_in_compose_and_in_the_node(docker_config):
    for name, service in _compose()["services"].items():
        logging_options = service.get("logging", {})
        assert logging_options.get("driver") == "json-file" and logging_options["options"]["max-size"], name
    configs = {"config.docker.toml": docker_config, "config.systemd.toml": load_config(DEPLOY / "config.systemd.toml")}
    for config_file, config in configs.items():
        section = config.logging
        assert section.file is not None and section.max_mb > 0 and section.backups >= 1, config_file


# --- systemd: the unit reads its configuration and writes its paths with the guide's permissions ------


def _bare_metal_commands() -> list[list[str]]:
    """The shell commands of deploy/README.md's bare-metal block, `sudo` dropped, split shell-like."""
    import shlex

    text = (DEPLOY / "README.md").read_text()
    section = text[text.index("## Bare metal (systemd)"):]
    block = section[section.index("```sh") + 5:section.index("```", section.index("```sh") + 5)]
    commands = []
    for line in block.splitlines():
        for command in re.split(r"&&|;", line.split("#")[0]):
            words = shlex.split(command)
            if words and words[0] == "sudo":
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def _installed_by_guide() -> dict[str, dict]:
    """Path -> {mode, owner, group, dir} for every `install` of the bare-metal block (install's defaults:
    root, root, 0755)."""
    installed = {}
    for words in _bare_metal_commands():
        if words[0] != "install":
            continue
        entry, rest, index = {"mode": 0o755, "owner": "root", "group": "root", "dir": False}, [], 1
        while index < len(words):
            word = words[index]
            if word == "-d":
                entry["dir"] = True
            elif word in ("-m", "-o", "-g"):
                index += 1
                entry[{"-m": "mode", "-o": "owner", "-g": "group"}[word]] = (
                    int(words[index], 8) if word == "-m" else words[index])
            else:
                rest.append(word)
            index += 1
        for path in rest if entry["dir"] else rest[-1:]:
            installed[path] = dict(entry)
    return installed


def _may(entry: dict, user: str, group: str, bits: int) -> bool:
    """Whether `user` (primary and only group `group`) has permission `bits` (4 r, 1 x) on the entry."""
    if entry["owner"] == user:
        return entry["mode"] >> 6 & bits == bits
    if entry["group"] == group:
        return entry["mode"] >> 3 & bits == bits
    return entry["mode"] & bits == bits


def test_systemd_unit_can_read_its_configuration_with_the_guides_permissions():
    service = _unit()["Service"]
    user, group = service["User"], service["Group"]
    environment = [value for key, value in _unit_lines() if key == "Environment"]
    config_path = next(v.split("=", 1)[1] for v in environment if v.startswith("DICOM_AI_NODE_CONFIG="))
    secrets = next(value for key, value in _unit_lines() if key == "EnvironmentFile").lstrip("-")
    # The guide creates the user with a group of the same name, which the unit runs as.
    (useradd,) = [words for words in _bare_metal_commands() if words[0] == "useradd"]
    assert useradd[-1] == user == group and "--user-group" in useradd
    installed = _installed_by_guide()
    folder = str(Path(config_path).parent)
    assert service["ConfigurationDirectory"] == Path(folder).name and folder.startswith("/etc/")
    # Every config file is installed (no `cp` with whatever umask), in a folder the service can enter,
    # readable by it and not writable by it.
    assert folder in installed and installed[folder]["dir"]
    assert _may(installed[folder], user, group, 1), f"{folder} is not traversable by {user}"
    assert int(service["ConfigurationDirectoryMode"], 8) == installed[folder]["mode"]  # systemd never chmods it
    for path in (config_path, secrets):
        assert path in installed, f"the guide does not install {path}"
        assert _may(installed[path], user, group, 4), f"{path} is not readable by {user}"
        assert installed[path]["owner"] != user and not installed[path]["mode"] & 0o022, path
        assert not installed[path]["mode"] & 0o004, f"{path} is readable by everyone"
    for words in _bare_metal_commands():
        assert not (words[0] in {"cp", "mv"} and words[-1].startswith(folder)), f"{words}: use install -m -g"
    # What the guide installs as the configuration is the shipped bare-metal file.
    (source,) = [words[-2] for words in _bare_metal_commands() if words[0] == "install" and words[-1] == config_path]
    assert source == "deploy/config.systemd.toml"


def _unit_lines() -> list[tuple[str, str]]:
    """Every `Key=value` of the unit, repeated keys kept (configparser keeps only the last)."""
    lines = []
    for line in (DEPLOY / "dicom-ai-node.service").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            lines.append((key.strip(), value.strip()))
    return lines


def _covered(path: Path, folders: list[str]) -> bool:
    return any(path == Path(folder) or Path(folder) in path.parents for folder in folders)


def test_systemd_unit_writes_every_path_of_the_bare_metal_config():
    service = _unit()["Service"]
    writable = [path for key, value in _unit_lines() if key == "ReadWritePaths" for path in value.split()]
    writable += [f"/var/lib/{service['StateDirectory']}", f"/var/log/{service['LogsDirectory']}"]
    config = load_config(DEPLOY / "config.systemd.toml")
    database = Path(config.database.url.removeprefix("sqlite:///"))
    assert config.database.url.startswith("sqlite:////")
    for what, path in {"storage.path": config.storage.path, "database": database.parent,
                       "logging.file": config.logging.file.parent, "WorkingDirectory": Path(service["WorkingDirectory"])
                       }.items():
        assert path.is_absolute() and _covered(path, writable), f"{what} {path} is not writable for the unit"
        assert not _covered(path, ["/home", "/root", "/run/user"]), f"{what} {path} is hidden by ProtectHome"
    for name, model in config.models.items():  # read-only, from the checkout the guide clones
        assert getattr(model, "path", None) is None or _covered(model.path, ["/opt/dicom-ai-node"]), name
    assert "/opt/dicom-ai-node/.venv/bin/dicom-ai-node" in service["ExecStart"]
    assert not any(key in {"InaccessiblePaths", "TemporaryFileSystem", "PrivateUsers", "DynamicUser"}
                   for key, _ in _unit_lines())
    # The guide names the same paths as the file it installs.
    guide = (DEPLOY / "README.md").read_text()
    for path in (config.storage.path, database, config.logging.file):
        assert str(path) in guide, path
    grace = config.node.shutdown_grace_seconds
    assert float(service["TimeoutStopSec"]) > grace


# --- documentation that matches the code ------------------------------------------------------------------

REPO = DEPLOY.parent
STALE = re.compile(r"being added|will be added|to be added|coming soon|not yet (?:implemented|available|supported)"
                   r"|when the web server lands|\bTODO\b", re.IGNORECASE)


def test_docs_promise_nothing_that_already_exists():
    documents = [REPO / "README.md", REPO / "config.toml", *[p for p in DEPLOY.rglob("*") if p.is_file()]]
    for path in documents:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            assert not STALE.search(line), f"{path.relative_to(REPO)}:{number}: {line.strip()}"
    # Every model kind the configuration accepts is described in the README's table.
    from typing import get_args

    from dicom_ai_node.config import AnyModelConfig, LoggingSection

    readme = (REPO / "README.md").read_text()
    (kind_row,) = [line for line in readme.splitlines() if line.startswith("| `models.NAME.kind`")]
    for model_class in get_args(get_args(AnyModelConfig)[0]):
        (kind,) = get_args(model_class.model_fields["kind"].annotation)
        assert f"`{kind}`" in kind_row, kind
    for key in LoggingSection.model_fields:
        assert f"logging.{key}" in readme and re.search(rf"^#?\s*{key} = ", (REPO / "config.toml").read_text(), re.M), key


def test_config_toml_header_names_what_is_not_an_embedded_default():
    import tomllib

    from dicom_ai_node.config import Config

    text = (REPO / "config.toml").read_text()
    header = text[:text.index("\n[")]
    shipped, defaults = tomllib.loads(text), Config()
    extra_models = set(shipped.get("models", {})) - set(defaults.models)
    extra_routes = {route["name"] for route in shipped.get("routes", [])} - {route.name for route in defaults.routes}
    assert extra_models == {"demo-mr"} and extra_routes == {"mr"}  # what the header below is about
    for name in extra_models:
        assert f"[models.{name}]" in header, f"the header must say models.{name} is not a default"
    for name in extra_routes:
        assert f'route "{name}"' in header
    assert "the values below are the embedded defaults, so" not in header  # the old, unqualified claim
    # The embedded defaults hold no MR route at all.
    assert {route.modality for route in defaults.routes} == {"CT"}


def test_quick_start_and_the_two_commands_agree():
    readme = (REPO / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):readme.index("## Two commands")]
    two = readme[readme.index("## Two commands"):readme.index("## What happens to an instance")]
    serve = (REPO / "scripts" / "serve.sh").read_text()
    test = (REPO / "scripts" / "test.sh").read_text()
    # The Quick start installs with scripts/install.sh; serve.sh and test.sh run that same script.
    assert "scripts/install.sh" in quick and ".venv/bin/dicom-ai-node demo" in quick
    assert re.search(r"^scripts/install\.sh\s*$", serve, re.M) and re.search(r"^scripts/install\.sh test\s*$", test, re.M)
    (serve_line,) = [line for line in two.splitlines() if line.startswith("scripts/serve.sh ")]
    (test_line,) = [line for line in two.splitlines() if line.startswith("scripts/test.sh ")]
    assert "scripts/install.sh" in serve_line and "scripts/install.sh test" in test_line
    assert "first run only" not in two  # install.sh runs on every start (quick when nothing changed)
    assert "db upgrade" in serve and "db upgrade" in two
    for script in ("install.sh", "serve.sh", "test.sh"):
        assert (REPO / "scripts" / script).exists()


def test_one_table_of_ports_matches_the_files():
    from dicom_ai_node.config import Config

    guide = (DEPLOY / "README.md").read_text()
    section = guide[guide.index("## Ports"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("|") and re.match(r"\d+", cells[0]):
            rows[int(re.match(r"\d+", cells[0]).group())] = cells
    assert guide.count("| port |") == 1, "one table of ports"
    site = json.loads((ORTHANC_DIR / "site.json").read_text())
    defaults = Config()
    assert set(rows) == {defaults.dimse.port, 2762, defaults.web.port, site["DicomPort"], site["HttpPort"], 3000, 5432}
    (header_line,) = [line for line in section.splitlines() if line.startswith("| port |")]
    header = [cell.strip() for cell in header_line.strip("|").split("|")]
    compose_column = header.index("Docker Compose")
    published = {host for service in _compose()["services"].values() for host in _published(service)}
    for port, cells in rows.items():
        assert ("**published**" in cells[compose_column]) == (port in published), (port, cells[compose_column])
    assert "(deploy/README.md#ports)" in (REPO / "README.md").read_text()


def test_restore_procedure_is_beside_the_backup():
    guide = (DEPLOY / "README.md").read_text()
    backup, restore = guide.index("## Backup"), guide.index("## Restore")
    assert backup < restore and "\n## " not in guide[backup + 1:restore], "Restore follows Backup directly"
    section = guide[restore:]
    for needle in ("pg_restore", "dicom-ai-node.sqlite-wal", "rsync -a --delete", "tar xzf", "db upgrade",
                   "run --rm db-upgrade", "chown -R dicom-ai-node:dicom-ai-node"):
        assert needle in section, needle
    # Stopped first, database and storage back, migrated, started last.
    steps = [section.index(word) for word in ("**Stop**", "**Database**", "**Storage**", "**Migrate**", "**Start**")]
    assert steps == sorted(steps)
    assert "(deploy/README.md#restore)" in (REPO / "README.md").read_text()
