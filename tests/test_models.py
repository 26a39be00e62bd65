"""Models: config validation, registry, shapes, masked pooling, padding invariance, AM-softmax math."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spkdist.config import RECIPES, ModelConfig, config_from_dict, load_config
from spkdist.errors import SpkdistError
from spkdist.models import (
    AMSoftmaxHead,
    AttentivePooling,
    ConformerEncoder,
    MeanPooling,
    TransformerEncoder,
    build_model,
    padding_mask,
)

N_MELS, N_SPEAKERS = 12, 7
SPKDIST = Path(__file__).resolve().parent.parent / "spkdist"

# PyTorch's eval fast path (exercised on purpose below) warns that nested tensors are a prototype API.
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")


def recipe(name: str) -> ModelConfig:
    return load_config(f"{name}.yaml").model


def build(name: str) -> torch.nn.Module:
    """The recipe's architecture (encoder, pooling, head) at test size; the kernel still spans padding."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(recipe(name), d_model=16, n_heads=2, n_layers=2, ffn_dim=32, kernel_size=5)
    return build_model(cfg, N_MELS, N_SPEAKERS)


# --- config -------------------------------------------------------------------------------------


def test_the_recipe_files_define_the_homework_recipes():
    cfgs = {name: recipe(name) for name in RECIPES}
    sizes = {n: (c.encoder, c.d_model, c.n_heads, c.n_layers, c.ffn_dim, c.dropout) for n, c in cfgs.items()}
    assert sizes == {
        "sample": ("transformer", 80, 2, 1, 256, 0.1),
        "medium": ("transformer", 120, 4, 4, 256, 0.1),
        "strong": ("conformer", 224, 4, 3, 256, 0.2),
        "boss": ("conformer", 224, 4, 3, 256, 0.2),
    }
    assert [(c.pooling, c.head) for c in cfgs.values()] == [("mean", "linear")] * 3 + [
        ("attention", "aam_softmax")
    ]
    assert (cfgs["boss"].kernel_size, cfgs["boss"].margin, cfgs["boss"].scale) == (31, 0.2, 30.0)
    assert all(cfg.name == name for name, cfg in cfgs.items())


def test_no_code_restates_a_recipe():
    """configs/*.yaml are the one definition of the recipes: no module spells out a recipe's setting."""
    source = "\n".join(path.read_text() for path in SPKDIST.rglob("*.py"))
    defaults = ModelConfig()
    for name in RECIPES:
        for field in dataclasses.fields(ModelConfig):
            value = getattr(recipe(name), field.name)
            if field.name == "name" or value == getattr(defaults, field.name):
                continue
            spelled = re.escape(json.dumps(value) if isinstance(value, str) else repr(value))  # "conformer"
            pattern = rf"\b{field.name}\s*[=:]\s*{spelled}(?![\w.])"
            assert not re.search(pattern, source), f"{name}: model.{field.name}={value!r} restated in code"


def test_config_takes_every_field_from_a_yaml_section():
    section = dataclasses.asdict(recipe("boss"))
    assert ModelConfig(**section) == recipe("boss")
    with pytest.raises(TypeError):  # the data decides these, not the config
        ModelConfig(**section, n_speakers=600)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoder": "lstm"}, "model.encoder: expected one of transformer, conformer, got 'lstm'"),
        ({"pooling": "max"}, "model.pooling: expected one of mean, attention, attentive_stats, got 'max'"),
        ({"head": "arcface"}, "model.head: expected one of linear, am_softmax, aam_softmax, got 'arcface'"),
        ({"d_model": 0}, "model.d_model must be > 0, got 0"),
        ({"n_layers": -1}, "model.n_layers must be > 0, got -1"),
        ({"ffn_dim": 2.5}, "model.ffn_dim: expected int, got 2.5"),
        ({"n_heads": True}, "model.n_heads: expected int, got True"),
        ({"n_heads": 3}, "model.d_model=80 must be divisible by n_heads=3"),
        ({"kernel_size": 4}, "model.kernel_size must be odd"),
        ({"dropout": 1.0}, r"model.dropout must be in \[0, 1\)"),
        ({"dropout": "0.1"}, "model.dropout: expected float, got '0.1'"),
        ({"margin": -0.1}, r"model.margin must be in \[0, 1\)"),
        ({"scale": 0}, "model.scale must be > 0"),
        ({"scale": float("inf")}, "model.scale must be finite"),
    ],
)
def test_bad_model_values_are_one_line_errors(change, message):
    with pytest.raises(SpkdistError, match=message) as err:
        config_from_dict({"model": change}, where="exp.yaml")
    assert str(err.value).startswith("exp.yaml: ") and "\n" not in str(err.value)


