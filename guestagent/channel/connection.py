"""One transport connection of the guest channel: the class that owns the fd.

Its reader task, its writer task and the callers' fast paths (a lone request written and its
reply read in the caller's own step, a pipelining task flushing its queue and reading its
replies) all work on the one fd here, so what may write when, and who may read, is decided in
one place.  A reconnect gets a fresh `Connection`; requests outlive it in the pending table
(the protocol session's), which the channel owns.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import trio
from trio.lowlevel import Abort, Task, current_task, reschedule, wait_task_rescheduled

from guestagent.channel.errors import Broken, Fatal
from guestagent.channel.requests import Request, complete, status_name
from guestagent.channel.sched import StepSlice, hold_budget
from guestagent.channel.transport import take_batch, unwritten
from guestagent.protocol import wire
from guestagent.protocol.headers import NOTICE, REPLY, payload_length
from guestagent.protocol.wire import HEADER_SIZE

__all__ = ["Connection"]

_RECV_SIZE: Final = 1 << 16  # bytes asked of the transport per receive
# A caller waiting for a reply (a lone request's, or the oldest of a pipelining task's) polls
# for it at most this long before parking as usual.  Within one step of a task (from when trio
# ran it until it yields), such waits stop once _SYNC_SLICE has passed since the step's first,
# so however busy the caller is between waits the event loop runs at least that often: trio
# cannot show us every runnable task (those later in the batch being run are not in its run
# queue), so this bound is what they wait at most.
_SYNC_WAIT: Final = 0.002
_SYNC_SLICE: Final = 0.001


class Connection:
    """State of one transport connection, and everything that reads or writes its fd.

    `pending` is the channel's table of requests by id (replies complete them); `on_notice`
    gets each host NOTICE frame; `on_break` is told once the connection is unusable.
    """

    __slots__ = (
        "budget",
        "buf",
        "error",
        "fd",
        "frames_in",
        "join",
        "on_break",
        "on_notice",
        "outq",
        "pending",
        "poller",
        "scope",
        "step",
        "view",
        "woken",
        "writer",
        "writer_task",
        "writing",
    )

    def __init__(
        self,
        fd: int,
        join: bool,
        frames_in: wire.FrameReader,
        pending: dict[int, Request],
        on_notice: Callable[[wire.Frame], None],
        on_break: Callable[[Connection], None],
    ) -> None:
        self.fd = fd
        self.join = join  # a virtio port: join a request's parts into one write (see PORT_WRITE)
        self.pending = pending
        self.on_notice = on_notice
        self.on_break = on_break
        # Receive state, shared by the reader task and a caller reading its own reply
        self.frames_in = frames_in
        self.buf = bytearray(_RECV_SIZE)
        self.view = memoryview(self.buf)
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        self.budget = hold_budget(_SYNC_WAIT)
        self.step = StepSlice()  # the step a synchronous wait last ran in (see await_sync)
        self.outq: list[bytes | memoryview] = []
        self.writer: Task | None = None  # the writer task while it is parked on an empty queue
        self.writer_task: Task | None = None  # the writer task, parked or not
        self.writing = False  # the writer holds parts taken off outq that are not all written
        self.woken = 0  # callers woken by the last read: more than one means a burst follows
        self.scope = trio.CancelScope()
        self.error: BaseException | None = None

    def wake_writer(self) -> None:
        """Reschedule the writer if it is parked on an empty queue."""
        writer = self.writer
        if writer is not None:
            self.writer = None
            reschedule(writer)

    def send(self, head: bytes, body: bytes) -> None:
        """Queue bytes for the writer and wake it if it sleeps (no checkpoint, no task)."""
        q = self.outq
        q.append(head)
        if body:
            q.append(body)
        self.wake_writer()

    def send_now(self, head: bytes, body: bytes) -> None:
        """Write a lone request straight to the fd, saving the writer's scheduler pass.

        Only called while the writer is parked on an empty queue, so nothing can be
        reordered; whatever the kernel does not take is queued for the writer.  "Lone" also
        means the last read woke at most one caller: when it woke many, their requests are
        a burst, and one write for all of it beats waking the host for the first alone.
        """
        try:
            if not body:
                n = os.write(self.fd, head)
            else:
                n = os.writev(self.fd, (head + body,) if self.join else (head, body))
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.fail(exc)  # the caller's request stays pending: stalled or dropped
            return
        if n < len(head):
            self.send(head[n:], body)
        elif n < len(head) + len(body):
            self.send(memoryview(body)[n - len(head) :].tobytes(), b"")

    async def read_loop(self) -> None:
        """Decode replies and wake their callers; any failure breaks the connection.

        Reads first and waits only when the fd is dry: no scheduler pass for data that is
        already there.  This cannot starve other tasks, as the host only sends replies to
        requests, and the callers we wake must run before they can make more.
        """
        fd = self.fd
        buffers = (self.buf,)
        readv = os.readv
        wait_readable = trio.lowlevel.wait_readable
        received = self.received
        try:
            while True:
                try:
                    n = readv(fd, buffers)
                except BlockingIOError:
                    await wait_readable(fd)
                    continue
                self.woken = received(n)
        except (Broken, wire.ProtocolError, trio.ClosedResourceError, OSError) as exc:
            self.fail(exc)

    def received(self, n: int) -> int:
        """Decode `n` bytes just read into self.buf and complete their requests.

        Returns how many parked callers it woke; raises Broken or ProtocolError when the
        connection is finished.
        """
        frames_in = self.frames_in
        if not n:
            frames_in.eof()
            raise Broken("host agent closed the channel")
        try:
            frames = frames_in.feed(self.view[:n])
        except wire.ProtocolError as err:
            self.dispatch(err.frames)
            raise
        return self.deliver(frames)

    def deliver(self, frames: Iterable[wire.Frame]) -> int:
        """Complete the requests these frames answer; returns how many parked callers it woke."""
        pending = self.pending
        woken = 0
        for frame in frames:  # _dispatch, inlined for the common case
            if frame.flags & REPLY:
                req = pending.pop(frame.request_id, None)
                if req is not None:  # else: its caller was cancelled
                    req.frame = frame
                    req.done = True
                    task = req.task
                    if task is not None:
                        req.task = None
                        reschedule(task, req)  # type: ignore[arg-type]  # see Request
                        woken += 1
            else:
                self.dispatch((frame,))
        return woken

    def await_sync(self, req: Request, pipelined: bool = False) -> None:  # noqa: C901 (the synchronous reply read with its bail-outs, in order)
        """Try to read a request's reply in the caller's own step, without parking (a lone
        request, or the oldest a pipelining caller awaits: `_catch_up`).

        Only while trio's run queue holds no other task (a blocked poll would delay it) and
        the caller is not cancelled (it must reach a checkpoint), within the next trio
        deadline, for at most _SYNC_WAIT; and not once _SYNC_SLICE has passed since the
        first such wait in the caller's current step (a pipelined wait stays within it), so
        the event loop runs other tasks and serves their I/O at least that often.  The
        reader task stays parked on the same fd meanwhile; epoll does not report an fd
        whose data we consumed first, and a spurious wakeup only costs it an EAGAIN.

        A reply larger than one read (a page through virtio-serial comes in 4 KiB buffers)
        is gathered in self.buf behind its first part and decoded once, rather than each
        part copied into the decoder's own buffer and its header parsed twice.
        """
        monotonic = time.monotonic
        began = monotonic()
        step = self.step
        if not step.enter(began, _SYNC_SLICE):
            return
        # the writer may be runnable when the caller wrote the queue itself (`_catch_up`)
        left = self.budget(self.writer_task if pipelined else None)
        if left <= 0:
            return
        if pipelined:  # a window's reply is due soon if at all: wait within the slice
            left = min(left, step.since + _SYNC_SLICE - began)
        deadline = began + left
        poll = self.poller.poll
        fd = self.fd
        buf = self.buf
        view = self.view
        size = len(buf)
        frames_in = self.frames_in
        gather = not frames_in.buffered  # else the decoder holds a partial frame: feed it all
        have = 0  # bytes read into self.buf but not yet fed to the decoder
        # A lone request's reply cannot be in yet: poll first.  A window's often is (the host
        # answered while we were busy): read first, and poll only when the fd is dry.
        polled = not pipelined
        try:
            while True:
                if polled and not poll(left * 1000):
                    break
                polled = True
                try:
                    n = os.readv(fd, (view[have:],) if have else (buf,))
                except BlockingIOError:
                    n = -1
                if n == 0:
                    if have:
                        self.received(have)
                        have = 0
                    self.received(0)  # raises: the host closed the channel
                if n > 0:
                    have += n
                    if not gather or (
                        have >= HEADER_SIZE and not have < HEADER_SIZE + payload_length(buf) <= size
                    ):  # not one partial frame that fits behind what we have: decode it now
                        end, have = have, 0
                        frame = frames_in.feed_one(view[:end]) if gather else None
                        if frame is None:
                            self.woken = self.received(end)
                        elif frame.request_id == req.rid and frame.flags & REPLY:
                            self.pending.pop(req.rid, None)  # the usual: our reply, alone
                            req.frame = frame
                            req.done = True
                            self.woken = 0
                        else:
                            self.woken = self.deliver((frame,))
                        if req.done:
                            break
                        gather = not frames_in.buffered
                left = deadline - monotonic()
                if left <= 0:
                    break
            if have:  # out of time with part of a frame: the decoder keeps it for the reader
                self.woken = self.received(have)
        except (Broken, wire.ProtocolError, OSError) as exc:
            self.fail(exc)  # the request stays pending: stalled or dropped by the session

    def dispatch(self, frames: Iterable[wire.Frame]) -> None:
        for frame in frames:
            if frame.flags & REPLY:
                req = self.pending.pop(frame.request_id, None)
                if req is not None:  # else: its caller was cancelled
                    complete(req, frame)
            elif frame.opcode == NOTICE:
                self.on_notice(frame)
            else:  # ERROR: the host closes the channel after it
                reason = wire.parse_error(frame.payload)
                raise Broken(
                    f"host agent sent ERROR ({status_name(frame.status)}): {reason}",
                    host_error=True,
                )

    async def write_loop(self) -> None:
        """Send everything queued since the last wakeup with one writev (and its tail, if the
        kernel took only part of it).

        writev rather than join+write on a socket: pages go from the callers' bytes straight
        to the kernel, and no batch-sized buffer (often above malloc's mmap threshold) is
        built.  On a virtio port, whose writev costs a round to QEMU per buffer, the parts are
        joined into writes of at most PORT_WRITE bytes.
        """
        q = self.outq
        fd = self.fd
        join = self.join
        writev = os.writev
        wait_writable = trio.lowlevel.wait_writable
        self.writer_task = current_task()

        def abort(_: Any) -> Abort:
            self.writer = None
            return Abort.SUCCEEDED

        try:
            while True:
                if not q:
                    self.writer = current_task()
                    await wait_task_rescheduled(abort)
                    continue
                parts = take_batch(q, join)
                self.writing = True  # holding parts: nobody else may write until they are out
                while True:
                    try:
                        n = writev(fd, parts)
                    except BlockingIOError:
                        await wait_writable(fd)
                        continue
                    if n == sum(map(len, parts)):
                        break
                    parts = unwritten(parts, n)
                self.writing = False
        except (trio.ClosedResourceError, OSError) as exc:
            self.fail(exc)

    def flush(self) -> bool:
        """Write the queue now, from the caller's step (see the channel's _FLUSH_PARTS); only while the
        writer holds no parts of its own, so nothing is reordered.  True if all of it went
        out; what the kernel does not take stays queued, in order, for the writer."""
        q = self.outq
        while q:  # a batch is bounded (IOV_MAX parts; on a port, PORT_WRITE bytes)
            parts = take_batch(q, self.join)
            try:
                n = os.writev(self.fd, parts)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self.fail(exc)  # the requests stay pending: stalled or dropped
                return False
            if n != sum(map(len, parts)):
                q[:0] = unwritten(parts, n)
                self.wake_writer()
                return False
        return True

    def fail(self, exc: BaseException) -> None:
        """Mark this connection dead, tell the channel, and stop its tasks.

        The first reason wins, except that a fatal one always does: a host refusing our
        HELLO sends its reply and an ERROR in one write, and the reader sees the ERROR
        before the handshake sees the refusal, yet retrying could never succeed.
        """
        if self.error is None or isinstance(exc, Fatal):
            self.error = exc
        self.on_break(self)
        self.scope.cancel()
