"""`atmerge` command line: sub-commands that call the library's experiment functions.

atmerge eval                      # CIFAR-10 reference ViT + ATM vs unpatched, offline (ships with the package)
atmerge calibrate --data my_photos/ --budget 0.6 --out cal/   # settings for 60% of the GFLOPs, no labels
atmerge eval --config cal/calibration.json --data my_photos/  # check it: agreement promised vs measured
atmerge eval --model deit_small_patch16_224 --pretrained --data /imagenet/val --method atm
atmerge eval --hf-model path/to/saved-vit --data my_folder/   # a Hugging Face model + its image processor
atmerge search --budget 0.5       # Optuna over alpha, beta, theta_min within half the GFLOPs
atmerge analyze info-loss | merge-profile | split-layer | batch-size | merging-error
atmerge visualize --data a.jpg b.jpg photos/
atmerge probe                     # linear head for the shared DINOv2-S on CIFAR-10
atmerge finetune --epochs 30      # fine-tune with merging in the loop (torchrun for many GPUs)

atmerge SUB-COMMAND --help lists its options with their defaults.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import shlex
import sys
from pathlib import Path

# Nothing here imports torch, timm or the method modules when the module loads: the parser is
# built from a light listing of the methods' dataclasses (their source read with ast), so that
# `atmerge --help` is quick; each command imports what it runs.

PACKAGE = Path(__file__).resolve().parent


def _number(text: str) -> int | float:
    """An int where the text is one, else a float (MCTF's r: a count or a share)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _flag_kind(annotations: list[str]) -> tuple[object, str | None]:
    """argparse type and nargs of a method setting, from its dataclass annotations."""
    text = " ".join(annotations)
    if "tuple[int, ...]" in text:
        return int, "+"
    if "float" in text and "int" in text:
        return _number, None
    for name, kind in (("bool", _boolean), ("float", float), ("int", int)):
        if name in text:
            return kind, None
    return str, None


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


# ----------------------------------------------------------------------------- light listings


@dataclasses.dataclass(frozen=True)
class Setting:
    """One dataclass field as a command-line flag: its name, annotation (text), default
    (``dataclasses.MISSING`` when none) and help (field metadata 'help', else the class docstring's
    ``name: ...`` entry, else '')."""

    name: str
    type: str
    default: object
    help: str


@dataclasses.dataclass(frozen=True)
class MethodListing:
    """A registered method as the command line shows it: registry name, class name, the first
    sentence of its docstring, and its settings."""

    name: str
    title: str
    summary: str
    settings: tuple[Setting, ...]


class _NotLiteral(Exception):
    """A dataclass whose source the light listing cannot read; the real class is imported instead."""


def _literal(node: ast.AST, names: dict[str, ast.AST]) -> object:
    """The value of a field default or help written as a literal (or built from module-level
    literals: f-strings, ``', '.join(NAMES)``, ``field(default=..., metadata=_help(...))``)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_literal(e, names) for e in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k, names): _literal(v, names) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand, names)
    if isinstance(node, ast.Name) and node.id in names:
        return _literal(names[node.id], names)
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.FormattedValue):
                if v.conversion != -1 or v.format_spec is not None:
                    raise _NotLiteral
                parts.append(str(_literal(v.value, names)))
            else:
                parts.append(_literal(v, names))
        return "".join(parts)
    if isinstance(node, ast.Call) and not node.keywords and len(node.args) == 1:
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "join" and isinstance(f.value, ast.Constant):
            return f.value.value.join(_literal(node.args[0], names))
        if isinstance(f, ast.Name) and f.id == "_help":
            return {"help": _literal(node.args[0], names)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "field" and not node.args:
        given = {k.arg: _literal(k.value, names) for k in node.keywords}
        if set(given) - {"default", "metadata"}:
            raise _NotLiteral
        return _Field(given.get("default", dataclasses.MISSING), given.get("metadata", {}))
    raise _NotLiteral


@dataclasses.dataclass(frozen=True)
class _Field:
    default: object
    metadata: dict


def _clean(text: str, escape: bool = True) -> str:
    """Docstring text as plain help: reST roles and literals unwrapped; ``escape``: '%' doubled,
    as argparse formats an option's help with %."""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)
    text = " ".join(re.sub(r"``([^`]*)``", r"\1", text).split())
    return text.replace("%", "%%") if escape else text


def _field_docs(doc: str, names: list[str]) -> dict[str, str]:
    """Each field's entry in a dataclass docstring: ``name: text`` or ``name in [0, 1]`` (at a
    line start, with the more indented lines below it; or within a paragraph, up to a line that
    ends a sentence), up to the next entry or the end of a sentence followed by two spaces."""
    lines = inspect.cleandoc(doc or "").splitlines()
    entry = {n: re.compile(rf"(?<![\w.`'=(]){re.escape(n)}(:|\s+in\s+[\[(])") for n in names}
    docs = {}
    for name in names:
        for i, line in enumerate(lines):
            found = entry[name].search(line)
            if not found:
                continue
            indent = len(line) - len(line.lstrip())
            at_start = found.start() == indent
            text = [line[found.start() :]]
            for below in lines[i + 1 :]:
                if not below.strip():
                    break
                if at_start and len(below) - len(below.lstrip()) <= indent:
                    break
                if not at_start and text[-1].rstrip().endswith("."):
                    break  # within a paragraph: up to the end of the sentence
                text.append(below.strip())
            text = " ".join(t.rstrip() for t in text)
            text = text[len(name) :].lstrip(":").strip() if found.group(1) == ":" else text[len(name) :].strip()
            ends = [text.find("  ")] + [
                m.start() for other in names if other != name for m in [entry[other].search(text)] if m
            ]
            ends = [e for e in ends if e > 0]
            if ends:
                text = text[: min(ends)]
            docs[name] = _clean(text).rstrip(";,. ")
            break
    return docs


def _summary(doc: str) -> str:
    """The first sentence of a docstring's first paragraph."""
    first = " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())
    found = re.search(r"(?<!\bal)(?<!\bEq)(?<!\be\.g)(?<!\bi\.e)\.\s", first + " ")
    return _clean(first[: found.start() + 1] if found else first, escape=False)


def _annotation(text: object) -> str:
    """An annotation as the light listing writes it (``int | None``), whatever the source spacing."""
    if not isinstance(text, str):
        return getattr(text, "__name__", str(text))
    try:
        return ast.unparse(ast.parse(text, mode="eval"))
    except SyntaxError:
        return text


def _settings(names_types_defaults: list[tuple[str, str, object, str]], doc: str) -> tuple[Setting, ...]:
    docs = _field_docs(doc, [n for n, *_ in names_types_defaults])
    return tuple(Setting(n, t, d, h or docs.get(n, "")) for n, t, d, h in names_types_defaults)


def _source_dataclasses(path: Path) -> tuple[dict[str, ast.ClassDef], dict[str, ast.AST]]:
    """The classes of a module's source and its module-level literal assignments."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    names = {
        n.targets[0].id: n.value
        for n in tree.body
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
    }
    return classes, names


def _source_fields(cls: ast.ClassDef, names: dict[str, ast.AST]) -> tuple[Setting, ...]:
    fields = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.simple):
            continue
        kind = ast.unparse(node.annotation)
        if "ClassVar" in kind or "InitVar" in kind:
            raise _NotLiteral
        value = dataclasses.MISSING if node.value is None else _literal(node.value, names)
        help_text = ""
        if isinstance(value, _Field):
            help_text = _clean(str(value.metadata.get("help", "")))
            value = value.default
        fields.append((node.target.id, _annotation(kind), value, help_text))
    return _settings(fields, ast.get_docstring(cls) or "")


def _registered_name(cls: ast.ClassDef) -> str | None:
    for d in cls.decorator_list:
        f = d.func if isinstance(d, ast.Call) else None
        if f is not None and (getattr(f, "id", None) or getattr(f, "attr", None)) == "register_method":
            return d.args[0].value
    return None


@functools.cache
def _methods_from_source() -> tuple[MethodListing, ...]:
    """The built-in methods, read from their source (registry.py's imports, in its order)."""
    registry = ast.parse((PACKAGE / "methods" / "registry.py").read_text(encoding="utf-8"))
    modules = [
        a.name for n in registry.body if isinstance(n, ast.Import) for a in n.names if a.name.startswith("atmerge.")
    ]
    listed = []
    for module in modules:
        classes, names = _source_dataclasses(PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py"))
        for cls in classes.values():
            name = _registered_name(cls)
            if name is None:
                continue
            if not any("dataclass" in ast.unparse(d) for d in cls.decorator_list) or any(
                ast.unparse(b) != "Method" for b in cls.bases
            ):
                raise _NotLiteral  # inherited fields: let the real class say
            doc = ast.get_docstring(cls) or ""
            listed.append(MethodListing(name, cls.name, _summary(doc), _source_fields(cls, names)))
    if not listed:
        raise _NotLiteral
    return tuple(listed)


def _live_settings(cls: type) -> tuple[Setting, ...]:
    fields = []
    for f in dataclasses.fields(cls):
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        fields.append((f.name, _annotation(f.type), default, _clean(str(f.metadata.get("help", "")))))
    return _settings(fields, cls.__doc__ or "")


def _methods_from_registry() -> tuple[MethodListing, ...]:
    from atmerge.methods.registry import METHODS

    return tuple(
        MethodListing(name, cls.__name__, _summary(cls.__doc__ or ""), _live_settings(cls))
        for name, cls in METHODS.items()
    )


def method_listing() -> tuple[MethodListing, ...]:
    """Every registered method and its settings, in registry order.  Without importing torch when
    the methods are not loaded yet: then read from the built-in methods' source (the same
    classes; ``tests/test_cli_dialect.py`` checks that both agree); once they are loaded, from
    the registry itself (methods registered by other code included)."""
    if "atmerge.methods.registry" in sys.modules:
        return _methods_from_registry()
    try:
        return _methods_from_source()
    except (_NotLiteral, OSError, SyntaxError, AttributeError, IndexError):
        return _methods_from_registry()


def dataclass_listing(module: str, name: str) -> tuple[Setting, ...]:
    """The fields of dataclass ``name`` of ``module`` as settings, read from its source while the
    module is not imported (no torch for --help), else from the class."""
    if module not in sys.modules:
        try:
            classes, names = _source_dataclasses(PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py"))
            return _source_fields(classes[name], names)
        except (_NotLiteral, OSError, SyntaxError, KeyError):
            pass
    import importlib

    return _live_settings(getattr(importlib.import_module(module), name))


def method_names() -> list[str]:
    return sorted(m.name for m in method_listing())


def method_flags() -> dict[str, tuple[object, str | None]]:
    """Every setting of every registered method, as {field name: (argparse type, nargs)}:
    derived from the methods' dataclass fields, so a new method's settings are flags at once."""
    annotations: dict[str, list[str]] = {}
    for m in method_listing():
        for s in m.settings:
            annotations.setdefault(s.name, []).append(s.type)
    return {name: _flag_kind(kinds) for name, kinds in annotations.items()}


def method_owners() -> dict[str, list[str]]:
    """{setting: the methods that have it}."""
    owners: dict[str, list[str]] = {}
    for m in method_listing():
        for s in m.settings:
            owners.setdefault(s.name, []).append(m.name)
    return owners


def boolean_method_flags() -> list[str]:
    """The flags of the boolean method settings, both spellings (``--batch-adaptive``,
    ``--no-batch-adaptive``)."""
    names = [n for n, (kind, _) in method_flags().items() if kind is _boolean]
    return [f"--{prefix}{n.replace('_', '-')}" for n in names for prefix in ("", "no-")]


def add_model_options(
    p: argparse.ArgumentParser,
    hf: bool = True,
    default: str = "cifar10-vit, the CIFAR-10 reference ViT that ships with the package",
) -> None:
    """The model flags; ``hf``: also ``--hf-model`` (a Hugging Face model instead of a timm one)."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=None, help=f"timm model name, or a preset: cifar10-vit, dinov2-probe (default: {default})"
    )
    if hf:
        g.add_argument(
            "--hf-model",
            default=None,
            metavar="NAME_OR_DIR",
            help="a Hugging Face transformers model instead: a save_pretrained directory (with its "
            "image processor's preprocessor_config.json) or a hub name; not with --model, "
            "--checkpoint",
        )
    g.add_argument(
        "--checkpoint",
        default=None,
        help="weights for --model: safetensors, or a PyTorch file (.pth, .pth.tar; official "
        "LV-ViT, T2T-ViT and MAE files as they are), loaded with weights_only=True",
    )
    g.add_argument("--model-kwargs", default=None, help="JSON kwargs for timm.create_model, e.g. '{\"img_size\": 32}'")
    g.add_argument("--pretrained", action="store_true", help="let timm download pretrained weights")
    g.add_argument("--probe", default=None, help="probe head file for --model dinov2-probe")
    g.add_argument(
        "--prop-attn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="proportional attention (+log size) on/off; default: the model's (off for mae_vit_base_ft), "
        "else the method's own (off for EViT)",
    )
    g.add_argument(
        "--prune-last-block",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="only CLS reaches the last MLP; default: on for CLS-pooled models, for every method",
    )


def add_data_options(p: argparse.ArgumentParser, labels: bool = False, data_help: str | None = None) -> None:
    """The data flags; ``labels``: also --labels/--no-labels and --class-map (eval)."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        metavar="FOLDER",
        help=data_help
        or "a folder of images: class folders (cat/, dog/ or synsets n01440764/, matched to "
        "the model's class names) for top-1"
        + (", or any layout for fidelity only" if labels else "")
        + "; default: the preset's data (cifar10-vit: CIFAR-10 test images)",
    )
    if labels:
        g.add_argument(
            "--labels",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="--labels: class folders required; --no-labels: ignore them, measure fidelity only; "
            "default: use class folders when the folder has them",
        )
        g.add_argument(
            "--class-map",
            default=None,
            metavar="FILE",
            help="JSON object {class folder name: the model's class index}, for folders whose names are "
            "not the model's class names",
        )
    g.add_argument("--limit", type=int, default=None, help="use N images, a seeded random subset (default: all)")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=0, help="seed of the --limit subset and of the search")
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes (0: in the main process)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def deprecated(message: str) -> None:
    """An old spelling that still works for one release: a one-line FutureWarning (shown to users)."""
    import warnings

    warnings.warn(message, FutureWarning, stacklevel=3)


class DeprecatedSpelling(argparse.Action):
    """An old spelling of a flag (hidden from --help): it sets the new flag's value and says, in
    one line, which spelling to use instead; ``args._spelled`` keeps what was typed."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        deprecated(f"{option_string} is deprecated; use {self.new}")
        setattr(namespace, "_spelled", {**getattr(namespace, "_spelled", {}), self.dest: option_string})
        setattr(namespace, self.dest, values)


def spelled(args, dest: str, flag: str) -> str:
    """The spelling the user typed for ``dest`` (an old one, or ``flag``)."""
    return getattr(args, "_spelled", {}).get(dest, flag)


def boolean_words(argv: list[str], flags: list[str]) -> list[str]:
    """The old spelling of boolean method settings, ``--batch-adaptive true|false`` (or
    ``=true``), rewritten to the flags ``--batch-adaptive`` / ``--no-batch-adaptive``, each with a
    one-line deprecation message."""
    out, i = [], 0
    while i < len(argv):
        item = argv[i]
        if item == "--":
            return out + argv[i:]
        name, eq, word = item.partition("=")
        if not eq:
            word = argv[i + 1] if i + 1 < len(argv) else ""
        if name in flags and word.lower() in ("true", "false"):
            on = (word.lower() == "true") != name.startswith("--no-")
            base = name.removeprefix("--no-").removeprefix("--")
            new = f"--{base}" if on else f"--no-{base}"
            deprecated(f"'{item if eq else item + ' ' + word}' is deprecated; write {new}")
            out.append(new)
            i += 1 if eq else 2
            continue
        out.append(item)
        i += 1
    return out


def _shown(value: object) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) if value else "()"
    if value == "":
        return "''"
    return str(value).replace("%", "%%")


def _setting_help(owners: list[tuple[MethodListing, Setting]]) -> str:
    """Help of one method flag: what it is (per method where they differ), for which methods, and
    its default for each."""
    docs = {m.name: s.help or f"{m.title}'s {s.name}" for m, s in owners}
    names = ", ".join(docs)
    texts = {d for d in docs.values() if d}
    if len(texts) <= 1:
        text = next(iter(texts), "")
    else:
        text = "; ".join(f"{m}: {d}" for m, d in docs.items() if d)
    if len(owners) > 1:
        text = f"[{names}] {text}".rstrip()
    defaults: dict[str, list[str]] = {}
    for m, s in owners:
        if s.default is not dataclasses.MISSING:
            defaults.setdefault(_shown(s.default), []).append(m.name)
    if len(defaults) == 1:
        text += f" (default: {next(iter(defaults))})"
    elif defaults:
        text += " (default: " + "; ".join(f"{v} for {', '.join(ms)}" for v, ms in defaults.items()) + ")"
    return text.strip()


def add_method_options(p: argparse.ArgumentParser, default: str = "atm", extra_choices: tuple[str, ...] = ()) -> None:
    """``--method`` and every registered method's settings as flags: one group per method (help
    from its dataclass docstring), the settings several methods share in one group of their own,
    each naming its methods.  Settings left out keep the method's defaults."""
    methods = method_listing()
    g = p.add_argument_group(
        "method", "settings left out keep the method's defaults; each method's settings are listed in its group below"
    )
    g.add_argument(
        "--method",
        default=default,
        choices=[*method_names(), *extra_choices],
        help="the token-reduction method"
        + (
            "; auto: calibrate every merging method (or those of --compare) the same way and keep the most "
            "faithful within the budget, or the cheapest that meets the floor, judged on held-out images"
            if "auto" in extra_choices
            else ""
        ),
    )
    owners: dict[str, list[tuple[MethodListing, Setting]]] = {}
    for m in methods:
        for s in m.settings:
            owners.setdefault(s.name, []).append((m, s))
    shared = [n for n, o in owners.items() if len(o) > 1]
    flag = {n: "--" + n.replace("_", "-") for n in owners}
    kinds = method_flags()

    def add(group, name):
        kind, nargs = kinds[name]
        text = _setting_help(owners[name])
        if kind is _boolean:
            group.add_argument(flag[name], action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            metavar = {int: "N", float: "X", _number: "N_OR_X"}.get(kind, "VALUE")
            group.add_argument(flag[name], type=kind, nargs=nargs, default=None, metavar=metavar, help=text)

    for m in methods:
        also = [flag[s.name] for s in m.settings if s.name in shared]
        description = m.summary + (f" Also {', '.join(also)} (settings of several methods, below)." if also else "")
        group = p.add_argument_group(f"method {m.name} ({m.title})", description)
        for s in m.settings:
            if s.name not in shared:
                add(group, s.name)
    if shared:
        group = p.add_argument_group("settings of several methods", "[the methods that have it] what it is")
        for name in shared:
            add(group, name)


def _or_none(kind):
    """argparse type: ``kind(text)``, or None for the word 'none'."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def add_dataclass_options(
    p: argparse.ArgumentParser,
    settings: tuple[Setting, ...],
    title: str,
    renamed: dict[str, str] | None = None,
) -> None:
    """One flag per field of a dataclass (``--min-lr``; a bool is ``--x / --no-x``; a field that
    may be None takes the word 'none'), its help and default from the field.  ``renamed``: {field:
    flag} where the flag is not the field's name (the field's name stays as a deprecated
    spelling).  Flags left out are absent from the parsed arguments, so the dataclass keeps its
    default."""
    g = p.add_argument_group(title)
    renamed = renamed or {}
    for s in settings:
        own = "--" + s.name.replace("_", "-")
        flag = renamed.get(s.name, own)
        text = f"{s.help} (default: {'none' if s.default is None else _shown(s.default)})"
        if s.type == "bool":
            g.add_argument(
                flag, action=argparse.BooleanOptionalAction, dest=s.name, default=argparse.SUPPRESS, help=text
            )
            continue
        kind, _ = _flag_kind([s.type])
        kind = _or_none(kind) if "None" in s.type else kind
        metavar = flag[2:].upper().replace("-", "_")
        g.add_argument(flag, type=kind, dest=s.name, default=argparse.SUPPRESS, metavar=metavar, help=text)
        if flag != own:
            g.add_argument(own, type=kind, dest=s.name, default=argparse.SUPPRESS, action=DeprecatedSpelling, new=flag)


def dataclass_from_args(cls: type, args) -> object:
    """``cls(**the fields given as flags)``; the others keep their defaults."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def method_from_args(args) -> object:
    from atmerge.methods.registry import build_method

    flags = method_flags()
    settings = {name: getattr(args, name) for name in flags}
    for name, (_, nargs) in flags.items():
        if nargs and settings[name] is not None:
            settings[name] = tuple(settings[name])
    return build_method(args.method, **settings)


def setup_from_args(args):
    """:func:`atmerge.experiments.setup.load_setup` with the model flags of ``args``."""
    from atmerge.experiments.setup import load_setup

    if getattr(args, "hf_model", None) is not None and not getattr(args, "progress", True):
        from atmerge.experiments.hf import _transformers

        _transformers().utils.logging.disable_progress_bar()  # --no-progress: no loading bar either
    return load_setup(
        args.model,
        args.checkpoint,
        args.model_kwargs,
        args.pretrained,
        getattr(args, "probe", None),
        hf_model=getattr(args, "hf_model", None),
    )


def _setup_and_batches(args, *, limit=None, labels: bool | None = True):
    import torch

    from atmerge.experiments.setup import load_dataset, loader

    torch.manual_seed(args.seed)
    setup = setup_from_args(args)
    dataset = load_dataset(
        setup,
        args.data,
        args.limit if limit is None else limit,
        args.seed,
        labels=getattr(args, "labels", None) if labels is None else labels,
        class_map=getattr(args, "class_map", None),
    )
    return setup, loader(dataset, args.batch_size, args.workers)


def _percent(value) -> str | None:
    """A share as the tables print it (70.00%), None as it is."""
    return None if value is None else f"{100 * value:.2f}%"


def _describe_data(description: dict) -> str:
    """One line: which images, and how their labels were found."""
    text = f"{description['images']} images from {description['folder']}"
    if description.get("labels") is None:
        return text + ": no class folders used, so fidelity to the unpatched model only (no top-1)"
    classes = description["classes"]
    shown = ", ".join(f"{k}->{v}" for k, v in list(classes.items())[:5]) + (", ..." if len(classes) > 5 else "")
    return (
        text + f": {len(classes)} class folders mapped to the model's {description['model_classes']} classes "
        f"{description['labels']} ({shown}); top-1 over the full head"
    )


def cmd_eval(args) -> int:
    from atmerge import data, distributed
    from atmerge.experiments.versus_unpatched import eval_rows, run_eval
    from atmerge.results_io import format_table, write_csv, write_json

    method = method_from_args(args)
    setup, batches = _setup_and_batches(args, labels=None)
    promised = None
    if args.config:
        from atmerge.config import load_method, read_config

        method = load_method(args.config, setup.model)
        promised = read_config(args.config).get("measured")
    world = distributed.init(args.device)
    if world.size > 1:  # under torchrun: each process a shard of the batches, results reduced
        shard = distributed.batch_shard(len(batches.dataset), args.batch_size, world.rank, world.size)
        batches = data.ReadableLoader(batches.dataset, batch_sampler=shard, num_workers=args.workers)
        if len(batches) == 0:
            raise ValueError(
                f"{len(batches.dataset)} images make fewer batches than the {world.size} processes; "
                "use a smaller --batch-size"
            )
    described = batches.dataset.description
    if world.main:
        print(_describe_data(described))
    try:
        result = run_eval(
            setup.model,
            method,
            batches,
            device=world.device,
            progress=args.progress and world.main,
            prop_attn=args.prop_attn,
            prune_last_block=args.prune_last_block,
        )
    except ValueError as e:
        if str(e) != "no images to evaluate":
            raise
        raise ValueError(
            f"none of the images under {described['folder']} could be read "
            f"({described['images']} skipped, each named above)"
        ) from None
    if not world.main:
        return 0
    result["setup"] = setup.description
    result["data"] = {**described, "folder": str(args.data or setup.default_data)}
    result["processes"] = world.size
    rows = eval_rows(result)
    columns = ["run", "top1", "top5", "gflops", "params_m", "images_per_s", "output_cosine"]
    if result["baseline"]["top1"] is None:
        columns = [c for c in columns if c not in ("top1", "top5")]
    shown = [{**r, **{k: _percent(r.get(k)) for k in ("top1", "top5")}} for r in rows]
    print(format_table(shown, columns))
    d, f = result["difference"], result["fidelity"]
    b, m = result["baseline"], result["merged"]
    top1 = (
        ""
        if d["top1"] is None
        else f"top-1 {100 * b['top1']:.2f}% -> {100 * m['top1']:.2f}% ({100 * d['top1']:+.2f} pt), "
    )
    passes = len(batches)
    rough = (
        f" (from {passes} batch{'es' if passes > 1 else ''} run once each, first calls included: not a timing; "
        "bench/core.py times models alternately)"
        if passes < 5
        else ""
    )
    print(f"difference: {top1}GFLOPs x{d['gflops_ratio']:.3f}, speed x{d['speedup']:.2f}{rough}")
    print(fidelity_line(f))
    if promised:
        print(promise_line(promised, f, result["merged"]["gflops"] / result["baseline"]["gflops"]))
    print("tokens per block:", rows[1]["tokens_per_block"])
    out = run_folder(args, args.method if not args.config else Path(args.config).stem)
    write_json(result, out / "eval.json")
    write_csv(rows, out / "eval.csv")
    print(f"wrote {out / 'eval.json'} and {out / 'eval.csv'}")
    return 0


def fidelity_line(f: dict) -> str:
    """The merged model against the unpatched one, in one line, rounded."""
    if "agreement" not in f:
        return f"fidelity to the unpatched model on {f['images']} images: output cosine {f['cosine']:.4f}"
    return (
        f"agreement with the unpatched model: {100 * f['agreement']:.1f}% of {f['images']} images "
        f"(95% {100 * f['agreement_low']:.1f}-{100 * f['agreement_high']:.1f}%), top-5 agreement "
        f"{100 * f['top5_agreement']:.1f}%, KL {f['kl']:.4f} nats, output cosine {f['cosine']:.4f}"
    )


def promise_line(promised: dict, measured: dict, share: float) -> str:
    """What the calibration config promised (on its held-out images) next to what eval measured."""
    measure = promised.get("fidelity_measure", "agreement")
    value = measured.get(measure)
    said = (
        f"config promised {measure} {100 * promised['fidelity']:.1f}% (one-sided 95% lower bound "
        f"{100 * promised['fidelity_low_one_sided_95']:.1f}%) at {100 * promised['gflops_share']:.1f}% of the "
        f"unpatched GFLOPs"
    )
    got = "n/a" if value is None else f"{100 * value:.1f}%"
    return f"{said}; measured here: {measure} {got} at {100 * share:.1f}%"


def run_folder(args, label: str) -> Path:
    """Where a run writes: ``--out`` when given (files already there are overwritten, and said
    so), else a new folder per run, ``results/<command>/<UTC time>-<label>``."""
    import time

    if args.out is not None:
        out = Path(args.out)
        if out.is_dir() and any(out.iterdir()):
            print(f"--out {out} exists: files of the same name in it are overwritten")
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path("results") / args.command
    folder, n = base / f"{stamp}-{label}", 1
    while folder.exists():
        n += 1
        folder = base / f"{stamp}-{label}-{n}"
    return folder


def _write(result: dict, out: Path, name: str, rows: list[dict] | None = None) -> None:
    from atmerge.results_io import write_csv, write_json

    write_json(result, out / f"{name}.json")
    written = [str(out / f"{name}.json")]
    if rows is not None:
        write_csv(rows, out / f"{name}.csv")
        written.append(str(out / f"{name}.csv"))
    print("wrote " + ", ".join(written))


def cmd_search(args) -> int:
    from atmerge import data
    from atmerge.results_io import format_table
    from atmerge.experiments.search import plot_search, search_methods

    from atmerge.api import gflops as dense_gflops

    base = method_from_args(args)
    goal = args.goal or ("budget" if args.budget is not None or args.budget_gflops is not None else "pareto")
    if goal != "budget" and (args.budget is not None or args.budget_gflops is not None):
        raise ValueError(f"--budget/--budget-gflops apply to --goal budget, not --goal {goal}")
    if args.budget is not None and not 0 < args.budget < 1:
        raise ValueError(
            f"--budget {args.budget:g} is a share of the unpatched model's GFLOPs; allowed (0, 1) "
            "(GFLOPs per image: --budget-gflops)"
        )
    setup, batches = _setup_and_batches(args)
    batches = [(x.to(args.device), y.to(args.device)) for x, y in batches]
    setup.model.to(args.device)
    budget = args.budget_gflops
    if goal == "budget" and (args.budget is not None or budget is not None):
        dense = dense_gflops(setup.model, tuple(batches[0][0].shape[1:]))
        if args.budget is not None:
            budget = args.budget * dense
            print(
                f"budget: {100 * args.budget:.0f}% of the unpatched {dense:.4g} GFLOPs = {budget:.4g} GFLOPs per image"
            )
        elif budget >= dense:
            raise ValueError(
                f"--budget-gflops {budget:g} is not below the unpatched model's {dense:.4g} GFLOPs per "
                "image: every setting meets it; give a smaller budget"
            )
    args.goal = goal
    others = [m for m in (args.compare or []) if m != args.method]
    results = search_methods(
        setup.model,
        batches,
        [base, *others],
        goal=goal,
        budget=budget,
        trials=args.trials,
        seed=args.seed,
        measure=args.metric,
        progress=args.progress,
        cache_dir=Path(args.cache_dir or data.cache_dir() / "predictions") if args.cache else None,
    )
    result = next(iter(results.values()))
    result["setup"] = setup.description
    result["compared"] = {label: r for label, r in results.items() if r is not result}
    out = run_folder(args, args.method)
    result["plot"] = plot_search(results, out / "search.png")
    for label, r in results.items():
        cols = ["trial", *r["space"], "top1", "agreement", "gflops", "feasible"]
        print(f"{label}: Pareto front of {len(r['trials'])} trials")
        shown = [
            {**t, "top1": _percent(t.get("top1")), "agreement": _percent(t.get("agreement"))} for t in r["pareto_front"]
        ]
        print(format_table(shown, cols))
    b = result["baseline"]
    top1 = "n/a" if b["top1"] is None else _percent(b["top1"])
    print(f"unpatched: top-1 {top1}, {b['gflops']:.4g} GFLOPs on {result['images']} images")
    if result["best"]:
        best = {k: result["best"][k] for k in [*result["space"], "gflops"]}
        said = ", ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in best.items())
        quality = ", ".join(
            f"{k} {_percent(result['best'][k])}" for k in ("top1", "agreement") if result["best"].get(k) is not None
        )
        print(f"best ({args.goal}): {said}; {quality}")
    elif args.goal == "budget" and result["cheapest"] is not None:
        cheapest = result["cheapest"]["gflops"]
        print(
            f"no trial met the budget of {budget:.4g} GFLOPs per image; the cheapest trial cost {cheapest:.4g} "
            f"({100 * cheapest / b['gflops']:.1f}% of the unpatched model's): ask for a budget above that"
        )
    elif args.goal != "pareto":
        print(f"no trial met the {args.goal} goal in {len(result['trials'])} trials")
    _write(result, out, "search", result["trials"])
    print(f"plot: {result['plot']}")
    return 0


def calibration_folder(args, setup) -> Path:
    """calibrate's image folder: --data (any layout, labels ignored); --images is its old spelling."""
    if args.images is not None:
        if args.data is not None and Path(args.data) != Path(args.images):
            raise ValueError(
                f"--data {args.data} and --images {args.images} name two folders; pass --data only "
                "(--images is its deprecated spelling)"
            )
        deprecated("calibrate --images is deprecated; use --data FOLDER")
    folder = args.data or args.images or setup.default_data
    if folder is None:
        raise ValueError("no images given: pass --data FOLDER (images in any layout; labels are not used)")
    return Path(folder)


def cmd_calibrate(args) -> int:
    import torch

    from atmerge.calibrate import calibrate_goals, folder_batches
    from atmerge.config import save_config
    from atmerge.methods.registry import METHODS, build_method
    from atmerge.results_io import format_table, write_csv

    goals = (
        [{"budget": v} for v in args.budget or []]
        + [{"budget_gflops": v} for v in args.budget_gflops or []]
        + [{"min_agreement": v} for v in args.min_agreement or []]
        + [{"min_cosine": v} for v in args.min_cosine or []]
    )
    torch.manual_seed(args.seed)
    setup = setup_from_args(args)
    folder = calibration_folder(args, setup)
    batches, skipped = folder_batches(folder, setup.transform, args.batch_size, args.limit, args.seed)
    if skipped:
        print(f"skipped {skipped} unreadable image files under {folder} (each named above)")
    count = sum(b.shape[0] for b in batches)
    limit = "" if args.limit is None else f", a seeded random {args.limit} of them (seed {args.seed})"
    described = f"{count} images from {folder}{limit}"
    from atmerge.calibrate import warn_if_trained_on

    warn_if_trained_on(setup.model, folder)
    auto = args.method == "auto"
    if auto:
        methods = ["auto"]
    else:
        methods = [method_from_args(args)] + [build_method(m) for m in args.compare if m != args.method]
    out, rows, met, pictures = run_folder(args, args.method), [], True, []
    for method in methods:
        found = calibrate_goals(
            setup.model,
            batches,
            goals,
            method=method,
            methods=(args.compare or None) if auto else None,
            fidelity=args.fidelity,
            trials=args.trials,
            seed=args.seed,
            progress=args.progress,
            fit_space=not args.paper_space,
        )
        if auto:
            pictures += _auto_report(found, goals, out)
        name = "auto" if auto else next(k for k, v in METHODS.items() if type(method) is v)
        for goal, c in zip(goals, found):
            ((kind, value),) = goal.items()
            if args.freeze is not None and c.method.adaptive:
                from atmerge.config import frozen_calibration

                c = frozen_calibration(setup.model, c, batches, quantile=args.freeze or None)
            stem = name if len(methods) > 1 or len(goals) > 1 else "calibration"
            path = save_config(
                out / (f"{stem}_{kind}_{value:g}.json" if stem != "calibration" else "calibration.json"),
                setup.model,
                c,
                described,
            )
            write_csv(
                c.trials, path.with_name(path.stem + "_trials.csv") if stem != "calibration" else out / "trials.csv"
            )
            met &= c.met
            if auto:
                label = "auto: " + next(r["method"] for r in c.compared if r["chosen"])
            else:
                label = (method.display_name or name) + (
                    " (frozen)" if c.method is not method and not c.method.adaptive and method.adaptive else ""
                )
            rows.append(
                {
                    "method": label,
                    "goal": f"{kind} {value:g}",
                    "met": c.met,
                    "gflops_share": round(c.gflops_share, 4),
                    c.measure: round(c.fidelity, 4),
                    f"{c.measure}_low": round(c.fidelity_low, 4),
                    "config": str(path),
                    "setting": str(c.method),
                }
            )
    print(
        f"{described}: {rows and found[0].search_images} searched ({args.trials} trials per method), the chosen "
        f"settings measured on the {found[0].images} held out ('low' = one-sided 95% lower bound):"
    )
    print(format_table(rows, [k for k in rows[0] if k != "setting"]))
    for r in rows:
        print(f"  {r['method']} {r['goal']}: {r['setting']}")
        if not r["met"]:
            print(f"  {r['method']} {r['goal']} not met: {_not_met(r)}")
    for picture in pictures:
        print(f"picture: {picture}")
    print(f"check it on other images: atmerge eval --config {rows[0]['config']}{_model_flags(args)} --data FOLDER")
    return 0 if met else 1


def _not_met(row: dict) -> str:
    """Why a calibration goal was not met, and what to ask for instead, in one clause."""
    kind = row["goal"].split()[0]
    share = 100 * row["gflops_share"]
    if kind.startswith("budget"):
        return (
            f"the cheapest setting found costs {share:.1f}% of the unpatched GFLOPs on the held-out images; ask for a "
            "budget at or above that (more --trials may search cheaper settings)"
        )
    measure = next(k for k in row if k.endswith("_low")).removesuffix("_low")
    return (
        f"the best setting found keeps {measure} {100 * row[measure]:.1f}% (lower bound "
        f"{100 * row[measure + '_low']:.1f}%) at {share:.1f}% of the GFLOPs; ask for a lower floor, or more held-out "
        "images (--limit) for a tighter bound"
    )


def _model_flags(args) -> str:
    """The model options of ``args`` as typed, for a follow-up command on the same model."""
    flags = [
        f" --{name.replace('_', '-')} {shlex.quote(str(getattr(args, name)))}"
        for name in ("model", "hf_model", "checkpoint", "model_kwargs", "probe")
        if getattr(args, name, None) is not None
    ]
    return "".join(flags) + (" --pretrained" if getattr(args, "pretrained", False) else "")


def _auto_report(found: list, goals: list[dict], out: Path) -> list[str]:
    """Print every method's confirmed numbers per goal (auto's comparison) and draw its picture."""
    from atmerge.experiments.fronts import plot_fronts
    from atmerge.results_io import format_table

    pictures = []
    for goal, c in zip(goals, found):
        ((kind, value),) = goal.items()
        print(f"method auto, {kind} {value:g}: every method on the held-out images ('*' = chosen)")
        table = [
            {
                "method": ("* " if r.get("chosen") else "  ") + r["method"],
                "met": r["met"],
                "gflops_share": None if r.get("gflops_share") is None else round(r["gflops_share"], 4),
                c.measure: None if r.get("fidelity") is None else round(r["fidelity"], 4),
                f"{c.measure}_low": None if r.get("fidelity_low") is None else round(r["fidelity_low"], 4),
                "landed": r.get("landed"),
                "note": r["note"],
            }
            for r in c.compared
        ]
        print(format_table(table, list(table[0])))
        entries = [(r["method"], a) for r, a in zip(c.compared, c.alternatives) if not isinstance(a, str)]
        pictures.append(plot_fronts(entries, out / f"auto_{kind}_{value:g}.png", chosen=c))
    return pictures


def cmd_analyze(args) -> int:
    from atmerge.experiments import analyze as A
    from atmerge.results_io import format_table
    from atmerge.methods.atm import ATM

    method = method_from_args(args)
    if args.study == "info-loss" and args.hf_model is not None:
        raise ValueError(
            f"analyze info-loss reads a timm model's pre-logits feature; it does not take --hf-model "
            f"{args.hf_model} (the other studies do): use --model"
        )
    setup, batches = _setup_and_batches(args)
    model = setup.model
    out = run_folder(args, args.study)
    study = args.study
    if study == "info-loss":
        result = A.info_loss(model, batches, thresholds=tuple(args.thresholds))
        result["plot"] = A.plot_info_loss(result, out / "info_loss.png")
        rows = [
            {"block": b, **{f"theta_{t}": d[i] for t, d in result["distance"].items()}, "mean": result["mean"][i]}
            for i, b in enumerate(result["blocks"])
        ]
    elif study in ("merge-profile", "split-layer") and not isinstance(method, ATM):
        raise ValueError(f"{study} studies ATM: use --method atm")
    elif study == "merge-profile":
        result = A.merge_profile(model, batches, method)
        result["plot"] = A.plot_merge_profile(result, out / "merge_profile.png")
        rows = [
            {"block": b, "atm_merged": a, "atm_threshold": ta, "constant_merged": c, "constant_threshold": tc}
            for b, a, ta, c, tc in zip(
                result["blocks"],
                result["atm"]["merged"],
                result["atm"]["thresholds"],
                result["constant"]["merged"],
                result["constant"]["thresholds"],
            )
        ]
    elif study == "split-layer":
        result = A.split_layer_sweep(model, batches, method)
        rows = result["rows"]
    elif study == "batch-size":
        result = A.batch_size_sweep(model, batches.dataset, method, sizes=tuple(args.batch_sizes))
        rows = result["rows"]
        if result["stopped"]:
            print(f"stopped at {result['stopped']}")
    else:  # merging-error
        result = A.merging_error_study(model, batches, method)
        result["plot"] = A.plot_merging_error(result, out / "merging_error.png")
        rows = result["rows"]
        print(f"{result['within_bounds']} of {result['pairs']} merged pairs lie within Theorem 1's bounds")
    result["setup"] = setup.description
    if rows and study != "merging-error":
        print(format_table(rows, list(rows[0])))
    name = study.replace("-", "_")
    _write(result, out, name, rows)
    if result.get("plot"):
        print(f"plot: {result['plot']}")
    return 0


def cmd_visualize(args) -> int:
    import torch

    from atmerge import budget, checkpoints, data
    from atmerge.experiments.visualize import chosen_images, draw
    from atmerge.methods.registry import knob_factory
    from atmerge.models.adapter import model_depth, model_patches

    torch.manual_seed(args.seed)
    files, found = chosen_images(args.data or [], args.count, None if args.data else data.imagenet_samples_folder())
    if args.data and found > len(files):
        print(f"drawing the first {len(files)} of {found} images (--count {found} draws them all)")
    if args.model is None and args.hf_model is None:  # real photos on real pretrained weights, offline
        try:
            model = checkpoints.dinov2_small()
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}; or draw on the model that ships with the package: --model cifar10-vit"
            ) from None
        transform = data.model_transform(model)
        model_name = "DINOv2-S/14 (shared weights, 224 px)"
    else:
        setup = setup_from_args(args)
        model, transform = setup.model, setup.transform
        model_name = args.hf_model or args.model
    print(f"model: {model_name}")
    images = torch.stack([transform(data.load_image(f)) for f in files])
    singles = list(images.split(1))
    method = method_from_args(args)
    label = method.display_name or args.method
    if args.config:
        from atmerge.config import load_method

        method = load_method(args.config, model)
        label = f"{method.display_name or type(method).__name__} ({Path(args.config).name})"
    methods = {label: method}
    if args.versus:
        target = budget.mean_gflops(model, method, singles)
        factory = knob_factory(args.versus, model_depth(model), model_patches(model))
        found = budget.match_gflops(model, factory, target, singles, steps=args.steps)
        methods = {f"{found.method.display_name or args.versus} (same GFLOPs)": found.method, label: method}
    mean, std = data.normalization(transform)
    out = run_folder(args, args.method)
    title = f"{model_name}: " + "; ".join(f"{name} = {m!r}" for name, m in methods.items())
    result = draw(
        model, images, methods, out / "visualize.png", mean=mean, std=std, every_block=args.every_block, title=title
    )
    result["model"] = model_name
    result["images"] = [str(f) for f in files]
    result["methods"] = {name: repr(m) for name, m in methods.items()}
    for name, left in result["tokens_left"].items():
        print(f"{name}: tokens left {left}")
    _write(result, out, "visualize")
    print(f"picture: {result['png']}")
    return 0


