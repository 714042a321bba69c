"""Deprecated: renamed :mod:`atmerge.score_profile` (the model's similarity-score statistics);
this path stays for one release."""

from atmerge import score_profile as _new
from atmerge._renamed import renamed

renamed(__name__, _new)
