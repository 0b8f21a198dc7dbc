"""Errors of the Ray cluster host (a branch of the launcher's one tree, ``launcher/errors.py``):

    ColdstartError
    └── ClusterError               the cluster cannot be reached, or a replica could not be placed or started
        ├── ClusterUnreachable     ``--cluster ADDRESS``: no Ray cluster answers there (names the fix)
        ├── PlacementTimeout       no node with a free unit took the replica within the boot timeout
        └── ReplicaLost            the replica's actor (or its node) died while it started

Ray's own exceptions (``ray.exceptions.RayError`` and its ``ActorDiedError``, ``ActorUnavailableError``,
``GetTimeoutError``) are mapped here, at the one boundary ``ray_host.py``, with ``raise ... from exc``.
"""

from __future__ import annotations

from coldstart.launcher.errors import ColdstartError


class ClusterError(ColdstartError):
    pass


class ClusterUnreachable(ClusterError):
    pass


class PlacementTimeout(ClusterError):
    pass


class ReplicaLost(ClusterError):
    pass
