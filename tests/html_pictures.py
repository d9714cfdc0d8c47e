"""What a static HTML report embeds: its pictures, decoded from data: URIs (a test helper)."""

import base64
import io
from html.parser import HTMLParser

from PIL import Image


class Pictures(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "img":
            self.sources.append(found.get("src") or "")
        for name in ("href", "src"):
            if tag != "img" and found.get(name):
                self.links.append(found[name] or "")


def pictures_of(page: str) -> list[Image.Image]:
    """Every <img> of the page decoded from its data: URI; fails on any picture kept elsewhere."""
    parser = Pictures()
    parser.feed(page)
    assert not parser.links, f"the report references other files: {parser.links}"
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in parser.sources), [s[:60] for s in parser.sources]
    return [Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))) for src in parser.sources]
