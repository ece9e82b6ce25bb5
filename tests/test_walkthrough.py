"""docs/walkthrough.md points at exact lines: each `path:line` link must still show the code
quoted after it, so the page cannot silently drift from the models it explains."""
from __future__ import annotations

import re

from tests.api_fixtures import ROOT

LINK = re.compile(r"\[`([\w/]+\.py):(\d+)`\]\(\.\./\1#L\2\) `(.+?)`(?=[\s.,;:)])", re.S)


def test_every_line_reference_shows_the_quoted_code():
    text = (ROOT / "docs" / "walkthrough.md").read_text()
    links = LINK.findall(text)
    assert len(links) >= 20
    for path, line, code in links:
        lines = (ROOT / path).read_text().splitlines()
        assert code in lines[int(line) - 1], f"{path}:{line} no longer reads {code!r}; update docs/walkthrough.md"
