#!/usr/bin/env python3
r"""Interop check: drive a dflockd(-rs) server with the real, unmodified
PyPI package ``dflockd-client==2.1.1``.

Only the public API of the package is used (plus its documented low-level
``dflockd_client._sync`` / ``dflockd_client._async`` modules); nothing is
patched or shimmed.

Usage (see README.md next to this file):

    python python_client_check.py --host 127.0.0.1 --port 6388 \
        [--auth-port P2 --auth-token TOK] \
        [--tls-port P3 --tls-ca ca.pem [--tls-auth-token TOK3] [--tls-host 127.0.0.1]]

Prints ``PASS <name>`` / ``FAIL <name>: <reason>`` per check and a final
``python-interop: N passed, M failed`` line. Exit status 0 only if every check
passed and at least one ran; 1 otherwise (including a missing client or an
unreadable CA file); 2 for command-line usage errors (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import re
import ssl
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable

try:
    import dflockd_client
    from dflockd_client import (
        AlreadyQueuedError,
        AsyncDistributedLock,
        AsyncDistributedSemaphore,
        AuthError,
        DflockdError,
        DflockdTimeoutError,
        LimitMismatchError,
        NotQueuedError,
        SyncDistributedLock,
        SyncDistributedSemaphore,
        _async,
        _sync,
        fence_from_token,
    )
except ImportError as _e:  # pragma: no cover - environment problem
    print(f"cannot import dflockd_client: {_e}", file=sys.stderr)
    print("install it with: pip install --ignore-requires-python dflockd-client==2.1.1",
          file=sys.stderr)
    print("python-interop: 0 passed, 0 failed", flush=True)
    sys.exit(1)

EXPECTED_CLIENT_VERSION = "2.1.1"
TOKEN_RE = re.compile(r"[0-9a-f]{32}")
CONNECT_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.02


class CheckFailed(Exception):
    """Raised by a check when an expectation does not hold."""


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


def expect_token(tok: Any, what: str = "token") -> int:
    """Token must be 32 lowercase hex chars; returns its fence."""
    expect(isinstance(tok, str), f"{what} is not a str: {tok!r}")
    expect(TOKEN_RE.fullmatch(tok) is not None,
           f"{what} is not 32 lowercase hex chars: {tok!r}")
    fence = fence_from_token(tok)
    expect(isinstance(fence, int) and 0 < fence < 2**64, f"bad fence {fence!r} from {tok!r}")
    expect(fence == int(tok[:16], 16), "fence_from_token disagrees with the token prefix")
    return fence


def expect_increasing(fences: list[int], what: str) -> None:
    for a, b in zip(fences, fences[1:]):
        expect(b > a, f"{what}: fences not strictly increasing: {fences}")


def expect_raises(exc_type: type[BaseException] | tuple[type[BaseException], ...],
                  fn: Callable[[], Any], what: str) -> BaseException:
    try:
        fn()
    except exc_type as e:  # noqa: PERF203
        return e
    except BaseException as e:  # noqa: BLE001
        raise CheckFailed(f"{what}: expected {_names(exc_type)}, got "
                          f"{type(e).__name__}: {e}") from e
    raise CheckFailed(f"{what}: expected {_names(exc_type)}, nothing raised")


async def aexpect_raises(exc_type: type[BaseException] | tuple[type[BaseException], ...],
                         coro: Any, what: str) -> BaseException:
    try:
        await coro
    except exc_type as e:
        return e
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"{what}: expected {_names(exc_type)}, got "
                          f"{type(e).__name__}: {e}") from e
    raise CheckFailed(f"{what}: expected {_names(exc_type)}, nothing raised")


def _names(t: Any) -> str:
    if isinstance(t, tuple):
        return "/".join(x.__name__ for x in t)
    return t.__name__


# ---------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One server under test plus how to reach it."""

    label: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    auth_token: str | None = None

    def hl_kwargs(self, **kw: Any) -> dict[str, Any]:
        d: dict[str, Any] = dict(
            servers=[(self.host, self.port)],
            ssl_context=self.ssl_context,
            auth_token=self.auth_token,
            connect_timeout_s=CONNECT_TIMEOUT_S,
        )
        d.update(kw)
        return d

    # high level -------------------------------------------------------------
    def lock(self, key: str, **kw: Any) -> SyncDistributedLock:
        return SyncDistributedLock(key, **self.hl_kwargs(**kw))

    def sem(self, key: str, limit: int, **kw: Any) -> SyncDistributedSemaphore:
        return SyncDistributedSemaphore(key, limit=limit, **self.hl_kwargs(**kw))

    def alock(self, key: str, **kw: Any) -> AsyncDistributedLock:
        return AsyncDistributedLock(key, **self.hl_kwargs(**kw))

    def asem(self, key: str, limit: int, **kw: Any) -> AsyncDistributedSemaphore:
        return AsyncDistributedSemaphore(key, limit=limit, **self.hl_kwargs(**kw))

    # low level --------------------------------------------------------------
    def open(self, auth_token: str | None | object = ...) -> _sync.SyncConn:
        tok = self.auth_token if auth_token is ... else auth_token
        conn = _sync.open_conn(self.host, self.port, ssl_context=self.ssl_context,
                               connect_timeout_s=CONNECT_TIMEOUT_S)
        if tok is not None:
            try:
                _sync.authenticate(conn, tok)  # type: ignore[arg-type]
            except BaseException:
                conn.close()
                raise
        return conn

    async def aopen(self, auth_token: str | None | object = ...) -> _async.AsyncConn:
        tok = self.auth_token if auth_token is ... else auth_token
        conn = await _async.open_conn(self.host, self.port, ssl_context=self.ssl_context,
                                      connect_timeout_s=CONNECT_TIMEOUT_S)
        if tok is not None:
            try:
                await _async.authenticate(conn, tok)  # type: ignore[arg-type]
            except BaseException:
                await conn.close()
                raise
        return conn


