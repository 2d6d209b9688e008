"""`kvstore ring --png/--svg`: a picture of the token ring drawn with matplotlib. Belongs here: the
layout of that one figure (ranges as coloured arcs, a legend of ownership, a key's replica walk).

matplotlib is an optional dependency (`kvstore[plot]`), imported only when a picture is asked for,
and drawn through the Agg canvas without pyplot, so nothing global (backend, open figures) changes.
"""
from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Any

from kvstore.core.ring import TOKEN_SPACE, Ring, Token, key_token, range_size

FORMATS = ("png", "svg")
DPI = 150  # ~1,650 x 1,200 pixels for 11 x 8 inches: sharp on a laptop screen, ~300 KB
_FADED_ALPHA = 0.22  # nodes outside the key's preference list, so its replicas stand out
_KEY_COLOUR = "#222222"
_QUARTERS = ["0", "2⁶²", "2⁶³", "3·2⁶²"]
_CLEAR = {"facecolor": "white", "edgecolor": "none", "pad": 1.0}  # labels stay readable on lines


def draw_ring(ring: Ring, path: Path, fmt: str, key: bytes | None = None, n: int = 3) -> None:
    """Draw `ring` to `path` as `fmt` ("png" or "svg"): each node's ranges as arcs in its own
    colour, token 0 at the top and clockwise as in the preference-list walk, and a legend of
    primary and n-replica ownership. With `key`: its token, its n replicas in full colour (the
    others faded) and a strip zooming in on the walk that picks them."""
    if fmt not in FORMATS:
        raise ValueError(f"picture format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not len(ring):
        raise ValueError("the ring has no nodes to draw")
    mpl = _matplotlib()
    figure = mpl.figure.Figure(figsize=(11, 8))
    mpl.backends.backend_agg.FigureCanvasAgg(figure)
    colours = _colours(mpl, ring.node_ids)
    preference = ring.preference_list(key, n) if key is not None else []
    if key is None:
        circle = figure.add_axes((0.02, 0.04, 0.62, 0.86))
    else:
        circle = figure.add_axes((0.02, 0.27, 0.62, 0.66))
        strip = figure.add_axes((0.07, 0.07, 0.88, 0.13))
        _draw_walk(mpl, strip, ring, key, preference, colours)
    _draw_circle(mpl, circle, ring, key, preference, colours)
    _draw_legend(mpl, figure, ring, n, preference, colours)
    title = (f"Token ring: {_count(len(ring), 'node')}, {_count(len(ring.ranges()), 'range')}, "
             f"digest {ring.digest()[:12]}")
    figure.suptitle(title, x=0.02, ha="left", fontsize=14, fontweight="bold")
    warning = ring.warning_for(n)
    if warning:
        figure.text(0.98, 0.005, f"warning: {warning}", ha="right", va="bottom", fontsize=8,
                    color="#a03000")
    # Text stays text in SVG (searchable, and the legend names the nodes); fixed ids and no date
    # make the file reproducible.
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "kvstore-ring"}):
        # A tight box takes in a legend that outgrew the figure (many nodes, long node ids).
        figure.savefig(Path(path), format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.25,
                       metadata={"Date": None} if fmt == "svg" else None)


def _matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.backends.backend_agg
        import matplotlib.figure
        import matplotlib.patches
        import matplotlib.ticker
    except ImportError as exc:
        raise RuntimeError(
            "drawing the ring needs matplotlib, which is not installed: "
            "pip install 'kvstore[plot]'"
        ) from exc
    return matplotlib


def _colours(mpl: Any, node_ids: tuple[str, ...]) -> dict[str, Any]:
    count = len(node_ids)
    if count <= 10:
        palette = list(mpl.colormaps["tab10"].colors)
    elif count <= 20:
        palette = list(mpl.colormaps["tab20"].colors)
    else:
        palette = [mpl.colormaps["turbo"](i / count) for i in range(count)]
    return {node_id: palette[i] for i, node_id in enumerate(node_ids)}


def _angle(token: Token) -> float:
    """Degrees counter-clockwise from +x, so token 0 is at the top and tokens grow clockwise."""
    return 90.0 - 360.0 * token / TOKEN_SPACE


def _draw_circle(
    mpl: Any, ax: Any, ring: Ring, key: bytes | None, preference: list[str], colours: dict
) -> None:
    patches = mpl.patches
    for start, end, owner in ring.ranges():
        extent = 360.0 * range_size(start, end) / TOKEN_SPACE
        faded = bool(preference) and owner not in preference
        ax.add_patch(patches.Wedge(
            (0, 0), 1.0, _angle(end), _angle(end) + extent, width=0.24,
            facecolor=colours[owner], alpha=_FADED_ALPHA if faded else 1.0,
            edgecolor="white", linewidth=0.25,
        ))
    for quarter, label in enumerate(_QUARTERS):
        theta = math.radians(90 - 90 * quarter)
        ax.plot([1.02 * math.cos(theta), 1.07 * math.cos(theta)],
                [1.02 * math.sin(theta), 1.07 * math.sin(theta)], color="#555555", linewidth=1)
        ax.text(1.14 * math.cos(theta), 1.14 * math.sin(theta), label, ha="center", va="center",
                fontsize=10, color="#555555")
    tokens = sum(len(node.tokens) for node in ring.nodes.values())
    centre = f"{_count(len(ring), 'node')}\n{_count(tokens, 'token')}"
    if key is not None:
        token = key_token(key)
        theta = math.radians(_angle(token))
        ax.annotate(
            "", xy=(0.74 * math.cos(theta), 0.74 * math.sin(theta)), xytext=(0, 0),
            arrowprops={"arrowstyle": "-|>", "color": _KEY_COLOUR, "linewidth": 1.6},
        )
        ax.plot([0], [0], marker="o", color=_KEY_COLOUR, markersize=4)
        centre = f"key {_show_key(key)}\ntoken {token:#018x}"
        replicas = "replicas: " + ", ".join(preference)
        if len(replicas) <= 40:  # longer lists would cross the ring; the legend has them anyway
            centre += "\n" + replicas
        below = math.sin(theta) > 0  # keep the text clear of the arrow
        ax.text(0, -0.24 if below else 0.24, centre, ha="center", va="center", fontsize=9.5,
                linespacing=1.5)
    else:
        ax.text(0, 0, centre, ha="center", va="center", fontsize=13, linespacing=1.5)
    ax.set_xlim(-1.22, 1.22)
    ax.set_ylim(-1.22, 1.22)
    ax.set_aspect("equal")
    ax.axis("off")


