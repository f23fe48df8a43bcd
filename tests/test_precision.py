"""Precision: what `auto` picks on each kind of machine, and both paths train (fp32, bf16 autocast with fp32
master weights)."""

import json
from pathlib import Path

import pytest
import torch

from rto import runtime
from rto.runtime import cpu_has_native_bf16, cpu_vendor, resolve_precision
from rto.stages.dpo import DPOConfig, run


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_a_cpu_follows_native_bf16(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_precision("auto") == expected
    # an explicit precision is kept whatever the machine can do
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"


@pytest.mark.parametrize("gpu_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_a_gpu_follows_the_gpu_not_the_cpu(monkeypatch, gpu_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: not gpu_bf16)
    assert resolve_precision("auto") == expected


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="auto, fp32 or bf16, got 'fp16x'"):
        resolve_precision("fp16x")


def _fake_cpuinfo(monkeypatch, text: str | None):
    """Make Path('/proc/cpuinfo').read_text() return `text` (None: raise OSError as an unreadable file)."""
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) != "/proc/cpuinfo":
            return real(self, *args, **kwargs)
        if text is None:
            raise PermissionError("no access")
        return text

    monkeypatch.setattr(Path, "read_text", read_text)


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx2 avx512f avx512bw avx512_bf16", True),
    ("fpu sse2 avx2 amx_bf16 amx_tile", True),
    ("fpu sse2 avx2 avx512f avx512bw avx512_vnni", False),  # AVX512 without its bf16 extension
    ("", False),
])
def test_cpu_has_native_bf16_reads_the_cpu_flags(monkeypatch, flags, expected):
    _fake_cpuinfo(monkeypatch, f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16() is expected


def test_cpu_has_native_bf16_is_false_when_cpuinfo_cannot_be_read(monkeypatch):
    _fake_cpuinfo(monkeypatch, None)
    assert cpu_has_native_bf16() is False


@pytest.mark.parametrize("text, expected", [
    ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n", "GenuineIntel"),
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n", "AuthenticAMD"),
    ("processor\t: 0\nBogoMIPS\t: 50.00\n", ""),  # (an Arm CPU has no vendor_id line)
    (None, ""),  # unreadable
])
def test_cpu_vendor_reads_the_vendor_id(monkeypatch, text, expected):
    _fake_cpuinfo(monkeypatch, text)
    assert cpu_vendor() == expected


def test_auto_precision_from_cpu_flags_end_to_end(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fake_cpuinfo(monkeypatch, "flags\t\t: avx2 amx_bf16\n")
    assert resolve_precision("auto") == "bf16"
    _fake_cpuinfo(monkeypatch, "flags\t\t: avx2 fma\n")
    assert resolve_precision("auto") == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("native_bf16", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_dpo_steps_in_both_precisions(monkeypatch, tmp_path, tiny_model, precision, native_bf16):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Describe item {i}.", "chosen": "A lovely, great thing.",
                                         "rejected": "A sad, bad thing.", "chosen_ended": True,
                                         "rejected_ended": i % 2 == 0}) + "\n" for i in range(8)))
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    out = tmp_path / precision
    summary = run(DPOConfig(out=str(out), model=tiny_model, pairs=str(pairs), batch_size=4, epochs=1, lr=1e-3,
                            eval_fraction=0.25, precision=precision, train_layers=2, progress=False))
    assert summary["steps"] == 2
    from safetensors.torch import load_file

    weights = load_file(out / "model" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights stay fp32
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # bf16 asked for on a CPU that only emulates it: the log says so (and what auto would pick)
    emulated = "bf16 on a CPU without native bf16" in (out / "log.txt").read_text()
    assert emulated == (precision == "bf16" and not native_bf16)
