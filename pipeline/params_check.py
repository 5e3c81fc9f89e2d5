"""Guard: ``params.yaml`` must survive DVC's round-trip YAML writer (``dvc exp run -S``).

``dvc exp run -S key=value`` (``--set-param``) rewrites ``params.yaml`` through
``dvc.utils.hydra.apply_overrides``: ruamel's round-trip loader (``YAML(typ="rt")``), a merge of the
overridden data in which every list and every scalar is replaced (dicts are merged in place, so
their flow/block style and comments stay), then ruamel's dumper with ``default_flow_style=False``;
DVC then reads the file back with ``YAML(typ="safe")`` (the libyaml-based C parser).

That writer does not keep quotes. A quoted value that holds ``": "``-free colons (a URL) inside a
flow mapping, ``{url: "https://..."}``, is written back unquoted, ``{url: https://...}``: ruamel's
pure-Python round-trip parser accepts that, but the C parser DVC reads with does not (``found
unexpected ':'``), so the run fails with "unable to read: 'params.yaml', YAML file structure is
corrupted" before anything runs. Block style (one key per line) is not affected. Long flow
mappings are also folded over several lines (which still reads back the same).

``check_roundtrip(path)`` performs the same rewrite in memory and raises
:class:`pipeline.config.ParamsError` naming the file, the key and its line when the result cannot
be read back by DVC's reader, or reads back different data (with DVC's reader or with the
pipeline's, PyYAML). A file that passed is remembered by its content, so repeated calls in one
process cost a hash of the text.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml import YAMLError as RuamelYAMLError

from pipeline.config import ParamsError

_PASSED: set[tuple[str, str]] = set()  # (resolved path, sha256 of the text) that passed

def _dvc_rewrite(text: str) -> tuple[Any, str]:
    """Rewrite ``text`` as ``dvc exp run -S`` would with no value changed.

    Returns the round-trip tree after DVC's merge (ruamel ``CommentedMap``s, their line numbers
    are those of ``text``) and the text DVC's dumper writes for it.
    """
    tree = YAML(typ="rt").load(text)
    if isinstance(tree, dict):
        _merge_like_dvc(tree)
    return tree, _dump_like_dvc(tree)


def _plain(value: Any) -> Any:
    """``dvc.utils.collections.to_omegaconf`` + ``OmegaConf.to_object``: plain lists/dicts, scalars kept."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _merge_like_dvc(node: dict) -> None:
    """``dvc.utils.collections.merge_dicts``: dicts merge in place, every other value is replaced."""
    for key, value in node.items():
        if isinstance(value, dict):
            _merge_like_dvc(value)
        else:
            node[key] = _plain(value)


def _dump_like_dvc(tree: Any) -> str:
    """``dvc.utils.serialize._yaml._get_yaml().dump``: round-trip dumper, ``default_flow_style=False``."""
    dumper = YAML()
    dumper.default_flow_style = False
    out = io.StringIO()
    dumper.dump(tree, out)
    return out.getvalue()


def _load_dvc(text: str) -> Any:
    """DVC's reader of params files (``dvc.utils.serialize._yaml.parse_yaml``)."""
    return YAML(typ="safe").load(text) or {}


def _load_pipeline(text: str) -> Any:
    """The pipeline's reader (``pipeline.config.read_params``: PyYAML's safe loader; C build if present)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def _line_of(parent: Any, key: Any) -> int | None:
    """1-based line of ``key`` in ``parent`` (a ruamel round-trip container) in the original text."""
    try:
        if isinstance(parent, dict):
            return parent.lc.key(key)[0] + 1
        return parent.lc.item(key)[0] + 1
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(node, dict):
        yield from node.items()
    elif isinstance(node, list):
        yield from enumerate(node)


def _nest(path: list[Any], node: Any) -> Any:
    """``{k1: {k2: ... {kn: node}}}`` in block style, so ``node`` is dumped at its real indentation."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    for key in reversed(path):
        if isinstance(key, int):
            wrapper: Any = CommentedSeq([node])  # list positions only shift the indentation, not the text
        else:
            wrapper = CommentedMap()
            wrapper[key] = node
        node = wrapper
    return node


def _problem(exc: Exception) -> str:
    """The parser's complaint without its marks (they point into the rewritten text, not the file)."""
    return str(getattr(exc, "problem", None) or str(exc).strip().splitlines()[0])


