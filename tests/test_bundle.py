"""bundle.py: bundle.json round trip and the errors for broken bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speechgpt_app.bundle import BUNDLE_FILE, BundleError, BundleInfo, locate, read_bundle, write_bundle
from speechgpt_app.units import SpeechConfig, write_speech_config


def make_bundle(root: Path, n_units: int = 12, **fields) -> Path:
    """A bundle directory with empty lm/adapter dirs and a speech.json of `n_units` units."""
    write_speech_config(root / "speech", SpeechConfig(n_units=n_units, features={"type": "logmel"}))
    (root / "lm").mkdir(parents=True)
    (root / "adapter").mkdir()
    info = BundleInfo(name="t", n_units=n_units, adapter="adapter", **fields)
    write_bundle(root, info)
    return root


def edit(root: Path, **changes) -> None:
    file = root / BUNDLE_FILE
    raw = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None and key != "adapter":
            raw.pop(key, None)
        else:
            raw[key] = value
    file.write_text(json.dumps(raw))


def test_round_trip_keeps_every_field(tmp_path):
    info = BundleInfo(
        name="tiny",
        n_units=12,
        prompt_style="explicit",
        lm={"hub": "fnlp/SpeechGPT-7B-cm"},
        adapter="adapter",
        context_length=512,
        generation={"temperature": 0.5, "top_k": 10, "do_sample": False},
        provenance={"recipe": "tiny", "steps": 3, "versions": {"torch": "2.13.0"}},
        description="é test",
    )
    make_bundle(tmp_path)
    write_bundle(tmp_path, info)
    assert read_bundle(tmp_path) == info
    assert read_bundle(tmp_path / BUNDLE_FILE) == info
    assert locate(tmp_path, info.lm) == "fnlp/SpeechGPT-7B-cm"
    assert locate(tmp_path, info.adapter) == str(tmp_path / "adapter")


def test_defaults_are_the_7b_context_and_released_prompt(tmp_path):
    info = read_bundle(make_bundle(tmp_path))
    assert (info.context_length, info.prompt_style, info.schema_version) == (2048, "released", 1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schema_version": 2}, "schema_version 2 is not supported"),
        ({"schema_version": None}, "no 'schema_version'"),
        ({"n_units": None}, "missing required fields"),
        ({"n_units": 13}, "n_units=13 but its speech model has 12"),
        ({"n_units": True}, "positive integer"),
        ({"prompt_style": "chatml"}, "prompt_style"),
        ({"lm": "../elsewhere"}, "inside the bundle"),
        ({"lm": {"hub": ""}}, "relative directory"),
        ({"lm": "missing"}, "'lm' directory 'missing' is missing"),
        ({"adapter": "nope"}, "'adapter' directory 'nope' is missing"),
        ({"generation": {"temprature": 0.7}}, "unknown setting 'temprature'"),
        ({"generation": {"top_k": 1.5}}, "generation.top_k"),
        ({"generation": {"do_sample": 1}}, "generation.do_sample"),
        ({"extra": 1}, "unknown fields"),
        ({"speech": "lm"}, "speech model is unreadable"),
    ],
)
def test_broken_bundles_name_the_problem(tmp_path, changes, message):
    make_bundle(tmp_path)
    edit(tmp_path, **changes)
    with pytest.raises(BundleError, match=message):
        read_bundle(tmp_path)


def test_missing_directory_file_and_bad_json(tmp_path):
    with pytest.raises(BundleError, match="not a directory"):
        read_bundle(tmp_path / "absent")
    with pytest.raises(BundleError, match="has no bundle.json"):
        read_bundle(tmp_path)
    (tmp_path / BUNDLE_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(tmp_path)
