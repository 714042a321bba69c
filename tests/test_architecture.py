"""The package imports only downward: no import cycle between its modules (function-level imports
counted; imports made only for type checking are not). The layers themselves (app above workflows
above core) are import-linter's contracts in pyproject.toml, checked by `lint-imports` in CI."""

import importlib
import re
import sys

import grimp
import pytest


def strongly_connected(graph) -> list[set[str]]:
    """Tarjan's components of the module graph with more than one module: the import cycles."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert strongly_connected(graph) == [{"p.a", "p.b"}]


def test_no_import_cycles():
    graph = grimp.build_graph("atmerge", exclude_type_checking_imports=True)
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


# Old module paths renamed so that each name says the module's job, each kept for one release as an
# alias that warns on import: old path -> the module(s) that now hold its names.
RENAMED = {
    "atmerge.profile": ("atmerge.score_profile",),
    "atmerge.zoo": ("atmerge.checkpoints",),
    "atmerge.methods.fixed": ("atmerge.methods.tome", "atmerge.methods.topr"),
    "atmerge.methods.threshold": ("atmerge.methods.constant",),
    "atmerge.experiments.eval": ("atmerge.experiments.versus_unpatched",),
}


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_module_paths_still_import_warn_and_expose_the_same_objects(old, monkeypatch):
    importlib.import_module("atmerge.methods.registry")  # the built-in methods register in their own order
    new = [importlib.import_module(name) for name in RENAMED[old]]
    parent, _, leaf = old.rpartition(".")
    monkeypatch.delitem(sys.modules, old, raising=False)  # a fresh import: it warns on import only
    if leaf in vars(sys.modules[parent]):  # (hasattr would import it: the package loads names lazily)
        monkeypatch.setattr(sys.modules[parent], leaf, vars(sys.modules[parent])[leaf])
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old} is renamed {' and '.join(RENAMED[old])}")) as caught:
        module = importlib.import_module(old)
    assert all(w.filename == __file__ for w in caught if issubclass(w.category, DeprecationWarning))  # the importer
    for m in new:
        public = [name for name in vars(m) if not name.startswith("_")]
        assert public
        for name in public:
            if not any(name in vars(earlier) for earlier in new[: new.index(m)]):
                assert getattr(module, name) is getattr(m, name), f"{old}.{name}"
        assert set(public) <= set(module.__all__) and set(public) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute"):
        module.not_a_name  # noqa: B018


def test_the_timm_check_has_its_own_name_and_the_old_one_still_works():
    """One ``check_supported`` (the adapter's, for any model); the timm family's own check is
    ``check_timm_model``, and its old name stays one release."""
    from atmerge.models import adapter, families, timm_vit

    assert families.check_supported is adapter.check_supported
    with pytest.warns(DeprecationWarning, match="renamed check_timm_model"):
        assert timm_vit.check_supported is timm_vit.check_timm_model
    pytest.importorskip("transformers")
    from atmerge.models import hf_vit

    with pytest.warns(DeprecationWarning, match="renamed check_hf_model"):
        assert hf_vit.check_supported is hf_vit.check_hf_model
