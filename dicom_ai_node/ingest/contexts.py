"""What the Storage SCP accepts: every standard storage SOP class, in the
transfer syntaxes scanners and PACS actually send.

Instances are stored as received, so accepting a compressed syntax costs
nothing on the receive path; decoding happens when a series is processed.
"""

from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pydicom import uid

ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
]

STORAGE_SOP_CLASSES: list[str] = [context.abstract_syntax for context in AllStoragePresentationContexts]
VERIFICATION_SOP_CLASS: str = Verification
