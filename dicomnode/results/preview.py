"""PNG preview of a result: coronal PET maximum intensity projection with the lesions outlined.

The PET MIP is shown the way nuclear-medicine readers are used to: inverted grey (hot is
dark, air is white), head at the top, the patient's right on the viewer's left, resampled
to square pixels so that slice spacing and in-plane spacing keep their true proportions.
The lesion mask is projected the same way and its outline is drawn in colour just outside
the projected lesions, so the uptake inside stays visible. A text band on top carries the
title and key figures. Pure numpy + pillow (+ scipy.ndimage). The same image (render_preview)
is the PNG preview and the pixels of the secondary capture (dicomnode.results.sc).

Layout (all integer pixels, so tests can reason about it):

* ``k = zoom / min(spacing_z, spacing_x)`` output pixels per mm;
* panel width ``W = round(nx * sx * k)``, height ``H = round(nz * sz * k)``;
* the PNG is the header band (``header_height(...)`` px) stacked on the panel; same width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from dicomnode.imaging.comparison import Comparison
from dicomnode.imaging.lesion_match import MatchStatus
from dicomnode.imaging.measures import measure_lesions

__all__ = ["mip_png", "render_preview", "render_mip", "coronal_mip", "panel_size", "default_zoom", "suv_window",
           "display_window", "lesion_figures", "PriorView", "render_comparison", "comparison_text", "STATUS_COLOURS"]

# Outline colours by label value (1 is the usual binary lesion label); cycles for larger values.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 30, 30),  # red
    (20, 120, 255),  # blue
    (0, 170, 60),  # green
    (255, 140, 0),  # orange
    (170, 40, 200),  # purple
)
# A comparison's panels colour each lesion by its course: present before and now (blue), new (red,
# in the current panel), resolved (green, in the prior panel). Label values 1..3 of render_mip.
STATUS_LABEL = {MatchStatus.MATCHED: 1, MatchStatus.NEW: 2, MatchStatus.RESOLVED: 3}
STATUS_COLOURS: dict[MatchStatus, tuple[int, int, int]] = {
    MatchStatus.MATCHED: (20, 120, 255),
    MatchStatus.NEW: (230, 30, 30),
    MatchStatus.RESOLVED: (0, 170, 60),
}
PANEL_GAP_PX = 12
HEADER_BG = (255, 255, 255)
HEADER_FG = (0, 0, 0)
MIN_PANEL_PX = 400
OUTLINE_PX = 2


def default_zoom(shape_zyx: Sequence[int], spacing_zyx: Sequence[float], min_px: int = MIN_PANEL_PX) -> int:
    """Smallest integer zoom making the panel's longer side at least ``min_px`` pixels."""
    nz, _, nx = shape_zyx
    sz, _, sx = (float(s) for s in spacing_zyx)
    base = min(sz, sx)
    longest = max(nx * sx / base, nz * sz / base)
    return max(1, math.ceil(min_px / longest))


def panel_size(shape_zyx: Sequence[int], spacing_zyx: Sequence[float], zoom: int) -> tuple[int, int]:
    """(width, height) in pixels of the aspect-correct MIP panel."""
    nz, _, nx = shape_zyx
    sz, _, sx = (float(s) for s in spacing_zyx)
    k = zoom / min(sz, sx)
    return max(1, round(nx * sx * k)), max(1, round(nz * sz * k))


