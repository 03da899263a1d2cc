"""``moe-fusion inspect TARGET``: compile a model with the pass and show, per MoE layer, what was
matched (the MoESpec and the nodes replaced) or why not (which step, on which node).

TARGET is ``path.py:factory`` (a function returning a module, or a module class), ``hf:<model
type>`` (a tiny HF transformers model with random weights; ``--config key=value`` overrides the
config), or the name of a built-in example (moe_fusion/tools/example_models.py)."""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import example_models

    parser.add_argument("target", help="path.py:factory, hf:<model type> (e.g. hf:deepseek_v3), or one of: "
                                       + ", ".join(example_models.EXAMPLES))
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the hf: model config (repeatable), e.g. n_group=2")
    parser.add_argument("--experts", default="grouped_mm", choices=["grouped_mm", "batched_mm"],
                        help="HF experts implementation (hf: targets)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default: float32, bfloat16 for examples that need it)")
    parser.add_argument("--tokens", type=int, default=4, help="tokens in the example input")
    parser.add_argument("--graphs", action="store_true", help="show each layer's FX code before and after")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--codegen", action="store_true",
                        help="run Inductor's code generation too (slower; default stops after the passes)")
    parser.add_argument("--expect", type=int, default=None, metavar="N",
                        help="exit with status 1 when fewer than N layers are matched")


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _config_overrides(items):
    overrides = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--config expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def _load_factory(target: str):
    path, _, name = target.rpartition(":")
    spec = importlib.util.spec_from_file_location("moe_fusion_inspect_target", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise SystemExit(f"{path} has no {name!r}")
    return getattr(module, name)


def build_target(args):
    """(model, example input) for the target."""
    from . import example_models

    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.target.startswith("hf:"):
        from .. import hf_models

        model = hf_models.build_model(args.target[3:], dtype=dtype or torch.float32,
                                      experts_implementation=args.experts, **_config_overrides(args.config))
        return model, torch.randint(3, model.config.vocab_size, (args.tokens, 1))
    if args.config:
        raise SystemExit("--config applies to hf: targets only")
    if args.target in example_models.EXAMPLES:
        model = example_models.build(args.target, dtype)
    elif ":" in args.target:
        model = _load_factory(args.target)()
        if dtype is not None:
            model = model.to(dtype)
        model = model.eval()
    else:
        raise SystemExit(f"unknown target {args.target!r}: expected path.py:factory, hf:<type>, or one of "
                         + ", ".join(example_models.EXAMPLES))
    param = next(model.parameters())
    hidden = getattr(model, "hidden_size", None) or example_models.HIDDEN
    return model, torch.randn(args.tokens, hidden, dtype=param.dtype)


def inspect_model(model, example, codegen: bool = False, keep_graphs: bool = False):
    """Compile ``model`` with a fresh backend, run it once on ``example``, return the report."""
    from ..backend import MoEFusionBackend

    torch._dynamo.reset()
    backend = MoEFusionBackend(codegen=codegen, keep_graphs=keep_graphs)
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=True)(example)
    return backend.report


def run(args) -> int:
    model, example = build_target(args)
    report = inspect_model(model, example, codegen=args.codegen, keep_graphs=args.graphs)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.format_text(graphs=args.graphs))
    if args.expect is not None and report.matched < args.expect:
        print(f"moe-fusion inspect: expected at least {args.expect} matched layer(s), got {report.matched}",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moe-fusion inspect", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
