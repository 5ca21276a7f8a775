"""The four modes as short recipes over the shared loop: what trains, at which learning rate, and what is written.

- lora: adapters (of --adapter's kind, adapters.py) on the UNet (and the text encoders when text_encoder_rank > 0);
- dreambooth: the same adapters; the loop adds the class images and the prior-preservation loss;
- textual-inversion: new token rows only, trained in fp32 (tokens.py; every other row stays bit-identical);
- pivotal: textual inversion for ti_steps, then LoRA and the embeddings jointly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import embeddings
from ..formats import embeddings as ti_files
from ..inject import lora_modules
from ..state import components, lora_state_dict
from . import adapters
from .config import TrainConfig
from .tokens import TokenRows

ADAPTER = "trained"  # the adapter name used while training ("train" would shadow nn.Module.train)


@dataclass
class Recipe:
    groups: list[dict] = field(default_factory=list)  # optimizer parameter groups
    lora: list[torch.nn.Parameter] = field(default_factory=list)
    text_trains: bool = False  # a text encoder has trainable parameters (no text-embedding cache)
    tokens: dict[str, list[str]] = field(default_factory=dict)  # component -> tokenizer entries added
    rows: dict[str, TokenRows] = field(default_factory=dict)  # component -> its new token rows (trained in fp32)
    ti_steps: int = 0  # pivotal: LoRA joins at this step

    def before_step(self, step: int) -> None:
        for p in self.lora:  # pivotal's first phase trains the embeddings alone
            p.requires_grad_(step >= self.ti_steps)

    def after_step(self) -> None:
        for rows in self.rows.values():
            rows.sync()

    def finish(self) -> None:
        """Take the token-row hooks off: the pipeline holds the trained rows (in its dtype) by itself."""
        for rows in self.rows.values():
            rows.remove()

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]


def _text_encoders(pipe) -> list[tuple[str, object, torch.nn.Module]]:
    names = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    return [(c, getattr(pipe, "tokenizer" if c == "text_encoder" else "tokenizer_2"), getattr(pipe, c)) for c in names]


def _init_vectors(tokenizer, te, cfg: TrainConfig) -> torch.Tensor:
    matrix = te.get_input_embeddings().weight.detach()
    if cfg.init_token:
        ids = tokenizer(cfg.init_token, add_special_tokens=False).input_ids
        start = matrix[ids].float().mean(0) if ids else matrix.float().mean(0)
    else:
        start = matrix.float().mean(0)
    return start.repeat(cfg.num_vectors, 1)


def build(cfg: TrainConfig, pipe) -> Recipe:
    """Freeze the pipeline, add what this mode trains, and return the optimizer groups."""
    for module in components(pipe).values():
        module.requires_grad_(False)
    if getattr(pipe, "vae", None) is not None:
        pipe.vae.requires_grad_(False)
    recipe = Recipe(ti_steps=cfg.ti_steps if cfg.mode == "pivotal" else 0)
    if cfg.mode in ("textual-inversion", "pivotal"):
        for comp, tokenizer, te in _text_encoders(pipe):
            added = embeddings.add_tokens(tokenizer, te, {cfg.token: _init_vectors(tokenizer, te, cfg)})
            recipe.tokens[comp] = added
            recipe.rows[comp] = TokenRows(te, embeddings.token_ids(tokenizer, added))
        ti_params = [rows.param for rows in recipe.rows.values()]
        recipe.groups.append({"params": ti_params, "lr": cfg.ti_lr, "weight_decay": 0.0})
        recipe.text_trains = True
    if cfg.mode != "textual-inversion":
        main = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
        unet_params = adapters.add(main, cfg, ADAPTER, cfg.targets, cfg.rank, cfg.alpha, conv_rank=cfg.conv_rank,
                                   conv_alpha=cfg.conv_alpha)  # fmt: skip
        recipe.groups.append({"params": unet_params, "lr": cfg.lr})
        recipe.lora += unet_params
        if cfg.text_encoder_rank > 0:
            te_params = []
            for _, _, te in _text_encoders(pipe):
                te_params += adapters.add(te, cfg, ADAPTER, cfg.text_encoder_targets, cfg.text_encoder_rank,
                                          cfg.text_encoder_alpha)  # fmt: skip
            recipe.groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.lr})
            recipe.lora += te_params
            recipe.text_trains = True
    for p in recipe.trainable():
        p.requires_grad_(True)
    for module in components(pipe).values():  # the adapters train (dropout on); the frozen model keeps its mode
        for _, wrapper in lora_modules(module):
            wrapper.train()
    return recipe


def checkpoint_tensors(recipe: Recipe, pipe) -> dict[str, torch.Tensor]:
    """Everything trainable, by name: adapters (canonical keys) and new token rows (`emb.<component>.<entry>`)."""
    out = {}
    if recipe.lora:
        out.update({f"lora.{k}": v.contiguous() for k, v in lora_state_dict(pipe, ADAPTER).items()})
    for comp, rows in recipe.rows.items():
        for i, entry in enumerate(recipe.tokens[comp]):
            out[f"emb.{comp}.{entry}"] = rows.param.detach()[i].clone()
    return out


def restore_tensors(recipe: Recipe, pipe, tensors: dict[str, torch.Tensor]) -> None:
    """Put checkpoint values back into the same trainable tensors (for --resume), whatever the adapter kind."""
    comps = components(pipe)
    with torch.no_grad():
        for comp, module in comps.items():
            for path, wrapper in lora_modules(module):
                if ADAPTER in wrapper.adapters:
                    for suffix, t in adapters.trainable_tensors(wrapper.adapters[ADAPTER]).items():
                        t.copy_(tensors[f"lora.{comp}.{path}.{suffix}"])
        for comp, rows in recipe.rows.items():
            rows.load(torch.stack([tensors[f"emb.{comp}.{entry}"] for entry in recipe.tokens[comp]]))


def learned_embeddings(recipe: Recipe, token: str) -> dict[str, dict[str, torch.Tensor]]:
    """The trained vectors (fp32) of `token` per text encoder: {component: {token: (n, d)}}."""
    return {comp: {token: rows.param.detach().clone()} for comp, rows in recipe.rows.items()}


def output_files(cfg: TrainConfig) -> list[Path]:
    """The files this mode produces: the LoRA (+ the pivotal sidecar), or the embedding file for textual inversion."""
    return [Path(cfg.output), ti_files.sidecar(cfg.output)] if cfg.mode == "pivotal" else [Path(cfg.output)]


def save_outputs(cfg: TrainConfig, recipe: Recipe, pipe, dtype, metadata: dict) -> list[Path]:
    """Write output_files(cfg), the first (the LoRA) last: a pivotal sidecar goes before its LoRA, so that a LoRA on
    disk always has its embeddings beside it."""
    from ..api import save

    paths = output_files(cfg)
    if cfg.mode == "textual-inversion":
        return [ti_files.write(paths[0], learned_embeddings(recipe, cfg.token), force=cfg.force)]
    sidecar = []
    if cfg.mode == "pivotal":
        sidecar.append(ti_files.write(paths[1], learned_embeddings(recipe, cfg.token), force=cfg.force))
    written = save(pipe, paths[0], name=ADAPTER, dtype=dtype, metadata=metadata,
                   force=cfg.force)  # fmt: skip
    return [written, *sidecar]
