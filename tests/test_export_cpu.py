"""Exact on every x86 CPU: the u8 x s8 pair bound, the session option of 8-bit weights, the CPU's ISA.

ONNX Runtime's U8S8 kernels on x86 without VNNI (vpmaddubsw) add pairs of u8 x s8 products in int16 with
saturation. These tests assert what each kind of CPU guarantees: the `ort` grids cannot saturate (so default
session options are exact everywhere); a model that can (8-bit weights) records session.x64quantprecision
and every session asga opens sets it (exact everywhere); without it, only a VNNI CPU is exact.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from asga_deploy.checkpoint import load_finetuned  # noqa: E402
from asga_deploy.export.ort import ParityConfig, _cpuid, cpu_isa, session  # noqa: E402
from asga_deploy.export.run import ExportConfig, run_export  # noqa: E402
from asga_deploy.policy import Policy  # noqa: E402
from asga_deploy.quant import QuantConv2d  # noqa: E402
from asga_deploy.targets import INT16_MAX, TARGETS, pair_saturates  # noqa: E402

from .test_export_helpers import make_checkpoint, random_loader  # noqa: E402


def vpmaddubsw_dot(x_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """Dot products (rows of x with w) as the AVX2 U8S8 kernel forms them: int16-saturated pairs, then int32."""
    prod = x_u8.astype(np.int32)[:, : len(w_s8)] * w_s8.astype(np.int32)
    pairs = np.clip(prod[:, 0::2] + prod[:, 1::2], -INT16_MAX - 1, INT16_MAX)
    return pairs.sum(1)


def test_the_pair_bound_is_what_the_avx2_arithmetic_needs():
    rng = np.random.default_rng(0)
    x = rng.integers(200, 256, size=(1000, 64))
    w8 = rng.choice([-127, 127, 100, -100], size=64)
    exact = (x * w8).sum(1)
    assert (vpmaddubsw_dot(x, w8) != exact).any()  # 8-bit weights: wrong sums
    assert pair_saturates(127, 8, False)
    w7 = rng.choice([-63, 63], size=64)
    xs = np.full((1, 64), 255)
    assert np.array_equal(vpmaddubsw_dot(np.vstack([x, xs]), w7), (np.vstack([x, xs]) * w7).sum(1))
    assert not pair_saturates(63, 8, False) and not pair_saturates(63, 8, True)


def test_every_ort_grid_is_exact_with_default_session_options():
    ort = TARGETS["ort"]
    assert max(ort.weight_bits) == 7 and not ort.x64_precision_option
    for w in ort.weight_bits:
        for signed in (False, True):
            for a in ort.act_bits(signed):
                assert not pair_saturates(2 ** (w - 1) - 1, a, signed), (w, a, signed)
    assert ort.session_config(False) == {}
    assert "ort-w8" in ort.check(8, 8, False)  # the refusal says what to do instead
    assert TARGETS["ort-w8"].session_config(True) == {"session.x64quantprecision": "1"}


def test_cpu_isa_reads_cpuid():
    """The ISA comes from CPUID (what MLAS dispatches on), not from /proc/cpuinfo, which under an emulator or in
    some VMs describes another CPU."""
    isa = cpu_isa()
    assert isa["kind"] in ("VNNI", "AVX2, no VNNI", "x86, no AVX2") or not isa["x86"]
    assert isa["u8s8_pairs_saturate"] == (isa["x86"] and not isa["vnni"])
    assert isa["vnni"] == (isa["avx512_vnni"] or isa["avx_vnni"])
    if not isa["x86"] or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("CPUID is an x86-64 instruction")
    regs = _cpuid(0)
    if regs is None:  # no executable page here (a hardened kernel): cpu_isa then reads numpy and /proc/cpuinfo
        pytest.skip("this system does not map executable memory for CPUID")
    vendor = b"".join(r.to_bytes(4, "little") for r in (regs[1], regs[3], regs[2])).decode()
    assert vendor in ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls", "  Shanghai  ")
    leaf7 = _cpuid(7, 0)
    assert isa["source"] == "cpuid"
    assert isa["avx2"] <= bool(leaf7[1] >> 5 & 1)  # EBX bit 5: AVX2 (numpy also asks the OS for the state)
    assert isa["avx512_vnni"] <= bool(leaf7[2] >> 11 & 1)  # ECX bit 11: AVX512_VNNI


@pytest.fixture(scope="module")
def saturating_export(tmp_path_factory):
    """An ort-w8 tinynet whose conv2 has weight codes of +-127 and inputs that drive activations to 255."""
    tmp = tmp_path_factory.mktemp("sat")
    p, c, pol = make_checkpoint(tmp, "tinynet", 8, 8, "ort-w8")
    ckpt = torch.load(c, weights_only=True)
    model, *_ = load_finetuned(c, Policy.load(p))
    conv2 = model.conv2
    assert isinstance(conv2, QuantConv2d)
    with torch.no_grad():
        sign = torch.ones_like(conv2.weight)
        sign[:, :, :, 1] = -1  # every pair of neighbours alike or opposite: both signs of overflow
        conv2.weight.copy_(sign * 0.5)
        conv2.weight_quantizer.scale.fill_(0.5 / 127)
    ckpt["model"] = model.state_dict()
    torch.save(ckpt, c)
    loader = [(x.abs() * 4, y) for x, y in random_loader((1, 28, 28), 64)]
    rep = run_export(ExportConfig(str(p), str(c), out_dir=str(tmp / "o"), parity=ParityConfig(images=64)), loader=loader)
    return rep, loader


def test_saturating_model_records_the_option_and_is_exact_with_it(saturating_export):
    rep, loader = saturating_export
    assert rep["u8s8_saturating_layers"]["conv2"]["max_pair_sum"] == 2 * 255 * 127
    assert rep["ort_session_config"] == {"session.x64quantprecision": "1"}
    p = rep["parity"]
    assert p["session_config"] == {"session.x64quantprecision": "1"}
    assert p["bit_identical"] and p["steps_checked"]  # on every x86 CPU: the option makes the kernels exact
    sess = session(rep["onnx"])
    assert sess.get_session_options().get_session_config_entry("session.x64quantprecision") == "1"


def test_without_the_option_only_a_vnni_cpu_is_exact(saturating_export):
    rep, loader = saturating_export
    x = loader[0][0].numpy()
    with_option = session(rep["onnx"]).run(None, {"input": x})[0]
    default = session(rep["onnx"], config={}).run(None, {"input": x})[0]
    isa = cpu_isa()
    if isa["vnni"]:
        assert np.array_equal(default, with_option)
    elif isa["u8s8_pairs_saturate"]:  # x86 without VNNI: the pairs saturate (vpmaddubsw; under QEMU as an AVX2
        # EPYC the logits differed by up to 0.08), which is why the export records the option
        assert not np.array_equal(default, with_option), "expected U8S8 saturation without VNNI (docs/results-ort.md)"
