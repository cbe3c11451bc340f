"""Find a printed picture in a camera frame and rectify it (the ``print`` fit).

The print is the largest convex quadrilateral that stands out from its surroundings.
Candidates come from OpenCV contours of three segmentations of a working copy of the
frame (Canny edges; Otsu on grey; Otsu on the distance from the frame border's colour,
i.e. "not the table"), each reduced to a polygon with ``approxPolyDP``. A candidate
counts when the colour just inside its edges differs from just outside (a quadrilateral
drawn by table texture does not), and the largest one wins.

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


def _quad(contour: np.ndarray, h: int, w: int) -> np.ndarray | None:
    """The convex hull of a contour as a quadrilateral (4, 2), when it is one of a plausible size."""
    hull = cv2.convexHull(contour)
    area = cv2.contourArea(hull)
    if not MIN_AREA * h * w <= area <= MAX_AREA * h * w:
        return None
    peri = cv2.arcLength(hull, True)
    for eps in (0.01, 0.02, 0.035, 0.05, 0.08):
        poly = cv2.approxPolyDP(hull, eps * peri, True)
        if len(poly) < 4:
            return None
        if len(poly) == 4:
            # A quadrilateral that keeps most of the hull: not a triangle's corner cut off.
            if cv2.isContourConvex(poly) and cv2.contourArea(poly) >= 0.85 * area:
                return order_corners(poly.reshape(4, 2))
            return None
    return None


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


def _candidates(gray: np.ndarray, rgb: np.ndarray) -> list[np.ndarray]:
    """Convex quadrilaterals (4, 2) in working-copy coordinates from several segmentations."""
    h, w = gray.shape
    quads = []
    for mask, mode in _masks(gray, rgb):
        contours, _ = cv2.findContours(mask, mode, cv2.CHAIN_APPROX_SIMPLE)
        for cnt in contours:
            if cv2.contourArea(cv2.convexHull(cnt)) >= MIN_AREA * h * w:
                q = _quad(cnt, h, w)
                if q is not None:
                    quads.append(q)
    return quads


def _edge_contrast(soft: np.ndarray, quad: np.ndarray) -> float:
    """How much the print stands out: the colour distance between thin bands just inside and just
    outside each side (away from the corners), on a smoothed (h, w, 3) frame."""
    c = quad.mean(0)
    diffs = []
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
            s = step[k]
            if peak[k] < weak:
                continue
            # The paper's edge is the outermost strong step (content steps lie further in), located
            # as the centroid of that step's differences: unbiased for a symmetric blur, and smooth
            # in the sub-pixel phase where a peak pick on interpolated samples is not.
            tol = 1e-3 * s.max()  # interpolated samples make plateaus, equal up to rounding
            j = int(np.argmax(s >= 0.5 * s.max()))
            while j + 1 < len(s) and s[j + 1] >= s[j] - tol:  # to the top of that step
                j += 1
            lo = hi = j
            while lo > 0 and 0.25 * s[j] < s[lo - 1] <= s[lo] + tol:
                lo -= 1
            while hi + 1 < len(s) and 0.25 * s[j] < s[hi + 1] <= s[hi] + tol:
                hi += 1
            wts = s[lo:hi + 1]
            off = float(np.dot(wts, offsets[lo:hi + 1] + 0.125) / wts.sum())
            found.append(base[k] + off * n)
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
    for quad in _candidates(gray_small, small):
        if (quad.min(0) < edge).any() or quad[:, 0].max() > sw - 1 - edge or quad[:, 1].max() > sh - 1 - edge:
            continue  # touching the frame's border: a print cut off by the frame, or the frame itself
        contrast = _edge_contrast(soft, quad)
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
    the grid is at least as fine as the print in the frame, then trim a paper margin.

    Returns the grid and the corners (4, 2) of what it kept, in the frame's pixels: the picture
    inside the margin, or the whole print."""
    h, w = size
    sides = [np.hypot(*(corners[(i + 1) % 4] - corners[i])) for i in range(4)]
    k = int(np.clip(np.ceil(max(max(sides[0], sides[2]) / w, max(sides[1], sides[3]) / h)), 2, 32))
    gh, gw = h * k, w * k
    dst = np.array([[-0.5, -0.5], [gw - 0.5, -0.5], [gw - 0.5, gh - 0.5], [-0.5, gh - 0.5]], np.float32)
    m = cv2.getPerspectiveTransform(corners.astype(np.float32), dst)
    grid = cv2.warpPerspective(rgb, m, (gw, gh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    top, bottom, left, right = margin(grid) if trim else (0, 0, 0, 0)
    kept = np.array([[left - 0.5, top - 0.5], [gw - right - 0.5, top - 0.5],
                     [gw - right - 0.5, gh - bottom - 0.5], [left - 0.5, gh - bottom - 0.5]], np.float32)
    taken = cv2.perspectiveTransform(kept[None], np.linalg.inv(m))[0].astype(np.float64)
    return grid[top:gh - bottom, left:gw - right], taken


def margin(grid: np.ndarray) -> tuple[int, int, int, int]:
    """Rows/columns of white paper to trim from (top, bottom, left, right) of a rectified print.

    A margin counts only when all four sides carry one: a bright band whose colour is even along the
    side (a lighting gradient allowed) and alike on all sides, so a picture whose own edge is a white
    sky on one side is left alone. Each side is trimmed while its lines keep the band's colour,
    compared position by position (the light may change along a side, hardly across a thin margin)."""
    g = grid.astype(np.float32)
    gh, gw = g.shape[:2]
    r = max(1, min(gh, gw) // 64)  # the outermost r lines may hold a sliver of table: the band starts at r
    sides = [g, g[::-1], g.transpose(1, 0, 2), g.transpose(1, 0, 2)[::-1]]  # top, bottom, left, right: lines first
    bands = [s[r:2 * r].mean(0) for s in sides]  # (length, 3) each
    levels = [float(np.median(b)) for b in bands]
    for b in bands:
        trend = cv2.blur(b[None], (max(3, len(b) // 8), 1))[0]
        if float(np.median(b)) < 120 or np.percentile(np.abs(b - trend).max(1), 90) > 20:
            return 0, 0, 0, 0
    if max(levels) - min(levels) > 45:
        return 0, 0, 0, 0
    counts = []
    for side, band, cap in zip(sides, bands, (gh, gh, gw, gw)):
        # Per position along the side, how deep the paper colour reaches; a margin's inner edge is a
        # straight line (the same depth all along), a white sky around an object is not.
        lines = side[r:int(MAX_MARGIN * cap)]
        off = np.abs(lines - band[None]).max(2) > 30  # (depth, length)
        depth = np.where(off.any(0), off.argmax(0), len(lines)) + r
        mid = float(np.median(depth))
        if np.mean(np.abs(depth - mid) <= max(2.0, 0.15 * mid)) < 0.6:  # picture that matches the paper may deepen it here and there
            return 0, 0, 0, 0
        inner = np.abs(lines[:max(1, int(mid) - r - 2)] - band[None]).max(2)
        if np.percentile(inner, 90) > 15:  # paper is even up to a sharp inner edge; a smooth picture drifts
            return 0, 0, 0, 0
        counts.append(int(round(mid)))
    if min(counts) <= r + 1:  # nothing beyond the sliver skipped at the edge
        return 0, 0, 0, 0
    return tuple(counts)