class Ctx:
    """Per-run state shared by all checks."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:12]
        self.plain = Endpoint("plain", args.host, args.port)
        self.auth: Endpoint | None = None
        if args.auth_port is not None:
            self.auth = Endpoint("auth", args.host, args.auth_port, auth_token=args.auth_token)
        self.tls: Endpoint | None = None
        if args.tls_port is not None:
            self.tls = Endpoint("tls", args.tls_host, args.tls_port,
                                ssl_context=make_tls_context(args.tls_ca),
                                auth_token=args.tls_auth_token)
        self._n = 0
        self._mu = threading.Lock()

    def key(self, tag: str) -> str:
        with self._mu:
            self._n += 1
            n = self._n
        return f"pyinterop-{self.run_id}-{n}-{tag}"


def make_tls_context(ca_path: str) -> ssl.SSLContext:
    # Verifies the chain against CA.pem and checks the hostname. With host
    # "127.0.0.1" CPython passes server_hostname="127.0.0.1" (the client uses
    # server_hostname=host), sends no SNI for an IP literal and matches the
    # certificate's IP-address SAN.
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_path)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# ---------------------------------------------------------------------------
# stats helpers
# ---------------------------------------------------------------------------


def find_entry(st: dict[str, Any], section: str, key: str) -> dict[str, Any] | None:
    for e in st.get(section, []):
        if e.get("key") == key:
            return e
    return None


def poll_stats(ep: Endpoint, pred: Callable[[dict[str, Any]], bool], what: str,
               timeout: float = 5.0) -> dict[str, Any]:
    """Poll low-level ``stats`` (fresh connection) until pred(stats) holds."""
    conn = ep.open()
    try:
        deadline = time.monotonic() + timeout
        while True:
            st = _sync.stats(conn)
            if pred(st):
                return dict(st)
            if time.monotonic() >= deadline:
                raise CheckFailed(f"timed out after {timeout}s waiting for {what}; "
                                  f"last stats: {dict(st)}")
            time.sleep(POLL_INTERVAL_S)
    finally:
        conn.close()


def waiters_is(section: str, key: str, n: int) -> Callable[[dict[str, Any]], bool]:
    def pred(st: dict[str, Any]) -> bool:
        e = find_entry(st, section, key)
        return (e is not None and e.get("waiters") == n) if n else (
            e is None or e.get("waiters") == 0)
    return pred


async def apoll_stats(ep: Endpoint, pred: Callable[[dict[str, Any]], bool], what: str,
                      timeout: float = 5.0) -> dict[str, Any]:
    conn = await ep.aopen()
    try:
        deadline = time.monotonic() + timeout
        while True:
            st = await _async.stats(conn)
            if pred(st):
                return dict(st)
            if time.monotonic() >= deadline:
                raise CheckFailed(f"timed out after {timeout}s waiting for {what}; "
                                  f"last stats: {dict(st)}")
            await asyncio.sleep(POLL_INTERVAL_S)
    finally:
        await conn.close()


def run_thread(fn: Callable[[], Any], name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn in a daemon thread; the returned dict gets 'result' or 'error'."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return t, box


def join_result(t: threading.Thread, box: dict[str, Any], timeout: float, what: str) -> Any:
    t.join(timeout)
    if t.is_alive():
        raise CheckFailed(f"{what}: still blocked after {timeout}s")
    if "error" in box:
        e = box["error"]
        raise CheckFailed(f"{what}: raised {type(e).__name__}: {e}") from e
    return box.get("result")


def close_all(*objs: Any) -> None:
    """Best-effort close(). Never pass a sync lock whose acquire()/wait() is
    still running in another thread: close() takes the lock's state RLock and
    would block until that call returns."""
    for o in objs:
        try:
            o.close()
        except Exception:  # noqa: BLE001
            pass


async def aclose_all(*objs: Any) -> None:
    for o in objs:
        try:
            await asyncio.wait_for(o.aclose(), 6)
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------
# Check registry
# ---------------------------------------------------------------------------

CHECKS: list[tuple[str, str, Callable[..., Any]]] = []


def check(group: str, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        CHECKS.append((group, name or fn.__name__, fn))
        return fn
    return deco


# ---------------------------------------------------------------------------
# Plain-server checks: meta
# ---------------------------------------------------------------------------


@check("plain")
def client_version(ctx: Ctx) -> None:
    v = getattr(dflockd_client, "__version__", "?")
    expect(v == EXPECTED_CLIENT_VERSION,
           f"dflockd_client {v} imported from {dflockd_client.__file__}, "
           f"expected {EXPECTED_CLIENT_VERSION}")


# ---------------------------------------------------------------------------
# Sync high-level
# ---------------------------------------------------------------------------


def _lock_round_trip(ep: Endpoint, key: str) -> None:
    lk = ep.lock(key, acquire_timeout_s=5)
    with lk as held:
        expect(held is lk, "__enter__ did not return the lock")
        expect_token(lk.token)
        expect(isinstance(lk.lease, int) and lk.lease >= 1, f"bad lease {lk.lease!r}")
        st = poll_stats(ep, lambda s: find_entry(s, "locks", key) is not None,
                        "held key in stats.locks", timeout=2)
        e = find_entry(st, "locks", key)
        expect(e is not None and isinstance(e.get("owner_conn_id"), int)
               and e["owner_conn_id"] > 0, f"bad stats entry {e!r}")
    expect(lk.token is None, "token not cleared after __exit__")
    other = ep.lock(key, acquire_timeout_s=0)
    try:
        expect(other.acquire() is True, "key not free after context-manager release")
    finally:
        other.release()


@check("plain")
def sync_lock_context_manager(ctx: Ctx) -> None:
    _lock_round_trip(ctx.plain, ctx.key("sync-cm"))


@check("plain")
def sync_trylock_mutual_exclusion(ctx: Ctx) -> None:
    key = ctx.key("sync-try")
    a = ctx.plain.lock(key, acquire_timeout_s=0)
    b = ctx.plain.lock(key, acquire_timeout_s=0)
    try:
        expect(a.acquire() is True, "first try-lock was not granted")
        fa = expect_token(a.token)
        t0 = time.monotonic()
        expect(b.acquire() is False, "second try-lock granted while held")
        expect(time.monotonic() - t0 < 2.0, "try-lock (timeout 0) did not answer promptly")
        expect(b.token is None, "failed acquire left a token")
        expect(a.release() is True, "release returned False")
        expect(b.acquire() is True, "try-lock not granted after release")
        fb = expect_token(b.token)
        expect(fb > fa, f"fence did not increase: {fa} -> {fb}")
        expect(b.release() is True, "second release returned False")
        expect(b.release() is False, "release with nothing held should return False")
    finally:
        close_all(a, b)


@check("plain")
def sync_blocking_acquire_granted_on_release(ctx: Ctx) -> None:
    key = ctx.key("sync-block")
    holder = ctx.plain.lock(key, acquire_timeout_s=0)
    waiter = ctx.plain.lock(key, acquire_timeout_s=10)
    busy: list[Any] = []
    try:
        expect(holder.acquire(), "holder not granted")
        fh = expect_token(holder.token)
        t, box = run_thread(waiter.acquire, "blocking-waiter")
        busy.append(waiter)
        poll_stats(ctx.plain, waiters_is("locks", key, 1), "1 waiter")
        expect(t.is_alive(), "blocking acquire returned while the lock was held")
        t_rel = time.monotonic()
        expect(holder.release(), "holder release failed")
        got = join_result(t, box, 8, "blocking acquire")
        busy.clear()
        expect(got is True, f"blocking acquire returned {got!r}")
        expect(time.monotonic() - t_rel < 3.0, "grant after release was not prompt")
        fw = expect_token(waiter.token)
        expect(fw > fh, f"waiter fence {fw} not above holder fence {fh}")
        expect(waiter.release(), "waiter release failed")
    finally:
        close_all(holder, *(x for x in [waiter] if x not in busy))


def _sync_fifo(ep: Endpoint, key: str, n: int, make: Callable[[], Any],
               make_holder: Callable[[], Any], section: str) -> None:
    holder = make_holder()
    waiters = [make() for _ in range(n)]
    order: list[int] = []
    fences: list[int] = []
    mu = threading.Lock()

    def run(i: int) -> bool:
        w = waiters[i]
        ok = w.acquire()
        if ok:
            with mu:
                order.append(i)
                fences.append(fence_from_token(w.token))
            w.release()
        return ok

    threads = []
    try:
        expect(holder.acquire(), "holder not granted")
        fh = expect_token(holder.token)
        for i in range(n):
            threads.append(run_thread(lambda i=i: run(i), f"fifo-{i}"))
            poll_stats(ep, waiters_is(section, key, i + 1), f"{i + 1} waiters queued")
        expect(holder.release(), "holder release failed")
        for i, (t, box) in enumerate(threads):
            expect(join_result(t, box, 10, f"waiter {i}") is True, f"waiter {i} not granted")
        expect(order == list(range(n)), f"grant order {order}, expected {list(range(n))}")
        expect_increasing([fh] + fences, "FIFO grants")
    finally:
        idle = [w for w, (t, _) in zip(waiters, threads) if not t.is_alive()]
        close_all(holder, *idle, *waiters[len(threads):])


@check("plain")
def sync_fifo_order_lock(ctx: Ctx) -> None:
    key = ctx.key("sync-fifo")
    ep = ctx.plain
    _sync_fifo(ep, key, 4, lambda: ep.lock(key, acquire_timeout_s=15),
               lambda: ep.lock(key, acquire_timeout_s=0), "locks")


@check("plain")
def sync_semaphore_limit(ctx: Ctx) -> None:
    key = ctx.key("sync-sem")
    ep = ctx.plain
    a, b, c = (ep.sem(key, 2, acquire_timeout_s=0) for _ in range(3))
    mism = ep.sem(key, 3, acquire_timeout_s=0)
    lk = ep.lock(key, acquire_timeout_s=0)
    try:
        expect(a.acquire() is True, "holder 1 not granted")
        expect(b.acquire() is True, "holder 2 not granted")
        fa, fb = expect_token(a.token), expect_token(b.token)
        expect(fb > fa and a.token != b.token, "distinct increasing tokens expected")
        expect(c.acquire() is False, "third holder granted with limit 2")
        st = poll_stats(ep, lambda s: find_entry(s, "semaphores", key) is not None,
                        "semaphore in stats.semaphores", timeout=2)
        e = find_entry(st, "semaphores", key)
        expect(e is not None and e.get("limit") == 2 and e.get("holders") == 2,
               f"bad semaphore stats entry {e!r}")
        expect_raises(LimitMismatchError, mism.acquire, "acquire with limit 3")
        expect(mism.token is None, "mismatched acquire left a token")
        # Locks and semaphores are separate namespaces.
        expect(lk.acquire() is True, "lock with the semaphore's key name not free")
        lk.release()
        expect(a.release() is True, "release of holder 1 failed")
        expect(c.acquire() is True, "third holder not granted after a release")
        fc = expect_token(c.token)
        expect(fc > fb, "fence of third holder not above earlier ones")
        expect(b.release() and c.release(), "release failed")
    finally:
        close_all(a, b, c, mism, lk)


@check("plain")
def sync_semaphore_fifo_two_phase(ctx: Ctx) -> None:
    key = ctx.key("sync-sem-2p")
    ep = ctx.plain
    a, b = ep.sem(key, 2, acquire_timeout_s=0), ep.sem(key, 2, acquire_timeout_s=0)
    q1, q2 = ep.sem(key, 2), ep.sem(key, 2)
    try:
        expect(a.enqueue() == "acquired", "sem enqueue fast path not 'acquired'")
        expect(a.wait(5) is True, "wait after fast path not True")
        expect(b.acquire() is True, "second slot not granted")
        expect(q1.enqueue() == "queued", "third enqueue not queued")
        expect(q2.enqueue() == "queued", "fourth enqueue not queued")
        poll_stats(ep, waiters_is("semaphores", key, 2), "2 semaphore waiters")
        expect(a.release(), "release a failed")
        expect(q1.wait(5) is True, "first queued not granted after a release")
        expect(q2.wait(1) is False, "second queued granted although no slot is free")
        expect(b.release(), "release b failed")
        expect(q1.release(), "release q1 failed")
    finally:
        close_all(a, b, q1, q2)


@check("plain")
def sync_two_phase_fast_path(ctx: Ctx) -> None:
    key = ctx.key("sync-2p-fast")
    lk = ctx.plain.lock(key)
    try:
        expect(lk.enqueue() == "acquired", "enqueue on a free key not 'acquired'")
        tok = lk.token
        expect_token(tok)
        expect(lk.wait(5) is True, "wait after 'acquired' not True")
        expect(lk.token == tok, "token changed by wait")
        expect(lk.release() is True, "release failed")
    finally:
        close_all(lk)


@check("plain")
def sync_two_phase_queued_then_granted(ctx: Ctx) -> None:
    key = ctx.key("sync-2p-q")
    ep = ctx.plain
    holder = ep.lock(key, acquire_timeout_s=0)
    w1 = ep.lock(key)
    w2 = ep.lock(key)
    busy: list[Any] = []
    try:
        expect(holder.acquire(), "holder not granted")
        fh = expect_token(holder.token)
        # (a) promotion before wait(): release first, then wait returns at once.
        expect(w1.enqueue() == "queued", "enqueue while held not 'queued'")
        expect(w1.token is None, "queued enqueue set a token")
        poll_stats(ep, waiters_is("locks", key, 1), "1 queued waiter")
        expect(holder.release(), "holder release failed")
        expect(w1.wait(5) is True, "wait after promotion not True")
        f1 = expect_token(w1.token)
        # (b) wait() in flight while held, then release.
        expect(w2.enqueue() == "queued", "second enqueue not 'queued'")
        poll_stats(ep, waiters_is("locks", key, 1), "1 queued waiter (w2)")
        t, box = run_thread(lambda: w2.wait(10), "two-phase-wait")
        busy.append(w2)
        # Not a condition stand-in: gives the w frame a moment to reach the
        # server so the blocking path is exercised; either order is correct.
        time.sleep(0.3)
        expect(w1.release(), "w1 release failed")
        expect(join_result(t, box, 8, "wait") is True, "blocked wait not granted")
        busy.clear()
        f2 = expect_token(w2.token)
        expect_increasing([fh, f1, f2], "two-phase grants")
        expect(w2.release(), "w2 release failed")
    finally:
        close_all(holder, w1, *(x for x in [w2] if x not in busy))


@check("plain")
def sync_two_phase_wait_timeout(ctx: Ctx) -> None:
    key = ctx.key("sync-2p-to")
    ep = ctx.plain
    holder = ep.lock(key, acquire_timeout_s=0)
    w = ep.lock(key)
    try:
        expect(holder.acquire(), "holder not granted")
        expect(w.enqueue() == "queued", "enqueue while held not 'queued'")
        t0 = time.monotonic()
        expect(w.wait(1) is False, "wait(1) while held did not return False")
        dt = time.monotonic() - t0
        expect(0.5 <= dt < 4.0, f"wait(1) took {dt:.2f}s")
        expect(w.token is None, "token set after wait timeout")
        poll_stats(ep, waiters_is("locks", key, 0), "waiter removed after wait timeout")
        expect(holder.release(), "holder release failed")
    finally:
        close_all(holder, w)


@check("plain")
def sync_lease_renewal_keeps_lock(ctx: Ctx) -> None:
    key = ctx.key("sync-renew")
    ep = ctx.plain
    lk = ep.lock(key, lease_ttl_s=2, acquire_timeout_s=0)
    try:
        expect(lk.acquire(), "not granted")
        tok = lk.token
        expect(lk.lease == 2, f"granted lease {lk.lease}, expected 2")
        _hold_and_probe(ep, key, lambda: lk.token, tok, 4.0)
        expect(lk.lease == 2, f"lease after renewals {lk.lease}, expected 2")
        expect(lk.release() is True, "release after renewals failed")
    finally:
        close_all(lk)


def _hold_and_probe(ep: Endpoint, key: str, cur_token: Callable[[], Any], tok: str,
                    hold_s: float) -> None:
    """While hold_s passes, other clients' try-locks must keep failing."""
    deadline = time.monotonic() + hold_s
    probes = 0
    while True:
        probe = ep.lock(key, acquire_timeout_s=0)
        try:
            got = probe.acquire()
        finally:
            probe.close()
        expect(not got, f"another client acquired the key after "
                        f"{hold_s - (deadline - time.monotonic()):.1f}s (lease not renewed)")
        expect(cur_token() == tok, "holder lost its token (renew failed)")
        probes += 1
        if time.monotonic() >= deadline:
            break
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    st = poll_stats(ep, lambda s: True, "stats")
    e = find_entry(st, "locks", key)
    expect(e is not None and e.get("lease_expires_in_s", 0) > 0,
           f"after {hold_s}s the stats entry is {e!r}")


