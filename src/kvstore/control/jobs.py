"""Long control operations (clear, move, compress) as cancellable, pollable jobs.

A job is an asyncio task on the store's event loop with an id, a state and
progress counters the operation updates as it goes. Finished jobs are kept
(the newest ``keep``) so clients can poll them after the fact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from kvstore.control.models import ErrorBody, JobInfo, JobState
from kvstore.errors import KVStoreError, NotFoundError
from kvstore.results import Progress, ProgressCallback

JobKind = Literal["clear", "move", "compress"]
log = logging.getLogger("kvstore.control")


class Job:
    """One long operation and what is known of it so far."""

    def __init__(self, kind: JobKind, tenant: str | None) -> None:
        self.id = uuid.uuid4().hex
        self.kind: JobKind = kind
        self.tenant = tenant
        self.state: JobState = "running"
        self.progress = Progress(0, 0, 0, 0)
        self.result: dict[str, int] | None = None
        self.error: ErrorBody | None = None
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.task: asyncio.Task[None] | None = None

    def info(self) -> JobInfo:
        return JobInfo(
            id=self.id,
            kind=self.kind,
            tenant=self.tenant,
            state=self.state,
            done_chunks=self.progress.done_chunks,
            total_chunks=self.progress.total_chunks,
            done_bytes=self.progress.done_bytes,
            total_bytes=self.progress.total_bytes,
            result=self.result,
            error=self.error,
            created_at=self.created_at,
            finished_at=self.finished_at,
        )

    def _report(self, progress: Progress) -> None:
        self.progress = progress

    async def _run(self, operation: Callable[[ProgressCallback], Awaitable[Any]]) -> None:
        try:
            outcome = await operation(self._report)
        except asyncio.CancelledError:
            self.state = "cancelled"
            raise
        except KVStoreError as exc:
            self.state = "failed"
            self.error = ErrorBody(error=type(exc).__name__, message=str(exc))
        except Exception as exc:
            log.exception("control job %s (%s) failed", self.id, self.kind)
            self.state = "failed"
            self.error = ErrorBody(error=type(exc).__name__, message=str(exc))
        else:
            self.state = "succeeded"
            self.result = {
                name: value
                for name, value in dataclasses.asdict(outcome).items()
                if isinstance(value, int)
            }
        finally:
            self.finished_at = time.time()


class JobManager:
    """The jobs of one control service; a tenant sees and cancels only its own."""

    def __init__(self, keep: int = 256) -> None:
        self._jobs: dict[str, Job] = {}
        self._keep = keep

    def start(
        self,
        kind: JobKind,
        tenant: str | None,
        operation: Callable[[ProgressCallback], Awaitable[Any]],
    ) -> Job:
        """Run ``operation(progress_callback)`` as a job; its result must be a dataclass."""
        job = Job(kind, tenant)
        job.task = asyncio.create_task(job._run(operation), name=f"kvstore-job-{kind}-{job.id}")
        self._jobs[job.id] = job
        self._forget_old()
        return job

    def get(self, job_id: str, tenant: str | None, *, admin: bool) -> Job:
        """The job ``job_id``; NotFoundError if it does not exist or is another tenant's."""
        job = self._jobs.get(job_id)
        if job is None or not (admin or job.tenant == tenant):
            raise NotFoundError(f"no job {job_id!r}")
        return job

    def visible(self, tenant: str | None, *, admin: bool) -> list[Job]:
        return [job for job in self._jobs.values() if admin or job.tenant == tenant]

    async def cancel(self, job: Job, wait_s: float = 5.0) -> None:
        """Cancel a running job and wait (up to ``wait_s``) for it to stop."""
        if job.task is not None and not job.task.done():
            job.task.cancel()
            await asyncio.wait([job.task], timeout=wait_s)

    async def close(self) -> None:
        """Cancel every running job and wait for them."""
        tasks = [job.task for job in self._jobs.values() if job.task and not job.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget_old(self) -> None:
        finished = [job for job in self._jobs.values() if job.state != "running"]
        for job in finished[: max(0, len(self._jobs) - self._keep)]:
            del self._jobs[job.id]
