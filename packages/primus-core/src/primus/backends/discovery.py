"""Find installed backends through the `primus.backends` entry-point group.

Reads distribution metadata only; importing a backend's top-level package must not import its
framework (a test checks `sys.modules`). `PRIMUS_DISABLE_BACKENDS=a,b` hides backends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from primus.backends.spec import BackendSpec
from primus.errors import ConfigError
from primus.suggest import did_you_mean

GROUP = "primus.backends"

#: Backends this project publishes, for "pip install" hints when one is missing.
KNOWN_BACKENDS = {
    "megatron": "primus-megatron",
    "torchtitan": "primus-torchtitan",
    "maxtext": "primus-maxtext",
    "hf": "primus-hf",
}


@dataclass(frozen=True)
class Backend:
    spec: BackendSpec
    distribution: str  # the Primus backend package that registered it
    framework_version: str | None  # installed version of spec.framework, None when absent

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def framework_ok(self) -> bool:
        return self.framework_version is not None and self.version_in_range

    @property
    def version_in_range(self) -> bool:
        if self.framework_version is None:
            return False
        try:
            return Version(self.framework_version) in SpecifierSet(self.spec.supported)
        except (InvalidVersion, InvalidSpecifier):
            return False

    def status(self) -> str:
        if self.framework_version is None:
            return f"{self.spec.framework} not installed"
        if not self.version_in_range:
            return f"{self.spec.framework} {self.framework_version} outside supported {self.spec.supported}"
        return "ok"


@dataclass
class Discovery:
    backends: dict[str, Backend]
    warnings: list[str]
    disabled: list[str]

    def get(self, name: str, *, file: str | None = None, key: str | None = None) -> Backend:
        if name in self.backends:
            return self.backends[name]
        installed = ", ".join(sorted(self.backends)) or "none"
        if name in self.disabled:
            msg = f"backend '{name}' is disabled by PRIMUS_DISABLE_BACKENDS"
            fix = "remove it from PRIMUS_DISABLE_BACKENDS"
        else:
            msg = f"unknown framework '{name}' (installed backends: {installed})"
            dist = KNOWN_BACKENDS.get(name)
            # every installed backend counts, third-party ones included, then the ones we publish
            hint = did_you_mean(name, set(self.backends) | set(KNOWN_BACKENDS))
            fix = f"pip install {dist}" if dist else hint or "choose one of " + ", ".join(
                sorted(set(self.backends) | set(KNOWN_BACKENDS)))
        raise ConfigError(msg, file=file, key=key, fix=fix)


def _framework_version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def discover() -> Discovery:
    """Load every backend spec. Two distributions claiming one name is a ConfigError naming both."""
    disabled = [n.strip() for n in os.environ.get("PRIMUS_DISABLE_BACKENDS", "").split(",") if n.strip()]
    claims: dict[str, list[tuple[str, metadata.EntryPoint]]] = {}
    for ep in metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
        claims.setdefault(ep.name, []).append((dist, ep))

    backends: dict[str, Backend] = {}
    warnings: list[str] = []
    for name, entries in sorted(claims.items()):
        if name in disabled:
            continue
        dists = sorted({d for d, _ in entries})
        if len(dists) > 1:
            raise ConfigError(
                f"backend '{name}' is registered by two distributions: {' and '.join(dists)}",
                fix=f"uninstall one of them, or hide it with PRIMUS_DISABLE_BACKENDS={name}",
            )
        dist, ep = entries[0]
        spec = ep.load()
        if not isinstance(spec, BackendSpec):
            raise ConfigError(f"entry point '{name}' of {dist} is not a primus BackendSpec ({ep.value})")
        if spec.name != name:
            raise ConfigError(f"entry point '{name}' of {dist} carries a spec named '{spec.name}'")
        backend = Backend(spec=spec, distribution=dist, framework_version=_framework_version(spec.framework))
        if backend.framework_version is not None and not backend.version_in_range:
            warnings.append(
                f"backend '{name}': {spec.framework} {backend.framework_version} is outside the supported "
                f"range {spec.supported}; it may not work"
            )
        backends[name] = backend
    return Discovery(backends=backends, warnings=warnings, disabled=disabled)
