"""All-reduce(SUM) through one shared-memory segment, for CPU shard workers that share a host.

gloo sends every all-reduce through loopback TCP: on a 2-core machine about 0.7 ms for 4096 floats
between two local processes, against a few microseconds for a copy into shared memory and a sum. With
two all-reduces per layer, gloo alone can double the step time. torch.distributed still does the
rendezvous (it tells the ranks whether they share a host and where the segment is), and gloo stays the
path for anything this reducer does not take: other hosts, tensors bigger than a slot, other dtypes.

The segment holds one header line per rank (three counters, each line written by its rank only) and
one data slot per rank. One call, numbered `seq` on every rank:

  1. wait until every peer's `done` reached seq - 1: nobody still reads the slots of the last call
  2. copy the tensor into this rank's slot, store its size, then store `arrived` = seq
  3. wait until every peer's `arrived` reached seq
  4. sum the slots of ranks 0, 1, ..., W-1, in that order, into the tensor; store `done` = seq

seq is this rank's `done` + 1, and `arrived` = seq says step 2 is done: so _kernels.c's fast path (bfloat16
and float32, ~1 us a call against ~20 of Python) runs a call as far as it goes without a long wait, and
this module finishes it (sleeps, liveness checks, timeouts, errors) from wherever it stopped.

Every rank adds the same values in the same order, so all ranks end with bit-identical tensors. The
sum is taken in the tensor's dtype, rounding after each addition as gloo does. For W = 2 that equals
gloo exactly (a + b == b + a in IEEE arithmetic); for W > 2 gloo's ring adds each chunk starting
from a different rank, so the two can differ in the last bit (never across ranks here).

The counters are plain aligned 8-byte stores and loads. Step 2's data must be visible before its
counter: x86-64 keeps stores in program order (and loads likewise), which is all this needs; other
architectures need memory fences that Python cannot issue, so there the reducer is not set up.

Rank 0 creates the segment and unlinks it as soon as every rank has attached: from then on nothing
is left in /dev/shm, even if every process is killed. A peer that stops calling makes the others raise
after `timeout_s`, and at once (within a fraction of a second) if its process is seen to have exited.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import shutil
import socket
import sys
import time
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import torch
import torch.distributed as dist

from bloomduo.core.logs import get_logger
from bloomduo.shard_worker import native
from bloomduo.shard_worker.native import SharedSegment

log = get_logger(__name__)

DEFAULT_SLOT_BYTES = 8 << 20  # per rank: decode batches of 32 x 4096 fp32 take 0.5 MiB; big prefills use gloo
DEFAULT_TIMEOUT_S = 600.0
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Waiting: spin briefly (the peer is usually microseconds away), then yield the core (with W processes
# on fewer cores the peer may need this very core), then sleep (the peer is in a long prefill).
SPIN_S = 5e-6
YIELD_S = 2e-3
SLEEP_S = 100e-6
LIVENESS_PERIOD_S = 0.2

_LINE = 64  # bytes: one cache line per rank, so ranks never write to the same line
_ARRIVED, _DONE, _SIZE = 0, 1, 2  # int64 counters within a rank's line
_PAGE = 4096
_MAX_CACHED_SHAPES = 64  # activations are [tokens, hidden]: one shape per batch size seen
_TSO_MACHINES = {"x86_64", "amd64", "i386", "i686", "x86"}


class ShmAllReduce:
    """In-place all-reduce(SUM) of CPU tensors over a shared-memory segment; build it with `create`."""

    def __init__(
        self,
        segment: SharedMemory,
        *,
        group: dist.ProcessGroup,
        rank: int,
        world_size: int,
        slot_bytes: int,
        timeout_s: float,
        peer_processes: dict[int, tuple[int, str]] | None,
    ) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        self.name = segment.name
        self._segment: SharedMemory | None = segment
        self._counters = segment.buf.cast("q")
        data = torch.frombuffer(segment.buf, dtype=torch.uint8)
        first = _data_offset(world_size)
        # what _kernels.c's fast path (native.shm_all_reduce) and the fused blocks read the segment by
        self.segment = SharedSegment(data.data_ptr(), rank, world_size, first, slot_bytes)
        self._slots = [data[first + r * slot_bytes : first + (r + 1) * slot_bytes] for r in range(world_size)]
        # tmpfs allocates a page at its first touch: each rank commits its own slot now, so a full /dev/shm
        # fails the start, never a step with SIGBUS. A peer reads this slot only after this rank's first
        # `arrived`, so after this. (Its own slot only: one rank committing all of them held every slot in
        # that rank's resident memory, 8 MiB more than its peers'.)
        self._slots[rank].zero_()
        self._view_cache: dict[tuple[torch.dtype, torch.Size], list[torch.Tensor]] = {}
        self._peers = [r for r in range(world_size) if r != rank]
        self._peer_processes = peer_processes  # rank -> (pid, start time); None: cannot watch them
        self._failure: str | None = None

    @classmethod
    def create(
        cls,
        group: dist.ProcessGroup | None = None,
        *,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> ShmAllReduce | None:
        """Set up the reducer on every rank of `group` (a collective call); None where it cannot be used.

        None, on every rank alike, when the group has one rank, the ranks are on different hosts or
        cannot open one segment, or this is not an x86 machine. Logs why.
        """
        group = group or dist.group.WORLD
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if world_size == 1:
            return None
        slot_bytes = -(-slot_bytes // _PAGE) * _PAGE
        me = (socket.gethostname(), platform.machine().lower(), _pid_namespace(), os.getpid(), _start_time())
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, me, group=group)
        if len({(host, machine) for host, machine, *_ in everyone}) > 1:
            log.info("shm_allreduce_off", reason="the ranks are on different hosts")
            return None
        if everyone[0][1] not in _TSO_MACHINES:
            log.info("shm_allreduce_off", reason=f"needs x86 store ordering, this is {everyone[0][1]}")
            return None

        segment, error = None, None
        if rank == 0:
            segment, error = _create_segment(_data_offset(world_size) + world_size * slot_bytes)
        offer = (segment.name, bytes(segment.buf[:16]), slot_bytes) if segment else error
        offers: list = [None] * world_size
        dist.all_gather_object(offers, offer, group=group)
        if not isinstance(offers[0], tuple):
            log.info("shm_allreduce_off", reason=offers[0])
            return None
        name, token, slot_bytes = offers[0]  # rank 0's slot size, should the ranks' settings differ
        if rank != 0:
            segment, error = _attach_segment(name, token, _data_offset(world_size) + world_size * slot_bytes)
        attached: list = [None] * world_size
        dist.all_gather_object(attached, error, group=group)
        if rank == 0:
            segment.unlink()  # everyone that will ever attach has: nothing left to leak from here on
        failures = [f"rank {r}: {e}" for r, e in enumerate(attached) if e]
        if failures:
            if segment is not None:
                segment.close()
            log.info("shm_allreduce_off", reason="; ".join(failures))
            return None

        same_pids = len({pid_ns for _, _, pid_ns, _, _ in everyone}) == 1 and everyone[0][2] is not None
        peer_processes = (
            {r: (pid, start) for r, (*_, pid, start) in enumerate(everyone)} if same_pids else None
        )
        log.info("shm_allreduce_on", world_size=world_size, slot_bytes=slot_bytes, segment=name)
        return cls(
            segment,
            group=group,
            rank=rank,
            world_size=world_size,
            slot_bytes=slot_bytes,
            timeout_s=timeout_s,
            peer_processes=peer_processes,
        )

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether this reducer takes `tensor` (else use torch.distributed): CPU, float, small enough."""
        return (
            tensor.device.type == "cpu"
            and tensor.dtype in SUPPORTED_DTYPES
            and not tensor.requires_grad
            and tensor.numel() * tensor.element_size() <= self.slot_bytes
        )

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` in place over the ranks and return it. Every rank must call with the same shape.

        Raises RuntimeError naming the peer when one does not arrive within `timeout_s` or has exited;
        the reducer is unusable after that (the ranks no longer agree on the call number).
        """
        if self._failure:
            raise RuntimeError(
                f"shared-memory all-reduce is unusable after an earlier failure: {self._failure}"
            )
        if self._segment is None:
            raise RuntimeError("shared-memory all-reduce is closed")
        if not self.fits(tensor):
            raise ValueError(
                f"{tensor.dtype} tensor of {tensor.numel() * tensor.element_size()} bytes on {tensor.device} "
                f"does not fit the shared-memory all-reduce (cpu, float, at most {self.slot_bytes} bytes)"
            )
        if native.shm_all_reduce(self.segment, tensor) == native.SHM_REDUCED:
            return tensor
        # Here the call is new, or the fast path (or the fused blocks') published this rank's part and left
        # the wait to this one: this rank's own counters say which.
        counters, line = self._counters, _line(self.rank)
        seq = counters[line + _DONE] + 1
        nbytes = tensor.numel() * tensor.element_size()
        slots = self._views(tensor.dtype, tensor.shape)
        if counters[line + _ARRIVED] < seq:
            self._wait(_DONE, seq - 1)
            slots[self.rank].copy_(tensor)
            counters[line + _SIZE] = nbytes
            counters[line + _ARRIVED] = seq  # after the data and size: x86 stores become visible in order
        self._wait(_ARRIVED, seq)
        for peer in self._peers:
            if counters[_line(peer) + _SIZE] != nbytes:
                self._fail(
                    f"call #{seq}: rank {peer} sent {counters[_line(peer) + _SIZE]} bytes, rank {self.rank} "
                    f"{nbytes}: the ranks disagree on the tensor"
                )
        torch.add(slots[0], slots[1], out=tensor)
        for slot in slots[2:]:
            tensor.add_(slot)
        counters[line + _DONE] = seq
        return tensor

    def _views(self, dtype: torch.dtype, shape: torch.Size) -> list[torch.Tensor]:
        """Every rank's slot seen as a `shape` tensor of `dtype`, kept: building views costs more than
        the copy and the sum of a decode step's activations."""
        key = (dtype, shape)
        views = self._view_cache.get(key)
        if views is None:
            if len(self._view_cache) >= _MAX_CACHED_SHAPES:
                self._view_cache.clear()
            nbytes = shape.numel() * dtype.itemsize
            views = [slot[:nbytes].view(dtype).view(shape) for slot in self._slots]
            self._view_cache[key] = views
        return views

    def close(self) -> None:
        """Unmap the segment (it was unlinked at set-up); safe to call twice."""
        segment, self._segment = self._segment, None
        if segment is None:
            return
        self._slots = []
        self._view_cache.clear()
        self._counters.release()
        with contextlib.suppress(BufferError):  # a view still held (say, by a traceback) keeps it mapped
            segment.close()

    def _wait(self, field: int, seq: int) -> None:
        """Return once every peer's `field` counter reached `seq`; raise when one cannot any more."""
        counters = self._counters
        pending = [peer for peer in self._peers if counters[_line(peer) + field] < seq]
        if not pending:
            return
        started = time.perf_counter()
        next_check = started + LIVENESS_PERIOD_S
        while pending:
            now = time.perf_counter()
            if now - started > YIELD_S:
                if now >= next_check:
                    self._check_peers(pending, field, seq, now - started)
                    next_check = now + LIVENESS_PERIOD_S
                time.sleep(SLEEP_S)
            elif now - started > SPIN_S:
                os.sched_yield()
            pending = [peer for peer in pending if counters[_line(peer) + field] < seq]

    def _check_peers(self, pending: list[int], field: int, seq: int, waited_s: float) -> None:
        call = f"call #{seq}" if field == _ARRIVED else f"the end of call #{seq}"
        if self._peer_processes is not None:
            for peer in pending:
                pid, start = self._peer_processes[peer]
                if not _is_running(pid, start):
                    self._fail(f"rank {peer} (pid {pid}) exited before {call}")
        if waited_s > self.timeout_s:
            ranks = ", ".join(str(peer) for peer in pending)
            self._fail(
                f"rank {ranks} did not reach {call} within {self.timeout_s:g} s (a stuck or dead peer)"
            )

    def _fail(self, reason: str) -> None:
        self._failure = f"shared-memory all-reduce on rank {self.rank}: {reason}"
        raise RuntimeError(self._failure)


def _line(rank: int) -> int:
    """Index of `rank`'s first counter; line 0 holds rank 0's random token."""
    return (rank + 1) * _LINE // 8


def _data_offset(world_size: int) -> int:
    return -(-(world_size + 1) * _LINE // _PAGE) * _PAGE


def _create_segment(size: int) -> tuple[SharedMemory | None, str | None]:
    """(segment, None) or (None, why not). The segment starts with a random token; each rank commits its own
    slot's pages (ShmAllReduce.__init__)."""
    free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None
    if free is not None and free < size:
        # tmpfs pages are allocated on first touch: a full /dev/shm would SIGBUS us mid-step.
        return None, f"/dev/shm has {free} bytes free, the segment needs {size}"
    try:
        segment = SharedMemory(f"bloomduo_ar_{secrets.token_hex(8)}", create=True, size=size)
    except OSError as exc:
        return None, f"cannot create a shared-memory segment: {exc}"
    segment.buf[:16] = secrets.token_bytes(16)
    return segment, None


def _attach_segment(name: str, token: bytes, size: int) -> tuple[SharedMemory | None, str | None]:
    """(segment, None) or (None, why not): another /dev/shm (a container) holds no such segment."""
    try:
        if sys.version_info >= (3, 13):
            segment = SharedMemory(name, track=False)
        else:
            # Attaching registers the segment with the resource tracker, which would unlink it and warn
            # of a leak when this process exits, though rank 0 owns it: skip the registration.
            register = resource_tracker.register
            resource_tracker.register = lambda *_: None
            try:
                segment = SharedMemory(name)
            finally:
                resource_tracker.register = register
    except OSError as exc:
        return None, f"cannot attach shared-memory segment {name}: {exc}"
    if segment.size < size or bytes(segment.buf[:16]) != token:
        segment.close()
        return None, f"shared-memory segment {name} is not the one rank 0 created"
    return segment, None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (the command name may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()
    except OSError:
        return None


def _start_time() -> str | None:
    fields = _stat_fields("self")
    return fields[19] if fields else None


def _is_running(pid: int, start_time: str | None) -> bool:
    """False once `pid` has exited or become a zombie, or its number went to a new process."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X") and fields[19] == start_time
