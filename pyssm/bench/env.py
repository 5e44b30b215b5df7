"""What a benchmark result records about where it ran: device, driver, versions, git sha; and
NVML readings (memory, power, clocks) while a measurement runs, when nvidia-ml-py is present."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import subprocess
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent.parent  # the checkout pyssm was installed from


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=SOURCE, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_sha() -> str | None:
    """The short sha of pyssm's source checkout, "+dirty" with uncommitted tracked changes;
    None for an installed copy outside git."""
    if not (SOURCE / ".git").exists():
        return None
    sha = _git("rev-parse", "--short=12", "HEAD")
    if sha and _git("status", "--porcelain", "--untracked-files=no"):
        sha += "+dirty"
    return sha


def device_slug(device: torch.device | None = None) -> str:
    """'nvidia-h200' for the GPU, 'cpu' otherwise: the profiles/ folder name."""
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _nvml():
    """The pynvml module, initialised, or None (not installed, or no NVIDIA driver)."""
    try:
        import pynvml  # nvidia-ml-py
        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def _version(package: str) -> str | None:
    """An installed distribution's version, None where it is not installed (read from its
    metadata, not by importing it)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    import pyssm

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "pyssm": pyssm.__version__,
           "pyssm_git": git_sha(), "pyssm_extension": pyssm.extension_status(),
           "cpu": platform.processor() or platform.machine(),
           "cpu_threads": torch.get_num_threads()}
    try:  # (the module's own version: torch's nightlies ship it as pytorch-triton)
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    for package in ("numpy", "timm", "transformers"):
        env[package] = _version(package)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   sms=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
        nvml = _nvml()
        env["driver"] = None
        if nvml is not None:
            driver = nvml.nvmlSystemGetDriverVersion()
            env["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    return env


class NvmlSampler:
    """Polls the GPU through NVML on a thread while a measurement runs: the peak of the memory
    the driver reports in use (every process and context, above its level at the start), the
    mean power draw and the mean SM clock. Without NVML it records nothing."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.nvml = _nvml() if device.type == "cuda" else None
        self.interval_s = interval_s
        self.samples: list[tuple[int, float, float]] = []
        if self.nvml is not None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
        self._stop = threading.Event()

    def _sample(self):
        n = self.nvml
        return (n.nvmlDeviceGetMemoryInfo(self.handle).used,
                n.nvmlDeviceGetPowerUsage(self.handle) / 1e3,
                float(n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM)))

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.nvml is not None:
            self.base = self._sample()[0]
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.nvml is not None:
            self._stop.set()
            self.thread.join()

    def result(self) -> dict:
        if not self.samples:
            return {}
        used, power, clock = zip(*self.samples)
        return {"nvml_peak_mb": (max(used) - self.base) / 2**20,
                "power_w": sum(power) / len(power), "sm_clock_mhz": sum(clock) / len(clock)}
