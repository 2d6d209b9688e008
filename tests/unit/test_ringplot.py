"""`kvstore ring --png/--svg`: the ring picture is written, in either format, naming every node."""

import builtins
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvstore.core.ring import Ring, RingNode, allocate_tokens

pytest.importorskip("matplotlib")

from kvstore.cli.ringplot import draw_ring  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def five_node_ring() -> Ring:
    rng = random.Random(1)
    ring, nodes = None, []
    for i in range(1, 6):
        nodes.append(RingNode(f"node-{i}", f"127.0.0.1:{7000 + i}",
                              tokens=allocate_tokens(ring, 64, rng)))
        ring = Ring(nodes)
    return ring


def legend_texts(svg: Path) -> str:
    root = ET.parse(svg).getroot()
    legend = next(g for g in root.iter(f"{SVG}g") if g.get("id") == "legend")
    return "\n".join("".join(text.itertext()) for text in legend.iter(f"{SVG}text"))


@pytest.mark.parametrize("key", [None, b"user:42"])
def test_draw_ring_writes_a_png(tmp_path, key):
    path = tmp_path / "ring.png"
    draw_ring(five_node_ring(), path, "png", key=key)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


@pytest.mark.parametrize("key", [None, b"user:42"])
def test_draw_ring_svg_legend_names_every_node_with_its_share(tmp_path, key):
    ring = five_node_ring()
    path = tmp_path / "ring.svg"
    draw_ring(ring, path, "svg", key=key, n=3)
    assert path.stat().st_size > 10_000
    legend = legend_texts(path)
    for node_id, share in ring.ownership().items():
        assert node_id in legend
        assert f"{share:.2%}" in legend
    preference = ring.preference_list(key, 3) if key else []
    assert [f"#{rank}" in legend for rank in (1, 2, 3)] == [bool(key)] * 3
    assert all(node_id in path.read_text() for node_id in preference)


def test_draw_ring_output_is_reproducible(tmp_path):
    ring = five_node_ring()
    for fmt in ("png", "svg"):
        first, second = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
        draw_ring(ring, first, fmt, key=b"k")
        draw_ring(ring, second, fmt, key=b"k")
        assert first.read_bytes() == second.read_bytes()


def test_draw_ring_handles_a_one_token_ring_and_a_too_small_cluster(tmp_path):
    ring = Ring([RingNode("solo", "a", tokens=(5,))])
    path = tmp_path / "solo.svg"
    draw_ring(ring, path, "svg", key=b"any", n=3)
    assert "fewer than replication factor n=3" in path.read_text()


def test_draw_ring_rejects_unknown_formats_and_empty_rings(tmp_path):
    with pytest.raises(ValueError, match="png, svg"):
        draw_ring(five_node_ring(), tmp_path / "ring.gif", "gif")
    with pytest.raises(ValueError, match="no nodes"):
        draw_ring(Ring(), tmp_path / "ring.png", "png")


def test_missing_matplotlib_tells_the_user_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def without_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    with pytest.raises(RuntimeError, match=r"pip install 'kvstore\[plot\]'"):
        draw_ring(five_node_ring(), tmp_path / "ring.png", "png")
