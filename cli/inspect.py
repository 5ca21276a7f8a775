"""lora-inspect FILE [--json]: what a LoRA file holds, read from its header only (instant on multi-GB files)."""

from __future__ import annotations

import json

import click

from ._common import command, friendly_errors


@command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
@click.option("--metadata/--no-metadata", default=False, help="Also list every header metadata entry.")
@friendly_errors
def main(file: str, as_json: bool, metadata: bool) -> None:
    """Show the format, architecture, modules, ranks, alphas, trigger words and metadata of a LoRA FILE (of a base
    model's checkpoint: its architecture, components, size and dtypes)."""
    from lora_kit.formats.header import describe  # what lora_kit.inspect calls, without importing torch

    info = describe(file)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['file']}  ({info['size_bytes'] / 1e6:.2f} MB)")
    click.echo(f"  format        {info['format']}")
    if info["format"].startswith("checkpoint"):  # a base model (not a LoRA): what it holds
        click.echo(f"  architecture  {info['architecture']}")
        click.echo(f"  components    {', '.join(f'{c} ({p})' for c, p in info['components'].items())}")
        click.echo(f"  parameters    {info['parameters'] / 1e6:.1f} M in {info['tensors']} tensors")
        click.echo(f"  dtypes        {', '.join(f'{d} x{n}' for d, n in info['dtypes'].items())}")
        if info["prediction_type"]:
            click.echo(f"  prediction    {info['prediction_type']}")
        _metadata(info, metadata)
        return
    click.echo(f"  architecture  {info['architecture']}")
    comps = ", ".join(f"{c} {n}" for c, n in info["components"].items())
    click.echo(f"  modules       {info['modules']} ({comps}); {info['conv_modules']} kxk conv")
    click.echo(f"  adapters      {', '.join(f'{a} x{n}' for a, n in info['adapters'].items())}")
    click.echo(f"  ranks         {', '.join(f'{r} x{n}' for r, n in info['ranks'].items()) or '-'}")
    click.echo(
        f"  alphas        {', '.join(f'{a} x{n}' for a, n in info['alphas'].items()) or '(none: alpha = rank)'}"
    )
    click.echo(f"  dtypes        {', '.join(info['dtypes'])}")
    if info["trigger_words"]:
        click.echo(f"  trigger words {info['trigger_words']}")
    if info["quantized_base"]:  # (it applies to the unquantized base; this is what it trained over)
        click.echo(f"  trained over  a quantized base: {_held(info['quantized_base'])}")
    if info["other_keys"]:
        click.echo(f"  other keys    {', '.join(info['other_keys'])}")
    _metadata(info, metadata)


def _held(text: str) -> str:
    """lora_kit.quantized_base ({component: what it held}, as JSON) as one line; another value as it is."""
    try:
        held = json.loads(text)
    except json.JSONDecodeError:
        return text
    return "; ".join(f"{c} {what}" for c, what in held.items()) if isinstance(held, dict) else text


def _metadata(info: dict, shown: bool) -> None:
    if shown:
        for k, v in sorted(info["metadata"].items()):
            click.echo(f"  {k} = {v if len(v) < 100 else v[:97] + '...'}")


if __name__ == "__main__":
    main()
