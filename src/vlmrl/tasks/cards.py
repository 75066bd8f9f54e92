"""Drawing playing cards with Pillow's built-in scalable font (no font files, no downloads).

Pillow's default font (Aileron) has no suit glyphs (U+2660..U+2667 render as boxes), so suits are drawn
as small shapes. The rank label is drawn as large as the card allows: a tiny VLM sees the 300 px image
downscaled to ~84-112 px, and a glyph must span more than one 14 px patch there to be learnable.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

RANK_LABELS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")  # rank 1..13 -> label
SUITS = ("spades", "hearts", "diamonds", "clubs")  # suit index 0..3

TABLE = (34, 110, 60)  # background: green felt, so white cards stand out at any scale
CARD_FACE = (255, 255, 255)
CARD_EDGE = (20, 20, 20)
CARD_BACK = (40, 70, 170)
BLACK = (0, 0, 0)
RED = (200, 20, 30)


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font at ``size`` px (cached: loading costs ~1 ms)."""
    return ImageFont.load_default(size=max(1, int(size)))


def blank_canvas(size: int = 300) -> Image.Image:
    """The common RGB background, ``size`` x ``size``."""
    return Image.new("RGB", (size, size), TABLE)


def suit_color(suit: int) -> tuple[int, int, int]:
    return RED if SUITS[suit] in ("hearts", "diamonds") else BLACK


def stroke(fnt: ImageFont.FreeTypeFont) -> int:
    """Extra outline width that makes the thin default font bold (thin strokes vanish when downscaled)."""
    return int(fnt.size) // 28


def fit_font(text: str, max_w: float, max_h: float) -> ImageFont.FreeTypeFont:
    """The largest font whose (bold) ink for ``text`` fits in ``max_w`` x ``max_h`` pixels."""
    # Ink size is close to linear in font size, so one measurement at a reference size is enough;
    # the loop only corrects rounding.
    ref = font(100)
    x0, y0, x1, y1 = ref.getbbox(text, stroke_width=stroke(ref))
    w, h = max(1, x1 - x0), max(1, y1 - y0)
    size = max(1, int(100 * min(max_w / w, max_h / h)))
    while size > 1:
        fnt = font(size)
        x0, y0, x1, y1 = fnt.getbbox(text, stroke_width=stroke(fnt))
        if x1 - x0 <= max_w and y1 - y0 <= max_h:
            break
        size -= 1
    return font(size)


def draw_text_centered(
    draw: ImageDraw.ImageDraw, center: tuple[float, float], text: str, fnt: ImageFont.FreeTypeFont, fill
) -> None:
    """Draw ``text`` in bold with its ink (not its line box) centred on ``center``."""
    sw = stroke(fnt)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=fnt, stroke_width=sw)
    cx, cy = center
    xy = (cx - (x0 + x1) / 2, cy - (y0 + y1) / 2)
    draw.text(xy, text, font=fnt, fill=fill, stroke_width=sw, stroke_fill=fill)


def draw_suit(
    draw: ImageDraw.ImageDraw, center: tuple[float, float], size: float, suit: int, fill=None
) -> None:
    """Draw a suit symbol about ``size`` px tall and wide, centred on ``center`` (default: its colour)."""
    cx, cy = center
    s = size / 2  # half extent
    color = suit_color(suit) if fill is None else fill
    name = SUITS[suit]
    if name == "diamonds":
        draw.polygon([(cx, cy - s), (cx + 0.75 * s, cy), (cx, cy + s), (cx - 0.75 * s, cy)], fill=color)
    elif name == "hearts":
        r = 0.5 * s
        for dx in (-r, r):
            draw.ellipse([cx + dx - r, cy - s, cx + dx + r, cy - s + 2 * r], fill=color)
        draw.polygon([(cx - 2 * r, cy - s + 1.1 * r), (cx + 2 * r, cy - s + 1.1 * r), (cx, cy + s)], fill=color)
    elif name == "spades":
        r = 0.45 * s
        lobe_y = cy + 0.1 * s  # centre of the two lower lobes
        for dx in (-r, r):
            draw.ellipse([cx + dx - r, lobe_y - r, cx + dx + r, lobe_y + r], fill=color)
        draw.polygon([(cx - 2 * r, lobe_y - 0.1 * r), (cx + 2 * r, lobe_y - 0.1 * r), (cx, cy - s)], fill=color)
        draw.polygon([(cx, lobe_y), (cx - 0.45 * s, cy + s), (cx + 0.45 * s, cy + s)], fill=color)
    else:  # clubs
        r = 0.36 * s
        for dx, dy in ((0, -s + r), (-1.1 * r, -s + 2.7 * r), (1.1 * r, -s + 2.7 * r)):
            draw.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=color)
        draw.polygon([(cx, cy - 0.2 * s), (cx - 0.45 * s, cy + s), (cx + 0.45 * s, cy + s)], fill=color)


