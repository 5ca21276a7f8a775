"""Target(parents=...) takes nn.Module classes and "package.module:Class" strings alike, and a bad value is one
LoraKitError line."""

import re

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

import lora_kit
from lora_kit import LoraKitError
from lora_kit.inject import find_targets, inject_lora, lora_modules
from lora_kit.targets import PRESETS, Target

ATTENTION = "diffusers.models.attention_processor:Attention"
QKVO = r"to_q|to_k|to_v|to_out\.0"


def test_a_class_selects_what_its_string_selects(make_pipe):
    unet = make_pipe("sd1").unet
    by_string = find_targets(unet, Target((ATTENTION,), QKVO))
    assert by_string and by_string == find_targets(unet, "attn")  # the preset is this target, by string
    by_class = find_targets(unet, Target((Attention,), QKVO))
    assert by_class == by_string
    # one parent given bare, a list, and classes mixed with strings
    assert find_targets(unet, Target(Attention, QKVO)) == by_string
    assert find_targets(unet, Target([ATTENTION], QKVO)) == by_string
    both = Target((Attention, "diffusers.models.resnet:ResnetBlock2D"), kinds=("linear", "conv1x1", "conv"))
    by_strings = Target((ATTENTION, "diffusers.models.resnet:ResnetBlock2D"), kinds=("linear", "conv1x1", "conv"))
    assert find_targets(unet, both) == find_targets(unet, by_strings)
    assert any(".resnets." in p for p in find_targets(unet, both))


def test_isinstance_matches_subclasses():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Special(Block):
        pass

    model = nn.Sequential(Block(), Special(), nn.Linear(4, 4))
    assert find_targets(model, Target((Block,))) == ["0.proj", "1.proj"]
    assert find_targets(model, Target((Special,))) == ["1.proj"]
    assert find_targets(model, Target((f"{__name__}:nn.Linear",))) == []  # a Linear's own children: none


def test_a_target_with_a_class_trains_and_saves(make_pipe, tmp_path):
    pipe = make_pipe("sd1")
    paths = inject_lora(pipe.unet, Target((ResnetBlock2D,), r"conv1|conv2", kinds=("conv",)), rank=2, conv_rank=2)
    assert paths and all(p.endswith(("conv1", "conv2")) for p in paths)
    assert [p for p, _ in lora_modules(pipe.unet)] == paths
    out = lora_kit.save(pipe, tmp_path / "resnets.safetensors")
    assert out.is_file()


def test_the_target_is_frozen_and_hashable_with_classes():
    a, b = Target((Attention,), QKVO), Target([Attention], QKVO)
    assert a == b and hash(a) == hash(b) and a.parents == (Attention,)
    assert Target(ATTENTION).parents == (ATTENTION,)  # one string is one parent, not its characters


BAD = [
    (dict(parents=(nn.Linear(2, 2),)), "Target.parents has Linear(in_features=2"),
    (dict(parents=(int,)), "Target.parents has <class 'int'>, which is not an nn.Module class"),
    (dict(parents=("diffusers.models.attention_processor.Attention",)), 'which is not "package.module:Class"'),
    (dict(parents=(":Attention",)), 'which is not "package.module:Class"'),
    (dict(parents=42), "Target.parents is 42; give a tuple"),
    (dict(kinds=("linear", "conv3x3")), "Target.kinds has ['conv3x3']; allowed"),
    (dict(children="to_(q"), "Target.children 'to_(q' is not a regular expression"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[m.split(",")[0][:40] for _, m in BAD])
def test_a_bad_value_is_one_line(kwargs, message):
    with pytest.raises(LoraKitError, match=re.escape(message)) as e:
        Target(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("parents", "message"),
    [
        (("no_such_package.module:Class",), "none of 'no_such_package.module:Class' exists in the installed"),
        (("diffusers.models.attention_processor:NoSuchClass",), "none of .*NoSuchClass.* exists"),
        (("torch:nn",), "Target.parents has 'torch:nn', which names <module 'torch.nn'"),
        (("torch.nn:functional.relu",), "which names <function relu"),
    ],
)
def test_a_string_that_names_no_module_class_is_one_line_when_used(make_pipe, parents, message):
    unet = make_pipe("sd1").unet
    target = Target(parents)
    with pytest.raises(LoraKitError, match=message) as e:
        inject_lora(unet, target, rank=2)
    assert "\n" not in str(e.value) and not list(lora_modules(unet))


def test_presets_still_resolve_every_parent():
    """The presets are strings; on the installed diffusers/transformers every one names an nn.Module class."""
    for name, targets in PRESETS.items():
        for target in targets:
            classes = target.parent_classes()
            assert len(classes) == len(target.parents), name
            assert all(issubclass(c, torch.nn.Module) for c in classes)