def suv_window(mip: np.ndarray) -> float:
    """Upper end of the display window: SUV 10 at most, the MIP's 99.5th percentile, 4 at least.

    Data that are clearly not SUV (values in the thousands: Bq/mL, counts) get the percentile.
    """
    finite = mip[np.isfinite(mip)]
    if finite.size == 0:
        return 1.0
    p = float(np.percentile(finite, 99.5))
    if float(finite.max()) > 200.0:  # not SUV units
        return p if p > 0 else 1.0
    return float(min(10.0, max(4.0, p)))


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def render_mip(
    pet_suv: np.ndarray,
    labels: np.ndarray | None,
    spacing_zyx: Sequence[float],
    *,
    vmax: float | None = None,
    zoom: int | None = None,
    z_up: bool = True,
    outline_px: int = OUTLINE_PX,
    palette: Sequence[tuple[int, int, int]] = PALETTE,
) -> np.ndarray:
    """The MIP panel as an RGB uint8 array (H, W, 3).

    ``z_up``: array index z grows towards the head (DICOM/LPS +z is superior), so it is flipped
    to put the head at the top. Projection is along y (anterior-posterior); x stays left to right
    (patient right on the viewer's left for LPS x).
    """
    pet = np.asarray(pet_suv, dtype=np.float32)
    if pet.ndim != 3:
        raise ValueError(f"pet_suv must be (z, y, x), got shape {pet.shape}")
    if labels is not None and np.shape(labels) != pet.shape:
        raise ValueError(f"labels shape {np.shape(labels)} differs from PET shape {pet.shape}")
    zoom = int(zoom) if zoom else default_zoom(pet.shape, spacing_zyx)
    width, height = panel_size(pet.shape, spacing_zyx, zoom)

    mip = coronal_mip(pet)  # (z, x)
    if z_up:
        mip = mip[::-1]
    vmax = float(vmax) if vmax else suv_window(mip)
    grey = np.clip(mip / vmax, 0.0, 1.0).astype(np.float32)
    grey_img = Image.fromarray(grey).resize((width, height), Image.Resampling.BILINEAR)
    grey = np.asarray(grey_img, dtype=np.float32)
    shade = np.round(255.0 * (1.0 - np.clip(grey, 0.0, 1.0))).astype(np.uint8)
    rgb = np.repeat(shade[:, :, None], 3, axis=2)

    if labels is not None:
        lab = np.asarray(labels)
        proj = lab.max(axis=1)  # (z, x): highest label along each ray
        if z_up:
            proj = proj[::-1]
        rows = _nearest_index(height, proj.shape[0])
        cols = _nearest_index(width, proj.shape[1])
        up = proj[rows][:, cols]
        values = [int(v) for v in np.unique(up) if v > 0]
        for v in values:
            mask = up == v
            ring = ndimage.binary_dilation(mask, iterations=outline_px) & ~mask
            ring &= up == 0  # never paint over another label's lesion
            rgb[ring] = palette[(v - 1) % len(palette)]
    return rgb


def lesion_figures(pet_suv: np.ndarray, labels: np.ndarray | None, spacing_zyx: Sequence[float]) -> str:
    """One line of key figures: lesion count (3-D connected components), volume, SUVmax."""
    pet = np.asarray(pet_suv)
    if labels is None:
        return f"SUVmax {float(np.nanmax(pet)):.1f}"
    mask = np.asarray(labels) > 0
    _, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return f"no lesions, SUVmax {float(np.nanmax(pet)):.1f}"
    voxel_ml = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0
    return (
        f"{n} lesion{'s' if n != 1 else ''}, {mask.sum() * voxel_ml:.1f} mL, "
        f"lesion SUVmax {float(np.nanmax(pet[mask])):.1f}"
    )


def _font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int
) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        words = para.split(" ")
        cur = ""
        for w in words:
            trial = w if not cur else f"{cur} {w}"
            if cur and draw.textlength(trial, font=font) > width:
                lines.append(cur)
                cur = w
            else:
                cur = trial
        lines.append(cur)
    return lines


def display_window(pet_suv: np.ndarray, vmax: float | None = None) -> float:
    """The upper end of the grey scale render_mip uses for this PET: `vmax`, else suv_window of the MIP."""
    if vmax:
        return float(vmax)
    return suv_window(coronal_mip(np.asarray(pet_suv, dtype=np.float32)))


def coronal_mip(pet: np.ndarray) -> np.ndarray:
    """The maximum along y (z, x), NaN read as 0 and infinities as the largest finite values
    (numpy's nan_to_num); that pass over the volume is made only when the plain maximum shows a
    value that is not finite."""
    mip = pet.max(axis=1)
    return mip if np.isfinite(mip).all() else np.nan_to_num(pet, nan=0.0).max(axis=1)


