"""The operator's subcommands of `llmep` (the dispatcher is llmep_serving.cli)."""

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


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The operator's own subcommands: version, crd, operator."""
    version = commands.add_parser("version", help="print the llmep version")
    version.set_defaults(func=_version)

    crd = commands.add_parser("crd", help="print the LLMEndpoint CRD (pipe it to kubectl apply -f -)")
    crd.add_argument("--check", action="store_true", help="check the repository's generated CRD files instead")
    crd.set_defaults(func=_crd)

    runner.add_parser(commands)