def _why_not(path: list[Any], node: Any) -> str | None:
    """Why ``node``, dumped alone at its place ``path`` by DVC's writer, does not read back as itself.

    Returns ``None`` when it reads back unchanged with both DVC's and the pipeline's reader.
    """
    expected = _plain(node)
    for key in reversed(path):
        expected = [expected] if isinstance(key, int) else {key: expected}
    try:
        text = _dump_like_dvc(_nest(path, node))
        back = _load_pipeline(text)
        back_dvc = _load_dvc(text)
    except (RuamelYAMLError, yaml.YAMLError) as exc:
        return f"DVC cannot read it back ({_problem(exc)}): write it in block style, one `key: value` per line"
    for got in (back, back_dvc):
        for _, old, new in _diff(expected, got, []):
            return (f"reads back as {new!r} instead of {old!r} (DVC's writer drops quotes): "
                    "choose a value that needs no quotes")
    return None


def _culprits(node: Any, path: list[Any]) -> list[tuple[str, int | None, str]]:
    """Deepest sub-trees of ``node`` that do not survive the rewrite on their own: (key, line, why)."""
    found: list[tuple[str, int | None, str]] = []
    for key, child in _children(node):
        why = _why_not([*path, key], child)
        if why is None:
            continue
        deeper = _culprits(child, [*path, key])
        found.extend(deeper or [(".".join(str(p) for p in [*path, key]), _line_of(node, key), why)])
    return found


def _kind(x: Any) -> str:
    """Type class that must match across readers (ruamel's ScalarFloat is a float; bool is no int)."""
    for kind in (bool, int, float, str, type(None)):
        if isinstance(x, kind):
            return kind.__name__
    return type(x).__name__


def _diff(a: Any, b: Any, path: list[Any]) -> Iterator[tuple[list[Any], Any, Any]]:
    """Leaves where ``a`` and ``b`` differ in value or in kind: (key path, value in a, value in b)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            yield from _diff(a.get(key, "<missing>"), b.get(key, "<missing>"), [*path, key])
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, [*path, i])
    elif a != b or _kind(a) != _kind(b):
        yield path, a, b


def _line_of_path(tree: Any, path: list[Any]) -> int | None:
    node, line = tree, None
    for key in path:
        try:
            line = _line_of(node, key) or line
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
    return line


def _where(dotted: str, line: int | None) -> str:
    return f"line {line}: '{dotted}'" if line is not None else f"'{dotted}'"


def check_roundtrip(path: Path | str) -> None:
    """Raise :class:`ParamsError` if ``path`` would not survive DVC's round-trip YAML writer.

    Returns ``None`` when DVC's rewrite of the file (as ``dvc exp run -S`` does, values unchanged)
    reads back as the same data with both DVC's reader and the pipeline's. Otherwise the error
    names the file, the offending key (dotted path) and its 1-based line in ``path``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file: {exc}") from exc
    key = (str(path.resolve()), hashlib.sha256(text.encode()).hexdigest())
    if key in _PASSED:
        return
    try:
        original = _load_pipeline(text)
        original_dvc = _load_dvc(text)
    except (RuamelYAMLError, yaml.YAMLError) as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    try:
        tree, rewritten = _dvc_rewrite(text)
    except RuamelYAMLError as exc:
        raise ParamsError(f"{path}: DVC's round-trip YAML loader cannot read this file: {exc}") from None

    try:
        back_dvc = _load_dvc(rewritten)
        back = _load_pipeline(rewritten)
        failure = None
        changes = [*_diff(original, back, []), *_diff(original_dvc, back_dvc, [])]
    except (RuamelYAMLError, yaml.YAMLError) as exc:
        failure, changes = _problem(exc), []
    if failure is None and not changes:
        _PASSED.add(key)
        return

    culprits = _culprits(tree, []) if isinstance(tree, dict) else []
    if not culprits:  # only the file as a whole fails: report what the whole rewrite did
        if failure is not None:
            culprits = [("(whole file)", None, f"DVC cannot read the rewritten file back ({failure})")]
        for keys, old, new in changes:
            culprits.append((".".join(str(k) for k in keys), _line_of_path(tree, keys),
                             f"reads back as {new!r} instead of {old!r}"))
    lines = [
        f"{path}: would not survive DVC's YAML writer (`dvc exp run -S` / --set-param rewrite "
        "params.yaml with ruamel: quotes are dropped, long flow-style lines folded):"
    ]
    seen: set[str] = set()
    for dotted, line, why in culprits:
        if dotted not in seen:
            seen.add(dotted)
            lines.append(f"  - {_where(dotted, line)}: {why}")
    raise ParamsError("\n".join(lines))
