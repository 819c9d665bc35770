"""DICOMweb server (STOW-RS, QIDO-RS, WADO-RS), health probes and Prometheus metrics."""
