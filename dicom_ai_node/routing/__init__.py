"""Routing: which models a complete series goes to, and where their results go."""
