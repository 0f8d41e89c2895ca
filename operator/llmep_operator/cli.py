"""`llmep`: the command line. Subcommands register themselves from small modules."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from llmep_operator import runner
from llmep_operator.api import crdgen


def _version(_: argparse.Namespace) -> int:
    print(f"llmep {metadata.version('llmep')}")
    return 0


def _crd(args: argparse.Namespace) -> int:
    if args.check:
        return crdgen.main(["--check"])
    sys.stdout.write(crdgen.render_crd())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmep",
        description="Self-hosted LLMs on Kubernetes behind one OpenAI-compatible base_url.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    version = commands.add_parser("version", help="print the llmep version")
    version.set_defaults(func=_version)

    crd = commands.add_parser("crd", help="print the LLMEndpoint CRD (pipe it to kubectl apply -f -)")
    crd.add_argument("--check", action="store_true", help="check the repository's generated CRD files instead")
    crd.set_defaults(func=_crd)

    runner.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
