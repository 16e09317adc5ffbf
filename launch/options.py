"""The launcher's options, checked before anything starts (no Ray needed)."""

from __future__ import annotations

from dataclasses import dataclass

from megamix.config import Config
from megamix.errors import ConfigError


@dataclass(frozen=True)
class LaunchOptions:
    """The ``megamix launch`` flags (docs/launch.md)."""

    nodes: int = 1
    procs_per_node: int = 1
    max_restarts: int = 3
    strategy: str = "PACK"
    resource_timeout_s: float = 60.0
    stop_timeout_s: float = 60.0  # Ctrl-C: how long the ranks get to reach a step boundary (and save)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def check(self, config: Config) -> None:
        """Refuse flags that cannot work, naming the flag."""
        for flag, value, least in (("--nodes", self.nodes, 1), ("--procs-per-node", self.procs_per_node, 1),
                                   ("--max-restarts", self.max_restarts, 0)):
            if value < least:
                raise ConfigError(f"{flag}: must be >= {least}, got {value}")
        for flag, value in (("--resource-timeout", self.resource_timeout_s), ("--stop-timeout", self.stop_timeout_s)):
            if value <= 0:
                raise ConfigError(f"{flag}: must be positive seconds, got {value:g}")
        if self.strategy not in ("PACK", "SPREAD"):
            raise ConfigError(f"--strategy: allowed PACK, SPREAD; got {self.strategy}")
        p = config.parallel
        if self.world_size % (p.tp * p.pp * p.cp):
            raise ConfigError(f"--nodes × --procs-per-node = {self.world_size} ranks is not a multiple of "
                              f"parallel.tp × parallel.pp × parallel.cp = {p.tp}×{p.pp}×{p.cp}")
