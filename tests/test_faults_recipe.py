"""Recipe values that would only fail later (a NaN loss, an error deep inside Megatron) are
refused when the recipe loads: non-finite numbers anywhere in the typed tree, negative counts and
sizes, and a recipe file that is not UTF-8. Each is one `error:` line naming the key."""

import dataclasses
import types
import typing

import pytest

from megatron_foresight.config import ConfigError, RecipeConfig, load_recipe
from megatron_foresight.configtree import Variant
from helpers.run import REPO, foresight

RECIPES = REPO / "recipes" / "tiny-cpu"
LM_RECIPE = RECIPES / "lm.yaml"


def config_error(args: list[str]) -> str:
    """The one-line error `foresight config ARGS` exits with (status 2, no traceback)."""
    proc = foresight(["config", *args], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.mark.parametrize("value, shown", [(".inf", "inf"), ("nan", "nan"), ("-.inf", "-inf")])
def test_non_finite_lr_override_is_refused(value, shown):
    line = config_error([str(LM_RECIPE), f"optimizer.lr={value}"])
    assert line == f"error: command line: optimizer.lr: must be a finite number, got {shown}"


def test_non_finite_lr_in_yaml_is_refused_with_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    for value, shown in ((".nan", "nan"), ("-inf", "-inf"), (".inf", "inf")):
        recipe.write_text(f"base: {LM_RECIPE}\noptimizer:\n  lr: {value}\n")
        with pytest.raises(ConfigError) as info:
            load_recipe(recipe)
        assert str(info.value) == f"{recipe}:3: optimizer.lr: must be a finite number, got {shown}"
    line = config_error([str(recipe)])  # and the command line says so in one line
    assert line == f"error: {recipe}:3: optimizer.lr: must be a finite number, got inf"


@pytest.mark.parametrize("override, message", [
    ("schedule.global_batch_size=-8", "schedule.global_batch_size: must be at least 1, got -8"),
    ("schedule.micro_batch_size=0", "schedule.micro_batch_size: must be at least 1, got 0"),
    ("schedule.train_steps=-1", "schedule.train_steps: must be at least 1, got -1"),
])
def test_nonsensical_counts_are_refused(override, message):
    assert config_error([str(LM_RECIPE), override]) == f"error: command line: {message}"


def test_a_recipe_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(b"seed: 1\n# caf\xe9\n")
    line = config_error([str(recipe)])
    assert line == (f"error: {recipe}: not UTF-8 text: byte 0xe9 at offset 13; "
                    "save the file as UTF-8")


def _scalar_fields(cls: type, prefix: str = ""):
    """(dotted key, int or float, the variant (key, type name) it belongs to or None) of every
    number field under dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(options) == 1:
            tp = options[0]  # Optional[int]
        if isinstance(tp, type) and issubclass(tp, Variant):
            for name, variant in tp.variants().items():
                for sub, kind, _ in _scalar_fields(variant, key):
                    yield sub, kind, (key, name)
        elif dataclasses.is_dataclass(tp):
            yield from _scalar_fields(tp, key)
        elif tp in (int, float):
            yield key, tp, None


def _every_number_key():
    from megatron_foresight.training.plugin import available_stages, load_plugin

    yield from ((LM_RECIPE, *field) for field in _scalar_fields(RecipeConfig))
    for stage in available_stages():
        for field in _scalar_fields(load_plugin(stage).Config, stage):
            yield (RECIPES / f"{stage}.yaml", *field)


def _override(key: str, value: str, variant) -> str:
    if variant is None:
        return f"{key}={value}"
    section, name = variant
    return f"{section}={{type: {name}, {key[len(section) + 1:]}: {value}}}"


def test_every_number_field_refuses_non_finite_and_every_int_refuses_negative():
    """The whole typed tree, the stages' sections included: a new field is held to this too."""
    keys = list(_every_number_key())
    assert len(keys) > 50
    for recipe, key, kind, variant in keys:
        value = "-1" if kind is int else ".inf"
        with pytest.raises(ConfigError) as info:
            load_recipe(recipe, [_override(key, value, variant)])
        assert info.value.key == key, (key, str(info.value))
        if kind is float:
            assert info.value.message == "must be a finite number, got inf", key


def test_numbers_inside_lists_and_mappings_must_be_finite_too():
    with pytest.raises(ConfigError, match=r"lm\.weights\[1\]: must be a finite number, got nan"):
        load_recipe(LM_RECIPE, ["lm.weights=[1.0, .nan]"])
    with pytest.raises(ConfigError, match=r"fc_rl\.reward_weights\.task: must be a finite"):
        load_recipe(RECIPES / "fc_rl.yaml", ["fc_rl.reward_weights={task: .inf}"])


def test_every_shipped_recipe_still_loads():
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        if path.name not in ("base.yaml", "cluster.yaml"):  # bases are not whole recipes
            load_recipe(path)
