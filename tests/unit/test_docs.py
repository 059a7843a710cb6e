"""The configuration guide must name every setting the code reads."""

from pathlib import Path

from server.settings import Settings

GUIDE = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()


def test_every_server_setting_is_documented():
    missing = [name for name in Settings.model_fields if f"SCRIBEFARM_{name.upper()}" not in GUIDE]
    assert missing == []
