"""Deprecated: renamed :mod:`atmerge.checkpoints` (reading checkpoints into timm models, and the
shared reference models); this path stays for one release."""

from atmerge import checkpoints as _new
from atmerge._renamed import renamed

renamed(__name__, _new)