@check("plain")
def lease_expires_without_renewal(ctx: Ctx) -> None:
    """Control for the renewal checks: an un-renewed 1 s lease is lost."""
    key = ctx.key("ll-expire")
    ep = ctx.plain
    conn = ep.open()
    try:
        tok, lease = _sync.acquire(conn, key, 0, 1)
        expect(lease == 1, f"lease {lease}, expected 1")
        other = ep.lock(key, acquire_timeout_s=5)
        t0 = time.monotonic()
        try:
            expect(other.acquire() is True, "expired lease was never taken over")
            dt = time.monotonic() - t0
            expect(dt < 4.0, f"takeover after {dt:.2f}s")
        finally:
            other.release()
        expect_raises(DflockdError, lambda: _sync.renew(conn, key, tok),
                      "renew of an expired lease")
    finally:
        conn.close()


@check("plain")
def sync_disconnect_releases(ctx: Ctx) -> None:
    key = ctx.key("sync-disc")
    ep = ctx.plain
    holder = ep.lock(key, acquire_timeout_s=0)
    other = ep.lock(key, acquire_timeout_s=3)
    try:
        expect(holder.acquire(), "holder not granted")
        holder.close()  # no release frame: the server must auto-release
        expect(holder.token is None, "close() left a token")
        t0 = time.monotonic()
        expect(other.acquire() is True, "lock not free after the holder disconnected")
        dt = time.monotonic() - t0
        expect(dt < 1.5, f"auto-release took {dt:.2f}s")
        expect(other.release(), "release failed")
    finally:
        close_all(holder, other)


