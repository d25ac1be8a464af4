"""The README's "For safety officers" section describes every inbox setting and shows a screenshot that exists."""

from __future__ import annotations

import re
from pathlib import Path

from monitor.config import WebSettings

ROOT = Path(__file__).resolve().parents[2]


def test_every_web_setting_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## For safety officers"):]
    section = section[:section.index("\n## ", 5)]
    for name in WebSettings.model_fields:
        assert f"`{name}`" in section, name
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section):
        assert (ROOT / image).is_file(), image
