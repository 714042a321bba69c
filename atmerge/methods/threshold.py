"""Deprecated: renamed :mod:`atmerge.methods.constant` (one threshold θ in every block; ATM is a
threshold method too); this path stays for one release."""

from atmerge._renamed import renamed
from atmerge.methods import constant as _new

renamed(__name__, _new)
