"""The `sshspec` command: serve, diagram, check, coverage, codes, schema, hash-password."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sshspec.codes import as_json, markdown_table
from sshspec.fsm.diagram import render
from sshspec.fsm.spec import BUNDLED, SpecError, load_spec, spec_schema

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

GRAPHVIZ_HINT = (
    "rendering {fmt} needs Graphviz's `dot` program, which is not installed.\n"
    "Install it (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz;\n"
    "Fedora: dnf install graphviz), or use --format mermaid or --format dot, which need nothing."
)


def _cmd_codes(args: argparse.Namespace) -> int:
    if args.format == "json":
        sys.stdout.buffer.write(as_json())
    else:
        sys.stdout.write(markdown_table())
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    if args.what == "spec":
        sys.stdout.buffer.write(spec_schema())
    else:
        import msgspec

        from sshspec.adapters.config import config_schema
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(config_schema())) + b"\n")
    return EXIT_OK


def _load_handler(spec: str) -> object:
    import importlib
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--handler {spec!r}: expected module:attribute")
    target = getattr(importlib.import_module(module_name), attr)
    return target() if isinstance(target, type) else target


def _workers(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError("expected a number >= 1 or 'auto'")
    return text


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from sshspec.adapters.config import ConfigError, load_config
    from sshspec.adapters.handlers import Handler
    from sshspec.adapters.server import serve_async
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"sshspec serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    handler: Handler | None = None
    if args.handler:
        try:
            loaded = _load_handler(args.handler)
        except (ImportError, AttributeError, ValueError) as exc:
            print(f"sshspec serve: --handler {args.handler}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if not isinstance(loaded, Handler):
            print(f"sshspec serve: --handler {args.handler}: not a sshspec Handler", file=sys.stderr)
            return EXIT_USAGE
        handler = loaded
    workers = (os.cpu_count() or 1) if args.workers == "auto" else int(args.workers)
    if workers > 1:
        from sshspec.adapters.server import run_workers
        return run_workers(config, handler, workers)
    return asyncio.run(serve_async(config, handler))


def _cmd_hash_password(args: argparse.Namespace) -> int:
    from sshspec.adapters.passwords import hash_password, read_password_for_hashing
    try:
        print(hash_password(read_password_for_hashing(sys.stdin)))
    except (ValueError, EOFError) as exc:
        print(f"sshspec hash-password: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def update_readme(path: Path) -> bool:
    """Rewrite the Mermaid block after each `<!-- diagram:NAME -->` marker; True if changed."""
    text = path.read_text()
    new = text
    for name in BUNDLED:
        marker = f"<!-- diagram:{name} -->\n"
        start = new.find(marker)
        if start < 0:
            continue
        begin = start + len(marker)
        end = new.find("```\n", new.find("```mermaid", begin) + 3) + 4 if new.startswith(
            "```mermaid", begin) else begin
        block = f"```mermaid\n{render(load_spec(name), 'mermaid')}```\n"
        new = new[:begin] + block + new[end:]
    if new != text:
        path.write_text(new)
    return new != text


def _cmd_diagram(args: argparse.Namespace) -> int:
    if args.readme:
        update_readme(Path(args.readme))
        return EXIT_OK
    try:
        loaded = load_spec(args.spec)
    except SpecError as exc:
        print(f"sshspec diagram: {exc}", file=sys.stderr)
        return EXIT_USAGE
    fmt = args.format
    text = render(loaded, "mermaid" if fmt == "mermaid" else "dot")
    if fmt in ("mermaid", "dot"):
        data = text.encode()
    else:
        dot = shutil.which("dot")
        if dot is None:
            print("sshspec diagram: " + GRAPHVIZ_HINT.format(fmt=fmt), file=sys.stderr)
            return EXIT_FAIL
        done = subprocess.run([dot, f"-T{fmt}"], input=text.encode(), capture_output=True)
        if done.returncode != 0:
            print(f"sshspec diagram: dot failed: {done.stderr.decode(errors='replace')}",
                  file=sys.stderr)
            return EXIT_FAIL
        data = done.stdout
    if args.output:
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sshspec", description="A declarative state-machine protocol engine for SSH servers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the SSH server (embedded defaults, or --config)")
    p.add_argument("--config", metavar="FILE", help="YAML config (see README)")
    p.add_argument("--handler", metavar="MODULE:ATTR", help="serve your own Handler (class or instance)")
    p.add_argument("--workers", default="1", type=_workers,
                   help="N processes sharing the port (SO_REUSEPORT); 'auto' = one per core")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("hash-password", help="print a passwordHash for the config (reads stdin)")
    p.set_defaults(func=_cmd_hash_password)

    p = sub.add_parser("codes", help="print the message-code catalog")
    p.add_argument("--format", choices=["markdown", "json"], default="markdown")
    p.set_defaults(func=_cmd_codes)

    p = sub.add_parser("schema", help="print a JSON Schema (spec files by default, or the config)")
    p.add_argument("what", nargs="?", choices=["spec", "config"], default="spec")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("diagram", help="draw a spec's state diagram")
    p.add_argument("spec", nargs="?", default="connection",
                   help="a bundled spec (server, connection, session) or a spec file path")
    p.add_argument("--format", choices=["mermaid", "dot", "svg", "png"], default="mermaid")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument("--readme", metavar="FILE", help=argparse.SUPPRESS)  # make readme-diagrams
    p.set_defaults(func=_cmd_diagram)

    from sshspec.adapters.check import add_commands
    add_commands(sub)  # check, coverage
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