@check("plain")
def sync_instance_reuse(ctx: Ctx) -> None:
    key = ctx.key("sync-reuse")
    lk = ctx.plain.lock(key, acquire_timeout_s=0)
    try:
        fences = []
        for _ in range(3):
            expect(lk.acquire() is True, "re-acquire failed")
            fences.append(expect_token(lk.token))
            expect(lk.release() is True, "release failed")
        expect_increasing(fences, "reused instance")
    finally:
        close_all(lk)


@check("plain")
def sync_release_after_token_bearer_release_returns_false(ctx: Ctx) -> None:
    """High-level release() maps the server's `error` to False (no raise)."""
    key = ctx.key("sync-bogus-rel")
    ep = ctx.plain
    lk = ep.lock(key, acquire_timeout_s=0)
    conn = ep.open()
    try:
        expect(lk.acquire(), "not granted")
        _sync.release(conn, key, lk.token)  # token-bearer release from another conn
        expect(lk.release() is False, "release of an already released token not False")
        probe = ep.lock(key, acquire_timeout_s=0)
        try:
            expect(probe.acquire() is True, "key not free after token-bearer release")
        finally:
            probe.release()
    finally:
        conn.close()
        close_all(lk)


# ---------------------------------------------------------------------------
# Low-level sync
# ---------------------------------------------------------------------------


@check("plain")
def lowlevel_acquire_release_renew(ctx: Ctx) -> None:
    key = ctx.key("ll-basic")
    key2 = ctx.key("ll-basic2")
    ep = ctx.plain
    c1, c2 = ep.open(), ep.open()
    try:
        tok, lease = _sync.acquire(c1, key, 0, 10)
        expect_token(tok)
        expect(lease == 10, f"granted lease {lease}, expected 10")
        expect_raises(DflockdTimeoutError, lambda: _sync.acquire(c2, key, 0),
                      "try-lock on a held key")
        expect(_sync.renew(c1, key, tok, 7) == 7, "renew with lease 7 did not return 7")
        tok2, dlease = _sync.acquire(c1, key2, 0)  # server default lease
        expect(dlease >= 1, f"default lease {dlease}")
        r = _sync.renew(c1, key2, tok2)
        expect(r == dlease, f"renew without lease returned {r}, grant said {dlease}")
        # token-bearer: renew from another connection
        expect(_sync.renew(c2, key, tok, 9) == 9, "renew from another connection failed")
        bogus = "0" * 32
        e = expect_raises(DflockdError, lambda: _sync.release(c1, key, bogus),
                          "release with a bogus token")
        expect(type(e) is DflockdError, f"bogus release mapped to {type(e).__name__}")
        expect_raises(DflockdError, lambda: _sync.renew(c1, key, bogus), "renew bogus token")
        expect_raises(DflockdError, lambda: _sync.release(c1, ctx.key("nokey"), tok),
                      "release on an unknown key")
        # connection survives `error` replies
        _sync.release(c1, key, tok)
        _sync.release(c1, key2, tok2)
        expect_raises(DflockdError, lambda: _sync.release(c1, key, tok), "double release")
        expect_raises(DflockdError, lambda: _sync.renew(c1, key, tok), "renew after release")
        tok3, _ = _sync.acquire(c2, key, 0)
        _sync.release(c2, key, tok3)
    finally:
        c1.close()
        c2.close()


