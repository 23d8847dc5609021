"""mkdocs hook: pages built from the code, never hand-written copies.

A page holds a marker ``<!-- generated: NAME -->`` that is replaced at build time:

* ``mcp-tools``: every tool of ``build_server().list_tools()``: title, description,
  annotations, and the parameters and result fields from its input and output schemas;
* ``cli-reference``: ``--help`` of every ``agent`` command and of ``self-healing-mcp``,
  as click renders it.
"""
from __future__ import annotations

import json
import re
from typing import Any

import anyio
import click

MARKER = re.compile(r"<!-- generated: ([\w-]+) -->")


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    if "enum" in prop:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if prop.get("type") == "array":
        return f"list of {_type(prop.get('items', {}))}"
    return prop.get("type") or prop.get("$ref", "").rsplit("/", 1)[-1] or "any"


def mcp_tools() -> str:
    from selfheal_plugin.mcp.server import build_server

    tools = anyio.run(build_server().list_tools)
    out = [f"The server has {len(tools)} tools. This page is generated from their schemas "
           "(`build_server().list_tools()`) when the docs are built.\n"]
    for t in tools:
        a = t.annotations
        hints = []
        if a is not None:
            hints = [name for name, on in (("read-only", a.read_only_hint), ("destructive", a.destructive_hint),
                                           ("idempotent", a.idempotent_hint)) if on]
        out.append(f"## `{t.name}`\n")
        if a is not None and a.title:
            out.append(f"**{a.title}**" + (f" ({', '.join(hints)})" if hints else "") + "\n")
        out.append(" ".join((t.description or "").split()) + "\n")
        props = t.input_schema.get("properties", {})
        required = set(t.input_schema.get("required", []))
        if props:
            out.append("| parameter | type | default | description |\n|---|---|---|---|")
            for name, p in props.items():
                default = "required" if name in required else f"`{json.dumps(p.get('default'))}`"
                out.append(f"| `{name}` | {_type(p)} | {default} | {_cell(p.get('description', ''))} |")
            out.append("")
        else:
            out.append("No parameters.\n")
        schema = t.output_schema or {}
        result = schema.get("properties", {})
        if list(result) == ["result"]:  # a list or scalar result is wrapped by the SDK
            item = result["result"]
            out.append(f"Returns `result`: {_type(item)}.\n")
            ref = item.get("items", item).get("$ref")
            result = schema.get("$defs", {}).get(ref.rsplit("/", 1)[-1], {}).get("properties", {}) if ref else {}
        if result:
            out.append("Result fields: " + ", ".join(f"`{k}`" for k in result) + ".\n")
    return "\n".join(out)


def _help(cmd: click.Command, path: list[str], parent: click.Context | None = None) -> list[str]:
    ctx = cmd.context_class(cmd, info_name=path[-1], parent=parent, terminal_width=100, max_content_width=100)
    out = [f"## `{' '.join(path)}`\n", "```text", cmd.get_help(ctx), "```\n"]
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                out += _help(sub, [*path, name], ctx)
    return out


def cli_reference() -> str:
    from selfheal_plugin.cli.main import agent
    from selfheal_plugin.mcp.server import cli as mcp_cli

    return "\n".join([*_help(agent, ["agent"]), *_help(mcp_cli, ["self-healing-mcp"])])


GENERATORS = {"mcp-tools": mcp_tools, "cli-reference": cli_reference}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)
