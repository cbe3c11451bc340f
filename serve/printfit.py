"""Find a printed picture in a camera frame and rectify it (the ``print`` fit).

The print is the largest convex quadrilateral that stands out from its surroundings.
Candidates come from OpenCV contours of three segmentations of a working copy of the
frame (Canny edges; Otsu on grey; Otsu on the distance from the frame border's colour,
i.e. "not the table"), each reduced to a polygon with ``approxPolyDP``; where a corner of
the picture matches the table and the polygon has it cut off, the four longest sides extended
are a candidate too. A candidate counts when the colour just inside its edges differs from
just outside (a quadrilateral drawn by table texture does not; an extended one must differ
along most of every side), and the largest one wins.

Its corners are then refined at full resolution: along each side, the edge is located
to a fraction of a pixel as the strongest intensity step across it, a robust line
(``cv2.fitLine``) goes through those points, and neighbouring lines meet at the corners.
The corners lie on the paper's outer edge (pixel centres at integer coordinates, so a
print covering pixels 10..89 has its left edge at x = 9.5).

``rectify`` warps those corners onto an upright grid (a non-square print is
stretched, never cropped, so a corner trigger stays in its corner), trims a white
paper margin when all four sides carry one, and leaves the final resize to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

WORK_SIDE = 800  # detection runs on a copy whose longer side is at most this
MIN_AREA = 0.02  # of the frame: smaller quadrilaterals are not "the print"
MAX_AREA = 0.97  # a quadrilateral that is the whole frame is not a print either
MIN_CONTRAST = 18.0  # grey levels between the bands just inside and just outside the edges
MAX_MARGIN = 0.2  # a paper margin is at most this fraction of the print's side, per side
# Largest difference in chromaticity (r, g, b over their sum) between a margin's four sides: 0.2-2% on
# simulated photos with light casts and gradients, 6.6% where a picture's own border passed for one.
MAX_MARGIN_HUE_SPREAD = 0.04


@dataclass(frozen=True)
class Print:
    corners: np.ndarray  # float64 (4, 2): x, y of top-left, top-right, bottom-right, bottom-left
    contrast: float  # grey levels between inside and outside of the edges


def order_corners(pts: np.ndarray) -> np.ndarray:
    """Four points -> top-left, top-right, bottom-right, bottom-left (by angle around the centre,
    starting from the one nearest the frame's top-left direction)."""
    pts = np.asarray(pts, dtype=np.float64).reshape(4, 2)
    c = pts.mean(0)
    ang = np.arctan2(pts[:, 1] - c[1], pts[:, 0] - c[0])
    pts = pts[np.argsort(ang)]  # clockwise on screen (y down), from about -pi
    start = int(np.argmin(pts.sum(1)))  # top-left: smallest x + y
    return np.roll(pts, -start, axis=0)


def _quads(contour: np.ndarray, h: int, w: int) -> list[tuple[np.ndarray, bool]]:
    """Quadrilaterals (4, 2) for a contour's convex hull, when it is of a plausible size, each with whether
    it was extended: the hull reduced to four vertices, and, where a stretch of the print matched the table
    and a corner of the hull is cut off, the four longest sides of the reduced hull extended until they
    meet (a print is a quadrilateral even where one of its corners does not stand out)."""
    hull = cv2.convexHull(contour)
    area = cv2.contourArea(hull)
    if not MIN_AREA * h * w <= area <= MAX_AREA * h * w:
        return []
    peri = cv2.arcLength(hull, True)
    found = []
    for eps in (0.01, 0.02, 0.035, 0.05, 0.08):
        poly = cv2.approxPolyDP(hull, eps * peri, True)
        if len(poly) < 4:
            break
        if len(poly) in (5, 6) and len(found) == 0:
            q = _four_longest_sides(poly.reshape(-1, 2).astype(np.float64), area, h, w)
            if q is not None:
                found.append((q, True))
        if len(poly) == 4:
            # A quadrilateral that keeps most of the hull: not a triangle's corner cut off.
            if cv2.isContourConvex(poly) and cv2.contourArea(poly) >= 0.85 * area:
                found.append((order_corners(poly.reshape(4, 2)), False))
            break
    return found


def _four_longest_sides(poly: np.ndarray, area: float, h: int, w: int) -> np.ndarray | None:
    """The quadrilateral whose sides lie on the four longest sides of a convex pentagon or hexagon, when
    those lines meet inside the frame in a convex quadrilateral not much larger than the polygon."""
    n = len(poly)
    length = [float(np.hypot(*(poly[(i + 1) % n] - poly[i]))) for i in range(n)]
    sides = sorted(sorted(range(n), key=lambda i: -length[i])[:4])
    if min(length[i] for i in sides) < 2 * max(length[i] for i in range(n) if i not in sides):
        return None  # no clear four sides: a rounded blob, not a print with a corner cut off
    corners = []
    for a, b in zip(sides, sides[1:] + sides[:1]):
        p, u = poly[a], poly[(a + 1) % n] - poly[a]
        q, v = poly[b], poly[(b + 1) % n] - poly[b]
        m = np.array([u, -v]).T
        if abs(np.linalg.det(m)) < 1e-6 * np.hypot(*u) * np.hypot(*v):
            return None
        t, _ = np.linalg.solve(m, q - p)
        corners.append(p + t * u)
    quad = np.array(corners, np.float32)
    if not cv2.isContourConvex(quad.reshape(-1, 1, 2)) or not area <= cv2.contourArea(quad) <= 1.3 * area:
        return None
    if (quad < 0).any() or (quad[:, 0] > w - 1).any() or (quad[:, 1] > h - 1).any():
        return None
    return order_corners(quad.astype(np.float64))


def _masks(gray: np.ndarray, rgb: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Binary images whose contours may outline the print, each with its contour retrieval mode."""
    smooth = cv2.GaussianBlur(gray, (5, 5), 0)
    side = min(gray.shape)
    grow = np.ones((3, 3), np.uint8)
    masks = []
    med = float(np.median(smooth))
    for lo, hi in ((15, 45), (int(max(10, 0.5 * med)), int(min(255, max(30, 1.2 * med))))):
        masks.append((cv2.dilate(cv2.Canny(smooth, lo, hi), grow), cv2.RETR_LIST))
    _, otsu = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    masks += [(otsu, cv2.RETR_EXTERNAL), (255 - otsu, cv2.RETR_EXTERNAL)]
    # "Not the table": colour distance from the frame border (assumed to be table), above what the
    # table itself shows there; closed so that picture regions of the table's colour join in.
    blur = cv2.GaussianBlur(rgb, (0, 0), 2).astype(np.float32)
    b = max(3, side // 80)
    ring = np.concatenate([blur[:b].reshape(-1, 3), blur[-b:].reshape(-1, 3),
                           blur[:, :b].reshape(-1, 3), blur[:, -b:].reshape(-1, 3)])
    table = np.median(ring, 0)
    dist = np.linalg.norm(blur - table, axis=2)
    level = max(20.0, 1.3 * float(np.percentile(np.linalg.norm(ring - table, axis=1), 99)))
    away = (dist > level).astype(np.uint8) * 255
    k = max(3, side // 40) | 1
    away = cv2.morphologyEx(away, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    away = cv2.morphologyEx(away, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    masks.append((away, cv2.RETR_EXTERNAL))
    # Parts of the picture may match the table's colour and split it: also join every sizeable
    # region that differs from the table and keeps clear of the frame's border.
    n, labels, stats, _ = cv2.connectedComponentsWithStats(away)
    h, w = away.shape
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 0.002 * h * w
            and stats[i, cv2.CC_STAT_LEFT] > 0 and stats[i, cv2.CC_STAT_TOP] > 0
            and stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH] < w
            and stats[i, cv2.CC_STAT_TOP] + stats[i, cv2.CC_STAT_HEIGHT] < h]
    if len(keep) > 1:
        joined = np.isin(labels, keep).astype(np.uint8) * 255
        pts = cv2.findNonZero(joined)
        hull = np.zeros_like(joined)
        cv2.fillConvexPoly(hull, cv2.convexHull(pts), 255)
        masks.append((hull, cv2.RETR_EXTERNAL))
    return masks


def _candidates(gray: np.ndarray, rgb: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    """Convex quadrilaterals (4, 2) in working-copy coordinates from several segmentations, each with
    whether a side was extended past the hull."""
    h, w = gray.shape
    quads = []
    for mask, mode in _masks(gray, rgb):
        contours, _ = cv2.findContours(mask, mode, cv2.CHAIN_APPROX_SIMPLE)
        for cnt in contours:
            if cv2.contourArea(cv2.convexHull(cnt)) >= MIN_AREA * h * w:
                quads += _quads(cnt, h, w)
    return quads


def _edge_contrast(soft: np.ndarray, quad: np.ndarray, every_side: bool = False) -> float:
    """How much the print stands out: the colour distance between thin bands just inside and just
    outside each side (away from the corners), on a smoothed (h, w, 3) frame. ``every_side``: the
    weakest side's, for a quadrilateral extended past its hull, which must stand out all round."""
    c = quad.mean(0)
    diffs, typical = [], []
    for i in range(4):
        a, b = quad[i], quad[(i + 1) % 4]
        t = np.linspace(0.15, 0.85, 24)[:, None]
        pts = a + t * (b - a)
        d = b - a
        n = np.array([d[1], -d[0]]) / max(1e-6, np.hypot(*d))
        if np.dot(c - pts.mean(0), n) < 0:
            n = -n  # n points inwards
        off = max(2.0, 0.02 * np.hypot(*d))
        inside, outside = _sample(soft, pts + off * n), _sample(soft, pts - off * n)
        dist = np.linalg.norm(inside - outside, axis=-1)
        dist = dist[~np.isnan(dist)]
        if len(dist) < 8:
            return 0.0
        diffs.append(float(dist.mean()))
        typical.append(float(np.median(dist)))
    if every_side:
        return min(typical)  # most of every side: a mean lets a stretch across the print carry a side that is not
    # A print stands out all round, though a stretch of one side may match the table's colour.
    return min(float(np.mean(diffs)), 2.5 * min(diffs))


def _sample(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear samples of a float32 (h, w) or (h, w, c) image at (x, y) points: shape pts.shape[:-1]
    (+ (c,)); NaN outside the frame."""
    h, w = img.shape[:2]
    x, y = pts[..., 0].astype(np.float32), pts[..., 1].astype(np.float32)
    rows = x.shape[0] if x.ndim == 2 else 1  # remap wants each side of its map below 32767
    out = cv2.remap(img, x.reshape(rows, -1), y.reshape(rows, -1), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    out = out.reshape(x.shape + img.shape[2:])
    out[(x < 0) | (y < 0) | (x > w - 1) | (y > h - 1)] = np.nan
    return out


def _steps(s: np.ndarray) -> list[tuple[float, float]]:
    """The steps in a profile of step magnitudes ``s``: (position, height) per local maximum, its
    position the centroid of the differences around it (unbiased for a symmetric blur, and smooth in
    the sub-pixel phase where a peak pick on interpolated samples is not)."""
    if float(s.max()) <= 0:
        return []
    tol = 1e-3 * float(s.max())  # interpolated samples make plateaus, equal up to rounding
    floor = 0.05 * float(s.max())
    out, j, n = [], 0, len(s)
    while j < n:
        if s[j] < floor:
            j += 1
            continue
        while j + 1 < n and s[j + 1] >= s[j] - tol:  # to the top of this step
            j += 1
        lo = hi = j
        while lo > 0 and 0.25 * s[j] < s[lo - 1] <= s[lo] + tol:
            lo -= 1
        while hi + 1 < n and 0.25 * s[j] < s[hi + 1] <= s[hi] + tol:
            hi += 1
        w = s[lo:hi + 1]
        out.append((float(np.dot(w, np.arange(lo, hi + 1)) / w.sum()), float(s[j])))
        j = hi + 1
    return out


def _refine(gray: np.ndarray, quad: np.ndarray) -> np.ndarray | None:
    """Sub-pixel corners: per side, the strongest step across the edge at many points, a robust
    line through them, and the intersections of neighbouring lines."""
    g = cv2.GaussianBlur(gray.astype(np.float32), (0, 0), 0.8)
    c = quad.mean(0)
    lines = []
    for i in range(4):
        a, b = quad[i], quad[(i + 1) % 4]
        d = b - a
        length = np.hypot(*d)
        n = np.array([d[1], -d[0]]) / max(1e-6, length)
        if np.dot(c - (a + b) / 2, n) < 0:
            n = -n
        search = max(4.0, 0.03 * length)
        offsets = np.arange(-search, search + 0.25, 0.25)
        t = np.linspace(0.12, 0.88, max(16, int(length // 4)))[:, None]
        base = a + t * d
        prof = _sample(g, base[:, None, :] + offsets[None, :, None] * n)  # (points, offsets)
        step = np.nan_to_num(np.abs(np.diff(prof, axis=1)))
        peak = step.max(1)
        weak = max(1.0, 0.35 * float(np.median(peak)))  # where the picture matches the table: no edge to find
        found = []
        for k in range(len(base)):
            if peak[k] < weak:
                continue
            # The paper's edge is the strong step nearest the coarse outline: a white margin's inner
            # edge (or a content edge) lies further in and may well be the stronger step.
            steps = [(pos, height) for pos, height in _steps(step[k]) if height >= 0.3 * peak[k]]
            pos = min(steps, key=lambda st: abs(offsets[0] + 0.25 * st[0] + 0.125))[0]
            found.append(base[k] + (offsets[0] + 0.25 * pos + 0.125) * n)
        if len(found) < 6:
            return None
        vx, vy, x0, y0 = cv2.fitLine(np.array(found, np.float32), cv2.DIST_HUBER, 0, 0.01, 0.01).ravel()
        lines.append((np.array([x0, y0], np.float64), np.array([vx, vy], np.float64)))
    corners = []
    for i in range(4):  # corner i is where side i-1 (ending at it) meets side i (starting at it)
        (p, u), (q, v) = lines[i - 1], lines[i]
        m = np.array([u, -v]).T
        if abs(np.linalg.det(m)) < 1e-9:
            return None
        s, _ = np.linalg.solve(m, q - p)
        corners.append(p + s * u)
    corners = np.array(corners)
    if np.abs(corners - quad).max() > 0.05 * np.hypot(*(quad[2] - quad[0])) + 3:
        return None  # the refinement wandered off (a weak or missing edge): keep the coarse corners
    return corners


def find_print(rgb: np.ndarray) -> Print | None:
    """The printed picture in an RGB frame (H, W, 3) uint8, or None when nothing stands out."""
    h, w = rgb.shape[:2]
    if min(h, w) < 48:
        return None
    scale = min(1.0, WORK_SIDE / max(h, w))
    small = rgb if scale == 1.0 else cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    gray_small = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    # Contrast is judged on a smoothed copy: pixel noise differs everywhere, a print's edge stands out.
    soft = cv2.GaussianBlur(small.astype(np.float32), (0, 0), 2)
    sh, sw = gray_small.shape
    edge = 0.01 * min(sh, sw)
    best = None
    for quad, extended in _candidates(gray_small, small):
        if (quad.min(0) < edge).any() or quad[:, 0].max() > sw - 1 - edge or quad[:, 1].max() > sh - 1 - edge:
            continue  # touching the frame's border: a print cut off by the frame, or the frame itself
        contrast = _edge_contrast(soft, quad, every_side=extended)
        if contrast < MIN_CONTRAST:
            continue
        area = cv2.contourArea(quad.astype(np.float32))
        if best is None or area > best[0] * 1.02 or (area >= best[0] / 1.02 and contrast > best[1]):
            best = (area, contrast, quad)
    if best is None:
        return None
    # Working-copy pixel centres -> full-resolution pixel centres.
    quad = (best[2] + 0.5) / scale - 0.5
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    refined = _refine(gray, quad)
    return Print(order_corners(refined if refined is not None else quad), best[1])


def rectify(rgb: np.ndarray, corners: np.ndarray, size: tuple[int, int], trim: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Warp the quadrilateral ``corners`` (outer edges) onto an upright (h * k, w * k) grid, k chosen so
    the grid is at least as fine as the print in the frame; when the print carries a paper margin,
    warp the picture inside it instead (located to a fraction of a pixel, one resampling of the frame).

    Returns the grid and the corners (4, 2) of what it holds, in the frame's pixels: the picture
    inside the margin, or the whole print."""
    h, w = size
    sides = [np.hypot(*(corners[(i + 1) % 4] - corners[i])) for i in range(4)]
    k = int(np.clip(np.ceil(max(max(sides[0], sides[2]) / w, max(sides[1], sides[3]) / h)), 2, 32))
    gh, gw = h * k, w * k
    dst = np.array([[-0.5, -0.5], [gw - 0.5, -0.5], [gw - 0.5, gh - 0.5], [-0.5, gh - 0.5]], np.float32)
    m = cv2.getPerspectiveTransform(corners.astype(np.float32), dst)
    grid = cv2.warpPerspective(rgb, m, (gw, gh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inner = picture_inside_margin(grid) if trim else None
    if inner is None:
        return grid, np.asarray(corners, np.float64)
    taken = cv2.perspectiveTransform(inner[None].astype(np.float32), np.linalg.inv(m))[0].astype(np.float64)
    m = cv2.getPerspectiveTransform(taken.astype(np.float32), dst)
    return cv2.warpPerspective(rgb, m, (gw, gh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), taken


def picture_inside_margin(grid: np.ndarray, chunks: int = 16) -> np.ndarray | None:
    """The corners (4, 2), TL TR BR BL in the grid's pixels, of the picture inside a white paper margin
    of a rectified print, or None when it has no margin.

    A margin counts only when all four sides carry one: a bright band, even along the side (a lighting
    gradient allowed) and alike on all sides, ending in a straight inner edge, so that a picture whose
    own edge is a white sky on one side is left alone. Along each side, in short stretches, the inner
    edge is the strongest step after the outer edge's step has died down (a flat band between them);
    a line through the stretches where it lies at a consistent depth is that side's edge, and
    neighbouring lines meet at the corners."""
    g = cv2.GaussianBlur(grid.astype(np.float32), (0, 0), 0.7)
    gh, gw = g.shape[:2]
    views = [g, g[::-1], g.transpose(1, 0, 2), g.transpose(1, 0, 2)[::-1]]  # top, bottom, left, right: lines first
    picks = []  # per side: (position along, depth) of the inner edge, stretch by stretch
    for view in views:
        depth_cap, length = int(MAX_MARGIN * view.shape[0]), view.shape[1]
        step = np.linalg.norm(np.diff(view[:depth_cap + 1], axis=0), axis=2)  # (depth, along): step d lies at depth d + 0.5
        bounds = np.linspace(0.08 * length, 0.92 * length, chunks + 1).astype(int)
        pts = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            prof = step[:, lo:hi].mean(1)
            noise = float(np.median(prof))
            top = int(np.argmax(prof[:3]))  # the outer edge's step: the grid starts on the paper's edge
            end = top
            while end + 1 < len(prof) and prof[end] > 0.15 * prof[top] + noise and prof[end + 1] <= prof[end]:
                end += 1  # its blurred tail, down to where it dies down or the next step begins
            inner = [st for st in _steps(prof[end:]) if st[0] >= 1]
            if not inner:
                continue
            # The first clear step after the band: the picture's own cell edges lie further in.
            strongest = max(st[1] for st in inner)
            clear = [st for st in inner if st[1] >= max(3 * noise, 0.25 * strongest)]
            if not clear:
                continue
            pos, height = clear[0]
            pos += end
            if float(prof[end:int(pos) + 1].min()) < 0.5 * height:  # a flat band of paper before it
                pts.append(((lo + hi - 1) / 2, pos + 0.5))
        picks.append(np.array(pts).reshape(-1, 2))

    def support(pts: np.ndarray, depth: float) -> np.ndarray:
        return pts[np.abs(pts[:, 1] - depth) <= max(1.5, 0.12 * depth)]

    # The margin is the shallowest depth that many stretches agree on, on three sides at least (a print
    # centres its picture, so its margins are about equal): where the picture's own edge matches the
    # paper, a stretch finds a cell edge further in instead, and a side whose picture is all white
    # there (a sky) finds none.
    fits = None
    for depth in sorted(np.concatenate([p[:, 1] for p in picks])):
        near = [support(p, depth) for p in picks]
        if depth >= 2 and sum(len(n) >= chunks // 4 for n in near) >= 3:
            fits = [tuple(np.polyfit(n[:, 0], n[:, 1], 1)[::-1]) if len(n) >= chunks // 4 else None for n in near]
            break
    if fits is None:
        return None
    # (offset, slope) per side; a side without its own edge takes its opposite side's depth.
    fits = [f if f is not None else (fits[i ^ 1][0] + fits[i ^ 1][1] * (views[i].shape[1] - 1) / 2, 0.0)
            for i, f in enumerate(fits)]
    levels, colours = [], []
    for view, (offset, slope) in zip(views, fits):
        # The band must be paper: bright, and even along the side (a lighting gradient allowed).
        length = view.shape[1]
        mid = offset + slope * (length - 1) / 2
        band = view[max(1, int(round(mid / 2)))]
        trend = cv2.blur(band[None], (max(3, length // 8), 1))[0]
        if float(np.median(band)) < 120 or np.percentile(np.abs(band - trend).max(1), 90) > 20:
            return None
        levels.append(float(np.median(band)))
        colours.append(np.median(band, 0))
    if max(levels) - min(levels) > 45:
        return None
    # One sheet of paper has one hue on all four sides, whatever the light's brightness gradient; a
    # picture whose own light border passes the tests above (a pale pink top, a beige side) does not.
    chroma = np.array(colours) / np.maximum(1.0, np.sum(colours, axis=1, keepdims=True))
    if float(np.abs(chroma[:, None] - chroma[None]).max()) > MAX_MARGIN_HUE_SPREAD:
        return None
    # Lines in the grid's pixels: top y = a + b x, bottom y = gh - 1 - (a + b x), left x = a + b y, right likewise.
    (at, bt), (ab, bb), (al, bl), (ar, br) = fits

    def meet(a1, b1, flip1, a2, b2, flip2):  # horizontal line y(x) meets vertical line x(y)
        # y = c1 + d1 x (top: c1 = a1, d1 = b1; bottom: c1 = gh - 1 - a1, d1 = -b1), x = c2 + d2 y likewise.
        c1, d1 = (gh - 1 - a1, -b1) if flip1 else (a1, b1)
        c2, d2 = (gw - 1 - a2, -b2) if flip2 else (a2, b2)
        x = (c2 + d2 * c1) / (1 - d1 * d2)
        return x, c1 + d1 * x

    return np.array([meet(at, bt, False, al, bl, False), meet(at, bt, False, ar, br, True),
                     meet(ab, bb, True, ar, br, True), meet(ab, bb, True, al, bl, False)], np.float64)
