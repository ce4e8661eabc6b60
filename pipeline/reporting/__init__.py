"""Reporting: the papers' tables, claims and figures from the evaluated runs' files (no model runs here)."""
