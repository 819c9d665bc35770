"""The admin's side: configuration errors that name the key, plain-words CLI failures, echo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, storescu

from dicom_ai_node.config import ConfigError, load_config
from dicom_ai_node.store.db import head_revision

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, config: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    extra = ["--config", str(config)] if config else []
    return subprocess.run(
        [sys.executable, "-m", "dicom_ai_node", *args, *extra], capture_output=True, text=True, timeout=60, env=env
    )


def test_shipped_config_is_the_embedded_default():
    config = load_config(REPO / "config.toml")
    assert config.node.ae_title == "AI_NODE" and config.dimse.port == 11112
    assert config.database.url == f"sqlite:///{REPO}/var/dicom-ai-node.sqlite"
    assert config.storage.path == REPO / "var" / "storage"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[dimse]\nprot = 104\n", "dimse.prot: unknown key"),
        ("[dimse]\nport = 70000\n", "dimse.port: Input should be less than or equal to 65535"),
        ('[node]\nae_title = "THIS_AE_TITLE_IS_TOO_LONG"\n', "node.ae_title"),
        ('[dimse]\nallowed_callers = [{ ae_title = "CT", hots = "x" }]\n', "dimse.allowed_callers.0.hots: unknown key"),
        ("[series]\nstable_seconds = -1\n", "series.stable_seconds"),
        ('[database]\nurl = "mysql://x"\n', "database.url"),
        ("[dimse\n", "not valid TOML"),
        ('[[routes]]\nname = "x"\nmodality = "CT"\nmodels = ["nope"]\n', "routes.0.models: no model named 'nope'"),
        ('[models.m]\nkind = "torchscript"\n', "models.m.path: Field required"),
        ('[models.m]\nkind = "onnx"\n', "models.m.kind: must be one of 'builtin', 'monai_bundle', 'torchscript'"),
        ('[models.m]\nkind = "builtin"\nmodel = "ct-lungs"\n', "models.m.model: Input should be 'ct-tissue', "
                                                               "'ct-lung-nodules' or 'ct-contrast'"),
        ('[destinations.pacs]\nkind = "dimse"\nhost = "x"\n', "destinations.pacs.ae_title: Field required"),
        ('[destinations.pacs]\nkind = "dimse"\nae_title = "PACS"\nport = 104\n', "destinations.pacs.host: Field required"),
        ('[destinations.pacs]\nkind = "dimse"\nae_title = "PACS"\nhost = "x"\nport = 104\nurl = "http://x"\n',
         "destinations.pacs.url: unknown key for kind = 'dimse'"),
        ('[destinations.pacs]\nkind = "dimse"\nae_title = "PACS"\nhost = "x"\nport = 104\ntls_ca_file = "ca.pem"\n',
         "destinations.pacs: tls_ca_file: not used unless tls = true"),
        ('[destinations.web]\nkind = "dicomweb"\nurl = "pacs.local/dicom-web"\n',
         "destinations.web.url: must start with http:// or https://"),
        ('[destinations.web]\nkind = "orthanc"\nurl = "http://x"\nhost = "x"\n',
         "destinations.web.host: unknown key for kind = 'orthanc'"),
        ('[destinations.web]\nkind = "dicomweb"\nurl = "http://x"\nusername = "u"\n',
         "destinations.web: username needs password_env"),
        ('[[routes]]\nname = "x"\nmodality = "CT"\nmodels = ["ct-tissue"]\ndestinations = ["nowhere"]\n',
         "routes.0.destinations: no destination named 'nowhere'"),
        ('[models.m]\nkind = "builtin"\ndevice = "gpu"\n', "models.m.device: must be auto, cpu, cuda or cuda:N"),
        ('[[routes]]\nname = "x"\nmodality = "CT"\nseries_description = "("\nmodels = ["ct-tissue"]\n',
         "routes.0.series_description: not a valid regular expression"),
    ],
)
def test_bad_config_stops_start_up_naming_the_key(tmp_path, text, named):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")):
        load_config(path)
    result = _cli("serve", config=path)
    assert result.returncode == 2
    assert named in result.stderr and "Traceback" not in result.stderr


def test_every_path_is_resolved_against_the_config_folder(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "config.toml").write_text(
        '[dimse.tls]\ncert_file = "tls/node.pem"\nkey_file = "tls/node.key"\nca_file = "tls/ca.pem"\n'
        '[web]\ntls_cert_file = "tls/web.pem"\ntls_key_file = "tls/web.key"\n'
        '[logging]\nfile = "log/node.log"\n'
        '[destinations.pacs]\nkind = "dimse"\nae_title = "PACS"\nhost = "pacs"\nport = 2762\ntls = true\n'
        'tls_ca_file = "tls/pacs-ca.pem"\ntls_cert_file = "tls/client.pem"\ntls_key_file = "tls/client.key"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(Path("../site/config.toml"))

    pacs = config.destinations["pacs"]
    assert (pacs.tls_ca_file, pacs.tls_cert_file, pacs.tls_key_file) == (
        site / "tls" / "pacs-ca.pem", site / "tls" / "client.pem", site / "tls" / "client.key")
    assert config.dimse.tls is not None and config.dimse.tls.cert_file == site / "tls" / "node.pem"
    assert config.web.tls_cert_file == site / "tls" / "web.pem"
    assert config.database.url == f"sqlite:///{site}/var/dicom-ai-node.sqlite"
    paths = list(_paths(config.model_dump(exclude={"source"})))
    assert len(paths) == 10 and all(path.is_relative_to(site) for path in paths), paths


def _paths(value: object):
    if isinstance(value, Path):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _paths(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _paths(item)


def test_a_model_path_that_does_not_exist_stops_start_up(tmp_path):
    """config.toml copied to another folder (/etc/dicom-ai-node/, as the deploy guide does) loses models/."""
    path = tmp_path / "config.toml"
    path.write_text((REPO / "config.toml").read_text())
    missing = tmp_path / "models" / "demo-mr-bundle"
    named = f"models.demo-mr.path: {missing} does not exist"
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(path)
    result = _cli("serve", config=path)
    assert result.returncode == 2 and named in result.stderr


def test_the_config_module_imports_no_web_module():
    """Configuration sections belong to config; the web server imports them, never the other way round."""
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, dicom_ai_node.config; print(sorted(sys.modules))"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split("'")
    assert [name for name in imported if name.startswith("dicom_ai_node.web")] == []


def test_config_from_environment_variable(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[dimse]\nport = 0\n")
    result = _cli("status", env={"DICOM_AI_NODE_CONFIG": str(path), "PATH": "/usr/bin"})
    assert result.returncode == 2 and "dimse.port" in result.stderr


def test_missing_config_file_is_named(tmp_path):
    result = _cli("status", config=tmp_path / "nowhere.toml")
    assert result.returncode == 2
    assert "configuration file not found" in result.stderr and "nowhere.toml" in result.stderr


def test_serve_refuses_an_unmigrated_database(tmp_path, database_url):
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\nurl = "{database_url}"\n[storage]\npath = "{tmp_path}/storage"\n')
    result = _cli("serve", config=path)
    assert result.returncode == 2
    assert "run: dicom-ai-node db upgrade" in result.stderr and "Traceback" not in result.stderr
    upgraded = _cli("db", "upgrade", config=path)
    assert upgraded.returncode == 0 and f"upgraded: empty -> {head_revision()}" in upgraded.stdout
    again = _cli("db", "upgrade", config=path)
    assert "up to date" in again.stdout


def test_echo_a_peer_and_a_dead_one(node_factory):
    dead_port = free_port()
    node = node_factory()
    node.settings["peers"] = {}
    node.start()
    config = node.config_path.read_text()
    config += f'\n[peers.self]\nae_title = "AI_NODE"\nhost = "127.0.0.1"\nport = {node.port}\n'
    config += f'\n[peers.down]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {dead_port}\n'
    config += f'\n[peers.wrong_title]\nae_title = "NOT_US"\nhost = "127.0.0.1"\nport = {node.port}\n'
    node.config_path.write_text(config)

    ok = node.cli("echo", "self")
    assert "C-ECHO OK" in ok.stdout
    down = node.cli("echo", "down", check=False)
    assert down.returncode == 2 and "unreachable" in down.stderr and "Traceback" not in down.stderr
    rejected = node.cli("echo", "wrong_title", check=False)
    assert rejected.returncode == 2 and "rejected the association" in rejected.stderr
    unknown = node.cli("echo", "nobody", check=False)
    assert unknown.returncode == 2 and "known: down, self, wrong_title" in unknown.stderr


def test_human_readable_listings(node_factory, small_ct):
    phantom, paths = small_ct
    node = node_factory(series={"stable_seconds": 600})  # still receiving while we look
    node.start()
    assert storescu(node.port, *paths).returncode == 0
    studies = node.cli("studies").stdout
    assert phantom.study_uid in studies and "Phantom^CT" in studies and "receiving" in studies
    series = node.cli("series", phantom.study_uid).stdout
    assert phantom.series_uid in series and "started arriving from STORESCU@127.0.0.1" in series
    status = node.cli("status").stdout
    assert "oldest waiting" in status and phantom.series_uid in status
    unknown = node.cli("series", "1.2.3.4", check=False)
    assert unknown.returncode == 2 and "no study 1.2.3.4" in unknown.stderr
    report = node.json("status")
    assert report["instances"] == len(paths) and report["series_by_state"]["receiving"] == 1
