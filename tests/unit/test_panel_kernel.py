"""The CPU panel kernel against `F.linear`: every tile, panel and K-block edge, bias, odd shapes and strides,
for each instruction-set variant this CPU runs (AVX2 everywhere, AVX-512 where present); and its build:
cached once per source, and a machine that cannot build it falls back instead of failing."""

import pytest
import torch
import torch.nn.functional as F

from server.kernels import build
from server.kernels import panel as pk

kernel = pk.panel_kernel()
variants = pk.isa_variants()
pytestmark = pytest.mark.skipif(kernel is None, reason="no AVX2 CPU or C compiler here")


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 8, 9, 16, 33, 64, 130])
@pytest.mark.parametrize("out,inp", [(16, 8), (48, 576), (40, 130), (96, 1536), (7, 257)])
def test_matches_f_linear(isa, rows, out, inp):
    if isa not in variants:
        pytest.skip(f"this CPU does not run the {isa} variant")
    g = torch.Generator().manual_seed(rows * 1000 + out)
    weight, x = torch.randn(out, inp, generator=g), torch.randn(rows, inp, generator=g)
    got = variants[isa](x, pk.pack_panels(weight), out)
    assert got.shape == (rows, out)
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_the_entry_point_runs_the_widest_variant_here():
    weight, x = torch.randn(48, 300), torch.randn(13, 300)
    widest = variants["avx512" if "avx512" in variants else "avx2"]
    assert torch.equal(kernel(x, pk.pack_panels(weight), 48), widest(x, pk.pack_panels(weight), 48))


def test_bias_leading_dims_and_strided_rows():
    weight, bias = torch.randn(40, 64), torch.randn(40)
    wide = torch.randn(3, 5, 96)
    x = wide[..., 10:74]  # rows 96 floats apart, not contiguous
    torch.testing.assert_close(kernel(x, pk.pack_panels(weight), 40, bias), F.linear(x, weight, bias),
                               atol=1e-4, rtol=1e-4)


def test_no_rows_gives_an_empty_result():
    assert kernel(torch.empty(0, 32), pk.pack_panels(torch.randn(16, 32)), 16).shape == (0, 16)


def test_packing_pads_rows_with_zeros_and_keeps_every_weight():
    weight = torch.randn(20, 3)
    panels = pk.pack_panels(weight)
    assert panels.shape == (2, 3, 16)
    assert torch.equal(panels[0].t(), weight[:16])
    assert torch.equal(panels[1].t()[:4], weight[16:]) and not panels[1].t()[4:].any()


def test_a_build_is_reused_and_a_failed_build_falls_back(tmp_path, monkeypatch):
    source = build.SOURCES / "panel_linear.c"
    built = build.build_library(source, tmp_path)
    assert built is not None and built.parent == tmp_path
    stamp = built.stat().st_mtime_ns
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that always fails
    assert build.build_library(source, tmp_path) == built and built.stat().st_mtime_ns == stamp  # cached
    assert build.build_library(source, tmp_path / "elsewhere") is None
    assert list(tmp_path.glob("**/*.partial")) == []  # nothing half-written left behind
