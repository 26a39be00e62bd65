"""The training levers of the accuracy work, each off unless a config turns it on: SpecAugment in the
training stream, per-utterance feature normalisation inside the model, attentive statistics pooling,
the Conformer's layer aggregation, AAM-softmax, a margin warm-up and a warm-up that follows the run's
length."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import small_overrides

from spkdist.config import config_from_dict, load_config
from spkdist.errors import SpkdistError
from spkdist.models import AAMSoftmaxHead, AMSoftmaxHead, AttentiveStatsPooling, build_model, padding_mask
from spkdist.shard_format import Sample, load_index
from spkdist.stream import NoiseAugment, SpecAugment, add_noise, eval_loader, spec_augment, train_loader
from spkdist.train import margin_at

N_MELS = 40


def test_spec_augment_masks_real_frames_with_crop_statistics_reproducibly():
    x = np.arange(30 * 8, dtype=np.float16).reshape(30, 8)
    x.setflags(write=False)  # like a view of a shard's bytes
    settings = SpecAugment(time_masks=2, time_width=5, freq_masks=1, freq_width=3)
    [a] = spec_augment([Sample("k", x, 0, "s", 0)], settings, random.Random(1))
    [b] = spec_augment([Sample("k", x, 0, "s", 0)], settings, random.Random(1))
    assert np.array_equal(a.mels, b.mels) and a.mels.shape == x.shape  # seeded: the same masks
    changed = a.mels != x
    assert changed.any()
    bin_means = x.mean(axis=0, dtype=np.float32)
    masked_cols = [c for c in range(8) if changed[:, c].all()]
    masked_rows = [r for r in range(30) if changed[r].sum() >= 8 - len(masked_cols)]
    for r in masked_rows:  # a time mask: each bin's mean over the crop
        outside = [c for c in range(8) if c not in masked_cols]
        assert np.array_equal(a.mels[r, outside], bin_means[outside].astype(np.float16))
    for c in masked_cols:  # a frequency mask: the crop's mean
        assert np.all(a.mels[:, c] == np.float16(bin_means.mean()))
    assert len(masked_rows) <= 10 and len(masked_cols) <= 3  # at most 2 x 5 frames and 3 bins


def test_spec_augment_reaches_training_batches_only_never_padding_or_evaluation(tiny_shards):
    index, settings = load_index(tiny_shards), SpecAugment(time_masks=3, time_width=10)
    common = dict(batch_size=8, segment_len=200, num_workers=0, shuffle_buffer=1, rank=0, world_size=1)
    plain = next(iter(train_loader(str(tiny_shards), index, seed=0, **common)))
    masked = next(iter(train_loader(str(tiny_shards), index, seed=0, augment=settings, **common)))
    assert plain.keys == masked.keys and torch.equal(plain.lengths, masked.lengths)
    assert not torch.equal(plain.mels, masked.mels)
    for row, length in enumerate(masked.lengths.tolist()):
        assert masked.mels[row, length:].abs().sum() == 0  # padding stays zero: masks only real frames
    # evaluation has no augmentation at all: the loader takes no such setting
    eval_args = dict(batch_size=8, num_workers=0, rank=0, world_size=1)
    eval_loader(str(tiny_shards), index, "valid", **eval_args)  # these arguments are fine...
    with pytest.raises(TypeError, match="augment"):
        eval_loader(str(tiny_shards), index, "valid", augment=settings, **eval_args)  # ...this one is not


def test_noise_adds_energy_at_the_drawn_snr_reproducibly():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(50, 8)) * 2 - 3).astype(np.float16)  # log-mel energies
    settings = NoiseAugment(prob=1.0, snr_low=10.0, snr_high=10.0)
    [a] = add_noise([Sample("k", x, 0, "s", 0)], settings, random.Random(1))
    [b] = add_noise([Sample("k", x, 0, "s", 0)], settings, random.Random(1))
    [c] = add_noise([Sample("k", x, 0, "s", 0)], settings, random.Random(2))
    assert np.array_equal(a.mels, b.mels) and not np.array_equal(a.mels, c.mels)  # seeded
    assert a.mels.dtype == np.float16 and a.mels.shape == x.shape
    clean, noisy = np.exp(x.astype(np.float64)), np.exp(a.mels.astype(np.float64))
    assert np.all(a.mels >= x)  # noise only adds energy
    assert clean.mean() / (noisy - clean).mean() == pytest.approx(10.0, rel=0.02)  # 10 dB (float16 rounding)
    # prob 0.5: about half the crops, the others untouched
    crops = [Sample(str(i), x, 0, "s", 0) for i in range(400)]
    out = list(add_noise(crops, NoiseAugment(prob=0.5), random.Random(0)))
    untouched = sum(o.mels is x for o in out)
    assert 150 < untouched < 250


def test_noise_reaches_training_batches_only_never_padding_or_evaluation(tiny_shards):
    index = load_index(tiny_shards)
    common = dict(batch_size=8, segment_len=200, num_workers=0, shuffle_buffer=1, rank=0, world_size=1)
    plain = next(iter(train_loader(str(tiny_shards), index, seed=0, **common)))
    noisy = next(iter(train_loader(str(tiny_shards), index, seed=0, noise=NoiseAugment(prob=1.0), **common)))
    assert plain.keys == noisy.keys and torch.equal(plain.lengths, noisy.lengths)
    for row, length in enumerate(noisy.lengths.tolist()):
        real_noisy, real_plain = noisy.mels[row, :length], plain.mels[row, :length]
        assert bool((real_noisy >= real_plain).all()) and bool((real_noisy > real_plain).any())
        assert noisy.mels[row, length:].abs().sum() == 0  # padding stays zero
    with pytest.raises(TypeError, match="noise"):
        eval_loader(
            str(tiny_shards), index, "valid", noise=NoiseAugment(prob=1.0), batch_size=8, num_workers=0
        )


def model_with(**change) -> torch.nn.Module:
    torch.manual_seed(0)
    small = dict(d_model=16, n_heads=2, n_layers=1, ffn_dim=32, kernel_size=5)
    cfg = dataclasses.replace(load_config("boss.yaml").model, **small | change)
    return build_model(cfg, N_MELS, 7).eval()


@pytest.mark.parametrize(
    "change",
    [
        {"feature_norm": "mean"},
        {"feature_norm": "mean_var"},
        {"pooling": "attentive_stats"},
        {"layer_aggregation": "concat", "n_layers": 3},
        {"frontend": "conv2d", "frontend_channels": 4, "n_layers": 2},
        {"frontend": "conv2d", "frontend_channels": 4, "encoder": "transformer", "n_layers": 2},
        {"frontend": "conv2d", "frontend_channels": 4, "frontend_mel_strides": (1, 2), "n_layers": 2},
    ],
    ids=[
        "cmn",
        "cmvn",
        "attentive_stats",
        "layer_concat",
        "conv_frontend",
        "conv_frontend_transformer",
        "conv_frontend_mel_stride_1",
    ],
)
def test_levers_keep_an_utterance_logits_independent_of_padding(change):
    model = model_with(**change)
    utterance = torch.randn(9, N_MELS) * 3 + 5
    batch = torch.full((2, 23, N_MELS), 77.0)
    batch[0], batch[1, :9] = torch.randn(23, N_MELS), utterance
    with torch.no_grad():
        alone = model(utterance[None], torch.tensor([9]))[0]
        padded = model(batch, torch.tensor([23, 9]))[1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_feature_normalisation_centres_each_bin_over_real_frames():
    from spkdist.models.model import normalise

    mels = torch.randn(2, 10, 4) * 2 + 3
    lengths = torch.tensor([10, 6])
    mask = padding_mask(lengths, 10)
    mels = mels.masked_fill(mask.unsqueeze(-1), 0.0)
    out = normalise(mels, mask, lengths, variance=True)
    real = out[1, :6]
    torch.testing.assert_close(real.mean(dim=0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(real.pow(2).mean(dim=0), torch.ones(4), atol=1e-4, rtol=0)
    assert out[1, 6:].abs().sum() == 0


def test_attentive_stats_pooling_is_mean_and_std_under_uniform_weights():
    pooling = AttentiveStatsPooling(3)
    torch.nn.init.zeros_(pooling.score.weight)  # equal scores: uniform weights over the valid frames
    frames = torch.randn(1, 6, 3)
    padded = torch.cat([frames, 1e4 * torch.ones(1, 2, 3)], dim=1)
    pooled = pooling(padded, padding_mask(torch.tensor([6]), 8))  # (1, 6): mean then std
    torch.testing.assert_close(pooled[0, :3], frames[0].mean(dim=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[0, 3:], frames[0].std(dim=0, unbiased=False), atol=1e-4, rtol=1e-4)
    assert (
        AttentiveStatsPooling.out_dim(16) == 32
        and model_with(pooling="attentive_stats").head.weight.shape[1] == 32
    )


def test_layer_concat_hands_the_pooling_every_conformer_layer_side_by_side():
    last, concat = model_with(n_layers=3), model_with(n_layers=3, layer_aggregation="concat")
    assert last.state_dict().keys() - concat.state_dict().keys() == set()  # the encoder's weights alike
    concat.encoder.load_state_dict(last.encoder.state_dict())
    mels, mask = torch.randn(2, 9, N_MELS), padding_mask(torch.tensor([9, 5]), 9)
    layers = []  # each layer's own output, (T, B, D) time-first as torchaudio runs them
    for layer in last.encoder.conformer.conformer_layers:
        layer.register_forward_hook(lambda module, args, out: layers.append(out.transpose(0, 1)))
    with torch.no_grad():
        plain = last.encoder(mels, mask)  # (B, T, 16)
        stacked = concat.encoder(mels, mask)  # (B, T, 48)
    assert stacked.shape == (2, 9, 48) and concat.head.weight.shape == (7, 48)
    torch.testing.assert_close(stacked, torch.cat(layers, dim=-1))
    torch.testing.assert_close(stacked[..., 32:], plain)  # the last layer's frames are the plain output


def test_conv_frontend_keeps_every_frame_and_shares_its_filters_across_the_mel_axis():
    from spkdist.models import ConvFrontend

    for n_mels, bins in ((40, 10), (41, 11), (3, 1)):  # ceil(ceil(n / 2) / 2) bins reach the projection
        frontend = ConvFrontend(n_mels, d_model=8, channels=3)
        assert frontend.proj.in_features == 3 * bins
        assert frontend(torch.randn(2, 7, n_mels), padding_mask(torch.tensor([7, 4]), 7)).shape == (2, 7, 8)
    # A pattern moved up the mel axis by one stride of both convolutions (4 bins) gives the same
    # convolution outputs, moved by one bin: the filters are shared, not learned per bin.
    frontend = ConvFrontend(16, d_model=8, channels=3)
    pattern = torch.zeros(1, 1, 5, 16)
    pattern[..., 2:5] = torch.randn(5, 3)
    with torch.no_grad():
        low = frontend.conv2(torch.relu(frontend.conv1(pattern)))  # (1, 3, 5, 4)
        high = frontend.conv2(torch.relu(frontend.conv1(pattern.roll(4, dims=-1))))
    torch.testing.assert_close(high[..., 2], low[..., 1])


def test_conv_frontend_mel_strides_set_the_bins_the_projection_sees():
    from spkdist.models import ConvFrontend

    for strides, bins in (((1, 2), 20), ((2, 1), 20), ((1, 1), 40), ((2, 2), 10)):
        frontend = ConvFrontend(40, d_model=8, channels=3, mel_strides=strides)
        assert (frontend.conv1.stride, frontend.conv2.stride) == ((1, strides[0]), (1, strides[1]))
        assert frontend.proj.in_features == 3 * bins
        assert frontend(torch.randn(2, 7, 40), padding_mask(torch.tensor([7, 4]), 7)).shape == (2, 7, 8)
    cfg = config_from_dict(
        {"model": {"frontend": "conv2d", "frontend_mel_strides": [1, 2]}}, where="exp.yaml"
    )
    assert cfg.model.frontend_mel_strides == (1, 2)
    with pytest.raises(SpkdistError, match=r"model\.frontend_mel_strides must be 1 or 2 each, got \[3, 2\]"):
        config_from_dict({"model": {"frontend_mel_strides": [3, 2]}}, where="exp.yaml")


def test_conv_frontend_needs_channels():
    with pytest.raises(SpkdistError, match=r"model\.frontend_channels must be > 0, got 0"):
        config_from_dict({"model": {"frontend": "conv2d", "frontend_channels": 0}}, where="exp.yaml")


def test_layer_concat_needs_a_conformer():
    with pytest.raises(SpkdistError, match=r"model\.layer_aggregation=concat needs model\.encoder=conformer"):
        config_from_dict({"model": {"layer_aggregation": "concat"}}, where="exp.yaml")


@pytest.mark.parametrize("head_type", [AMSoftmaxHead, AAMSoftmaxHead])
def test_margin_heads_at_margin_zero_are_plain_scaled_cosine(head_type):
    torch.manual_seed(0)
    head = head_type(dim=6, n_speakers=5, margin=0.0, scale=30.0).train()
    emb, labels = torch.randn(4, 6), torch.tensor([0, 3, 3, 4])
    cos = F.normalize(emb, dim=1) @ F.normalize(head.weight.detach(), dim=1).T
    torch.testing.assert_close(head(emb, labels), 30 * cos, atol=1e-5, rtol=1e-5)


def test_aam_softmax_adds_the_margin_to_the_target_angle():
    torch.manual_seed(0)
    head = AAMSoftmaxHead(dim=6, n_speakers=5, margin=0.3, scale=1.0).train()
    emb, labels = torch.randn(4, 6), torch.tensor([0, 3, 3, 4])
    emb[0] = -head.weight.detach()[0]  # theta = pi: past pi - m, the linear continuation applies
    cos = (F.normalize(emb.double(), dim=1) @ F.normalize(head.weight.detach().double(), dim=1).T).clamp(
        -1, 1
    )
    target = F.one_hot(labels, 5).bool()
    theta = torch.acos(cos[target])
    expected = torch.where(theta + 0.3 < math.pi, torch.cos(theta + 0.3), cos[target] - 0.3 * math.sin(0.3))
    assert (theta + 0.3 >= math.pi).any() and (theta + 0.3 < math.pi).any()  # both branches are tested
    torch.testing.assert_close(head(emb, labels).double()[target], expected, atol=1e-4, rtol=1e-4)
    cos_one = torch.ones(1, 1, requires_grad=True)
    head.target_logit(cos_one).sum().backward()
    assert torch.isfinite(cos_one.grad).all()  # at theta = 0 exactly, the gradient stays finite


def test_margin_warmup_grows_the_margin_linearly_over_its_step_range():
    cfg = load_config("boss.yaml", ["train.margin_warmup=[100, 300]"])
    assert [margin_at(cfg, step) for step in (0, 100, 200, 300, 1000)] == pytest.approx(
        [0.0, 0.0, 0.1, 0.2, 0.2]
    )
    assert margin_at(load_config("boss.yaml"), 0) == 0.2  # off: the full margin from the start


def test_margin_warmup_reaches_the_head_during_training(tiny_shards, tmp_path):
    from spkdist import train

    overrides = [*small_overrides(tiny_shards, tmp_path / "run", steps=4), "train.margin_warmup=[0, 8]"]
    result = train.run(load_config("boss.yaml", [*overrides, "model.d_model=16", "model.n_heads=2"]))
    assert float(result.model.head.margin_now) == pytest.approx(0.2 * 3 / 8)  # set before step 4


def test_warmup_is_exactly_one_of_steps_and_a_fraction_of_the_run(tmp_path):
    assert load_config("sample.yaml").optim.warmup(3000) == 300  # the recipes: 10% of the run
    # an override of either form replaces the file's, whichever the file used
    assert load_config("sample.yaml", ["optim.warmup_steps=1000"]).optim.warmup(3000) == 1000
    steps_file = tmp_path / "steps.yaml"
    steps_file.write_text("optim:\n  warmup_steps: 50\n")
    assert load_config(steps_file, ["optim.warmup_fraction=0.2"]).optim.warmup(3000) == 600
    # both, or neither, is an error
    for overrides in (
        ["optim.warmup_fraction=0.1", "optim.warmup_steps=5"],
        ["optim.warmup_steps=null", "optim.warmup_fraction=null"],
    ):
        with pytest.raises(SpkdistError, match=r"set exactly one of optim\.warmup_steps and optim\."):
            load_config("sample.yaml", overrides)
    with pytest.raises(SpkdistError, match=r"set exactly one of optim\.warmup_steps"):
        config_from_dict({"optim": {"warmup_steps": 10, "warmup_fraction": 0.1}})
    with pytest.raises(SpkdistError, match=r"optim.warmup_fraction must be in \[0, 1\)"):
        config_from_dict({"optim": {"warmup_steps": None, "warmup_fraction": 1.5}})


def test_the_ablation_turns_each_lever_of_a_recipe_off():
    from spkdist.bench.ablation import LEVERS, levers_on

    every = [
        "model.feature_norm=mean_var",
        "data.time_masks=2",
        "model.pooling=attentive_stats",
        "model.head=aam_softmax",
        "train.margin_warmup=[0, 100]",
        "model.layer_aggregation=concat",
        "model.frontend=conv2d",
        "data.noise_prob=0.5",
    ]
    cfg = load_config("boss.yaml", every)
    assert set(levers_on(cfg)) == set(LEVERS)
    for name, off in levers_on(cfg).items():
        without = load_config("boss.yaml", [*every, *off])
        assert set(levers_on(without)) == set(LEVERS) - {name}, name
    assert levers_on(load_config("sample.yaml")) == {}


def test_the_logistic_baseline_separates_the_tiny_speakers(tiny_shards, capsys):
    from spkdist.cli import main

    assert main(["bench", "baseline", "--shards", str(tiny_shards)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_accuracy"] == 1.0  # 4 speakers, each with its own spectral shape: an easy floor