# --- registry and shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_build_at_full_size(name):
    model = build_model(recipe(name), n_mels=40, n_speakers=600).eval()
    family = TransformerEncoder if name in ("sample", "medium") else ConformerEncoder
    assert isinstance(model.encoder, family)
    mels, lengths = torch.randn(2, 20, 40), torch.tensor([20, 13])
    with torch.no_grad():
        assert model(mels, lengths).shape == (2, 600)
        assert model.embed(mels, lengths).shape == (2, recipe(name).d_model)


def test_padding_mask_marks_frames_past_each_length():
    mask = padding_mask(torch.tensor([3, 1, 4]), 4)
    expected = [[False, False, False, True], [False, True, True, True], [False, False, False, False]]
    assert mask.tolist() == expected


@pytest.mark.parametrize("name", RECIPES)
def test_shapes_and_gradients(name):
    model = build(name).train()
    mels, lengths = torch.randn(3, 11, N_MELS), torch.tensor([11, 6, 1])
    labels = torch.tensor([0, 6, 3])
    logits = model(mels, lengths, labels)  # (B, n_speakers)
    assert logits.shape == (3, N_SPEAKERS)
    assert model.embed(mels, lengths).shape == (3, 16)  # (B, d_model)
    F.cross_entropy(logits, labels).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", RECIPES)
