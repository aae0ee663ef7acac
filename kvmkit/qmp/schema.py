"""Checking commands against the live QMP schema (``query-qmp-schema``).

QEMU describes every command, event and type it knows in ``query-qmp-schema``.  A
:class:`Schema` built from that reply checks, before anything is sent, that a command
exists, that its arguments are the ones it takes (no unknown names, no missing required
ones) and that each value has the right JSON type (string, integer, number, boolean, enum
value, array, object, alternate, union branch).  Errors name the valid choices.  Because
the schema is read from the running QEMU it is never stale, unlike generated bindings.

QEMU masks the names of non-command types in the introspection output (``"123"``), so
messages speak of JSON kinds and argument paths (``blockdev-add.file.filename``), not type
names.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from kvmkit.qmp.errors import SchemaError

_JSON_KINDS: dict[str, str] = {
    "string": "a string",
    "int": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "null": "null",
    "object": "an object",
    "array": "an array",
    "value": "any value",
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _builtin_ok(json_type: str, value: Any) -> bool:
    if json_type == "value":
        return True
    if json_type == "string":
        return isinstance(value, str)
    if json_type == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if json_type == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "null":
        return value is None
    if json_type == "object":
        return isinstance(value, Mapping)
    if json_type == "array":
        return isinstance(value, list | tuple)
    return True  # a JSON type this code does not know: let the server judge


class Schema:
    """The commands and types of one QEMU, from its ``query-qmp-schema`` reply."""

    def __init__(self, entries: Sequence[Mapping[str, Any]]) -> None:
        self.types: dict[str, Mapping[str, Any]] = {}
        self.commands: dict[str, Mapping[str, Any]] = {}
        self.events: dict[str, Mapping[str, Any]] = {}
        for entry in entries:
            meta = entry.get("meta-type")
            name = entry["name"]
            if meta == "command":
                self.commands[name] = entry
            elif meta == "event":
                self.events[name] = entry
            else:
                self.types[name] = entry

    def arguments_of(self, command: str) -> dict[str, bool]:
        """Argument names of ``command`` mapped to whether each is required."""
        entry = self._command(command)
        arg_type = self.types.get(entry.get("arg-type", ""), {})
        return {m["name"]: "default" not in m for m in arg_type.get("members", ())}

    def check(self, command: str, arguments: Mapping[str, Any] | None, oob: bool = False) -> None:
        """Raise SchemaError if ``command`` with ``arguments`` does not fit the schema
        (or, with ``oob``, cannot run out of band)."""
        entry = self._command(command)
        if oob and not entry.get("allow-oob"):
            allowed = sorted(name for name, e in self.commands.items() if e.get("allow-oob"))
            raise SchemaError(
                f"{command!r} cannot run out of band",
                hint=f"commands that can: {', '.join(allowed) or 'none'}",
            )
        arg_type = self.types.get(entry.get("arg-type", ""))
        if arg_type is None:
            return
        if arguments is not None and not isinstance(arguments, Mapping):
            raise SchemaError(f"{command}: arguments must be an object, not {_kind(arguments)}")
        self._check_object(arguments or {}, arg_type, command, top=True)

    def _command(self, command: str) -> Mapping[str, Any]:
        entry = self.commands.get(command)
        if entry is None:
            close = difflib.get_close_matches(command, self.commands, n=3, cutoff=0.6)
            guess = f"; did you mean {', '.join(close)}?" if close else ""
            raise SchemaError(
                f"QEMU has no command {command!r}{guess}",
                hint=f"valid commands: {', '.join(sorted(self.commands))}",
            )
        return entry

    def _check_object(
        self, value: Mapping[str, Any], info: Mapping[str, Any], path: str, top: bool = False
    ) -> None:
        members = {m["name"]: m for m in info.get("members", ())}
        tag = info.get("tag")
        if tag is not None and tag in value:
            for variant in info.get("variants", ()):
                if variant.get("case") == value[tag]:
                    branch = self.types.get(variant["type"], {})
                    members.update({m["name"]: m for m in branch.get("members", ())})
                    break
        what = "argument" if top else "member"
        for name in value:
            if name not in members:
                valid = ", ".join(sorted(members)) or "none"
                raise SchemaError(
                    f"{path}: unknown {what} {name!r}",
                    hint=f"valid {what}s: {valid}",
                )
        for name, member in members.items():
            if "default" not in member and name not in value:
                raise SchemaError(
                    f"{path}: missing required {what} {name!r}",
                    hint=f"required: {', '.join(n for n, m in members.items() if 'default' not in m)}",
                )
        for name, item in value.items():
            self._check_value(item, members[name]["type"], f"{path}.{name}")

    def _describe(self, type_name: str, depth: int = 0) -> str:
        info = self.types.get(type_name)
        if info is None:
            return "any value"
        meta = info.get("meta-type")
        if meta == "builtin":
            return _JSON_KINDS.get(info.get("json-type", "value"), "any value")
        if meta == "enum":
            return "one of " + ", ".join(repr(v) for v in info.get("values", ()))
        if meta == "array":
            if depth > 2:
                return "an array"
            return f"an array of {self._describe(info.get('element-type', ''), depth + 1)}"
        if meta == "alternate":
            if depth > 2:
                return "one of several types"
            kinds = [self._describe(m["type"], depth + 1) for m in info.get("members", ())]
            return " or ".join(kinds)
        return "an object"

    def _accepts(self, value: Any, type_name: str, path: str) -> bool:
        try:
            self._check_value(value, type_name, path)
        except SchemaError:
            return False
        return True

    def _check_value(self, value: Any, type_name: str, path: str) -> None:
        info = self.types.get(type_name)
        if info is None:
            return  # unknown type: let the server judge
        meta = info.get("meta-type")
        ok = True
        if meta == "builtin":
            ok = _builtin_ok(info.get("json-type", "value"), value)
        elif meta == "enum":
            ok = isinstance(value, str) and value in info.get("values", ())
        elif meta == "array":
            if isinstance(value, list | tuple):
                for index, element in enumerate(value):
                    self._check_value(element, info["element-type"], f"{path}[{index}]")
            else:
                ok = False
        elif meta == "object":
            if isinstance(value, Mapping):
                self._check_object(value, info, path)
            else:
                ok = False
        elif meta == "alternate":
            ok = any(self._accepts(value, m["type"], path) for m in info.get("members", ()))
        if not ok:
            raise SchemaError(
                f"{path}: expected {self._describe(type_name)}, got {_kind(value)} {value!r}"
            )