def draw_card(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rank: int | None, suit: int | None
) -> None:
    """Draw one card filling box=(x0, y0, x1, y1); rank None draws it face down.

    Face up: the rank label fills the upper ~half of the card, the suit symbol sits below it.
    ``suit`` None draws the rank alone (for tasks where suits do not matter).
    """
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if x1 - x0 < 4 or y1 - y0 < 4:
        raise ValueError(f"card box {box} is too small to draw")
    if rank is not None and not 1 <= rank <= 13:
        raise ValueError(f"rank must be 1..13 (A..K), got {rank}")
    if rank is not None and suit is not None and not 0 <= suit < len(SUITS):
        raise ValueError(f"suit must be 0..3 ({', '.join(SUITS)}), got {suit}")
    for mask, color in _card_layers(x1 - x0, y1 - y0, rank, suit if rank is not None else None):
        draw.bitmap((x0, y0), mask, fill=color)


@lru_cache(maxsize=4096)
def _card_layers(w: int, h: int, rank: int | None, suit: int | None) -> tuple[tuple[Image.Image, tuple], ...]:
    """A card as (alpha mask, colour) layers, painted in order; cached because text rendering is slow."""

    def layer() -> tuple[Image.Image, ImageDraw.ImageDraw]:
        mask = Image.new("L", (w + 1, h + 1), 0)  # boxes are inclusive: w + 1 pixels wide
        return mask, ImageDraw.Draw(mask)

    radius = max(1, int(min(w, h) * 0.08))
    edge = max(1, int(min(w, h) * 0.02))
    shape, d = layer()
    d.rounded_rectangle((0, 0, w, h), radius=radius, fill=255)
    outline, d = layer()
    d.rounded_rectangle((0, 0, w, h), radius=radius, outline=255, width=edge)
    ink, d = layer()
    if rank is None:
        m = max(2, int(min(w, h) * 0.12))  # inner frame and cross so a face-down card reads as a back
        d.rounded_rectangle((m, m, w - m, h - m), radius=radius, outline=255, width=edge)
        d.line((m, m, w - m, h - m), fill=255, width=edge)
        d.line((m, h - m, w - m, m), fill=255, width=edge)
        return (shape, CARD_BACK), (outline, CARD_EDGE), (ink, CARD_FACE)
    label = RANK_LABELS[rank - 1]
    pad = 0.08 * w
    if suit is None:
        draw_label(d, (pad, 0.15 * h, w - pad, 0.85 * h), label, 255)
        return (shape, CARD_FACE), (outline, CARD_EDGE), (ink, BLACK)
    draw_label(d, (pad, 0.08 * h, w - pad, 0.58 * h), label, 255)
    draw_suit(d, (w / 2, 0.78 * h), min(0.3 * h, 0.6 * w), suit, fill=255)
    return (shape, CARD_FACE), (outline, CARD_EDGE), (ink, suit_color(suit))


def draw_label(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], text: str, fill) -> None:
    """Draw ``text`` in bold, as tall as ``box`` allows, centred in it.

    A label too wide for the box ("10" on a narrow card) is squeezed horizontally rather than
    shrunk, so every rank is drawn at the same height.
    """
    x0, y0, x1, y1 = box
    max_w, max_h = x1 - x0, y1 - y0
    fnt = fit_font(text, float("inf"), max_h)
    sw = stroke(fnt)
    bx0, by0, bx1, by1 = fnt.getbbox(text, stroke_width=sw)
    ink_w, ink_h = bx1 - bx0, by1 - by0
    if ink_w <= max_w:
        draw_text_centered(draw, ((x0 + x1) / 2, (y0 + y1) / 2), text, fnt, fill)
        return
    # Render the ink alone into a mask, squeeze it to the box width, then paint through it.
    mask = Image.new("L", (ink_w, ink_h), 0)
    ImageDraw.Draw(mask).text((-bx0, -by0), text, font=fnt, fill=255, stroke_width=sw, stroke_fill=255)
    new_w = max(1, int(max_w))
    mask = mask.resize((new_w, ink_h), Image.Resampling.LANCZOS)
    left = int(round((x0 + x1) / 2 - new_w / 2))
    top = int(round((y0 + y1) / 2 - ink_h / 2))
    draw.bitmap((left, top), mask, fill=fill)
