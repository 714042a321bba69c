"""Experiments a researcher runs: library functions first, CLI sub-commands second."""