def cmd_finetune(args) -> int:
    import torch

    from atmerge import data, distributed
    from atmerge.results_io import format_table
    from atmerge.experiments.setup import load_setup
    from atmerge.finetune import FinetuneConfig, finetune
    from atmerge.recipe import train_transform

    config = dataclass_from_args(FinetuneConfig, args)
    if args.config and not args.merging:
        raise ValueError("--no-merging fine-tunes the unpatched model: drop --config, or drop --no-merging")
    method = method_from_args(args) if args.merging else None
    torch.manual_seed(config.seed)  # a randomly initialised model is the same in every process
    setup = load_setup(args.model, args.checkpoint, args.model_kwargs, args.pretrained, args.probe)
    preset = setup.default_data is not None  # the presets' data: cifar10-train / cifar10-test
    train_root = args.data or (data.cifar10_folder("train") if preset else None)
    val_root = args.val_data or setup.default_data
    if train_root is None or val_root is None:
        raise ValueError("no data given: pass --data and --val-data, folders of class folders (ImageFolder)")
    if args.config:
        from atmerge.config import load_method

        method = load_method(args.config, setup.model)
    train_set = data.image_folder(train_root, train_transform(setup.model, config, data.normalization(setup.transform)))
    val_set = data.image_folder(val_root, setup.transform)
    notes = {"setup": setup.description, "train_data": str(train_root), "val_data": str(val_root)}
    result = finetune(
        setup.model,
        method,
        train_set,
        val_set,
        config,
        prop_attn=args.prop_attn,
        prune_last_block=args.prune_last_block,
        notes=notes,
    )
    if not distributed.init(config.device).main:
        return 0
    print(
        format_table(
            result.epochs,
            ["epoch", "lr", "train_loss", "val_top1", "val_gflops", "train_images_per_s", "epoch_seconds"],
        )
    )
    top1 = "n/a" if result.best_val_top1 is None else f"{result.best_val_top1:.4f}"
    print(
        f"best epoch {result.best_epoch}: val top-1 {top1}; training time {result.train_seconds:.1f} s "
        f"(with validation {result.total_seconds:.1f} s)"
    )
    print("wrote " + ", ".join(result.files.values()))
    return 0


