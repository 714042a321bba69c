"""Deprecated: split into :mod:`atmerge.methods.tome` (ToMe) and :mod:`atmerge.methods.topr`
(TopR), one method per file; this path stays for one release."""

from atmerge._renamed import renamed
from atmerge.methods import tome as _tome
from atmerge.methods import topr as _topr

renamed(__name__, _tome, _topr)
