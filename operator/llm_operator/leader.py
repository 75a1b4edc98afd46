"""Leader election on a coordination.k8s.io Lease: of several operator replicas, only the holder reconciles.

`lease_action` decides (pure); `LeaderElector` reads and writes the Lease. A holder that cannot renew for a
whole lease duration stops acting before anyone else may take over; one that stops cleanly hands the Lease
back at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

from prometheus_client import Gauge

from llm_operator.errors import OperatorError
from llm_operator.kube import ConflictError, Kube, NotFoundError
from llm_operator.objects import Manifest, parse_rfc3339, rfc3339_micro

Action = Literal["create", "renew", "take", "wait"]
log = logging.getLogger("llm_operator.leader")
LEADING = Gauge("llm_operator_leader", "1 while this replica holds the lease")


def _parse_time(text: str | None) -> datetime | None:
    return parse_rfc3339(text) if text else None


def lease_action(lease: Manifest | None, identity: str, now: datetime) -> Action:
    """What a candidate should do with the Lease as it is now."""
    if lease is None:
        return "create"
    spec = lease.get("spec", {})
    holder = spec.get("holderIdentity") or ""
    if holder == identity:
        return "renew"
    renewed = _parse_time(spec.get("renewTime")) or _parse_time(spec.get("acquireTime"))
    duration = timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))
    if not holder or renewed is None or now > renewed + duration:
        return "take"
    return "wait"


class LeaderElector:
    """Keeps trying to hold the Lease; `leading` is set while this replica may act."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_seconds: int = 15,
        retry_seconds: float = 2.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.lease_seconds, self.retry_seconds, self.clock = lease_seconds, retry_seconds, clock
        self.leading = asyncio.Event()
        self._renewed_at: datetime | None = None
        self.on_start: Callable[[], None] = lambda: None

    def _body(self, lease: Manifest | None, now: datetime, take: bool) -> Manifest:
        spec = dict((lease or {}).get("spec", {}))
        if take or lease is None:
            spec["acquireTime"] = rfc3339_micro(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if lease else 0)
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=self.lease_seconds,
            renewTime=rfc3339_micro(now),
        )
        meta: Manifest = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            meta["resourceVersion"] = lease["metadata"]["resourceVersion"]
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    async def _get(self) -> Manifest | None:
        try:
            return await self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
        except NotFoundError:
            return None

    async def try_once(self) -> bool:
        """One round: create, renew or take the Lease when allowed; whether this replica leads now."""
        now = self.clock()
        try:
            lease = await self._get()
            action = lease_action(lease, self.identity, now)
            if action == "create":
                await self.kube.create(self._body(None, now, take=True))
            elif action in ("renew", "take"):
                await self.kube.replace(self._body(lease, now, take=action == "take"))
            else:
                self._set(False)
                return False
        except ConflictError:
            self._set(False)
            return False
        except OperatorError as error:
            expired = self._renewed_at is None or now - self._renewed_at > timedelta(
                seconds=self.lease_seconds
            )
            log.warning("lease %s/%s not renewed: %s", self.namespace, self.name, error)
            if expired:
                self._set(False)
            return self.leading.is_set()
        self._renewed_at = now
        self._set(True)
        return True

    def _set(self, leading: bool) -> None:
        if leading and not self.leading.is_set():
            log.info("became leader as %s", self.identity, extra={"lease": f"{self.namespace}/{self.name}"})
            self.leading.set()
            LEADING.set(1)
            self.on_start()
        elif not leading and self.leading.is_set():
            log.warning("lost leadership", extra={"lease": f"{self.namespace}/{self.name}"})
            self.leading.clear()
            LEADING.set(0)

    async def run(self) -> None:
        """Forever: try, then wait a retry period (a third of the lease while leading)."""
        while True:
            leading = await self.try_once()
            await asyncio.sleep(
                min(self.retry_seconds, self.lease_seconds / 3) if leading else self.retry_seconds
            )

    async def release(self) -> None:
        """Hand the Lease back so a standby takes over at once."""
        if not self.leading.is_set():
            return
        self.leading.clear()
        try:
            lease = await self._get()
            if lease and lease.get("spec", {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                await self.kube.replace(lease)
        except OperatorError as error:
            log.warning("could not release the lease: %s", error)
