"""Every numeric setting of the training config, given NaN, inf, a negative number or a string in a
YAML file, is taken where the value is legal or refused by a ValueError naming its dotted field:
never a TypeError, AttributeError or ZeroDivisionError from deep inside, never a refusal that names
another field or none (``optimizer: need 0 <= min_lr <= lr ...``), never a negative count accepted.

The settings are found by walking the dataclasses of the schema ``load_config`` returns, so a new
setting is covered the day it is added."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from megatron_cosmos3.training.config import load_config

# Settings whose negative values are legal: a location, not a count, size, rate or probability.
NEGATIVE_IS_LEGAL = {"flow_matching.logit_normal_mean"}
# YAML's own spellings: a NaN, an infinity, a negative number, a string.
VALUES = {"NaN": ".nan", "inf": ".inf", "negative": "-3", "string": "abc"}


def numeric_settings(schema: type, prefix: str = "") -> typing.Iterator[str]:
    """The dotted names of the int and float fields of ``schema`` and of the dataclasses it holds
    (also those that are None by default, such as ``model.vision``)."""
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        kind = hints[field.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kinds = [k for k in typing.get_args(kind) if k is not type(None)]
            kind = kinds[0] if len(kinds) == 1 else kind
        if dataclasses.is_dataclass(kind):
            yield from numeric_settings(kind, f"{prefix}{field.name}.")
        elif kind in (int, float):
            yield f"{prefix}{field.name}"


SETTINGS = sorted(numeric_settings(typing.get_type_hints(load_config)["return"]))


def test_the_walk_finds_the_settings_of_every_section():
    """Control: the walk reaches nested and optional sections, so the test below covers them."""
    for name in ("steps", "optimizer.lr", "data.packing.tokens_per_pack", "data.media.fps", "model.vision.depth"):
        assert name in SETTINGS
    assert "eval.suite.steps" in SETTINGS and "parallel.num_layers_in_first_pipeline_stage" in SETTINGS
    assert len(SETTINGS) > 90


@pytest.mark.parametrize("name", SETTINGS)
def test_a_numeric_setting_given_nan_inf_a_negative_number_or_a_string_is_taken_or_refused_by_name(tmp_path, name):
    keys = name.split(".")
    # A section that is None by default takes its defaults where the file names it; the ViT's output
    # width must then be the model's (64), its DeepStack layers among the model's 2 and its tokens in
    # the model's vocabulary (256), for its other fields to be judged.
    base = tmp_path / "base.yaml"
    vision = (
        "model:\n  vision:\n    out_hidden_size: 64\n    deepstack_visual_indexes: [0]\n"
        "    image_token_id: 250\n    video_token_id: 251\n"
        "    vision_start_token_id: 252\n    vision_end_token_id: 253\n"
    )
    base.write_text(vision if name.startswith("model.vision.") else "{}\n")
    path = tmp_path / "config.yaml"
    for kind, value in VALUES.items():
        # Nested mappings, so the file sets the one field.
        path.write_text(
            "".join(f"{'  ' * depth}{key}:\n" for depth, key in enumerate(keys[:-1]))
            + f"{'  ' * (len(keys) - 1)}{keys[-1]}: {value}\n"
        )
        try:
            load_config([str(base), str(path)])
        except ValueError as error:
            assert name in str(error), f"{name}={value}: the refusal names another field or none: {error}"
        else:
            assert kind == "negative" and name in NEGATIVE_IS_LEGAL, f"{name}={value} was accepted"
