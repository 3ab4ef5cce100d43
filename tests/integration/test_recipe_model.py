"""The model the recipe trains: really 4-bit on CPU, embeddings kept in the compute dtype."""

import pytest
import torch

from oomguard.recipes import default
from oomguard.recipes import model as qlora
from oomguard.recipes.options import RecipeOptions


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(default.ensure_default_model(tmp_path_factory.mktemp("cache")))


def build(model_path, **overrides):
    options = RecipeOptions(lora_r=4, lora_alpha=8, **overrides)
    device = qlora.pick_device(options)
    tokenizer = qlora.load_tokenizer(model_path)
    return qlora.attach_lora(qlora.load_base_model(model_path, options, device, tokenizer), options), device


def test_four_bit_is_really_used_on_cpu(model_path):
    model, device = build(model_path)
    assert device.name == ("cuda" if torch.cuda.is_available() else "cpu")
    # 2 layers x (q, k, v, o, gate, up, down); lm_head stays unquantized
    assert qlora.count_4bit_layers(model) == 14
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_embeddings_stay_in_compute_dtype_unless_asked(model_path):
    model, device = build(model_path)
    compute = qlora.DTYPES[device.precision]
    assert model.get_input_embeddings().weight.dtype == compute
    assert model.get_output_embeddings().weight.dtype == compute
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    upcast, _ = build(model_path, upcast_embeddings=True)
    assert upcast.get_input_embeddings().weight.dtype == torch.float32


def test_no_4bit_gives_plain_lora(model_path):
    model, _ = build(model_path, load_in_4bit=False, target_modules="all-linear")
    assert qlora.count_4bit_layers(model) == 0
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} >= {"gate_proj", "down_proj"}
