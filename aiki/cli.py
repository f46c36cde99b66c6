"""The ``aiki`` command: ``aiki demo`` (more subcommands come with the server)."""

from __future__ import annotations

import argparse
import sys

import trio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiki", description="Durable workflows on Trio.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the order-processing demo: crash and resume")
    demo.add_argument("--store-path", help="SQLite file to use (default: a new temp file)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from aiki import demo as demo_module

        trio.run(demo_module.main, args.store_path)
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
