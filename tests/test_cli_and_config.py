"""The admin's side: configuration errors that name the key, plain-words CLI failures, echo."""

from __future__ import annotations

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
        ('[models.m]\nkind = "torchscript"\n', "models.m: path is required for kind = 'torchscript'"),
        ('[destinations.pacs]\nkind = "dimse"\nhost = "x"\n', "destinations.pacs: kind = 'dimse' needs ae_title, port"),
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