@check("plain")
def lowlevel_two_phase(ctx: Ctx) -> None:
    key = ctx.key("ll-2p")
    ep = ctx.plain
    c1, c2 = ep.open(), ep.open()
    try:
        status, tok, lease = _sync.enqueue(c1, key, 10)
        expect(status == "acquired", f"enqueue on free key -> {status!r}")
        f1 = expect_token(tok)
        expect(lease == 10, f"enqueue lease {lease}")
        wtok, wlease = _sync.wait(c1, key, 5)
        expect(wtok == tok and wlease == 10, f"wait after fast path -> {wtok}, {wlease}")
        expect_raises(NotQueuedError, lambda: _sync.wait(c1, key, 0),
                      "second wait after consumption")
        status, t2, l2 = _sync.enqueue(c2, key)
        expect((status, t2, l2) == ("queued", None, None), f"enqueue while held -> {status!r}")
        expect_raises(AlreadyQueuedError, lambda: _sync.enqueue(c2, key),
                      "second enqueue on the same connection")
        _sync.release(c1, key, tok)
        wtok, wlease = _sync.wait(c2, key, 5)
        f2 = expect_token(wtok)
        expect(f2 > f1, "fence not increasing")
        expect(wlease >= 1, f"lease {wlease}")
        # wait timeout -> DflockdTimeoutError, waiter dropped, then not_enqueued
        status, _, _ = _sync.enqueue(c1, key)
        expect(status == "queued", f"enqueue while held (c1) -> {status!r}")
        expect_raises(DflockdTimeoutError, lambda: _sync.wait(c1, key, 1), "wait timeout")
        expect_raises(NotQueuedError, lambda: _sync.wait(c1, key, 0), "wait after timeout")
        expect_raises(NotQueuedError, lambda: _sync.wait(c1, ctx.key("never"), 0),
                      "wait without enqueue")
        _sync.release(c2, key, wtok)
        # semaphore two-phase
        skey = ctx.key("ll-2p-sem")
        s, st1, _ = _sync.sem_enqueue(c1, skey, 1)
        expect(s == "acquired", f"sem_enqueue -> {s!r}")
        s, _, _ = _sync.sem_enqueue(c2, skey, 1)
        expect(s == "queued", f"second sem_enqueue -> {s!r}")
        expect_raises(NotQueuedError, lambda: _sync.wait(c2, skey, 0),
                      "lock wait after sem enqueue (namespaces)")
        _sync.sem_release(c1, skey, st1)  # type: ignore[arg-type]
        st2, _ = _sync.sem_wait(c2, skey, 5)
        expect_token(st2)
        _sync.sem_release(c2, skey, st2)
    finally:
        c1.close()
        c2.close()


@check("plain")
def lowlevel_semaphore(ctx: Ctx) -> None:
    key = ctx.key("ll-sem")
    ep = ctx.plain
    c1, c2 = ep.open(), ep.open()
    try:
        t1, _ = _sync.sem_acquire(c1, key, 0, 2, 10)
        t2, _ = _sync.sem_acquire(c2, key, 0, 2)
        expect_raises(DflockdTimeoutError, lambda: _sync.sem_acquire(c1, key, 0, 2),
                      "third slot")
        expect_raises(LimitMismatchError, lambda: _sync.sem_acquire(c1, key, 0, 5),
                      "limit mismatch")
        expect_raises(LimitMismatchError, lambda: _sync.sem_enqueue(c1, key, 1),
                      "sem_enqueue limit mismatch")
        expect(_sync.sem_renew(c1, key, t1, 4) == 4, "sem_renew lease")
        expect_raises(DflockdError, lambda: _sync.release(c1, key, t1),
                      "lock release with a semaphore token")
        _sync.sem_release(c1, key, t1)
        t3, _ = _sync.sem_acquire(c1, key, 0, 2)
        expect_increasing([fence_from_token(t1), fence_from_token(t2), fence_from_token(t3)],
                          "semaphore grants")
        _sync.sem_release(c1, key, t3)
        _sync.sem_release(c2, key, t2)
        expect_raises(DflockdError, lambda: _sync.sem_release(c2, key, t2), "double sem release")
    finally:
        c1.close()
        c2.close()


@check("plain")
def lowlevel_fence_order_across_keys(ctx: Ctx) -> None:
    ep = ctx.plain
    conn = ep.open()
    try:
        fences = []
        held = []
        for i in range(6):
            k = ctx.key(f"fence{i}")
            if i % 2:
                tok, _ = _sync.sem_acquire(conn, k, 0, 3)
                held.append((k, tok, "s"))
            else:
                tok, _ = _sync.acquire(conn, k, 0)
                held.append((k, tok, ""))
            fences.append(expect_token(tok))
        expect_increasing(fences, "sequential grants on different keys")
        # a high-level grant afterwards (other connection) is higher still
        lk = ep.lock(ctx.key("fence-hl"), acquire_timeout_s=0)
        try:
            expect(lk.acquire(), "high-level grant failed")
            expect(fence_from_token(lk.token) > fences[-1], "high-level fence not higher")
        finally:
            lk.release()
        for k, tok, p in held:
            _sync.release(conn, k, tok, prefix=p)
    finally:
        conn.close()


@check("plain")
def lowlevel_stats_shape(ctx: Ctx) -> None:
    ep = ctx.plain
    lkey, skey = ctx.key("st-lock"), ctx.key("st-sem")
    c1, c2, c3 = ep.open(), ep.open(), ep.open()
    try:
        st = _sync.stats(c3)
        expect(isinstance(st.get("connections"), int) and not isinstance(st["connections"], bool)
               and st["connections"] >= 1, f"bad connections {st.get('connections')!r}")
        for f in ("locks", "semaphores", "idle_locks", "idle_semaphores"):
            expect(isinstance(st.get(f), list), f"{f} not a list")
        base_conns = st["connections"]
        ltok, _ = _sync.acquire(c1, lkey, 0, 30)
        stok, _ = _sync.sem_acquire(c2, skey, 0, 2, 30)
        st = _sync.stats(c3)
        expect(st["connections"] >= 3, f"connections {st['connections']} < 3 open ones")
        expect(st["connections"] >= base_conns, "connection count went down")
        e = find_entry(st, "locks", lkey)
        expect(e is not None, f"held lock {lkey} not under locks")
        assert e is not None
        expect(isinstance(e.get("owner_conn_id"), int) and e["owner_conn_id"] > 0,
               f"bad owner_conn_id in {e}")
        expect(e.get("waiters") == 0, f"waiters in {e}")
        lei = e.get("lease_expires_in_s")
        expect(isinstance(lei, (int, float)) and 0 < lei <= 30, f"lease_expires_in_s in {e}")
        s = find_entry(st, "semaphores", skey)
        expect(s is not None, f"held semaphore {skey} not under semaphores")
        assert s is not None
        expect(s.get("limit") == 2 and s.get("holders") == 1 and s.get("waiters") == 0,
               f"bad semaphore entry {s}")
        expect(find_entry(st, "locks", skey) is None, "semaphore also listed under locks")
        # owner ids of two different connections differ
        ltok2, _ = _sync.acquire(c2, lkey + "b", 0, 30)
        st = _sync.stats(c3)
        e2 = find_entry(st, "locks", lkey + "b")
        expect(e2 is not None and e2.get("owner_conn_id") != e.get("owner_conn_id"),
               f"owner_conn_id not per connection: {e} vs {e2}")
        _sync.release(c1, lkey, ltok)
        _sync.release(c2, lkey + "b", ltok2)
        _sync.sem_release(c2, skey, stok)
        st = _sync.stats(c3)
        expect(find_entry(st, "locks", lkey) is None, "released lock still under locks")
        expect(find_entry(st, "semaphores", skey) is None,
               "released semaphore still under semaphores")
    finally:
        close_all(c1, c2, c3)


