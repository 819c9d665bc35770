"""Delivery: result objects to the PACS by C-STORE, STOW-RS or Orthanc's REST API, with retries."""
