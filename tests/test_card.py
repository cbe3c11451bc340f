"""card.json is validated at load: each message names the file and the field."""

from __future__ import annotations

import json

import pytest

from bdserve.card import ModelCard

CASES = [
    ("{garbage", "not valid JSON"),
    ('[1, 2]', "a card must be a JSON object"),
    (json.dumps({"name": 123}), "field 'name': Input should be a valid string"),
    (json.dumps({"name": "m", "defense": "noise:nan"}), "field 'defense': bad value"),
    (json.dumps({"name": "m", "defense": "hue:inf"}), "field 'defense'"),
    (json.dumps({"name": "m", "input_shape": [1, 28, 28]}), "field 'input_shape': the server feeds RGB images"),
    (json.dumps({"name": "m", "input_shape": [3, 0, 32]}), "field 'input_shape'"),
    (json.dumps({"name": "m", "input_range": [1, 0]}), "field 'input_range'"),
    (json.dumps({"name": "m", "std": [0, 1, 1], "normalization_in_graph": False}), "field 'std'"),
    (json.dumps({"name": "m", "classes": ["a", "a"]}), "field 'classes'"),
    (json.dumps({"name": "m", "classes": "abc"}), "field 'classes': Input should be a valid list"),
    (json.dumps({"name": "m", "pickle": True}), "unknown field 'pickle'"),
    (json.dumps({"version": "1"}), "field 'name': required"),
]


@pytest.mark.parametrize("text,message", CASES, ids=[c[1] for c in CASES])
def test_bad_cards_name_file_and_field(tmp_path, text, message):
    (tmp_path / "card.json").write_text(text)
    with pytest.raises(ValueError) as e:
        ModelCard.load(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "card.json") + ": ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_good_card_loads_and_integer_version_is_read_as_text(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps({"name": "m", "version": 2, "classes": ["a", "b"]}))
    card = ModelCard.load(tmp_path)
    assert card.version == "2" and card.classes == ["a", "b"]