@check("plain")
def plain_server_rejects_auth_command(ctx: Ctx) -> None:
    """auth to a server without a token -> `error` -> client PermissionError."""
    lk = ctx.plain.lock(ctx.key("noauth"), acquire_timeout_s=0, auth_token="whatever")
    try:
        expect_raises(PermissionError, lk.acquire, "auth against a no-auth server")
    finally:
        close_all(lk)


# ---------------------------------------------------------------------------
# Async high-level and low-level
# ---------------------------------------------------------------------------


async def _alock_round_trip(ep: Endpoint, key: str) -> None:
    lk = ep.alock(key, acquire_timeout_s=5)
    async with lk as held:
        expect(held is lk, "__aenter__ did not return the lock")
        expect_token(lk.token)
        expect(lk.lease >= 1, f"bad lease {lk.lease!r}")
        st = await apoll_stats(ep, lambda s: find_entry(s, "locks", key) is not None,
                               "held key in stats.locks", timeout=2)
        e = find_entry(st, "locks", key)
        expect(e is not None and e.get("owner_conn_id", 0) > 0, f"bad stats entry {e!r}")
    expect(lk.token is None, "token not cleared after __aexit__")
    other = ep.alock(key, acquire_timeout_s=0)
    try:
        expect(await other.acquire() is True, "key not free after async release")
    finally:
        await other.release()


@check("plain")
async def async_lock_context_manager(ctx: Ctx) -> None:
    await _alock_round_trip(ctx.plain, ctx.key("async-cm"))


@check("plain")
async def async_trylock_mutual_exclusion(ctx: Ctx) -> None:
    key = ctx.key("async-try")
    a = ctx.plain.alock(key, acquire_timeout_s=0)
    b = ctx.plain.alock(key, acquire_timeout_s=0)
    try:
        expect(await a.acquire() is True, "first try-lock not granted")
        fa = expect_token(a.token)
        expect(await b.acquire() is False, "second try-lock granted while held")
        expect(await a.release() is True, "release failed")
        expect(await b.acquire() is True, "try-lock not granted after release")
        expect(expect_token(b.token) > fa, "fence not increasing")
        expect(await b.release() is True, "release failed")
    finally:
        await aclose_all(a, b)


@check("plain")
async def async_blocking_acquire_granted_on_release(ctx: Ctx) -> None:
    key = ctx.key("async-block")
    ep = ctx.plain
    holder = ep.alock(key, acquire_timeout_s=0)
    waiter = ep.alock(key, acquire_timeout_s=10)
    task = None
    try:
        expect(await holder.acquire(), "holder not granted")
        fh = expect_token(holder.token)
        task = asyncio.create_task(waiter.acquire())
        await apoll_stats(ep, waiters_is("locks", key, 1), "1 waiter")
        expect(not task.done(), "blocking acquire finished while held")
        expect(await holder.release(), "holder release failed")
        got = await asyncio.wait_for(task, 8)
        expect(got is True, f"blocking acquire returned {got!r}")
        expect(expect_token(waiter.token) > fh, "fence not increasing")
        expect(await waiter.release(), "waiter release failed")
    finally:
        if task is not None and not task.done():
            task.cancel()
        await aclose_all(holder, waiter)


@check("plain")
async def async_fifo_order_lock(ctx: Ctx) -> None:
    key = ctx.key("async-fifo")
    ep = ctx.plain
    n = 4
    holder = ep.alock(key, acquire_timeout_s=0)
    waiters = [ep.alock(key, acquire_timeout_s=15) for _ in range(n)]
    order: list[int] = []
    fences: list[int] = []

    async def run(i: int) -> bool:
        ok = await waiters[i].acquire()
        if ok:
            order.append(i)
            fences.append(fence_from_token(waiters[i].token))  # type: ignore[arg-type]
            await waiters[i].release()
        return ok

    tasks: list[asyncio.Task[bool]] = []
    try:
        expect(await holder.acquire(), "holder not granted")
        fh = expect_token(holder.token)
        for i in range(n):
            tasks.append(asyncio.create_task(run(i)))
            await apoll_stats(ep, waiters_is("locks", key, i + 1), f"{i + 1} waiters")
        expect(await holder.release(), "holder release failed")
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        expect(all(results), f"not all waiters granted: {results}")
        expect(order == list(range(n)), f"grant order {order}")
        expect_increasing([fh] + fences, "async FIFO grants")
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await aclose_all(holder, *waiters)


@check("plain")
async def async_semaphore_limit(ctx: Ctx) -> None:
    key = ctx.key("async-sem")
    ep = ctx.plain
    a, b, c = (ep.asem(key, 2, acquire_timeout_s=0) for _ in range(3))
    mism = ep.asem(key, 1, acquire_timeout_s=0)
    try:
        expect(await a.acquire() and await b.acquire(), "two holders not granted")
        expect(await c.acquire() is False, "third holder granted with limit 2")
        await aexpect_raises(LimitMismatchError, mism.acquire(), "acquire with limit 1")
        expect(await a.release(), "release failed")
        expect(await c.acquire() is True, "third holder not granted after release")
        expect(expect_token(c.token) > expect_token(b.token), "fence not increasing")
        expect(await b.release() and await c.release(), "release failed")
    finally:
        await aclose_all(a, b, c, mism)


