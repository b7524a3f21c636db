from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pytest

from torchbook.config import build_config, load_config_file, parse_value, to_dict
from torchbook.errors import UserInputError
from torchbook.train import TrainConfig


@dataclass
class Example(TrainConfig):
    data: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    hidden: list[int] = field(default_factory=lambda: [300, 100])
    name: str | None = None
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"smoke": {"epochs": 1, "data": "digits"}}


def test_overrides_are_parsed_by_field_type():
    c = build_config(Example, overrides=["lr=0.05", "epochs=3", "hidden=[10,20]", "progress=false", "name=none"])
    assert (c.lr, c.epochs, c.hidden, c.progress, c.name) == (0.05, 3, [10, 20], False, None)
    assert build_config(Example, overrides=["hidden=64,32"]).hidden == [64, 32]


def test_preset_then_overrides_win():
    c = build_config(Example, preset="smoke", overrides=["epochs=5"])
    assert (c.epochs, c.data) == (5, "digits")


@pytest.mark.parametrize(
    "override, message",
    [
        ("lrr=0.1", "unknown config key 'lrr'; accepted: lr"),
        ("epochs=1.5", "epochs='1.5' is not int"),
        ("lr=fast", "lr='fast' is not float"),
        ("data=mnist", "data='mnist' is not accepted; accepted:"),
        ("optimizer=adamm", "unknown optimizer 'adamm'; accepted: adam"),
        ("epochs", "expected key=value"),
    ],
)
def test_bad_overrides_name_what_is_accepted(override, message):
    with pytest.raises(UserInputError, match=None) as info:
        build_config(Example, overrides=[override])
    assert message in str(info.value)


def test_unknown_preset():
    with pytest.raises(UserInputError, match="unknown preset 'smok'; accepted: smoke"):
        build_config(Example, preset="smok")


def test_parse_bool_and_int_forms():
    assert parse_value("1e3", int) == 1000
    assert parse_value("yes", bool) is True
    with pytest.raises(UserInputError):
        parse_value("maybe", bool)


def test_config_file_round_trip(tmp_path):
    original = build_config(Example, overrides=["lr=0.2", "hidden=[7]"])
    path = tmp_path / "config.json"
    import json

    path.write_text(json.dumps({"recipe": "x", "config": to_dict(original)}))
    assert build_config(Example, base=load_config_file(path)) == original
    path.write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        load_config_file(path)
    with pytest.raises(UserInputError, match="does not exist"):
        load_config_file(tmp_path / "missing.json")
