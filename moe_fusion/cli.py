"""The ``moe-fusion`` command: ``inspect`` (what the pass matched) and ``bench`` (decode latency)."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each subcommand lives in moe_fusion/tools/<name>.py with add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "inspect": "which MoE layers matched, which did not and why, graphs before/after",
    "bench": "decode latency at M = 1..64: eager vs Inductor vs moe_fusion",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moe-fusion")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"moe_fusion.tools.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return importlib.import_module(f"moe_fusion.tools.{args.command}").run(args)


if __name__ == "__main__":
    sys.exit(main())