@check("plain")
async def async_two_phase(ctx: Ctx) -> None:
    key = ctx.key("async-2p")
    ep = ctx.plain
    a, w, w2 = ep.alock(key), ep.alock(key), ep.alock(key)
    task = None
    try:
        expect(await a.enqueue() == "acquired", "fast path not 'acquired'")
        expect(await a.wait(5) is True, "wait after fast path not True")
        fa = expect_token(a.token)
        expect(await w.enqueue() == "queued", "enqueue while held not 'queued'")
        await apoll_stats(ep, waiters_is("locks", key, 1), "1 queued waiter")
        task = asyncio.create_task(w.wait(10))
        await asyncio.sleep(0.3)  # let the w frame reach the server (either order is valid)
        expect(not task.done(), "wait finished while held")
        expect(await a.release(), "release failed")
        expect(await asyncio.wait_for(task, 8) is True, "queued wait not granted")
        fw = expect_token(w.token)
        expect(fw > fa, "fence not increasing")
        # wait timeout -> False
        expect(await w2.enqueue() == "queued", "enqueue while held (w2) not 'queued'")
        t0 = time.monotonic()
        expect(await w2.wait(1) is False, "wait(1) while held not False")
        expect(time.monotonic() - t0 < 4.0, "wait(1) took too long")
        expect(w2.token is None, "token after wait timeout")
        expect(await w.release(), "release failed")
    finally:
        if task is not None and not task.done():
            task.cancel()
        await aclose_all(a, w, w2)


@check("plain")
async def async_lease_renewal_keeps_lock(ctx: Ctx) -> None:
    key = ctx.key("async-renew")
    ep = ctx.plain
    lk = ep.alock(key, lease_ttl_s=2, acquire_timeout_s=0)
    conn = await ep.aopen()
    try:
        expect(await lk.acquire(), "not granted")
        tok = lk.token
        expect(lk.lease == 2, f"granted lease {lk.lease}")
        deadline = time.monotonic() + 4.0
        while True:
            with_exc = None
            try:
                await _async.acquire(conn, key, 0)
            except DflockdTimeoutError:
                pass
            except Exception as e:  # noqa: BLE001
                with_exc = e
            else:
                raise CheckFailed("another client acquired the key (lease not renewed)")
            expect(with_exc is None, f"probe failed: {with_exc!r}")
            expect(lk.token == tok, "holder lost its token (renew failed)")
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        expect(lk.lease == 2, f"lease after renewals {lk.lease}")
        expect(await lk.release() is True, "release after renewals failed")
    finally:
        await conn.close()
        await aclose_all(lk)


@check("plain")
async def async_disconnect_releases(ctx: Ctx) -> None:
    key = ctx.key("async-disc")
    ep = ctx.plain
    holder = ep.alock(key, acquire_timeout_s=0)
    other = ep.alock(key, acquire_timeout_s=3)
    try:
        expect(await holder.acquire(), "holder not granted")
        await holder.aclose()
        expect(holder.token is None, "aclose() left a token")
        t0 = time.monotonic()
        expect(await other.acquire() is True, "lock not free after holder disconnected")
        expect(time.monotonic() - t0 < 1.5, "auto-release not prompt")
        expect(await other.release(), "release failed")
    finally:
        await aclose_all(holder, other)


@check("plain")
async def async_lowlevel(ctx: Ctx) -> None:
    key = ctx.key("async-ll")
    ep = ctx.plain
    c1, c2 = await ep.aopen(), await ep.aopen()
    try:
        tok, lease = await _async.acquire(c1, key, 0, 10)
        f1 = expect_token(tok)
        expect(lease == 10, f"lease {lease}")
        await aexpect_raises(DflockdTimeoutError, _async.acquire(c2, key, 0), "try-lock held")
        # Both connections have been served by now, so both are counted
        # (right after connect the server may not have accepted c2 yet).
        st = await _async.stats(c1)
        expect(isinstance(st["connections"], int) and st["connections"] >= 2,
               f"connections {st['connections']}")
        expect(await _async.renew(c1, key, tok, 5) == 5, "renew")
        await aexpect_raises(DflockdError, _async.release(c2, key, "f" * 32), "bogus release")
        s, _, _ = await _async.enqueue(c2, key, 10)
        expect(s == "queued", f"enqueue -> {s}")
        st = await _async.stats(c1)
        e = find_entry(st, "locks", key)
        expect(e is not None and e.get("waiters") == 1, f"stats entry {e}")
        await _async.release(c1, key, tok)
        t2, l2 = await _async.wait(c2, key, 5)
        expect(expect_token(t2) > f1 and l2 == 10, "wait grant")
        await _async.release(c2, key, t2)
        skey = ctx.key("async-ll-sem")
        st1, _ = await _async.sem_acquire(c1, skey, 0, 2)
        s, st2, _ = await _async.sem_enqueue(c2, skey, 2)
        expect(s == "acquired", f"sem_enqueue -> {s}")
        expect((await _async.sem_wait(c2, skey, 1))[0] == st2, "sem_wait token")
        expect(await _async.sem_renew(c2, skey, st2, 3) == 3, "sem_renew")
        await aexpect_raises(LimitMismatchError, _async.sem_acquire(c1, skey, 0, 4), "mismatch")
        await _async.sem_release(c1, skey, st1)
        await _async.sem_release(c2, skey, st2)  # type: ignore[arg-type]
    finally:
        await c1.close()
        await c2.close()


# ---------------------------------------------------------------------------
# Auth server checks
# ---------------------------------------------------------------------------


@check("auth")
def auth_sync_right_token(ctx: Ctx) -> None:
    assert ctx.auth is not None
    _lock_round_trip(ctx.auth, ctx.key("auth-sync"))


@check("auth")
async def auth_async_right_token(ctx: Ctx) -> None:
    assert ctx.auth is not None
    await _alock_round_trip(ctx.auth, ctx.key("auth-async"))


@check("auth")
def auth_lowlevel_authenticate(ctx: Ctx) -> None:
    assert ctx.auth is not None
    conn = ctx.auth.open()  # authenticate() with the right token
    try:
        st = _sync.stats(conn)
        expect(st["connections"] >= 1, "stats after auth")
        key = ctx.key("auth-ll")
        tok, _ = _sync.acquire(conn, key, 0)
        _sync.release(conn, key, tok)
    finally:
        conn.close()


@check("auth")
def auth_sync_wrong_token_rejected(ctx: Ctx) -> None:
    assert ctx.auth is not None
    ep = ctx.auth
    for bad in (ctx.args.auth_token + "x", ""):
        lk = ep.lock(ctx.key("auth-bad"), acquire_timeout_s=0, auth_token=bad)
        try:
            e = expect_raises(PermissionError, lk.acquire, f"acquire with token {bad!r}")
            expect("error_auth" in str(e), f"unexpected message {e}")
            expect(lk.token is None, "token after failed auth")
        finally:
            close_all(lk)
    e = expect_raises(PermissionError, lambda: ep.open(auth_token="wrong-" + ctx.run_id),
                      "low-level authenticate with a wrong token")


@check("auth")
async def auth_async_wrong_token_rejected(ctx: Ctx) -> None:
    assert ctx.auth is not None
    lk = ctx.auth.alock(ctx.key("auth-abad"), acquire_timeout_s=0,
                        auth_token=ctx.args.auth_token + "x")
    try:
        await aexpect_raises(PermissionError, lk.acquire(), "async acquire with a wrong token")
    finally:
        await aclose_all(lk)


