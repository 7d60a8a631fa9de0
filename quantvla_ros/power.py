"""Power and energy-per-chunk readings from whatever meter the machine has, named honestly.

Sources, tried in this order by `auto`:
- `nvml`: NVIDIA desktop/datacenter GPUs through pynvml (if importable): the total-energy
  counter (mJ, Volta and newer), else instantaneous board power (mW).
- `ina3221`: Jetson power monitor rails in sysfs (hwmon `in*_input` mV x `curr*_input` mA,
  or the older iio `in_power*_input` mW); the VDD_IN rail when labelled, else all rails summed.
- `rapl`: x86 CPU package energy counters in /sys/class/powercap (uJ, wraps at
  max_energy_range_uj), summed over packages.
With none of them the source is "unavailable" and no number is invented.
"""

from __future__ import annotations

import glob
import os
import time

SOURCES = ("auto", "nvml", "ina3221", "rapl", "none")


class PowerSource:
    """Either `energy_j()` (a cumulative counter) or `power_w()` (instantaneous) is real."""

    name = "unavailable"
    has_energy_counter = False

    def energy_j(self) -> float:
        raise NotImplementedError

    def power_w(self) -> float | None:
        return None


class Unavailable(PowerSource):
    pass


class NvmlSource(PowerSource):
    def __init__(self, index: int = 0):
        import pynvml  # optional: only where nvidia-ml-py is installed

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        gpu = pynvml.nvmlDeviceGetName(self._handle)
        gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
        self.name = f"nvml:{gpu}"
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self.has_energy_counter = True
        except pynvml.NVMLError:
            self.has_energy_counter = False

    def energy_j(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0

    def power_w(self) -> float | None:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0


def _read_number(path: str) -> float:
    with open(path) as f:
        return float(f.read().strip())


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


class Ina3221Source(PowerSource):
    """Jetson rails; `rails` is a list of (label, callable returning watts)."""

    def __init__(self, root: str = "/"):
        rails = []
        for hwmon in sorted(glob.glob(os.path.join(root, "sys/class/hwmon/hwmon*"))):
            if _read_text(os.path.join(hwmon, "name")) != "ina3221":
                continue
            for volt in sorted(glob.glob(os.path.join(hwmon, "in[0-9]*_input"))):
                ch = os.path.basename(volt)[2 : -len("_input")]
                curr = os.path.join(hwmon, f"curr{ch}_input")
                if not os.path.exists(curr):
                    continue
                label = _read_text(os.path.join(hwmon, f"in{ch}_label")) or f"in{ch}"
                rails.append((label, lambda v=volt, c=curr: _read_number(v) * _read_number(c) / 1e6))
        iio = os.path.join(root, "sys/bus/i2c/drivers/ina3221x/*/iio:device*")
        for dev in sorted(glob.glob(iio)):
            for pw in sorted(glob.glob(os.path.join(dev, "in_power[0-9]*_input"))):
                ch = os.path.basename(pw)[len("in_power") : -len("_input")]
                label = _read_text(os.path.join(dev, f"rail_name_{ch}")) or f"rail{ch}"
                rails.append((label, lambda p=pw: _read_number(p) / 1000.0))
        if not rails:
            raise FileNotFoundError("no INA3221 rails under sysfs")
        vdd_in = [r for r in rails if r[0].upper() in ("VDD_IN", "POM_5V_IN")]
        self._rails = vdd_in or rails
        self.name = "ina3221:" + "+".join(label for label, _ in self._rails)

    def power_w(self) -> float | None:
        return sum(read() for _, read in self._rails)


class RaplSource(PowerSource):
    has_energy_counter = True

    def __init__(self, root: str = "/"):
        zones = [
            z
            for z in sorted(glob.glob(os.path.join(root, "sys/class/powercap/*rapl*:*")))
            if z.count(":") == 1 and os.path.exists(os.path.join(z, "energy_uj"))
        ]
        if not zones:
            raise FileNotFoundError("no RAPL package zones under /sys/class/powercap")
        self._zones = []
        for z in zones:
            _read_number(os.path.join(z, "energy_uj"))  # raises when unreadable (permissions)
            wrap = os.path.join(z, "max_energy_range_uj")
            self._zones.append((z, _read_number(wrap) if os.path.exists(wrap) else 2.0**32))
        self._last = [None] * len(self._zones)
        self._total = 0.0
        self.name = "rapl:" + "+".join(
            _read_text(os.path.join(z, "name")) or os.path.basename(z) for z, _ in self._zones
        )

    def energy_j(self) -> float:
        """Monotonic joules since construction, unwrapping each zone's counter."""
        for i, (zone, wrap) in enumerate(self._zones):
            uj = _read_number(os.path.join(zone, "energy_uj"))
            if self._last[i] is not None:
                delta = uj - self._last[i]
                self._total += (delta if delta >= 0 else delta + wrap) / 1e6
            self._last[i] = uj
        return self._total


def detect_power_source(preference: str = "auto", device: str = "cpu", root: str = "/") -> tuple[PowerSource, str]:
    """(source, note): the first working source allowed by `preference`; note says why not."""
    if preference not in SOURCES:
        raise ValueError(f"power_source {preference!r} is not one of {', '.join(SOURCES)}")
    order = {"auto": ("nvml", "ina3221", "rapl"), "none": ()}.get(preference, (preference,))
    reasons = []
    for kind in order:
        try:
            if kind == "nvml":
                if not device.startswith("cuda"):
                    raise RuntimeError("model is not on a CUDA device")
                index = int(device.split(":")[1]) if ":" in device else 0
                return NvmlSource(index), ""
            if kind == "ina3221":
                return Ina3221Source(root), ""
            return RaplSource(root), ""
        except Exception as exc:  # noqa: BLE001 - any failure just means "not this source"
            reasons.append(f"{kind}: {type(exc).__name__}: {exc}")
    return Unavailable(), "; ".join(reasons) or "disabled by parameter power_source"


class EnergyMeter:
    """Energy and mean power over an interval (one chunk), from a counter or two samples."""

    def __init__(self, source: PowerSource, clock=time.perf_counter):
        self.source = source
        self._clock = clock

    @property
    def available(self) -> bool:
        return not isinstance(self.source, Unavailable)

    def start(self):
        if not self.available:
            return None
        try:
            reading = self.source.energy_j() if self.source.has_energy_counter else self.source.power_w()
        except Exception:  # noqa: BLE001 - a meter hiccup must not stop inference
            return None
        return self._clock(), reading

    def stop(self, token) -> tuple[float, float] | None:
        """(energy_j, mean_power_w) since `token`, or None when unmeasurable."""
        if token is None:
            return None
        t0, r0 = token
        try:
            dt = max(self._clock() - t0, 1e-9)
            if self.source.has_energy_counter:
                energy = self.source.energy_j() - r0
                return energy, energy / dt
            mean_w = 0.5 * (r0 + self.source.power_w())
            return mean_w * dt, mean_w
        except Exception:  # noqa: BLE001
            return None
