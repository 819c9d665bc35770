"""The tuned pynetdicom acceptor (ingest/transport.py), a guard on the pynetdicom code it copies, and the
first-copy-wins file placement it relies on.

Behaviour on the wire is covered by test_ingest, with dcmtk and pynetdicom as peers.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicom_ai_node.ingest.transport import store_success_command

# The pynetdicom code ingest/transport.py copies, replaces or extends (its docstrings say how), by the
# sha256 of its source (first 16 hex digits) as recorded from pynetdicom 3.0.4.
PYNETDICOM_SOURCES = {
    # SharedUIDContext.of copies a context's __dict__, new lists and shared everything else.
    "pynetdicom.presentation.PresentationContext.__init__": "37a8842ac07cd8f3",
    # BulkReadSocket.recv replaces it.
    "pynetdicom.transport.AssociationSocket.recv": "6bc20a33b1b7cfe7",
    # GuardedDUL: its _run_loop_delay property replaces the constant set here and slept on in run_reactor.
    "pynetdicom.dul.DULServiceProvider.__init__": "c82dafa9438ddf70",
    "pynetdicom.dul.DULServiceProvider.run_reactor": "e3a10eb3a0931e48",
    "pynetdicom.dul.DULServiceProvider._is_transport_event": "8725ed03bb8fbdef",
    "pynetdicom.dul.DULServiceProvider._read_pdu_data": "19f2d4e38c13c835",
    # QuickStoreResponseDIMSE extends the first and bypasses the second for a Success C-STORE-RSP.
    "pynetdicom.dimse.DIMSEServiceProvider.receive_primitive": "5f99c86b14a15cef",
    "pynetdicom.dimse.DIMSEServiceProvider.send_msg": "a839cf2fb46976d9",
    # PromptAssociation extends the first and copies the second (its acceptor loop).
    "pynetdicom.association.Association.run_reactor": "ed8bbbe3b3d6ddae",
    "pynetdicom.association.Association._run_reactor": "f28838c5559e462a",
    # _AcceptorRequestHandler replaces handle and swaps the classes of what _create_association makes.
    "pynetdicom.transport.RequestHandler.handle": "034823fb4df3a874",
    "pynetdicom.transport.RequestHandler._create_association": "05c8d12b79863cdb",
    # GuardedServer.get_request replaces it (the TLS handshake moves to the connection's thread).
    "pynetdicom.transport.AssociationServer.get_request": "925a4f3a3042f6e4",
    # bind_acceptor then serve_acceptor do what it does.
    "pynetdicom.ae.ApplicationEntity.start_server": "d3868a2df83d3cc0",
}


def _pynetdicom_function(name: str) -> Callable[..., object]:
    """The function `name` (module, class, function) in the installed pynetdicom."""
    module, class_name, function = name.rsplit(".", 2)
    return getattr(getattr(importlib.import_module(module), class_name), function)


@pytest.mark.parametrize("name", sorted(PYNETDICOM_SOURCES))
def test_pynetdicom_code_that_transport_copies_is_unchanged(name: str):
    """An upgrade that changes what transport.py copies or replaces must be reviewed, not silently run."""
    source = inspect.getsource(_pynetdicom_function(name))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == PYNETDICOM_SOURCES[name], (
        f"pynetdicom {name} changed: re-check ingest/transport.py's copy of it, then record {digest} here"
    )


def test_installed_pynetdicom_is_the_pinned_one():
    """The hashes above hold for the versions pyproject.toml allows; the installed one must be among them."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    requirements = [Requirement(line) for line in pyproject["project"]["dependencies"]]
    (pin,) = [requirement for requirement in requirements if requirement.name == "pynetdicom"]
    installed = importlib.metadata.version("pynetdicom")
    assert pin.specifier.contains(installed), f"pynetdicom {installed} is installed, pyproject.toml pins {pin}"


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4.5", "1.2.3.4.56", "2.25.1234567890123456789012345678901234567"])
def test_success_response_is_what_pynetdicom_encodes(sop_instance_uid):
    """Odd and even UID lengths: the hand-built command must match pynetdicom's encoding byte for byte."""
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 65535
    response.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    response.AffectedSOPInstanceUID = sop_instance_uid
    response.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(response)

    expected = encode(message.command_set, True, True)
    assert store_success_command(65535, "1.2.840.10008.5.1.4.1.1.2", sop_instance_uid) == expected


def test_supported_contexts_copy_like_pynetdicom_copies_them():
    """Each association deep-copies the supported contexts; the copies must equal pynetdicom's own."""
    import copy

    from pynetdicom import AE

    from dicom_ai_node.ingest.contexts import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES
    from dicom_ai_node.ingest.transport import SharedUIDContext

    ae = AE()
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    originals = ae.supported_contexts
    shared = [SharedUIDContext.of(context) for context in originals]

    copies, reference = copy.deepcopy(shared), copy.deepcopy(originals)
    assert [vars(c) for c in copies] == [vars(c) for c in reference]
    # Negotiation may change a copy's lists; the server's own must stay as they were.
    copies[0].transfer_syntax.clear()
    assert shared[0].transfer_syntax == originals[0].transfer_syntax


@pytest.mark.parametrize("hard_links", [True, False])
def test_first_copy_of_an_instance_is_kept(tmp_path, monkeypatch, hard_links):
    """Ingest never replaces a stored file, also on filesystems without hard links (SMB shares, some NAS)."""
    import errno
    import os

    from dicom_ai_node.store.files import InstanceStore

    if not hard_links:
        def no_links(*_args, **_kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    store = InstanceStore(tmp_path, min_free_bytes=0)
    store.write_instance("1/2/3.dcm", b"first", replace=False)
    store.write_instance("1/2/3.dcm", b"second", replace=False)
    assert (tmp_path / "1/2/3.dcm").read_bytes() == b"first"
    store.write_instance("1/2/3.dcm", b"result, re-made", replace=True)  # results are rewritten in place
    assert (tmp_path / "1/2/3.dcm").read_bytes() == b"result, re-made"
    assert sorted(p.name for p in (tmp_path / "1/2").iterdir()) == ["3.dcm"]
