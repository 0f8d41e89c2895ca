"""`llmep`: the command line. Each subcommand lives in a small module and imports its heavy
dependencies (kopf, ray, vllm) only when it runs."""

from __future__ import annotations

import argparse
import sys

from llmep_operator import cli as operator_cli
from llmep_operator import weights_fetch
from llmep_serving import admin, local_mode, usage


def _gateway(gateway_args: list[str]) -> int:
    from llmep_serving.gateway import main as gateway_main

    gateway_main(gateway_args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmep",
        description="Self-hosted LLMs on Kubernetes behind one OpenAI-compatible base_url.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    operator_cli.add_commands(commands)
    gateway = commands.add_parser(
        "gateway", help="run the OpenAI-compatible gateway (flags: llmep gateway --help)", add_help=False
    )
    gateway.add_argument("gateway_args", nargs=argparse.REMAINDER)
    local_mode.add_parser(commands)
    admin.add_parsers(commands)
    usage.add_parser(commands)
    fetch = commands.add_parser("fetch", help="copy a model's weights (s3://, hf://) into a folder, showing progress")
    weights_fetch.add_arguments(fetch)
    fetch.set_defaults(func=weights_fetch.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gateway"]:
        # The gateway parses its own flags (they mirror its settings), --help included.
        return _gateway(argv[1:])
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
