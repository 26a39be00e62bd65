"""Config loading: the four recipes, overrides, bare names, and one-line errors for bad values."""

import subprocess
import sys
from pathlib import Path

import pytest

from spkdist.cli import main
from spkdist.config import CONFIG_DIR, RECIPES, config_from_dict, dump_config, load_config
from spkdist.errors import SpkdistError


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_load_and_match_their_names(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.model.name == name
    assert cfg.train.output_dir == f"runs/{name}"
    assert cfg.data.segment_len == 128 and cfg.data.batch_size == 32 and cfg.optim.lr == 1e-3


def test_recipe_architectures_follow_the_homework():
    boss = load_config("boss.yaml").model
    assert (boss.d_model, boss.n_layers, boss.pooling, boss.head) == (224, 3, "attention", "aam_softmax")
    assert (boss.margin, boss.scale) == (0.2, 30.0)
    assert (boss.frontend, boss.frontend_channels) == ("conv2d", 32)  # measured on the dev draw (README)
    assert boss.feature_norm == "mean"  # mean alone beat mean_var on the dev draw, two seeds (README)
    assert boss.frontend_mel_strides == (1, 1)  # all 40 bins through both convs: +0.8 valid, two seeds
    medium = load_config("medium").model
    assert (medium.d_model, medium.n_layers, medium.n_heads) == (120, 4, 4)


def test_bare_name_resolves_to_configs_dir(tmp_path, monkeypatch):
    """A file in the working directory, else ./configs/ (copies to edit), else the shipped configs."""
    monkeypatch.chdir(tmp_path)
    assert load_config("boss.yaml").model.name == "boss"
    assert main(["configs", "--copy", "."]) == 0
    (tmp_path / "configs" / "boss.yaml").write_text("model: {name: edited, d_model: 64, n_heads: 2}\n")
    assert load_config("boss").model.name == "edited"  # the copy in ./configs, .yaml optional
    (tmp_path / "boss.yaml").write_text("model: {name: sample, d_model: 80, n_heads: 2, n_layers: 1}\n")
    assert load_config("boss.yaml").model.name == "sample"  # a file in the working dir wins
    with pytest.raises(SpkdistError, match="config file not found"):
        load_config("elsewhere/sample.yaml")  # a path is never swapped for a shipped file


def test_old_conformer_configs_without_an_encoder_are_refused(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model: {name: boss, d_model: 64, n_heads: 2}\n")
    with pytest.raises(SpkdistError, match=r"model\.encoder is missing; add `encoder: conformer`"):
        load_config(old)


def test_overrides_are_typed_from_yaml():
    cfg = load_config(
        "boss.yaml",
        [
            "data.shards=shards/fsdd",
            "train.max_steps=300",
            "train.mixed_precision=bf16",
            "optim.lr=3e-4",
            "train.resume=latest",
        ],
    )
    assert cfg.data.shards == "shards/fsdd" and cfg.train.max_steps == 300
    assert cfg.train.mixed_precision == "bf16" and cfg.optim.lr == 3e-4 and cfg.train.resume == "latest"


def test_round_trip_through_dump():
    cfg = load_config("boss.yaml", ["train.max_steps=7"])
    import yaml

    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=3", "unknown key 'train.max_step'"),
        ("trian.max_steps=3", "unknown section 'trian'"),
        ("train.max_steps=abc", "train.max_steps: expected int, got 'abc'"),
        ("train.max_steps=0", "train.max_steps must be > 0"),
        ("train.mixed_precision=fp8", "expected one of no, fp16, bf16"),
        ("data.on_bad_shard=ignore", "expected one of warn, raise"),
        ("optim.betas=[0.9]", "expected a list of 2 numbers"),
        ("model.encoder=giant", "giant"),
        ("model.d_model=102", "n_heads"),
        ("max_steps=3", "expected section.key=value"),
    ],
)
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(SpkdistError) as err:
        load_config("boss.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpkdistError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(SpkdistError, match="not valid YAML"):
        load_config(bad)


def test_train_script_reports_config_errors_without_traceback(tmp_path):
    script = Path(__file__).resolve().parent.parent / "launch" / "train.py"
    result = subprocess.run(  # from a directory without configs/: the shipped boss.yaml
        [sys.executable, str(script), "--config", "boss.yaml", "train.max_steps=-1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"spkdist: error: {CONFIG_DIR / 'boss.yaml'}: train.max_steps must be > 0, got -1"
    )


def test_yes_no_words_stay_strings_and_only_true_false_are_booleans():
    # YAML 1.1 would turn `no` into False, and `train.mixed_precision=no` into a type error
    cfg = load_config("sample.yaml", ["train.mixed_precision=no", "train.compile=true", "log.run_name=off"])
    assert cfg.train.mixed_precision == "no" and cfg.train.compile is True and cfg.log.run_name == "off"
