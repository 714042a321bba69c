"""pytest plugin: every timm and Hugging Face model that a test creates is patched by atmerge the
moment it is created, so that timm's and transformers' own model tests run on merging models.

Loaded by ``bench/upstream/run_upstream_tests.py`` (``-p atmerge_upstream_plugin``).  The method
comes from ``ATMERGE_UPSTREAM_METHOD``: ``none`` (the unpatched baseline), ``tome`` (``ToMe(r)``, r
from ``ATMERGE_UPSTREAM_R``, default 2) or ``atm`` (``ATM(alpha=0.45, beta=0.04,
theta_min=0.3)``: on random weights and random images it merges from the second block on, e.g.
197 → 191 → 169 tokens in DeiT-T's first blocks).

- timm: ``timm.create_model`` (and its ``timm.models`` aliases) is wrapped: the model it returns
  is patched.
- transformers: ``PreTrainedModel.post_init`` (the last step of every model's ``__init__``) is
  wrapped: the model is patched and any patched model inside it (a classifier's backbone, patched
  by its own ``post_init`` a moment earlier) is unpatched first, so only the outermost model is.

A model atmerge does not support (``UnsupportedModelError``: ``features_only`` wrappers,
``ViTForMaskedImageModeling``, ``Dinov2Backbone``, flash attention, ...) is left unpatched and
counted; the terminal summary prints how many models were patched and how many were left as they
were, by class.
"""

from __future__ import annotations

import collections
import os

METHOD = os.environ.get("ATMERGE_UPSTREAM_METHOD", "none")
PATCHED: collections.Counter = collections.Counter()
LEFT: collections.Counter = collections.Counter()


def make_method():
    import atmerge

    if METHOD == "tome":
        return atmerge.ToMe(r=int(os.environ.get("ATMERGE_UPSTREAM_R", "2")))
    if METHOD == "atm":
        return atmerge.ATM(alpha=0.45, beta=0.04, theta_min=0.3)
    raise ValueError(f"ATMERGE_UPSTREAM_METHOD={METHOD!r}; choose none, tome or atm")


def patch_new_model(model):
    """Patch ``model`` with the run's method; leave it as it is if atmerge does not support it."""
    import atmerge

    try:
        atmerge.patch(model, make_method())
    except atmerge.UnsupportedModelError:
        LEFT[type(model).__name__] += 1
    else:
        PATCHED[model.__dict__.get("_atmerge_original_class", type(model)).__name__] += 1
    return model


def _install_timm() -> None:
    import timm
    import timm.models
    import timm.models._factory as factory

    original = factory.create_model

    def create_model(*args, **kwargs):
        return patch_new_model(original(*args, **kwargs))

    for module in (timm, timm.models, factory):
        module.create_model = create_model


def _install_transformers() -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return
    import atmerge

    original = PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for module in self.modules():
            if module is not self and atmerge.is_patched(module):
                atmerge.unpatch(module)
        patch_new_model(self)

    PreTrainedModel.post_init = post_init


def pytest_configure(config) -> None:
    if METHOD == "none":
        return
    make_method()  # a wrong name fails before any test runs
    _install_timm()
    _install_transformers()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    terminalreporter.write_sep("=", f"atmerge upstream run: method={METHOD}")
    if METHOD != "none":
        terminalreporter.write_line(f"patched at construction: {sum(PATCHED.values())} {dict(PATCHED)}")
        terminalreporter.write_line(f"left unpatched (unsupported): {sum(LEFT.values())} {dict(LEFT)}")