def test_logits_are_the_head_applied_to_the_embedding(name):
    model = build(name).eval()
    mels, lengths = torch.randn(2, 9, N_MELS), torch.tensor([9, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(mels, lengths), model.head(model.embed(mels, lengths)))


# --- padding invariance ---------------------------------------------------------------------------


def batch_with(utterance: torch.Tensor, fill: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of [a longer utterance, `utterance` padded to its length with `fill`]."""
    torch.manual_seed(1)
    longer = torch.randn(23, N_MELS)
    padded = {
        "zeros": torch.zeros(2, 23, N_MELS),
        "minus20": torch.full((2, 23, N_MELS), -20.0),
        "garbage": 50 * torch.randn(2, 23, N_MELS),
        "nan": torch.full((2, 23, N_MELS), float("nan")),
    }[fill]
    padded[0] = longer
    padded[1, : len(utterance)] = utterance
    return padded, torch.tensor([23, len(utterance)])


# Invariance is an eval-mode property: in training, dropout is random and the Conformer's BatchNorm
# normalises with statistics of the whole batch, padded frames included.
@pytest.mark.parametrize("fill", ["zeros", "minus20", "garbage", "nan"])
@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad(fast path)", "grad"])
def test_padding_never_changes_an_utterance_logits(name, fill, grad):
    model = build(name).eval()
    utterance = torch.randn(9, N_MELS)
    mels, lengths = batch_with(utterance, fill)
    with torch.set_grad_enabled(grad):
        alone = model(utterance[None], torch.tensor([9]))[0]
        batched = model(mels, lengths)[1]
        alone_emb = model.embed(utterance[None], torch.tensor([9]))[0]
        batched_emb = model.embed(mels, lengths)[1]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched_emb, alone_emb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", RECIPES)
def test_encoder_frames_ignore_padding(name):
    # Frame by frame, and with nonzero padding reaching the encoder itself. This is what fails without
    # the Conformer's mask before each depthwise convolution: padded frames leak into the last
    # kernel_size // 2 valid frames of every layer.
    encoder = build(name).encoder.eval()
    utterance = torch.randn(1, 9, N_MELS)
    mels = torch.cat([utterance, torch.randn(1, 14, N_MELS)], dim=1)  # (1, 23, n_mels)
    with torch.no_grad():
        alone = encoder(utterance, padding_mask(torch.tensor([9]), 9))  # (1, 9, D)
        padded = encoder(mels, padding_mask(torch.tensor([9]), 23))  # (1, 23, D)
    torch.testing.assert_close(padded[:, :9], alone, atol=1e-5, rtol=1e-5)


def test_conformer_refuses_to_run_its_convolutions_unmasked():
    encoder = build("strong").encoder
    layer = encoder.conformer.conformer_layers[0]
    with pytest.raises(RuntimeError, match=r"must run inside ConformerEncoder\.forward"):
        layer(torch.randn(5, 1, 16), None)  # (T, B, D), called around the encoder


# --- pooling --------------------------------------------------------------------------------------


def test_mean_pooling_averages_valid_frames_only():
    frames = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])  # (B=2, T=3, D=1)
    mask = padding_mask(torch.tensor([2, 3]), 3)
    assert MeanPooling()(frames, mask).tolist() == [[2.0], [4.0]]


def test_attentive_pooling_gives_padded_frames_zero_weight():
    torch.manual_seed(0)
    pooling = AttentivePooling(4)
    frames = torch.randn(1, 5, 4)
    padded = torch.cat([frames, 1e4 * torch.randn(1, 3, 4)], dim=1)  # (1, 8, 4)
    expected = pooling(frames, padding_mask(torch.tensor([5]), 5))
    torch.testing.assert_close(pooling(padded, padding_mask(torch.tensor([5]), 8)), expected)
    # Equal scores -> uniform weights over the valid frames: the plain mean.
    torch.nn.init.zeros_(pooling.score.weight)
    torch.testing.assert_close(pooling(padded, padding_mask(torch.tensor([5]), 8)), frames.mean(dim=1))


# --- AM-softmax -----------------------------------------------------------------------------------


def test_am_softmax_subtracts_the_margin_from_the_target_only_in_training():
    torch.manual_seed(0)
    head = AMSoftmaxHead(dim=6, n_speakers=5, margin=0.2, scale=30.0)
    emb, labels = torch.randn(4, 6), torch.tensor([0, 3, 3, 4])
    cos = F.normalize(emb.double(), dim=1) @ F.normalize(head.weight.detach().double(), dim=1).T  # (4, 5)
    target = F.one_hot(labels, 5).bool()

    logits = head.train()(emb, labels).double()
    torch.testing.assert_close(logits[target], 30 * (cos[target] - 0.2), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits[~target], 30 * cos[~target], atol=1e-4, rtol=1e-5)
    # No labels, or eval mode: plain scaled cosines.
    torch.testing.assert_close(head(emb).double(), 30 * cos, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(head.eval()(emb, labels).double(), 30 * cos, atol=1e-4, rtol=1e-5)
    assert (head.eval()(emb).abs() <= 30 + 1e-4).all()


def test_am_softmax_computes_cosines_in_fp32_under_autocast():
    torch.manual_seed(0)
    head = AMSoftmaxHead(dim=64, n_speakers=5, margin=0.2, scale=30.0).eval()
    emb = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(emb)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, head(emb))


# --- mixed precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_bf16_autocast_trains_and_evaluates(name):
    model = build(name)
    mels, lengths, labels = torch.randn(3, 10, N_MELS), torch.tensor([10, 7, 2]), torch.tensor([1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model.train()(mels, lengths, labels).float(), labels)
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        reference = model(mels, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(mels, lengths)  # PyTorch's eval fast path once crashed here
    torch.testing.assert_close(mixed.float(), reference, atol=0.05 * reference.abs().max().item(), rtol=0)
