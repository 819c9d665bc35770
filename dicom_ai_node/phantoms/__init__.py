"""Synthetic CT and MR phantoms: test objects with analytically known anatomy.

They feed the tests, the benchmarks, the demo and the demo bundle's training; the node's
production code (ingest, inference, results) never imports them.
"""

from dicom_ai_node.phantoms.ct import CTPhantom, PhantomGeometry
from dicom_ai_node.phantoms.mr import MRContrast, MRPhantom

__all__ = ["CTPhantom", "MRContrast", "MRPhantom", "PhantomGeometry"]
