"""New token rows of textual inversion and pivotal tuning, trained as one fp32 tensor whatever the text encoder's
dtype: in a bf16 or fp16 matrix, updates of an embedding (a few 1e-3) round away, and the fp16 GradScaler refuses
fp16 gradients. The embedding matrix itself never trains, so every other row stays bit-identical."""

from __future__ import annotations

import torch


class TokenRows:
    """Rows `ids` (consecutive, as add_tokens gives them) of `text_encoder`'s input embeddings as `param` (fp32). A
    forward hook puts them, cast to the matrix's dtype, in place of the stored rows; `sync()` (after each optimizer
    step) copies them into the matrix, so sampling, and the pipeline once `remove()` took the hook off, see them."""

    def __init__(self, text_encoder: torch.nn.Module, ids: list[int]):
        self.module = text_encoder.get_input_embeddings()
        self.start, self.stop = ids[0], ids[-1] + 1
        if list(ids) != list(range(self.start, self.stop)):
            raise ValueError(f"token rows {ids} are not consecutive")
        weight = self.module.weight.detach()
        self.param = torch.nn.Parameter(weight[self.start : self.stop].float().clone())
        self._handle = self.module.register_forward_hook(self._substitute)

    def _substitute(self, module, args, out: torch.Tensor) -> torch.Tensor:
        ids = args[0]
        new = (ids >= self.start) & (ids < self.stop)
        rows = self.param.to(out.dtype)[(ids - self.start).clamp(0, self.stop - self.start - 1)]
        return torch.where(new[..., None], rows, out)

    def sync(self) -> None:
        with torch.no_grad():
            self.module.weight[self.start : self.stop] = self.param.to(self.module.weight.dtype)

    def load(self, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.param.copy_(values)
        self.sync()

    def remove(self) -> None:
        self._handle.remove()
