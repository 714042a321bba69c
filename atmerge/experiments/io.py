"""Kept importable from here: results are written by :mod:`atmerge.results_io`."""

from atmerge.results_io import format_table, write_csv, write_json  # noqa: F401