def render_preview(
    pet_suv: np.ndarray,
    labels: np.ndarray | None,
    spacing_zyx: Sequence[float],
    text: str,
    *,
    vmax: float | None = None,
    zoom: int | None = None,
    z_up: bool = True,
) -> np.ndarray:
    """The preview as an RGB uint8 array (H, W, 3): a white header band with ``text`` (wrapped
    to the width; newlines start new lines) and the "R ... L" orientation row, stacked on the
    MIP panel of render_mip. The PNG preview and the secondary capture are this image."""
    panel = render_mip(pet_suv, labels, spacing_zyx, vmax=vmax, zoom=zoom, z_up=z_up)
    height, width = panel.shape[:2]
    font = _font()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = 6
    lines = _wrap(scratch, text, font, max(1, width - 2 * margin)) if text else []
    asc_desc = font.getbbox("Ag|")
    line_h = (asc_desc[3] - asc_desc[1]) + 4
    orient_h = line_h  # "R ... L" orientation row
    header_h = margin + line_h * len(lines) + orient_h + margin // 2

    canvas = Image.new("RGB", (width, header_h + height), HEADER_BG)
    draw = ImageDraw.Draw(canvas)
    y = margin
    for line in lines:
        draw.text((margin, y), line, fill=HEADER_FG, font=font)
        y += line_h
    draw.text((margin, y), "R", fill=HEADER_FG, font=font)
    draw.text((width - margin - draw.textlength("L", font=font), y), "L", fill=HEADER_FG, font=font)
    canvas.paste(Image.fromarray(panel), (0, header_h))
    return np.asarray(canvas)


@dataclass(frozen=True)
class PriorView:
    """The prior study beside the current one: its PET (SUVbw) and lesion mask on its own grid."""

    suv: np.ndarray
    labels: np.ndarray | None
    spacing_zyx: tuple[float, float, float]
    study_date: str = ""


def _status_labels(suv: np.ndarray, mask: np.ndarray | None, spacing_zyx: Sequence[float], comparison: Comparison,
                   side: str, connectivity: int) -> np.ndarray | None:
    """The mask's lesions (numbered as the comparison numbers them) as 1 matched, 2 new, 3 resolved."""
    if mask is None:
        return None
    _, numbered = measure_lesions(np.asarray(mask) != 0, suv, spacing_zyx, connectivity=connectivity)
    lookup = np.zeros(int(numbered.max()) + 1, dtype=np.int32)
    for row in comparison.lesions:
        number = row.pair.current if side == "current" else row.pair.prior
        if number is not None and number < len(lookup):
            lookup[number] = STATUS_LABEL[row.status]
    return lookup[numbered]


def comparison_text(comparison: Comparison) -> str:
    """The header lines of a comparison image: the category and the change, in words and figures."""
    response = comparison.response
    u = comparison.unit
    before, now = comparison.prior.hottest, comparison.current.hottest
    if before is not None and now is not None:
        change = comparison.hottest_change_percent
        peak = f"hottest {u}peak {before.peak:.1f} -> {now.peak:.1f}" + (f" ({change:+.0f} %)" if change is not None
                                                                         else "")
    elif before is not None:
        peak = f"hottest {u}peak {before.peak:.1f} -> no lesion"
    elif now is not None:
        peak = f"no lesion before, hottest {u}peak now {now.peak:.1f}"
    else:
        peak = "no lesions"
    lines = [
        f"PERCIST 1.0: {response.category.value}" + (f" ({response.reason})" if response.category.name in
                                                      ("NOT_ASSESSABLE", "PMD") else ""),
        f"{peak} | lesions {comparison.prior.lesion_count} -> {comparison.current.lesion_count} "
        f"({len(comparison.new_lesions)} new, {len(comparison.resolved_lesions)} resolved) | MTV "
        f"{comparison.prior.total_mtv_ml:.1f} -> {comparison.current.total_mtv_ml:.1f} ml",
        "outlines: blue present before and now, red new, green resolved",
    ]
    return "\n".join(lines)