def cmd_export(args) -> int:
    from atmerge.export import export_config

    if args.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {args.batch_size}")
    setup = setup_from_args(args)
    print(f"wrote {export_config(args.config, setup.model, args.out, batch=args.batch_size)}")
    return 0


def cmd_probe(args) -> int:
    from atmerge.experiments.probe import run_probe

    for dest, count in (("limit", args.limit), ("val_limit", args.val_limit)):
        if count < 1:
            flag = spelled(args, dest, "--" + dest.replace("_", "-"))[2:]
            raise ValueError(f"{flag} must be a positive number of images, got {count}")
    result = run_probe(args.limit, args.val_limit, args.seed, args.save, progress=args.progress)
    print(
        f"DINOv2-S linear probe: train top-1 {result['train_top1']:.4f} on {result['train_images']} images, "
        f"test top-1 {result['test_top1']:.4f} on {result['test_images']} cifar10-test images"
    )
    _write(result, run_folder(args, "probe"), "probe")
    print(f"probe saved to {result['path']}; use it with --model dinov2-probe")
    return 0


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that states every option's default (those that have one and do not say it already)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is argparse.SUPPRESS or default is False:
            return text
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            return text
        return text + " (default: %(default)s)"


class RawDefaultsFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """DefaultsFormatter with a description laid out as written."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the bad value and what is allowed), then where
    the options are listed, instead of the whole usage first; its help states the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


STUDIES = {
    "info-loss": (
        "Figure 2: merge in one block only; CLS feature distance per block",
        "Figure 2 of the ATM paper: how much information merging loses in each block.  For each "
        "constant threshold θ of --thresholds and each block, the model merges in that block only "
        "(pairs of alternate matching above θ) and the study measures the cosine distance of the "
        "final CLS feature (pre-logits) from the unmerged model's, averaged over the images; a "
        "table (block x θ, and their mean) and a plot.  timm models only (not --hf-model); the "
        "method flags are not used.",
    ),
    "merge-profile": (
        "Figure 6: tokens merged per block, ATM vs a constant θ at equal GFLOPs",
        "Figure 6 of the ATM paper: the tokens ATM merges in each block (its settings: the method "
        "flags) beside those of a constant threshold tuned by bisection to the same mean GFLOPs, "
        "with each block's threshold; a table and a plot.  ATM only (--method atm).",
    ),
    "split-layer": (
        "Table 3: top-1 and GFLOPs of ATM for every split layer",
        "Table 3 of the ATM paper: top-1 and GFLOPs of ATM for each split layer l_s = 0..depth "
        "(blocks up to l_s match alternately, later ones by merge size: 0 = size-distinctive "
        "matching everywhere, depth = alternate everywhere), the other settings from the method "
        "flags.  ATM only (--method atm).",
    ),
    "batch-size": (
        "Table A1: top-1 and GFLOPs for each batch size",
        "Table A1 of the ATM paper: top-1 and GFLOPs of the method for each batch size of "
        "--batch-sizes in turn (batch-adaptive methods merge one count per batch, so results "
        "depend on it), up to the first size that does not fit in memory, which is said in the "
        "output and as 'stopped' in the JSON.",
    ),
    "merging-error": (
        "Theorem 1: every merged pair's merging error against its bounds",
        "Theorem 1 of the ATM paper: for every pair the method merges, its merging error beside "
        "the theorem's lower and upper bounds; how many pairs lie within them, a table and a plot.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="atmerge", description=__doc__, formatter_class=RawDefaultsFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("eval", help="a method against the unpatched model on the same images")
    add_model_options(p)
    add_data_options(p, labels=True)
    add_method_options(p)
    p.add_argument("--config", default=None, help="a calibration config (atmerge calibrate); replaces --method")
    p.add_argument(
        "--out",
        default=None,
        help="folder for the results (default: a new folder per run, results/eval/<UTC time>-<label>; files in a given --out are overwritten)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="choose a method's settings from unlabeled images (budget or agreement floor)")
    add_model_options(p)
    add_data_options(p, data_help="a folder of images, any layout, labels ignored (default: the preset's data)")
    add_method_options(p, extra_choices=("auto",))
    p.add_argument("--images", default=None, help=argparse.SUPPRESS)  # deprecated spelling of --data
    p.add_argument("--budget", type=float, nargs="+", help="share(s) of the unpatched GFLOPs, in (0, 1)")
    p.add_argument("--budget-gflops", type=float, nargs="+", help="GFLOPs per image")
    p.add_argument(
        "--min-agreement", type=float, nargs="+", help="floor(s) on agreement's one-sided 95%% lower bound, in (0, 1]"
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        nargs="+",
        help="floor(s) on the mean output cosine's one-sided 95%% lower bound, in (0, 1]",
    )
    p.add_argument(
        "--compare",
        nargs="*",
        default=[],
        choices=method_names(),
        metavar="METHOD",
        help="also calibrate these methods the same way (same images, goals and trials); with --method auto: "
        "the methods auto chooses from (default: every merging method)",
    )
    p.add_argument(
        "--measure",
        dest="fidelity",
        choices=("agreement", "cosine"),
        default=None,
        help="the fidelity measure a budget goal is judged by (default: agreement for classifiers, cosine for "
        "feature models)",
    )
    p.add_argument(
        "--fidelity", dest="fidelity", choices=("agreement", "cosine"), action=DeprecatedSpelling, new="--measure"
    )
    p.add_argument(
        "--paper-space",
        action="store_true",
        help="search the methods' default ranges instead of ranges fitted to the model's similarity scores",
    )
    p.add_argument("--trials", type=int, default=40, help="settings tried per method")
    p.add_argument(
        "--freeze",
        nargs="?",
        type=float,
        const=0.0,
        default=None,
        metavar="QUANTILE",
        help="save adaptive settings frozen: fixed merge counts per block (the mean over the calibration "
        "images, or this quantile in (0, 1]), one static graph for torch.compile / export",
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for the results (default: a new folder per run, results/calibrate/<UTC time>-<label>; files in a given --out are overwritten)",
    )
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "search", help="Optuna search of a method's settings on a calibration set (same trials for --compare)"
    )
    add_model_options(p)
    add_data_options(p)
    add_method_options(p)
    p.add_argument(
        "--goal",
        default=None,
        choices=["budget", "stress", "pareto"],
        help="budget: the best setting within a budget; stress: the cheapest; pareto: the front "
        "(default: budget when a budget is given, else pareto)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="share of the unpatched model's GFLOPs, in (0, 1), as in calibrate (goal budget)",
    )
    p.add_argument("--budget-gflops", type=float, default=None, help="GFLOPs per image instead (goal budget)")
    p.add_argument("--trials", type=int, default=40, help="settings tried per method")
    p.add_argument(
        "--measure",
        dest="metric",
        default="top1",
        choices=["top1", "agreement", "cosine"],
        help="what a trial is judged by: top-1 (labels), or agreement with the unpatched model's predictions, "
        "or the cosine of the outputs (no labels)",
    )
    p.add_argument(
        "--metric", dest="metric", choices=["top1", "agreement", "cosine"], action=DeprecatedSpelling, new="--measure"
    )
    p.add_argument(
        "--compare",
        nargs="*",
        default=[],
        choices=method_names(),
        metavar="METHOD",
        help="also search these methods, each with the same number of trials, drawn on the same axes",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the unpatched model's predictions are kept between runs (default: $ATMERGE_CACHE/predictions)",
    )
    p.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the unpatched model's predictions in --cache-dir and reuse them (--no-cache: always recompute them)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for the results (default: a new folder per run, results/search/<UTC time>-<label>; files in a given --out are overwritten)",
    )
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "analyze",
        help="the paper's studies: info-loss, merge-profile, split-layer, batch-size, merging-error",
        description="The paper's studies, one per run (atmerge analyze STUDY --help: what it does, its options):\n"
        + "\n".join(f"  {name:<14} {text}" for name, (text, _) in STUDIES.items()),
        formatter_class=RawDefaultsFormatter,
    )
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY", parser_class=OneLineParser)
    for study, (text, description) in STUDIES.items():
        q = studies.add_parser(study, help=text, description=description)
        add_model_options(q)
        add_data_options(q)
        add_method_options(q)
        if study == "info-loss":
            q.add_argument(
                "--thresholds",
                type=float,
                nargs="+",
                default=[0.80, 0.85, 0.90, 0.95],
                help="the constant thresholds θ, one curve each",
            )
        if study == "batch-size":
            q.add_argument(
                "--batch-sizes",
                type=int,
                nargs="+",
                default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
                help="batch sizes, run in this order up to the first that does not fit in memory",
            )
        q.add_argument(
            "--out",
            default=None,
            help="folder for the results (default: a new folder per run, results/analyze/<UTC time>-<study>; files in "
            "a given --out are overwritten)",
        )
        q.set_defaults(func=cmd_analyze)

    p = sub.add_parser("visualize", help="draw which patches merged")
    add_model_options(p, default="the shared DINOv2-S/14 backbone at 224 px, for real photos")
    add_method_options(p)
    p.add_argument(
        "--data",
        nargs="*",
        default=None,
        metavar="FILE_OR_FOLDER",
        help="image files or folders of images (default: the shared ImageNet photos)",
    )
    p.add_argument("--images", nargs="*", dest="data", action=DeprecatedSpelling, new="--data")
    p.add_argument(
        "--count",
        type=int,
        default=4,
        metavar="N",
        help="how many images the figure shows, in all: the first N of --data's images in the order given (a "
        "folder's in name order), or of the shared photos",
    )
    p.add_argument("--config", default=None, help="a calibration config (atmerge calibrate); replaces --method")
    p.add_argument("--versus", default="tome", help="a method tuned to the same mean GFLOPs, drawn above ('' for none)")
    p.add_argument("--steps", type=int, default=10, help="bisection steps for --versus")
    p.add_argument("--every-block", action="store_true", help="one column per block (Figure A1)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch's random numbers")
    p.add_argument(
        "--out",
        default=None,
        help="folder for the results (default: a new folder per run, results/visualize/<UTC time>-<label>; files in a given --out are overwritten)",
    )
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser(
        "finetune",
        help="fine-tune with merging in the forward pass (also under torchrun)",
        description="Fine-tune a patched model with its merges in the loop; the paper's recipe by "
        "default. Data-parallel: torchrun --nproc_per_node N -m atmerge.cli finetune ...",
    )
    add_model_options(p, hf=False)  # the training recipe is timm's
    add_method_options(p)
    p.add_argument("--config", default=None, help="a calibration config (atmerge calibrate); replaces --method")
    p.add_argument(
        "--merging",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="merge tokens in the forward pass (--no-merging: fine-tune the unpatched model, the control)",
    )
    p.add_argument("--data", default=None, help="training ImageFolder (default for the presets: cifar10-train)")
    p.add_argument("--val-data", default=None, help="validation ImageFolder (default for the presets: cifar10-test)")
    add_dataclass_options(
        p,
        dataclass_listing("atmerge.finetune", "FinetuneConfig"),
        "training (atmerge.FinetuneConfig)",
        renamed={"train_limit": "--limit"},
    )
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "export",
        help='write a frozen or fixed-count setting as ONNX (pip install "atmerge[export]")',
        description="Patch the model with a saved config (atmerge calibrate --freeze, or a fixed-count "
        "method) and export it with torch.export to ONNX, for onnxruntime and other runtimes. "
        "Adaptive settings (ATM, constant θ) are refused: freeze them first.",
    )
    add_model_options(p)
    p.add_argument("--config", required=True, help="a calibration config holding a frozen or fixed-count method")
    p.add_argument("--out", default="model.onnx", help="the ONNX file to write")
    p.add_argument("--batch-size", type=int, default=1, help="the example batch traced (the exported batch is dynamic)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("probe", help="train a linear head for the shared DINOv2-S on CIFAR-10 features")
    p.add_argument("--limit", type=int, default=2000, help="train on N images, a seeded random subset of cifar10-train")
    p.add_argument(
        "--val-limit", type=int, default=1000, help="test on N images, a seeded random subset of cifar10-test"
    )
    p.add_argument("--train-images", type=int, dest="limit", action=DeprecatedSpelling, new="--limit")
    p.add_argument("--test-images", type=int, dest="val_limit", action=DeprecatedSpelling, new="--val-limit")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and of the head's training")
    p.add_argument("--save", default=None, help="where to save the head (default: the cache)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.add_argument(
        "--out",
        default=None,
        help="folder for the results (default: a new folder per run, results/probe/<UTC time>-<label>; files in a given --out are overwritten)",
    )
    p.set_defaults(func=cmd_probe)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line, 'Category: message', without the source line that raised them."""
    return f"{category.__name__}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(boolean_words(argv, boolean_method_flags()))
    import atmerge.models.families  # noqa: F401  (atmerge's timm model names: lvvit_s, ...)

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"atmerge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