def _draw_legend(
    mpl: Any, figure: Any, ring: Ring, n: int, preference: list[str], colours: dict
) -> None:
    primary, replicas = ring.ownership(), ring.replica_ownership(n)
    width = max(4, *(len(node_id) for node_id in ring.node_ids))
    # The column header is an entry with an invisible handle, so it lines up with the rows.
    header = f"{'node':<{width}} {'primary':>7} {f'n={n}':>7} {'tokens':>6}"
    handles = [mpl.patches.Patch(visible=False, label=header + ("  replica" if preference else ""))]
    for node_id in ring.node_ids:
        rank = preference.index(node_id) + 1 if node_id in preference else 0
        label = (f"{node_id:<{width}} {primary[node_id]:7.2%} {replicas[node_id]:7.2%} "
                 f"{len(ring.nodes[node_id].tokens):6d}" + (f"  #{rank}" if rank else ""))
        faded = bool(preference) and not rank
        handles.append(mpl.patches.Patch(facecolor=colours[node_id], label=label,
                                         alpha=_FADED_ALPHA if faded else 1.0))
    rows_per_column = 24
    columns = 1 + (len(handles) - 1) // rows_per_column
    legend = figure.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(0.64, 0.9), ncols=columns,
        frameon=False, handlelength=1.4, prop={"family": "monospace", "size": 10},
    )
    legend.get_texts()[0].set_color("#555555")  # not bold: bold glyphs are wider, columns shift
    legend.set_gid("legend")
    # The note goes under the legend, wherever the legend's rows end.
    box = legend.get_window_extent(figure.canvas.get_renderer())
    legend_bottom = figure.transFigure.inverted().transform((0, box.y0))[1]
    note = ("primary: share of the token space owned\n"
            f"n={n}: share of keys replicated on the node")
    if preference:
        note += "\n#: position in the key's preference list"
    figure.text(0.655, legend_bottom - 0.03, note, fontsize=8.5,
                color="#555555", va="top", linespacing=1.5)


def _draw_walk(
    mpl: Any, ax: Any, ring: Ring, key: bytes, preference: list[str], colours: dict
) -> None:
    """A strip of the ranges from the key's token clockwise to its last replica's token; x is the
    clockwise distance from the key's token as a share of the ring."""
    token = key_token(key)
    ranges = ring.ranges()
    ends = [end for _, end, _ in ranges]
    first = bisect.bisect_left(ends, token) % len(ranges)
    picked: dict[str, Token] = {}
    walked: list[tuple[Token, Token, str]] = []
    for step in range(len(ranges)):
        start, end, owner = ranges[(first + step) % len(ranges)]
        walked.append((start, end, owner))
        if owner in preference and owner not in picked:
            picked[owner] = end
        if len(picked) == len(preference):
            break
    if len(walked) < len(ranges):
        walked.append(ranges[(first + len(walked)) % len(ranges)])  # context past the last pick

    # x: percent of the ring clockwise from the key's token; the key's own range starts before it.
    left = -100.0 * ((token - walked[0][0]) % TOKEN_SPACE) / TOKEN_SPACE
    x = left
    ends_x: dict[Token, float] = {}
    for start, end, owner in walked:
        width = 100.0 * range_size(start, end) / TOKEN_SPACE
        ax.barh(0, width, left=x, height=0.5, color=colours[owner], edgecolor="white",
                linewidth=1.2, alpha=1.0 if owner in picked else _FADED_ALPHA)
        x += width
        ends_x.setdefault(end, x)
    right = x
    ax.axvline(0, color=_KEY_COLOUR, linewidth=1.5, linestyle="--")
    ax.text(0, -0.45, f"key {_show_key(key)}", ha=_align(0, left, right), va="top", fontsize=9,
            bbox=_CLEAR)
    for rank, node_id in enumerate(preference, 1):
        if node_id not in picked:
            continue
        x = ends_x[picked[node_id]]
        label = f"#{rank} {node_id}" + (" (primary)" if rank == 1 else "")
        ax.plot([x], [0.25], marker="v", color=_KEY_COLOUR, markersize=6)
        ax.text(x, 0.35 + 0.3 * ((rank - 1) % 2), label, ha=_align(x, left, right),
                va="bottom", fontsize=9, bbox=_CLEAR)
    ax.set_xlim(left, right)
    ax.set_ylim(-1.0, 1.1)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("clockwise from the key's token (% of the ring); "
                  "▼ the token where the walk picks each replica", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda x, _: f"{x:+.2f}%"))
    ax.set_title("the key's replica walk", loc="left", fontsize=10, fontweight="bold")


def _show_key(key: bytes) -> str:
    text = key.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= 32 else text[:31] + "…")


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _align(x: float, left: float, right: float) -> str:
    """Horizontal alignment that keeps a label near either end of the strip inside it."""
    share = (x - left) / (right - left)
    return "left" if share < 0.12 else "right" if share > 0.88 else "center"
