"""Deprecated: renamed :mod:`atmerge.experiments.versus_unpatched` (``atmerge eval``: a method
against the unpatched model, not :mod:`atmerge.evaluate`); this path stays for one release."""

from atmerge._renamed import renamed
from atmerge.experiments import versus_unpatched as _new

renamed(__name__, _new)