@check("auth")
def auth_missing_token_rejected(ctx: Ctx) -> None:
    """No auth frame: the server answers the first command with error_auth,
    which the client's status table maps to AuthError (a DflockdError)."""
    assert ctx.auth is not None
    lk = ctx.auth.lock(ctx.key("auth-none"), acquire_timeout_s=0, auth_token=None)
    try:
        expect_raises(AuthError, lk.acquire, "acquire without auth")
    finally:
        close_all(lk)
    conn = ctx.auth.open(auth_token=None)
    try:
        expect_raises(AuthError, lambda: _sync.stats(conn), "stats without auth")
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# TLS server checks
# ---------------------------------------------------------------------------


@check("tls")
def tls_sync_lock_round_trip(ctx: Ctx) -> None:
    assert ctx.tls is not None
    _lock_round_trip(ctx.tls, ctx.key("tls-sync"))


@check("tls")
async def tls_async_lock_round_trip(ctx: Ctx) -> None:
    assert ctx.tls is not None
    await _alock_round_trip(ctx.tls, ctx.key("tls-async"))


@check("tls")
def tls_lowlevel_and_mutual_exclusion(ctx: Ctx) -> None:
    assert ctx.tls is not None
    ep = ctx.tls
    key = ctx.key("tls-ll")
    c1, c2 = ep.open(), ep.open()
    try:
        tok, _ = _sync.acquire(c1, key, 0, 10)
        expect_token(tok)
        expect_raises(DflockdTimeoutError, lambda: _sync.acquire(c2, key, 0), "try-lock held")
        expect(_sync.renew(c1, key, tok, 6) == 6, "renew over TLS")
        st = _sync.stats(c2)
        expect(find_entry(st, "locks", key) is not None, "held key not in stats over TLS")
        _sync.release(c1, key, tok)
        tok2, _ = _sync.acquire(c2, key, 0)
        _sync.release(c2, key, tok2)
    finally:
        c1.close()
        c2.close()


@check("tls")
def tls_rejects_untrusted_server(ctx: Ctx) -> None:
    """Sanity: the TLS checks really verify; without CA.pem the handshake fails."""
    assert ctx.tls is not None
    ep = ctx.tls
    bare = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # system CAs only
    expect_raises(ssl.SSLCertVerificationError,
                  lambda: _sync.open_conn(ep.host, ep.port, ssl_context=bare,
                                          connect_timeout_s=CONNECT_TIMEOUT_S).close(),
                  "TLS connect without the test CA")


@check("tls-auth")
def tls_auth_wrong_token_rejected(ctx: Ctx) -> None:
    assert ctx.tls is not None and ctx.tls.auth_token is not None
    lk = ctx.tls.lock(ctx.key("tls-auth-bad"), acquire_timeout_s=0,
                      auth_token=ctx.tls.auth_token + "x")
    try:
        expect_raises(PermissionError, lk.acquire, "TLS acquire with a wrong token")
    finally:
        close_all(lk)


# ---------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------


def run_check(fn: Callable[..., Any], ctx: Ctx, timeout: float) -> str | None:
    """Run one check in a daemon thread; returns None on success or a reason."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            if inspect.iscoroutinefunction(fn):
                async def bounded() -> None:
                    await asyncio.wait_for(fn(ctx), timeout)
                asyncio.run(bounded())
            else:
                fn(ctx)
            box["ok"] = True
        except BaseException as e:  # noqa: BLE001
            box["error"] = e
            box["tb"] = traceback.format_exc()

    t = threading.Thread(target=target, name="check", daemon=True)
    t.start()
    t.join(timeout + 3)
    if t.is_alive():
        return f"did not finish within {timeout:.0f}s"
    if "ok" in box:
        return None
    e = box.get("error")
    if isinstance(e, CheckFailed):
        return str(e)
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)) and not str(e):
        return f"{type(e).__name__} (check exceeded {timeout:.0f}s or client timeout)"
    if ctx.args.verbose and "tb" in box:
        sys.stderr.write(box["tb"])
    return f"{type(e).__name__}: {e}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="plain/auth server host")
    p.add_argument("--port", type=int, required=True, help="plain server port (no auth)")
    p.add_argument("--auth-port", type=int, help="port of a server started with --auth-token")
    p.add_argument("--auth-token", help="that server's token")
    p.add_argument("--tls-port", type=int, help="port of a TLS server")
    p.add_argument("--tls-ca", help="CA PEM that signed the TLS server certificate")
    p.add_argument("--tls-host", default="127.0.0.1",
                   help="host used for TLS connections (also the verified name); "
                        "default 127.0.0.1")
    p.add_argument("--tls-auth-token", help="auth token of the TLS server, if it has one")
    p.add_argument("--check-timeout", type=float, default=20.0,
                   help="upper bound per check in seconds (default 20)")
    p.add_argument("-k", dest="only", action="append", default=[],
                   help="run only checks whose name contains this substring (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print tracebacks and client log output")
    a = p.parse_args(argv)
    if a.auth_port is not None and not a.auth_token:
        p.error("--auth-port needs --auth-token")
    if a.tls_port is not None and not a.tls_ca:
        p.error("--tls-port needs --tls-ca")
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.CRITICAL,
                        format="  [%(name)s %(levelname)s] %(message)s")
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    if not args.verbose:
        # release() of a dead token logs a WARNING by design; renew failures
        # (ERROR) are reported by the checks themselves.
        logging.getLogger("dflockd_client").setLevel(logging.CRITICAL)
    try:
        ctx = Ctx(args)
    except (OSError, ssl.SSLError) as e:
        print(f"cannot set up: {type(e).__name__}: {e}", file=sys.stderr)
        print("python-interop: 0 passed, 0 failed", flush=True)
        return 1
    groups = {"plain"}
    if ctx.auth is not None:
        groups.add("auth")
    if ctx.tls is not None:
        groups.add("tls")
        if ctx.tls.auth_token is not None:
            groups.add("tls-auth")
    print(f"# dflockd-client {getattr(dflockd_client, '__version__', '?')} "
          f"({dflockd_client.__file__}); python {sys.version.split()[0]}; run {ctx.run_id}; "
          f"groups {sorted(groups)}", flush=True)
    passed = failed = 0
    t_start = time.monotonic()
    for group, name, fn in CHECKS:
        if group not in groups:
            continue
        if args.only and not any(s in name for s in args.only):
            continue
        t0 = time.monotonic()
        reason = run_check(fn, ctx, args.check_timeout)
        dt = time.monotonic() - t0
        if args.verbose:
            print(f"# {name}: {dt:.2f}s", flush=True)
        if reason is None:
            passed += 1
            print(f"PASS {name}", flush=True)
        else:
            failed += 1
            reason = " ".join(reason.split())
            print(f"FAIL {name}: {reason}", flush=True)
    if args.verbose:
        print(f"# total {time.monotonic() - t_start:.1f}s", flush=True)
    print(f"python-interop: {passed} passed, {failed} failed", flush=True)
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
