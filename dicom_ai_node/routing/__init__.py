"""Routing: which models (and, later, destinations) a complete series goes to."""
