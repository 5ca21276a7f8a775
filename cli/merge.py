"""lora-merge: LoRAs into one LoRA (exact weighted sum of deltas), or a LoRA into its base model."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ._common import command, friendly_errors, output_options, progress, torch_dtype
from .convert import print_module_errors


def _is_model(spec: str, allow_pickle: bool) -> bool:
    """A diffusers folder, a hub id, or a single-file checkpoint (told from its header), not a LoRA."""
    from lora_kit.single_file.reader import items

    parts = items(spec)
    p = Path(parts[0])
    if p.is_file():
        from lora_kit.formats import files
        from lora_kit.single_file.sniff import sniff

        if len(parts) > 1:
            return True
        if p.suffix.lower() in files.PICKLES:
            return allow_pickle and p.suffix.lower() == ".ckpt"
        try:
            return sniff(p) is not None
        except Exception:  # noqa: BLE001 - a bad header is reported by the LoRA reader, naming the file
            return False
    return p.is_dir() or (not p.exists() and not spec.endswith((".safetensors", ".pt", ".bin", ".ckpt")))


def _weights(n: int, alpha: float | None, weights: str | None) -> list[float]:
    from lora_kit.errors import LoraKitError

    if weights is not None:
        if alpha is not None:
            raise LoraKitError("give --alpha (two LoRAs) or --weights (any number), not both")
        try:
            ws = [float(w) for w in weights.split(",")]
        except ValueError:
            raise LoraKitError(f"--weights {weights!r}: expected comma-separated numbers") from None
        if not all(math.isfinite(w) for w in ws):
            raise LoraKitError(f"--weights {weights!r}: every weight must be a finite number")
        if len(ws) != n:
            raise LoraKitError(f"--weights {weights!r}: {len(ws)} weight(s) for {n} LoRAs")
        return ws
    if n == 2:
        a = 0.5 if alpha is None else alpha
        return [a, 1.0 - a]
    raise LoraKitError(f"{n} LoRAs: give --weights with {n} numbers")


@command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--alpha", type=float, default=None,
              help="Mixing ratio for two LoRAs: OUT = alpha*A + (1-alpha)*B (default 0.5). With a MODEL first: the "
                   "weight at which the LoRA is collapsed into it (default 1.0).")  # fmt: skip
@click.option("--weights", default=None, help="Comma-separated weights for N LoRAs, taken as given: 0.5,0.3,0.2.")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Re-compress the merged LoRA to this rank by SVD.")  # fmt: skip
@click.option("--conv-rank", type=click.IntRange(min=1), default=None,
              help="Rank for convs larger than 1x1 with --rank.")  # fmt: skip
@click.option("--allow-pickle", is_flag=True,
              help="Read pickled .pt/.bin LoRAs (torch weights_only): {name: tensor} files, and with a MODEL first "
                   "also cloneofsimo's lists.")  # fmt: skip
@click.option("--model", default=None,
              help="LoRA + LoRA holding LoHa/LoKr/DoRA/IA3/full-diff modules (summed by SVD at --rank): the base "
                   "model whose names and layer shapes the files are read with; DoRA and IA3 need it, their delta "
                   "depends on the base weight. Default: the architecture the files are for, built on the meta "
                   "device.")  # fmt: skip
@click.option("--to", "to", type=click.Choice(["folder", "single-file"]), default=None,
              help="With a MODEL first: write a diffusers folder or one checkpoint file. [single-file when OUTPUT "
                   "ends in .safetensors, else folder]")  # fmt: skip
@output_options
@friendly_errors
def main(inputs, alpha, weights, rank, conv_rank, allow_pickle, model, to, output, dtype, force):
    """Merge LoRA files: `lora-merge A B --alpha 0.6 -o OUT` writes a LoRA whose delta is exactly
    0.6*dA + 0.4*dB in every module (ranks are concatenated; --rank re-compresses and prints the error).
    Pivotal-tuning embeddings (`A.emb.safetensors`) are merged too; a token in both is an error. Inputs holding
    LyCORIS kinds (LoHa, LoKr, DoRA, IA3, full diff) need --rank: each module's weighted sum of exact deltas is
    factored by SVD and the errors printed (DoRA/IA3: --model too).

    `lora-merge MODEL A --alpha 0.8 -o DIR` collapses A at weight 0.8 into MODEL (a diffusers folder, a hub id or
    a single-file checkpoint) and writes a diffusers pipeline folder that from_pretrained loads; `-o
    merged.safetensors` writes one checkpoint file instead, in the layout MODEL had (A1111/SGM names for
    SD1/SD2/SDXL, ComfyUI's for SD3/FLUX; a folder MODEL: the layout A1111 and ComfyUI save).
    """
    from lora_kit import tools
    from lora_kit.errors import LoraKitError

    if len(inputs) < 2:
        raise LoraKitError("give at least two inputs: two or more LoRAs, or a MODEL and a LoRA")
    if alpha is not None and not math.isfinite(alpha):
        raise LoraKitError(f"--alpha {alpha}: must be a finite number")
    if _is_model(inputs[0], allow_pickle):
        if len(inputs) != 2 or weights:
            raise LoraKitError("with a MODEL first, give exactly one LoRA (and --alpha for its weight)")
        if model is not None:
            raise LoraKitError("--model is for merging LoRAs of other kinds; with a MODEL first it is that MODEL")
        if rank is not None or conv_rank is not None:
            flag = "--rank" if rank is not None else "--conv-rank"
            raise LoraKitError(f"{flag} re-compresses a merged LoRA; with a MODEL first the LoRA is collapsed into it")
        weight = 1.0 if alpha is None else alpha
        single = to == "single-file" if to else str(output).endswith(".safetensors")
        out = tools.collapse_into_model(inputs[0], inputs[1], output, weight, torch_dtype(dtype), force, allow_pickle,
                                        single_file=single)  # fmt: skip
        what = "checkpoint" if single else "pipeline"
        click.echo(f"wrote the {what} with {inputs[1]} collapsed at weight {weight:g} to {out}")
        return
    if to is not None:
        raise LoraKitError("--to applies with a MODEL first (lora-merge MODEL LORA --to single-file -o OUT)")
    ws = _weights(len(inputs), alpha, weights)
    report = tools.merge(inputs, output, ws, rank=rank, conv_rank=conv_rank, dtype=torch_dtype(dtype), force=force,
                         progress=progress("re-rank"), allow_pickle=allow_pickle, model=model)  # fmt: skip
    if rank is not None:  # the ranks kept: a module already at or below --rank keeps its own
        kept = ", ".join(f"{r} x{n}" for r, n in sorted(report.ranks.items()))
        click.echo(f"re-compressed to rank {max(report.ranks)} ({kept}): relative error {report.total_error:.3e}")
        print_module_errors(report.errors)
    for note in report.notes:
        click.echo(note)
    click.echo(f"wrote {report.path} ({' + '.join(f'{w:g}*{Path(p).name}' for w, p in zip(ws, inputs, strict=True))})")


if __name__ == "__main__":
    main()
