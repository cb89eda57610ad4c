"""Build-time helpers for the documentation site (an mkdocs hooks file).

* The error reference (``errors.md``) is generated from :mod:`aiokvpipe.errors`
  on every build: the class hierarchy, each class's docstring, its built-in
  bases and constructor, so the page cannot drift from the code. A class
  without a docstring is a build warning (an error under ``--strict``).
* Pages that other parts of the project own (``shm.md``, ``cuda.md``) stay in
  the nav, but are dropped from it while their file does not exist yet.
* :class:`SphinxRolesToCode` is a griffe extension (loaded by mkdocstrings
  from this file) that renders the reST roles used in the package's
  docstrings (``:class:`~a.b.C```) as code spans.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.aiokvpipe")

ERRORS_MARKER = "<!-- aiokvpipe:error-reference -->"
ERRORS_MODULE = "aiokvpipe.errors"
# Nav pages written by other parts of the project; absent ones are left out.
OPTIONAL_PAGES = frozenset({"shm.md", "cuda.md"})


# ----------------------------------------------------------------- optional pages


def _prune(items: list[Any], docs_dir: Path) -> list[Any]:
    kept: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            ((title, value),) = item.items()
            if isinstance(value, list):
                kept.append({title: _prune(value, docs_dir)})
                continue
            if value in OPTIONAL_PAGES and not (docs_dir / value).is_file():
                log.info("nav: %r (%s) is not written yet; leaving it out", title, value)
                continue
        kept.append(item)
    return kept


def on_config(config: Any) -> Any:
    if config.get("nav"):
        config["nav"] = _prune(config["nav"], Path(config["docs_dir"]))
    return config


# ----------------------------------------------------------------- error reference


def _import_errors(config: Any) -> Any:
    try:
        return importlib.import_module(ERRORS_MODULE)
    except ImportError:
        # Building from a checkout without installing the package.
        sys.path.insert(0, str(Path(config["config_file_path"]).parent))
        return importlib.import_module(ERRORS_MODULE)


def _attributes(cls: type) -> list[str]:
    """Public attributes the class's own ``__init__`` sets."""
    init = cls.__dict__.get("__init__")
    if init is None:
        return []
    names = re.findall(r"self\.([a-z]\w*)\s*=", inspect.getsource(init))
    return list(dict.fromkeys(names))


def _signature(cls: type) -> str | None:
    init = cls.__dict__.get("__init__")
    if init is None:
        return None
    params = list(inspect.signature(init, eval_str=True).parameters.values())[1:]
    return f"{cls.__name__}({', '.join(str(p) for p in params)})"


def _anchor(name: str) -> str:
    return name.lower()


def error_reference(module: Any) -> str:
    """Markdown for every exception class listed in ``module.__all__``."""
    classes = [getattr(module, name) for name in module.__all__]
    classes = [c for c in classes if isinstance(c, type) and issubclass(c, BaseException)]
    classes.sort(key=lambda c: inspect.getsourcelines(c)[1])  # the module's own grouping
    for name, obj in vars(module).items():
        if (
            isinstance(obj, type)
            and issubclass(obj, BaseException)
            and obj.__module__ == module.__name__
            and obj not in classes
        ):
            log.warning("%s.%s is not in __all__, so it is not documented", module.__name__, name)
    ours = set(classes)
    children: dict[type, list[type]] = {c: [] for c in classes}
    roots: list[type] = []
    for cls in classes:
        parents = [b for b in cls.__bases__ if b in ours]
        if not parents:
            roots.append(cls)
        for parent in parents[:1]:  # listed under its first aiokvpipe base
            children[parent].append(cls)

    def builtin_bases(cls: type) -> list[str]:
        return [b.__name__ for b in cls.__bases__ if b not in ours]

    out = ["## Hierarchy", ""]

    def tree(cls: type, depth: int) -> None:
        also = builtin_bases(cls) if depth else []
        extra_parents = [b.__name__ for b in cls.__bases__ if b in ours][1:]
        note = ", ".join(f"`{n}`" for n in (*extra_parents, *also))
        line = f"{'    ' * depth}- [`{cls.__name__}`](#{_anchor(cls.__name__)})"
        out.append(line + (f" (also {note})" if note else ""))
        for child in children[cls]:
            tree(child, depth + 1)

    for root in roots:
        tree(root, 0)
    out += ["", "## Classes", ""]

    order: list[type] = []

    def walk(cls: type) -> None:
        order.append(cls)
        for child in children[cls]:
            walk(child)

    for root in roots:
        walk(root)
    for cls in order:
        doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
        if not doc:
            log.warning("%s.%s has no docstring of its own", module.__name__, cls.__name__)
            doc = ""
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        out += [f"### `{cls.__name__}` {{#{_anchor(cls.__name__)}}}", ""]
        out += [f"`class {cls.__name__}({bases})`", ""]
        out += [_roles_to_code(doc), ""]
        also = [
            b.__name__
            for b in cls.__mro__[1:]
            if b not in ours and b not in (Exception, BaseException, object)
        ]
        if also:
            out += ["Also catchable as " + ", ".join(f"`{n}`" for n in also) + ".", ""]
        signature = _signature(cls)
        if signature is not None:
            out += [f"Constructed as `{signature}`."]
            attrs = _attributes(cls)
            if attrs:
                out[-1] += " Attributes: " + ", ".join(f"`.{a}`" for a in attrs) + "."
            out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if ERRORS_MARKER not in markdown:
        return markdown
    return markdown.replace(ERRORS_MARKER, error_reference(_import_errors(config)))


# ----------------------------------------------------------------- docstring roles

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|exc|obj):`~?([^`]+)`")


def _roles_to_code(text: str) -> str:
    def code(match: re.Match[str]) -> str:
        target = match.group(1)
        # ``~a.b.C`` shows ``C``; a plain target is shown as written.
        shown = target.rsplit(".", 1)[-1] if match.group(0).count("~") else target
        return f"`{shown}`"

    text = _ROLE.sub(code, text)
    # reST's ``::`` before a literal block reads as ``:`` in markdown.
    return re.sub(r"::\n\n", ":\n\n", text)


try:
    import griffe
except ImportError:  # pragma: no cover - only mkdocs hooks are used then
    pass
else:

    class SphinxRolesToCode(griffe.Extension):
        """Rewrite reST roles in docstrings as markdown code spans."""

        def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
            if obj.docstring is not None:
                obj.docstring.value = _roles_to_code(obj.docstring.value)