def render_comparison(
    pet_suv: np.ndarray,
    labels: np.ndarray | None,
    spacing_zyx: Sequence[float],
    prior: PriorView,
    comparison: Comparison | None,
    text: str,
    *,
    current_date: str = "",
    vmax: float | None = None,
    zoom: int | None = None,
    connectivity: int = 18,
) -> np.ndarray:
    """Prior (left) and current (right) coronal MIPs side by side under one header band, one grey
    scale (the current's window), each panel captioned with its date; with a comparison the
    lesions are outlined by course (STATUS_COLOURS), without one in the usual palette. Each panel
    is on its own study's grid (no registration: what each scan showed)."""
    current = np.asarray(pet_suv, dtype=np.float32)
    before = np.asarray(prior.suv, dtype=np.float32)
    window = display_window(current, vmax)
    if comparison is not None:
        palette = [STATUS_COLOURS[s] for s in (MatchStatus.MATCHED, MatchStatus.NEW, MatchStatus.RESOLVED)]
        labels_now = _status_labels(current, labels, spacing_zyx, comparison, "current", connectivity)
        labels_before = _status_labels(before, prior.labels, prior.spacing_zyx, comparison, "prior", connectivity)
    else:
        palette, labels_now, labels_before = list(PALETTE), labels, prior.labels
    zoom = int(zoom) if zoom else default_zoom(current.shape, spacing_zyx)
    panels = [render_mip(before, labels_before, prior.spacing_zyx, vmax=window, zoom=zoom, palette=palette),
              render_mip(current, labels_now, spacing_zyx, vmax=window, zoom=zoom, palette=palette)]
    captions = [f"prior {_date(prior.study_date)}", f"current {_date(current_date)}"]
    font = _font()
    asc_desc = font.getbbox("Ag|")
    caption_h = (asc_desc[3] - asc_desc[1]) + 8
    height = max(p.shape[0] for p in panels) + caption_h
    width = sum(p.shape[1] for p in panels) + PANEL_GAP_PX
    body = Image.new("RGB", (width, height), HEADER_BG)
    draw = ImageDraw.Draw(body)
    x = 0
    for panel, caption in zip(panels, captions):
        draw.text((x + 6, 2), caption, fill=HEADER_FG, font=font)
        body.paste(Image.fromarray(panel), (x, caption_h))
        x += panel.shape[1] + PANEL_GAP_PX
    header = _header(text, width)
    canvas = Image.new("RGB", (width, header.shape[0] + height), HEADER_BG)
    canvas.paste(Image.fromarray(header), (0, 0))
    canvas.paste(body, (0, header.shape[0]))
    return np.asarray(canvas)


def _header(text: str, width: int) -> np.ndarray:
    """A white band with `text` wrapped to `width` (no orientation row)."""
    font = _font()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = 6
    lines = _wrap(scratch, text, font, max(1, width - 2 * margin)) if text else []
    asc_desc = font.getbbox("Ag|")
    line_h = (asc_desc[3] - asc_desc[1]) + 4
    band = Image.new("RGB", (width, margin + line_h * len(lines) + margin // 2), HEADER_BG)
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(lines):
        draw.text((margin, margin + k * line_h), line, fill=HEADER_FG, font=font)
    return np.asarray(band)


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value


def mip_png(
    pet_suv: np.ndarray,
    labels: np.ndarray | None,
    spacing_zyx: Sequence[float],
    out: Path,
    title: str = "",
    *,
    vmax: float | None = None,
    zoom: int | None = None,
    z_up: bool = True,
    figures: bool = True,
    prior: PriorView | None = None,
    comparison: Comparison | None = None,
    current_date: str = "",
) -> Path:
    """Write the coronal MIP preview PNG to ``out``; returns ``out``.

    ``pet_suv`` and ``labels`` are (z, y, x) on the same grid; ``spacing_zyx`` in mm.
    The header holds ``title`` (may contain newlines), then the key figures line
    (lesion count, lesion volume, SUVmax, display window) unless ``figures`` is False.
    With ``prior`` the prior study's MIP stands on the left of the current one
    (render_comparison), and with ``comparison`` the header adds the change and the lesions are
    outlined by course.
    """
    pet = np.asarray(pet_suv, dtype=np.float32)
    figs = lesion_figures(pet, labels, spacing_zyx) if figures else ""
    window = f"window SUV 0-{display_window(pet, vmax):.1f}"
    text = "\n".join(t for t in (title, (f"{figs} | " if figs else "") + window) if t)
    if prior is not None:
        if comparison is not None:
            text = f"{text}\n{comparison_text(comparison)}"
        image = render_comparison(pet, labels, spacing_zyx, prior, comparison, text, current_date=current_date,
                                  vmax=vmax, zoom=zoom)
    else:
        image = render_preview(pet, labels, spacing_zyx, text, vmax=vmax, zoom=zoom, z_up=z_up)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out, format="PNG")
    return out
