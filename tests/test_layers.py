"""The wrapper layers against hand-written formulas (F.linear / F.conv2d on explicit weights)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from torch import nn

from lora_kit import functional
from lora_kit.layers import LoraInjectedConv2d, LoraInjectedLinear

CONVS = [  # (in, out, kernel, stride, padding, dilation, padding_mode)
    (4, 6, 3, 1, 1, 1, "zeros"),
    (4, 6, 1, 1, 0, 1, "zeros"),
    (3, 5, (3, 5), 2, (1, 2), 1, "zeros"),
    (4, 4, 3, 1, 2, 2, "zeros"),
    (4, 6, 3, 1, 1, 1, "reflect"),
]


def _random(adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.up.copy_(torch.randn(adapter.up.shape, generator=g))
        adapter.down.copy_(torch.randn(adapter.down.shape, generator=g))


def test_linear_matches_formula_with_two_adapters():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    w = LoraInjectedLinear(base)
    a = w.add_adapter("a", rank=3, alpha=1.5)
    b = w.add_adapter("b", rank=2, alpha=4.0)
    _random(a, 1)
    _random(b, 2)
    b.weight = 0.3
    x = torch.randn(2, 7, 8)
    expected = F.linear(x, base.weight, base.bias)
    expected = expected + (x @ a.down.T @ a.up.T) * (1.5 / 3) + (x @ b.down.T @ b.up.T) * (4.0 / 2) * 0.3
    assert_close_scaled(w(x), expected, reduction=8 + 3 + 2)  # x @ down (8 inputs), then @ up (ranks 3 + 2)
    # the collapsed weight gives the same output
    merged = base.weight + (a.up @ a.down) * 0.5 + (b.up @ b.down) * 2.0 * 0.3
    assert_close_scaled(w.delta_weight() + base.weight, merged, reduction=3 + 2)
    b.enabled = False
    assert_close_scaled(w(x), F.linear(x, base.weight, base.bias) + (x @ a.down.T @ a.up.T) * 0.5, reduction=8 + 3)


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,mode", CONVS)
def test_conv_matches_collapsed_weight(cin, cout, k, stride, pad, dil, mode):
    torch.manual_seed(0)
    base = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, padding_mode=mode)
    w = LoraInjectedConv2d(base)
    a = w.add_adapter("a", rank=2, alpha=3.0)
    _random(a, 4)
    x = torch.randn(2, cin, 9, 11)
    merged = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, padding_mode=mode)
    # independent delta: the kohya 3x3 form conv2d(down.permute(1,0,2,3), up).permute(1,0,2,3)
    with torch.no_grad():
        delta = F.conv2d(a.down.permute(1, 0, 2, 3), a.up).permute(1, 0, 2, 3) * 1.5
        merged.weight.copy_(base.weight + delta)
        merged.bias.copy_(base.bias)
    assert_close_scaled(w(x), merged(x), reduction=base.weight[0].numel() + 2)  # down (C_in*kh*kw), then up (rank)
    assert_close_scaled(w.delta_weight(), delta, reduction=2)


def test_fresh_adapter_is_identity_and_init_modes():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    w = LoraInjectedLinear(base)
    a = w.add_adapter("k", rank=4)
    g = w.add_adapter("g", rank=4, init="gaussian")
    x = torch.randn(3, 16)
    assert torch.equal(w(x), base(x))
    assert torch.count_nonzero(a.up) == 0 and torch.count_nonzero(g.up) == 0
    assert a.down.abs().max() <= 1 / 16**0.5  # kaiming-uniform(a=sqrt 5) bound 1/sqrt(fan_in)
    assert abs(g.down.std().item() - 0.25) < 0.08  # gaussian std 1/rank
    assert a.scale == 1.0  # alpha defaults to rank


def test_dropout_only_in_training():
    torch.manual_seed(0)
    w = LoraInjectedLinear(nn.Linear(32, 32))
    _random(w.add_adapter("a", rank=4, dropout=0.5), 0)
    x = torch.randn(4, 32)
    w.eval()
    assert torch.equal(w(x), w(x))
    w.train()
    assert not torch.equal(w(x), w(x))


def test_refusals():
    with pytest.raises(ValueError, match="grouped"):
        LoraInjectedConv2d(nn.Conv2d(4, 4, 3, groups=2))
    w = LoraInjectedLinear(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="rank 4 is not in 1..3"):
        w.add_adapter("a", rank=4)
    w.add_adapter("a", rank=2)
    with pytest.raises(ValueError, match="already exists"):
        w.add_adapter("a", rank=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_fp32_adapters_with_and_without_autocast(dtype):
    torch.manual_seed(0)
    ref = LoraInjectedConv2d(nn.Conv2d(4, 8, 3, padding=1))
    _random(ref.add_adapter("a", rank=2, alpha=1.0), 0)
    half = LoraInjectedConv2d(nn.Conv2d(4, 8, 3, padding=1).to(dtype))
    half.base.load_state_dict({k: v.to(dtype) for k, v in ref.base.state_dict().items()})
    a = half.add_adapter("a", rank=2, alpha=1.0)
    a.load_state_dict(ref.adapters["a"].state_dict())
    assert a.down.dtype == torch.float32 and half.base.weight.dtype == dtype
    x = torch.randn(2, 4, 6, 6)
    y_ref = ref(x)
    y_ref.square().mean().backward()
    # plain half precision, no autocast
    y = half(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, atol=0.05, rtol=0.05)  # half precision: a stated precision bound
    # under autocast (bf16 is what CPU autocast supports), forward and backward
    if dtype == torch.bfloat16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = half(x)
            loss = y.float().square().mean()
        loss.backward()
        for p in (a.down, a.up):
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        ref_grad = ref.adapters["a"].up.grad
        cos = F.cosine_similarity(a.up.grad.flatten(), ref_grad.flatten(), dim=0)
        assert cos > 0.99


def test_functional_delta_and_factorize_roundtrip():
    torch.manual_seed(0)
    up, down = torch.randn(6, 3), torch.randn(3, 5)
    assert_close_scaled(functional.delta(up, down, 0.5), 0.5 * up @ down, reduction=3)
    u2, d2 = functional.factorize(up @ down, 3)  # an SVD of a 6 x 5 matrix: relative to its spectral norm
    assert_close_scaled(u2 @ d2, up @ down, reduction=6, scale=torch.linalg.matrix_norm(up @ down, 2))
    conv_up, conv_down = torch.randn(6, 2, 1, 1), torch.randn(2, 4, 3, 3)
    full = functional.delta(conv_up, conv_down)
    assert full.shape == (6, 4, 3, 3)
    cu, cd = functional.factorize(full, 2)
    assert cu.shape == (6, 2, 1, 1) and cd.shape == (2, 4, 3, 3)
    spectral = torch.linalg.matrix_norm(full.flatten(1), 2)  # an SVD of the 6 x 36 matrix
    assert_close_scaled(functional.delta(cu, cd), full, reduction=36, scale=spectral)


def _check_twice(w, x, base=None):
    """w(x) twice equals the formula in float64 from the live tensors: the first call sees the last change, the second
    runs the plan the first kept. `base`: the base's own output in float64, where it is not F.linear's."""
    x = x.to(w.base.weight.dtype)
    first, again = w(x), w(x)
    y = F.linear(x.double(), w.base.weight.double(), w.base.bias.double()) if base is None else base
    for a in w.adapters.values():
        if a.enabled:
            h = F.linear(F.linear(x.double(), a.down.double()), a.up.double())
            y = y + a.weight * a.factor * a.alpha.item() / a.rank * h
    rank = sum(a.rank for a in w.adapters.values())
    assert_close_scaled(first.double(), y, reduction=x.shape[-1] + rank, dtype=first.dtype)
    assert torch.equal(first, again) and w._plan is not None


@pytest.mark.parametrize("fused", [False, True])
def test_inference_fast_path_sees_every_change(fused):
    """The wrapper keeps its last inference forward as a ready function: each kind of change must reach the output
    at the next forward."""
    torch.manual_seed(0)
    w = LoraInjectedLinear(nn.Linear(8, 5)).eval()
    for name, rank, seed in (("a", 2, 1), ("b", 3, 2)):
        w.add_adapter(name, rank, alpha=1.5)
        _random(w.adapters[name], seed)
    w.fused = fused
    x = torch.randn(4, 8)

    def check():
        with torch.no_grad():
            _check_twice(w, x)

    check()
    with torch.no_grad():
        w.adapters["a"].up.mul_(2)  # in place: the version counter
    check()
    w.adapters["b"].weight = 0.3
    check()
    w.adapters["a"].factor = -1.0
    check()
    w.adapters["b"].enabled = False
    check()
    w.add_adapter("c", 1)
    _random(w.adapters["c"], 3)
    check()
    del w.adapters["a"]
    check()
    with torch.no_grad():
        w.adapters["c"].alpha.fill_(4.0)
    check()
    w.adapters["c"].to(torch.bfloat16)  # one adapter cast by itself: new storage, rounded values
    check()
    w.base.weight = nn.Parameter(w.base.weight * 2)  # a new base parameter (also as fused: the cache recomposes)
    check()
    with torch.no_grad():
        w.base.bias.add_(1)
    check()
    with torch.no_grad():
        w.base.weight.mul_(0.5)  # in place (as collapsing another LoRA into the base does)
    check()
    w.fused = not fused
    check()
    w.to(torch.float64)  # new storage and dtype
    check()


@pytest.mark.parametrize("fused", [False, True])
def test_adapters_made_under_inference_mode_keep_a_plan_too(fused):
    """Tensors created under torch.inference_mode keep no version counter: the plan is kept all the same (it checked
    for one by raising an error before: about ten times the cost of a kept plan, on every call of every layer), and
    sees every setting, new Parameter, move and cast; writes in place into such tensors need invalidate()."""
    with torch.inference_mode():
        torch.manual_seed(0)
        w = LoraInjectedLinear(nn.Linear(8, 5)).eval()
        for name, rank, seed in (("a", 2, 1), ("b", 3, 2)):
            _random(w.add_adapter(name, rank, alpha=1.5), seed)
        assert w.adapters["a"].up.is_inference()
        w.fused = fused
        x = torch.randn(4, 8)
        _check_twice(w, x)
        w.adapters["b"].weight = 0.3
        _check_twice(w, x)
        w.adapters["a"].up = nn.Parameter(torch.randn(5, 2))
        _check_twice(w, x)
        w.adapters["b"].down.mul_(2)  # unseen by version counters: the documented call
        w.invalidate()
        _check_twice(w, x)
        w.base.weight.mul_(0.5)  # a base written in place: read live unfused; fused must be told as well
        if fused:
            w.invalidate()
        _check_twice(w, x)
        w.fused = not fused
        _check_twice(w, x)
        w.to(torch.float64)
        _check_twice(w, x)


def _two_adapter_linear(fused=False):
    torch.manual_seed(0)
    w = LoraInjectedLinear(nn.Linear(8, 5)).eval()
    for name, rank, seed in (("a", 2, 1), ("b", 3, 2)):
        _random(w.add_adapter(name, rank, alpha=1.5), seed)
    w.fused = fused
    return w, torch.randn(4, 8)


@torch.no_grad()
def test_the_adapter_table_changed_by_any_route_and_invalidate_reach_the_output():
    """(An adversarial review's findings, each stale before.) ModuleDict routes that bypass item assignment, a new
    table, and invalidate() after alpha was written through .data (the scale alpha / rank was kept)."""
    w, x = _two_adapter_linear()
    other, _ = _two_adapter_linear()
    _check_twice(w, x)
    w.adapters.add_module("z", other.adapters["a"])
    _check_twice(w, x)
    del w.adapters.z
    _check_twice(w, x)
    w.adapters.y = other.adapters["b"]
    _check_twice(w, x)
    w.adapters = other.adapters
    _check_twice(w, x)
    w.adapters["a"].alpha.data.fill_(6.0)  # (invisible to version counters: the documented call)
    w.invalidate()
    _check_twice(w, x)
    w.add_module("base", nn.Linear(8, 5))  # (register_module, add_module: no __setattr__)
    _check_twice(w, x)
    w.adapters["a"].register_parameter("up", nn.Parameter(torch.randn(5, 2)))
    _check_twice(w, x)
    w.adapters["a"].register_buffer("alpha", torch.tensor(7.0))
    _check_twice(w, x)


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_a_base_that_is_more_than_its_op_is_called_as_a_module(fused):
    """A subclass with its own forward (quantised, LoRA-compatible linears) and a base whose forward hook keeps its
    output (feature caches) are called as modules, in fused mode too, and what they return is not written into."""

    class Doubled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    w, x = _two_adapter_linear(fused)
    w.base = Doubled(8, 5)
    _check_twice(w, x, 2 * F.linear(x.double(), w.base.weight.double(), w.base.bias.double()))
    w.base = nn.Linear(8, 5)
    kept = {}
    w.base.register_forward_hook(lambda module, args, out: kept.setdefault("y", out))
    for _ in range(2):
        _check_twice(w, x)  # (the hook returns the output of the first call at every call)
    assert_close_scaled(kept["y"], w.base(x), reduction=8)


@torch.no_grad()
def test_fused_weights_are_composed_outside_autocast_and_follow_a_parametrized_base():
    w, x = _two_adapter_linear(fused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w(x)  # the fused weight is built here: not rounded to bf16 for later fp32 calls
    _check_twice(w, x)
    torch.nn.utils.parametrizations.weight_norm(w.base)  # the weight: a new tensor at every read
    for scale in (2.0, 0.5, 3.0):
        w.base.parametrizations.weight.original0.mul_(scale)
        _check_twice(w, x)


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("adapters", ["float64", "float32"])
def test_a_float64_wrapper_computes_in_float64(fused, adapters):
    """(The stacked ups, the column scales and the fused sum were fp32 whatever the model: 4e-8 off in float64.)
    Adapters added to a float64 model are fp32 (as they always are): the model's float64 all the same."""
    w, x = _two_adapter_linear(fused)
    if adapters == "float64":
        w.double()
    else:
        w.base.double()
    y = F.linear(x.double(), w.base.weight, w.base.bias)
    for a in w.adapters.values():
        y = y + a.weight * a.alpha.item() / a.rank * F.linear(F.linear(x.double(), a.down.double()), a.up.double())
    for _ in range(2):
        assert_close_scaled(w(x.double()), y, reduction=8 + 3 + 2)  # (an fp32 step: 4e-8 off, far outside)


@pytest.mark.parametrize("copy_with", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_copy_runs_its_own_tensors(kind, copy_with):
    """A copy of a wrapper that kept a plan (copy.deepcopy, torch.save of the module) computes with its own tensors:
    the original's plan holds the original's base weight and pair, and the copy's tensors can carry the very version
    counters the original's plan saw (new Parameters, a buffer written once: the case here)."""
    import copy
    import io

    torch.manual_seed(0)
    linear = kind == "linear"
    base, x = (nn.Linear(8, 5), torch.randn(3, 8)) if linear else (nn.Conv2d(4, 5, 3), torch.randn(2, 4, 6, 6))
    w = (LoraInjectedLinear if linear else LoraInjectedConv2d)(base).eval()
    a = w.add_adapter("a", 2)
    a.down, a.up = nn.Parameter(torch.randn(a.down.shape)), nn.Parameter(torch.randn(a.up.shape))  # versions 0
    with torch.no_grad():
        a.alpha.fill_(3.0)  # version 1, as a copied buffer's
        w(x), w(x)
        if copy_with == "deepcopy":
            c = copy.deepcopy(w)
        else:
            buffer = io.BytesIO()
            torch.save(w, buffer)
            c = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        c.base.weight.mul_(0.0)  # the copy's own base (read directly by the plan's function)
        k = base.weight[0].numel() + 2  # down (the base's fan-in), then up (rank 2)
        assert_close_scaled(c(x), c.base(x) + 1.5 * w._up(w._down(x, a.down), a.up), reduction=k)
        c.adapters["a"].up.mul_(2.0)
        assert_close_scaled(c(x), c.base(x) + 3.0 * w._up(w._down(x, a.down), a.up), reduction=k)
        assert_close_scaled(w(x), w.base(x) + 1.5 * w._up(w._down(x, a.down), a.up), reduction=k)


@pytest.mark.parametrize("fused", [False, True])
def test_inference_plan_keeps_no_reference_cycle(fused):
    """A wrapper whose plan is kept is freed by reference counting alone (GPU memory returns at `del pipe`)."""
    import gc
    import weakref

    w = LoraInjectedLinear(nn.Linear(8, 5)).eval()
    _random(w.add_adapter("a", 2), 1)
    w.fused = fused
    with torch.no_grad():
        w(torch.randn(3, 8)), w(torch.randn(3, 8))
    assert w._plan is not None
    ref = weakref.ref(w)
    gc.disable()
    try:
        del w
        assert ref() is None
    finally:
        gc.enable()
