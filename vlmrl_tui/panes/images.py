"""How the rollouts pane draws images: half blocks everywhere, a graphics protocol where it works.

Half blocks (``▀``, foreground = upper pixel, background = lower pixel) are a Rich
renderable: every true-colour terminal shows them, Rich downgrades colours for the others,
tmux passes them through, and SVG snapshots capture them. Where the terminal speaks the
kitty graphics protocol or sixel, and the optional ``textual-image`` package is installed
(``pip install vlmrl[images]``), images are drawn at full resolution instead.
:func:`choose_renderer` decides; ``VLMRL_IMAGES=halfblock|kitty|sixel`` overrides it.

textual-image asks the terminal what it supports when it is first imported, by writing an
escape sequence and reading the answer from stdin. Once Textual runs, its input thread
would take that answer, so :func:`probe_graphics` runs before the app starts
(``VlmrlApp.__init__``), and only where a protocol may be used at all.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from PIL import Image
from rich.color import Color
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult, RenderResult as WidgetRender
from textual.binding import Binding
from textual.cache import LRUCache
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Static

IMAGES_ENV = "VLMRL_IMAGES"  # halfblock | kitty | sixel | auto (the default)
HALFBLOCK, KITTY, SIXEL = "halfblock", "kitty", "sixel"
PROTOCOLS = (KITTY, SIXEL)
MAX_PIXELS = 512  # images are kept at most this large for the pane (the enlarged view reads the file)


class HalfBlockImage:
    """A PIL image as terminal cells: two pixel rows per cell row, aspect ratio kept."""

    def __init__(self, image: Image.Image, max_width: int = 48, max_height: int = 24) -> None:
        if image.mode != "RGB":
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (0, 0, 0))
            image.paste(rgba, mask=rgba.getchannel("A"))
        self.image = image
        self.max_width = max(1, max_width)
        self.max_height = max(1, max_height)
        self._cache: dict[int, list[list[Segment]]] = {}

    def cell_size(self, width: int) -> tuple[int, int]:
        """(columns, rows) the image takes when at most ``width`` columns are free."""
        w, h = self.image.size
        cols = max(1, min(width, self.max_width))
        rows = max(1, math.ceil(h * cols / w / 2))
        if rows > self.max_height:
            rows = self.max_height
            cols = max(1, min(cols, round(w * rows * 2 / h)))
        return cols, rows

    def _lines(self, width: int) -> list[list[Segment]]:
        lines = self._cache.get(width)
        if lines is not None:
            return lines
        cols, rows = self.cell_size(width)
        shrinking = cols < self.image.width
        method = Image.Resampling.BOX if shrinking else Image.Resampling.NEAREST
        small = self.image.resize((cols, rows * 2), method)
        px = small.load()
        styles: dict[tuple[tuple[int, int, int], tuple[int, int, int]], Style] = {}
        lines = []
        for r in range(rows):
            line: list[Segment] = []
            for c in range(cols):
                top, bottom = px[c, 2 * r], px[c, 2 * r + 1]
                style = styles.get((top, bottom))
                if style is None:
                    style = styles[(top, bottom)] = Style(
                        color=Color.from_rgb(*top[:3]), bgcolor=Color.from_rgb(*bottom[:3])
                    )
                line.append(Segment("▀", style))
            lines.append(list(Segment.simplify(line)))
        self._cache[width] = lines
        return lines

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        cols, _ = self.cell_size(options.max_width)
        return Measurement(cols, cols)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self._lines(options.max_width):
            yield from line
            yield Segment.line()


def load_image(path: Path, max_pixels: int | None = MAX_PIXELS) -> Image.Image | None:
    """The image at ``path`` (shrunk to ``max_pixels`` a side), None if it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            if max_pixels is not None and max(im.size) > max_pixels:
                im.thumbnail((max_pixels, max_pixels))
            return im.copy()
    except (OSError, ValueError):
        return None


class PictureCache:
    """Images read for the pane, and their half-block renders (which keep their drawn lines)."""

    def __init__(self, image_height: int, size: int = 64) -> None:
        self.image_height = image_height
        self._images: LRUCache[Path, Image.Image | None] = LRUCache(size)
        self._pictures: LRUCache[Path, HalfBlockImage] = LRUCache(size)

    def load(self, path: Path) -> Image.Image | None:
        if path not in self._images:
            self._images[path] = load_image(path)
        return self._images[path]

    def picture(self, path: Path) -> HalfBlockImage | Text:
        """The image at ``path`` as half blocks ``image_height`` rows high, or a line saying
        it is missing."""
        picture = self._pictures.get(path)
        if picture is not None:
            return picture
        img = self.load(path)
        if img is None:
            return Text(f"[image missing: {path}]", style="red")
        picture = HalfBlockImage(img, max_width=self.image_height * 2 * img.width // max(1, img.height),
                                 max_height=self.image_height)
        self._pictures[path] = picture
        return picture


# ---- which renderer ----------------------------------------------------------------------
@dataclass(frozen=True)
class GraphicsProbe:
    """What :func:`probe_graphics` found: textual-image importable, and the protocol the
    terminal answered for (None: neither, or not asked)."""

    installed: bool = False
    detected: str | None = None


def under_multiplexer(env: Mapping[str, str]) -> bool:
    """True inside tmux or GNU screen: they drop graphics escapes unless configured to pass them."""
    term = env.get("TERM", "")
    return bool(env.get("TMUX") or env.get("STY") or env.get("TERM_PROGRAM") == "tmux"
                or term.startswith(("screen", "tmux")))


