"""`asga policy show|validate|diff|uniform`: read-only helpers on policy files (uniform writes one)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from . import app
from .common import choice, console, handle_errors

policy_app = typer.Typer(no_args_is_help=True, help="Inspect, validate, compare and create policy files.")
app.add_typer(policy_app, name="policy")


def _model_for(policy, model: str | None, in_chans: int | None):
    from ..models import create_model

    name = model or policy.model
    shape = policy.cost.get("input_shape") or [in_chans or 3, 32, 32]
    return create_model(name, num_classes=policy.cost.get("num_classes", 10), in_chans=in_chans or shape[0]), shape


@policy_app.command("show")
@handle_errors
def show(path: Path = typer.Argument(..., help="policy JSON file")):
    """Show a table of layers, bits, MACs and share of BitOPs."""
    from ..policy import Policy, costs_at

    pol = Policy.load(path)
    model, shape = _model_for(pol, None, None)
    costs = costs_at(model, shape, pol.model, f"{path}'s")
    excluded = set(pol.cost.get("excluded", []))
    total = sum(costs[n].bitops(b.weight_bits, b.act_bits) for n, b in pol.layers.items()
                if n in costs and n not in excluded) or 1
    t = Table(title=f"{path.name}: {pol.model} -> {pol.target}")
    for col in ("layer", "W", "A", "act", "MACs", "params", "BitOPs share"):
        t.add_column(col, justify="left" if col in ("layer", "act") else "right")
    for n, c in costs.items():
        if n in pol.layers:
            b = pol.layers[n]
            share = "excluded" if n in excluded else f"{100 * c.bitops(b.weight_bits, b.act_bits) / total:.1f}%"
            t.add_row(n, str(b.weight_bits), str(b.act_bits), "signed" if b.act_signed else "unsigned",
                      f"{c.macs:,}", f"{c.params:,}", share)
        else:
            t.add_row(n, "float", "float", "", f"{c.macs:,}", f"{c.params:,}", "")
    console.print(t)
    cost = pol.cost
    if cost:
        console.print(f"BitOPs {cost.get('bitops', 0):.4g} = {100 * cost.get('bitops_vs_w8a8', 0):.2f}% of W8A8 "
                      f"(searched layers, input {cost.get('input_shape')}); weight bytes "
                      f"{cost.get('weight_bytes', 0):,.0f} searched / {cost.get('weight_bytes_total', 0):,.0f} total")


@policy_app.command("validate")
@handle_errors
def validate(path: Path = typer.Argument(..., help="policy JSON file"),
             model: str = typer.Option(None, "--model", "-m", help="model name (default: the policy's)"),
             in_chans: int = typer.Option(None, min=1, help="input channels (default: from the policy's cost)")):
    """Check a policy against a model and its target; report every problem at once."""
    from ..policy import Policy, validate_policy

    pol = Policy.load(path)
    if model and model != pol.model:
        from ..errors import PolicyError

        net, _ = _model_for(pol, model, in_chans)
        try:
            validate_policy(pol, net, str(path))
        except PolicyError as e:
            raise PolicyError(f"policy is for model {pol.model!r}, not {model!r}: {e}") from None
    net, _ = _model_for(pol, model, in_chans)
    validate_policy(pol, net, str(path))
    console.print(f"[green]ok[/green] {path}: {len(pol.layers)} quantized, {len(pol.float_layers)} float layers, "
                  f"target {pol.target}")


@policy_app.command("diff")
@handle_errors
def diff(a: Path, b: Path):
    """List the layers whose bits differ between two policies (of the same model)."""
    from ..policy import compare

    d = compare(a, b)
    for line in d:
        console.print(line)
    console.print(f"{len(d)} layer(s) differ")


@policy_app.command("uniform")
@handle_errors
def uniform(model: str = typer.Option("smallcnn", "--model", "-m"),
            weight_bits: int = typer.Option(..., "--w", help="weight bits of the searched layers"),
            act_bits: int = typer.Option(..., "--a", help="activation bits of the searched layers"),
            target: str = typer.Option("ort", help="sim | ort | tensorrt"),
            num_classes: int = typer.Option(10, min=1), in_chans: int = typer.Option(None, min=1),
            input_size: int = typer.Option(None, min=1),
            edges: str = typer.Option("w8a8", callback=choice("w8a8", "float"),
                                      help="first conv and classifier: w8a8 or float"),
            out: Path = typer.Option(None, help="output file (default policies/<model>-w<W>a<A>.json)"),
            force: bool = typer.Option(False, "--force")):
    """Write the uniform W<w>A<a> policy of a model (first conv and classifier at 8 bits by default)."""
    from ..errors import PolicyError
    from ..io import check_writable
    from ..naming import uniform_stem
    from ..policy import uniform_policy
    from ..targets import BITS_RANGE, get_target

    get_target(target)
    for k, v in (("--w", weight_bits), ("--a", act_bits)):
        if not BITS_RANGE[0] <= v <= BITS_RANGE[1]:
            raise PolicyError(f"{k} {v} outside {BITS_RANGE[0]}..{BITS_RANGE[1]}")
    path = check_writable(out or Path("policies") / f"{uniform_stem(model, weight_bits, act_bits, target)}.json",
                          force)
    pol = uniform_policy(model, weight_bits, act_bits, target, num_classes, in_chans, input_size, edges)
    pol.save(path, force=force)
    console.print(f"wrote {path}: {100 * pol.cost['bitops_vs_w8a8']:.2f}% of W8A8 BitOPs")
