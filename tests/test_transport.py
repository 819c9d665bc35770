"""The tuned pynetdicom acceptor (ingest/transport.py) and the first-copy-wins file placement it relies on.

Behaviour on the wire is covered by test_ingest, with dcmtk and pynetdicom as peers.
"""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicom_ai_node.ingest.transport import store_success_command


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
