"""Strict YAML for the Sporefile: one document, composed to plain values with source positions.

PyYAML alone accepts duplicate keys, aliases (billion laughs), merge keys, arbitrary tags and
unbounded nesting. Here the document is composed to a node tree with the pure-Python
SafeLoader (so composition can be intercepted), those constructs are refused, and every value
and key keeps its start mark so later errors can say ``file:line:col: path: ...``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
import yaml.reader

from sporevm.errors import SporefileError
from sporevm.units import show as show  # re-exported: the Sporefile's messages use it

MAX_DEPTH = 16  # the schema needs 6 levels; the bound keeps the recursive composer safe
MAX_NODES = 10_000  # keys + values; bounds pure-Python parse and validation time to ~1 s
_MAX_NUMBER_CHARS = 64  # YAML ints like 1:2:3:... (sexagesimal) grow without bound

Seg = str | int
DocPath = tuple[Seg, ...]


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_path(path: DocPath) -> str:
    """``steps[1].ready.tcp``; keys that are not plain words are quoted."""
    out = ""
    for seg in path:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif _PLAIN_KEY.fullmatch(seg):
            out += f".{seg}" if out else seg
        else:
            out += f"[{show(seg)}]"
    return out or "(document)"


def located(name: str, line: int, col: int, path: DocPath | None, msg: str) -> SporefileError:
    where = f"{format_path(path)}: " if path is not None else ""
    return SporefileError(f"{name}:{line}:{col}: {where}{msg}")


class _Reject(Exception):
    """Raised inside the composer; turned into a located SporefileError by _compose."""

    def __init__(self, mark: Any, path: DocPath, msg: str) -> None:
        super().__init__(msg)
        self.mark, self.path, self.msg = mark, path, msg


_T = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_T + t for t in ("str", "int", "float", "bool", "null")}
# Timestamps and '=' are YAML 1.1 oddities: read such plain scalars as the text they are.
_DROPPED = {_T + "timestamp", _T + "value"}


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._path: list[Seg] = []
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        seg: Seg | None = None
        if isinstance(parent, yaml.SequenceNode):
            seg = int(index)
        elif isinstance(parent, yaml.MappingNode) and isinstance(index, yaml.Node):
            seg = index.value if isinstance(index, yaml.ScalarNode) else "?"
        here = tuple(self._path) if seg is None else (*self._path, seg)
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            raise _Reject(
                event.start_mark,
                here,
                "YAML aliases (*name) are not allowed; write the value out in full",
            )
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            raise _Reject(
                event.start_mark,
                here,
                "YAML anchors (&name) are not allowed; write each value out in full",
            )
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Reject(
                event.start_mark,
                here,
                f"the document has more than {MAX_NODES} "
                "keys and values; a Sporefile needs far fewer",
            )
        if len(self._path) >= MAX_DEPTH:
            raise _Reject(
                event.start_mark,
                here,
                f"nested deeper than {MAX_DEPTH} levels; a Sporefile needs far fewer",
            )
        if seg is not None:
            self._path.append(seg)
        try:
            return super().compose_node(parent, index)
        finally:
            if seg is not None:
                self._path.pop()


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def compose(name: str, text: str) -> yaml.Node:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader rejects control characters right here
        if not loader.check_node():
            raise SporefileError(
                f"{name}:1:1: the file is empty; expected a mapping starting with sporefile: 1"
            )
        root = loader.get_node()
        if loader.check_node():
            event = loader.peek_event()  # type: ignore[no-untyped-call]
            mark = event.start_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            raise located(
                name,
                line,
                col,
                None,
                "a second YAML document starts here; "
                "a Sporefile is exactly one document (remove the extra ---)",
            )
    except _Reject as rej:
        line, col = (rej.mark.line + 1, rej.mark.column + 1) if rej.mark else (1, 1)
        raise located(name, line, col, rej.path, rej.msg) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(p for p in (exc.context, exc.problem) if p).replace("\n", " ")
        raise SporefileError(
            f"{name}:{line}:{col}: invalid YAML: {what}; "
            "fix the syntax (check indentation and quoting)"
        ) from None
    except yaml.reader.ReaderError as exc:
        line, col = _line_col(text, int(exc.position))
        raise SporefileError(
            f"{name}:{line}:{col}: invalid YAML: character "
            f"U+{int(exc.character):04X} is not allowed; "
            "remove it or write it as an escape in a double-quoted string"
        ) from None
    except yaml.YAMLError as exc:  # any other parser complaint, still one line
        first = (str(exc).splitlines() or ["unreadable input"])[0]
        raise SporefileError(f"{name}:1:1: invalid YAML: {first}; fix the syntax") from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:  # pragma: no cover - check_node() said there is a node
        raise SporefileError(f"{name}:1:1: the file is empty; expected a mapping")
    return root


def kind(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a mapping" if isinstance(value, dict) else "a list"


class Doc:
    """Plain values of the document plus where each value and key came from."""

    def __init__(self, name: str, root: yaml.Node) -> None:
        self.name = name
        self.nodes: dict[DocPath, yaml.Node] = {}
        self.keys: dict[DocPath, yaml.Node] = {}
        self._loader = _Loader("")  # only used to construct int/float/bool scalars
        self.value = self._convert(root, ())

    def mark(self, path: DocPath, *, at_key: bool = False) -> tuple[int, int]:
        """1-based line and column of a key (at_key) or value, else of its nearest ancestor."""
        node = self.keys.get(path) if at_key else None
        probe = path
        while node is None:
            node = self.nodes.get(probe)
            if not probe:
                break
            probe = probe[:-1]
        mark = node.start_mark if node is not None else None
        return (mark.line + 1, mark.column + 1) if mark else (1, 1)

    def error(self, path: DocPath, msg: str, *, at_key: bool = False) -> SporefileError:
        return located(self.name, *self.mark(path, at_key=at_key), path, msg)

    def raw(self, path: DocPath) -> str:
        """The value as the user wrote it, for messages."""
        node = self.nodes.get(path)
        if isinstance(node, yaml.ScalarNode):
            text = str(node.value)
            return show(text) if node.tag == _T + "str" or len(text) > 60 else text
        return "this value"

    def _convert(self, node: yaml.Node, path: DocPath) -> Any:
        self.nodes[path] = node
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _T + "seq":
                raise self.error(path, f"tag {show(_tag(node.tag))} is not allowed; remove it")
            return [self._convert(item, (*path, i)) for i, item in enumerate(node.value)]
        if node.tag != _T + "map":
            raise self.error(path, f"tag {show(_tag(node.tag))} is not allowed; remove it")
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, path)
            if key in out:
                first = self.keys[(*path, key)].start_mark
                where = f" (first at line {first.line + 1})" if first else ""
                raise _at(
                    self.name,
                    key_node,
                    (*path, key),
                    f"duplicate key {show(key)}{where}; remove one of them",
                )
            self.keys[(*path, key)] = key_node
            out[key] = self._convert(value_node, (*path, key))
        return out

    def _key(self, node: yaml.Node, path: DocPath) -> str:
        if isinstance(node, yaml.ScalarNode) and node.tag == _T + "merge":
            raise _at(
                self.name,
                node,
                (*path, "<<"),
                "YAML merge keys (<<) are not allowed; write the keys out in full",
            )
        if not isinstance(node, yaml.ScalarNode):
            raise _at(self.name, node, path, "a key is a list or mapping; keys must be plain names")
        if node.tag != _T + "str":
            read_as = {_T + "bool": "a boolean", _T + "null": "empty (null)"}.get(
                node.tag, "a number" if node.tag in _SCALAR_TAGS else f"tag {show(_tag(node.tag))}"
            )
            raw = str(node.value)
            raise _at(
                self.name,
                node,
                (*path, raw),
                f"key {show(raw)} is read by YAML as "
                f'{read_as}; quote it ("{raw}") or choose another key',
            )
        key = str(node.value)
        _check_text(self.name, node, path, key)
        return key

    def _scalar(self, node: yaml.ScalarNode, path: DocPath) -> Any:
        tag, text = node.tag, str(node.value)
        if tag not in _SCALAR_TAGS:
            raise self.error(
                path,
                f"tag {show(_tag(tag))} is not allowed; "
                "remove it (only plain YAML values are accepted)",
            )
        if tag == _T + "str":
            _check_text(self.name, node, path, text)
            return text
        if tag == _T + "null":
            return None
        if tag == _T + "bool":
            value = self._loader.bool_values.get(text.lower())
            if value is None:
                raise self.error(path, f"{show(text)} is not a boolean; expected true or false")
            return value
        if len(text) > _MAX_NUMBER_CHARS:
            raise self.error(
                path, f"number {show(text)} is too long; quote it if it is meant as text"
            )
        try:
            if tag == _T + "int":
                return self._loader.construct_yaml_int(node)
            return self._loader.construct_yaml_float(node)
        except (ValueError, ArithmeticError):
            raise self.error(
                path, f"{show(text)} is not a number; remove the tag or quote the value"
            ) from None


def _tag(tag: str) -> str:
    return "!!" + tag[len(_T) :] if tag.startswith(_T) else tag


def _at(name: str, node: yaml.Node, path: DocPath, msg: str) -> SporefileError:
    mark = node.start_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    return located(name, line, col, path, msg)


def _check_text(name: str, node: yaml.Node, path: DocPath, text: str) -> None:
    # NUL cannot cross exec/env/paths, and lone surrogates cannot be encoded as UTF-8.
    if "\x00" in text:
        raise _at(name, node, path, "contains a NUL character; remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _at(
            name, node, path, "contains an unpaired surrogate escape; write the character itself"
        ) from None