def choose_renderer(env: Mapping[str, str], headless: bool, probe: GraphicsProbe) -> str:
    """``halfblock``, ``kitty`` or ``sixel``: how the pane draws images.

    A headless app (Pilot tests, SVG snapshots) always gets half blocks. Otherwise
    ``VLMRL_IMAGES=halfblock`` forces half blocks and ``kitty``/``sixel`` force a protocol
    (even under tmux, for one set up to pass it through) when textual-image is installed;
    without an override a protocol is used only outside tmux/screen, when the terminal
    said it supports it.
    """
    if headless or not probe.installed:
        return HALFBLOCK
    wanted = env.get(IMAGES_ENV, "").strip().lower()
    if wanted == HALFBLOCK or wanted in PROTOCOLS:
        return wanted
    if under_multiplexer(env) or probe.detected not in PROTOCOLS:
        return HALFBLOCK
    return probe.detected


def probe_graphics(env: Mapping[str, str] | None = None) -> GraphicsProbe:
    """Ask the terminal which graphics protocol it speaks (through textual-image's import),
    unless the answer cannot matter: half blocks forced, tmux/screen without an override,
    no terminal on stdout, or textual-image missing. Call it before the app starts."""
    env = os.environ if env is None else env
    wanted = env.get(IMAGES_ENV, "").strip().lower()
    installed = importlib.util.find_spec("textual_image") is not None
    out = sys.__stdout__
    if (not installed or wanted == HALFBLOCK or (under_multiplexer(env) and wanted not in PROTOCOLS)
            or out is None or not out.isatty()):
        return GraphicsProbe(installed, None)
    try:
        import textual_image.widget  # noqa: F401 - measures the cells while the terminal still answers
        from textual_image.renderable import Image as Auto, SixelImage, TGPImage
    except Exception:  # noqa: BLE001 - a broken optional package must not stop the dashboard
        return GraphicsProbe(False, None)
    return GraphicsProbe(True, KITTY if Auto is TGPImage else SIXEL if Auto is SixelImage else None)


def graphics_image(mode: str, image: Image.Image | Path) -> Widget:
    """textual-image's widget for ``image`` in protocol ``mode`` (``kitty`` or ``sixel``)."""
    from textual_image.widget import SixelImage, TGPImage

    return (TGPImage if mode == KITTY else SixelImage)(image)


class GraphicsStrip(Horizontal):
    """The detail's images as graphics-protocol widgets, ``image_height`` rows high (kitty
    and sixel modes; hidden under half blocks)."""

    DEFAULT_CSS = "GraphicsStrip { height: auto; display: none; }"

    def __init__(self, image_height: int, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.image_height = image_height
        self.paths: list[Path] = []  # what it shows now

    def show(self, mode: str, images: list[tuple[Path, Image.Image]]) -> None:
        paths = [p for p, _ in images]
        if paths == self.paths:
            return
        self.paths = paths
        self.remove_children()
        self.display = bool(images)
        widgets = [graphics_image(mode, img) for _, img in images]
        for w in widgets:
            w.styles.width, w.styles.height = "auto", self.image_height
        if widgets:
            self.mount_all(widgets)


# ---- the enlarged view -------------------------------------------------------------------
class FittedImage(Widget):
    """Half blocks re-rendered to fill the widget (a small image is scaled up)."""

    DEFAULT_CSS = "FittedImage { width: 1fr; height: 1fr; content-align: center middle; }"

    def __init__(self, image: Image.Image) -> None:
        super().__init__()
        self.image = image
        self.picture: HalfBlockImage | None = None  # the render of the current size

    def render(self) -> WidgetRender:
        width, height = self.content_size
        if self.picture is None or (self.picture.max_width, self.picture.max_height) != (width, height):
            self.picture = HalfBlockImage(self.image, max_width=width, max_height=height)
        return self.picture


class ImageScreen(ModalScreen[None]):
    """One rollout's images, one at a time, as large as the screen allows; Esc closes."""

    DEFAULT_CSS = """
    ImageScreen { align: center middle; }
    ImageScreen > Vertical { width: 100%; height: 100%; border: thick $primary; background: $surface; }
    ImageScreen #image-title { height: 1; padding: 0 1; background: $panel; }
    ImageScreen #image-view { width: 1fr; height: 1fr; align: center middle; }
    ImageScreen #image-view > * { width: auto; height: auto; }
    ImageScreen #image-view > FittedImage { width: 1fr; height: 1fr; }
    """
    BINDINGS = [
        Binding("escape,f", "close", "Close", id="image.close"),
        Binding("left", "image(-1)", "Previous image", id="image.prev"),
        Binding("right", "image(1)", "Next image", id="image.next"),
    ]

    def __init__(self, images: list[tuple[Path, Image.Image]], title: str, mode: str = HALFBLOCK) -> None:
        super().__init__()
        self.images = images
        self.title_text = title
        self.mode = mode
        self.index = 0
        self._title = Static("", id="image-title")
        self._view = Vertical(id="image-view")

    def compose(self) -> ComposeResult:
        with Vertical():
            yield self._title
            yield self._view

    def on_mount(self) -> None:
        self._show()

    @property
    def shown(self) -> Widget | None:
        """The image widget on screen."""
        return next(iter(self._view.children), None)

    def _show(self) -> None:
        path, image = self.images[self.index]
        count = f" · image {self.index + 1}/{len(self.images)} (←/→)" if len(self.images) > 1 else ""
        self._title.update(f"{self.title_text}{count} · {path} · Esc closes")
        self._view.remove_children()
        # A protocol gets the file itself (full resolution); half blocks the image read for the pane.
        self._view.mount(graphics_image(self.mode, path) if self.mode in PROTOCOLS else FittedImage(image))

    def action_image(self, delta: int) -> None:
        index = (self.index + delta) % len(self.images)
        if index != self.index:
            self.index = index
            self._show()

    def action_close(self) -> None:
        self.dismiss(None)
