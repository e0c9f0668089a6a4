"""The machine a run (or a figure set) was made on, as far as it decides the bits of a result.

The same seed and config give bitwise identical runs only where the same kernels run: the same
CPU model (its ISA decides which oneDNN / MKL / ATen kernels are dispatched - an Intel Xeon with
AVX512-FP16 and an AMD EPYC sum in different orders), the same torch (and its oneDNN, MKL,
cuDNN), the same precision and thread count. This record names those; ``device_name`` in older
run configs (``x86_64``) named none of them. Elsewhere the numbers agree only statistically
(README, "Reproducing a figure set"; ``msr reproduce``).

Lowest layer, like msr.catalog: the trainer (msr.training.run) and the manifest writer
(msr.analysis.manifest) both call it. torch is imported lazily, and only when asked for.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

# CPU flags that change which kernels run (bf16/fp16 dot products, AMX tiles), plus the
# AVX2/AVX-512 baseline for context. Other flags (sse4, aes, ...) are the same on every CPU
# torch supports and only lengthen the record.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
# environment variables that override the kernels or the code path torch and its libraries pick
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR",
              "MKL_ENABLE_INSTRUCTIONS", "CUBLAS_WORKSPACE_CONFIG")
# the fields that must agree for a bitwise rerun (with the run's precision, threads and device,
# which its config records); the rest of the record is context
BITWISE_FIELDS = ("cpu_model", "cpu_flags", "torch", "cpu_capability", "onednn", "mkl", "cuda",
                  "cudnn", "gpu", "env")
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo(path: Path | None = None) -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo ({} where there is none)."""
    try:
        text = (path or CPUINFO).read_text(errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break  # the end of the first processor's block
            continue
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_model(info: dict[str, str] | None = None) -> str | None:
    """"model name" on x86 (e.g. ``AMD EPYC 7763 64-Core Processor``); the implementer/part
    numbers on ARM; else what the platform module knows."""
    info = _cpuinfo() if info is None else info
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if info.get(key):
            return info[key]
    if info.get("CPU implementer"):
        return f"ARM implementer {info['CPU implementer']} part {info.get('CPU part', '?')}"
    return platform.processor() or None


def cpu_flags(info: dict[str, str] | None = None) -> list[str]:
    """The :data:`KERNEL_FLAGS` this CPU has, in that order."""
    info = _cpuinfo() if info is None else info
    have = set((info.get("flags") or info.get("Features") or "").split())
    return [flag for flag in KERNEL_FLAGS if flag in have]


def _library_versions(torch) -> dict[str, str | None]:
    """oneDNN and MKL versions from torch's build record (torch has no attribute for either)."""
    try:
        config = torch.__config__.show()
    except Exception:  # noqa: BLE001 - a build record is context, never worth a failed run
        return {"onednn": None, "mkl": None}
    onednn = re.search(r"(?:oneDNN|MKL-DNN) v(\S+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    return {"onednn": onednn.group(1) if onednn else None, "mkl": mkl.group(1) if mkl else None}


def machine_record(device: str | None = "cpu", *, with_torch: bool = True) -> dict[str, Any]:
    """What decides the bits of a result on this machine.

    ``device``: the run's device (``cpu``, ``cuda``, ``cuda:1``); for ``cuda`` the record
    names that GPU (CUDA must already be in use: the trainer's case). ``None``: no GPU looked
    at (the manifest writer's case: it starts no CUDA). ``with_torch=False`` leaves out the
    torch fields, for a process that has no reason to import torch.
    """
    info = _cpuinfo()
    record: dict[str, Any] = {
        "cpu_model": cpu_model(info),
        "cpu_flags": cpu_flags(info),
        "cpu_count": os.cpu_count(),
        "arch": platform.machine() or None,
        "os": platform.system() or None,
        "python": platform.python_version(),
        "env": {key: os.environ[key] for key in KERNEL_ENV if key in os.environ},
    }
    if not with_torch:
        return record
    import torch

    record.update(torch=torch.__version__, cpu_capability=_cpu_capability(torch), **_library_versions(torch),
                  cuda=torch.version.cuda, cudnn=None, gpu=None, gpu_capability=None)
    if device is not None and str(device).startswith("cuda"):
        dev = torch.device(device)
        record.update(
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            gpu=torch.cuda.get_device_name(dev),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
        )
    return record


def _cpu_capability(torch) -> str | None:
    """ATen's dispatched CPU kernel level (``AVX512``, ``AVX2``, ``DEFAULT``)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def bitwise_key(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a machine record that must agree for a bitwise rerun; None if unknown."""
    if not record or not record.get("cpu_model"):
        return None
    return {field: record.get(field) for field in BITWISE_FIELDS}


def describe(record: dict[str, Any] | None) -> str:
    """One line for people: ``AMD EPYC 7763 (avx2 avx512f avx512_bf16), torch 2.4.1, oneDNN 3.4``."""
    if not record:
        return "unrecorded machine"
    if not record.get("cpu_model"):
        known = ", ".join(f"{k} {record[k]}" for k in ("device_name", "torch") if record.get(k))
        return f"unrecorded machine ({known})" if known else "unrecorded machine"
    flags = " ".join(record.get("cpu_flags") or []) or "no AVX2"
    text = f"{record['cpu_model']} ({flags})"
    if record.get("torch"):
        text += f", torch {record['torch']}"
    if record.get("onednn"):
        text += f", oneDNN {record['onednn']}"
    if record.get("gpu"):
        text += f", {record['gpu']} (CUDA {record.get('cuda')}, cuDNN {record.get('cudnn')})"
    if record.get("env"):
        text += ", " + " ".join(f"{k}={v}" for k, v in sorted(record["env"].items()))
    return text
