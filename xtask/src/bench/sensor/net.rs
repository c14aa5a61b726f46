//! The sensor benchmark's traffic: a threaded TCP server (the "gateway", inside the cgroup) and the
//! clients (this process, outside it), on loopback with std::net.
//!
//! Every connection starts with a 9-byte header from the client: the mode (`B` bulk, `R` keep-alive
//! request/response, `C` one request/response then the server closes), then the request and response
//! sizes as little-endian u32. A connection that sends no header (the readiness probe) is dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use super::interrupted;
use crate::bench::procs::Proc;

const MODE_BULK: u8 = b'B';
const MODE_RR: u8 = b'R';
const MODE_CONNECT: u8 = b'C';

/// Read size of the server's bulk sink.
const SINK_BUF: usize = 256 * 1024;

/// Blocking reads and writes give up after this long (a stuck peer fails the bench, not hangs it).
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Request/response exchanges per connection before the measurement starts.
const RR_WARMUP: usize = 50;

/// What one phase of load did.
#[derive(Debug, Default)]
pub struct Load {
    /// Bytes the server received (bulk), requests answered (rr) or connections completed (connect).
    pub amount: u64,
    pub elapsed: Duration,
    /// Per request or connection (not bulk), in ns.
    pub latencies_ns: Vec<u32>,
}

fn header(mode: u8, req: u32, resp: u32) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[0] = mode;
    h[1..5].copy_from_slice(&req.to_le_bytes());
    h[5..9].copy_from_slice(&resp.to_le_bytes());
    h
}

fn nanos(d: Duration) -> u32 {
    u32::try_from(d.as_nanos()).unwrap_or(u32::MAX)
}

fn open(addr: SocketAddr, nodelay: bool) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(nodelay).context("TCP_NODELAY")?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .context("SO_RCVTIMEO")?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .context("SO_SNDTIMEO")?;
    Ok(s)
}

/// Waits until the server accepts connections (it listens only once it is in its cgroup).
pub fn wait_listening(addr: SocketAddr, server: &mut Proc, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(st) = server.exited() {
            bail!(
                "the server exited ({st}) before it listened; its output:\n{}",
                server.log_tail(20)
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!(
                "the server does not listen on {addr} after {limit:?}; its output:\n{}",
                server.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A bulk connection: the client streams `write_bytes` per write; at the end the server's count of
/// what arrived must match what was sent.
struct BulkConn {
    s: TcpStream,
    buf: Vec<u8>,
    sent: u64,
}

impl BulkConn {
    fn open(addr: SocketAddr, write_bytes: usize) -> Result<BulkConn> {
        let mut s = open(addr, false)?;
        s.write_all(&header(MODE_BULK, 0, 0))
            .context("sending the header")?;
        Ok(BulkConn {
            s,
            buf: vec![b'x'; write_bytes],
            sent: 0,
        })
    }

    /// One write; returns the bytes written.
    fn write(&mut self) -> Result<u64> {
        self.s
            .write_all(&self.buf)
            .context("streaming to the server")?;
        let n = self.buf.len() as u64;
        self.sent += n;
        Ok(n)
    }

    /// Half-closes and waits for the server's count; returns the bytes it received.
    fn finish(mut self) -> Result<u64> {
        self.s
            .shutdown(Shutdown::Write)
            .context("shutdown(SHUT_WR)")?;
        let mut count = [0u8; 8];
        self.s
            .read_exact(&mut count)
            .context("reading the server's byte count")?;
        let received = u64::from_le_bytes(count);
        if received != self.sent {
            bail!(
                "the server received {received} bytes, the client sent {}",
                self.sent
            );
        }
        Ok(received)
    }
}

/// A keep-alive request/response connection (TCP_NODELAY), its header sent and [`RR_WARMUP`]
/// exchanges done.
struct RrConn {
    s: TcpStream,
    request: Vec<u8>,
    response: Vec<u8>,
}

impl RrConn {
    fn open(addr: SocketAddr, req: u32, resp: u32) -> Result<RrConn> {
        let mut s = open(addr, true)?;
        s.write_all(&header(MODE_RR, req, resp))
            .context("sending the header")?;
        let mut c = RrConn {
            s,
            request: vec![b'q'; req as usize],
            response: vec![0u8; resp as usize],
        };
        for _ in 0..RR_WARMUP {
            c.exchange()?;
        }
        Ok(c)
    }

    fn exchange(&mut self) -> Result<()> {
        self.s
            .write_all(&self.request)
            .context("sending a request")?;
        self.s
            .read_exact(&mut self.response)
            .context("reading a response")
    }
}

/// Bulk: one connection, `write_bytes` per write for `dur`, then the server's count of what arrived.
pub fn bulk(addr: SocketAddr, dur: Duration, write_bytes: usize) -> Result<Load> {
    let mut c = BulkConn::open(addr, write_bytes)?;
    let start = Instant::now();
    while start.elapsed() < dur && !interrupted() {
        c.write()?;
    }
    let received = c.finish()?;
    Ok(Load {
        amount: received,
        elapsed: start.elapsed(),
        latencies_ns: Vec::new(),
    })
}

/// Request/response: `conns` keep-alive connections, one thread each, each sending its next request as
/// soon as the previous response arrived (closed loop), for `dur`.
pub fn rr(addr: SocketAddr, conns: usize, req: u32, resp: u32, dur: Duration) -> Result<Load> {
    let barrier = Barrier::new(conns + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..conns)
            .map(|_| {
                let barrier = &barrier;
                scope.spawn(move || -> Result<Vec<u32>> {
                    // Warmed up before the barrier; a failed connection still waits at the
                    // barrier so the others are not left hanging.
                    let warmed = RrConn::open(addr, req, resp);
                    barrier.wait();
                    let mut c = warmed?;
                    let start = Instant::now();
                    let mut lat = Vec::with_capacity(1 << 16);
                    while start.elapsed() < dur && !interrupted() {
                        let t = Instant::now();
                        c.exchange()?;
                        lat.push(nanos(t.elapsed()));
                    }
                    Ok(lat)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut load = Load::default();
        let mut first_err = None;
        for w in workers {
            match w.join() {
                Ok(Ok(lat)) => {
                    load.amount += lat.len() as u64;
                    load.latencies_ns.extend(lat);
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(anyhow::anyhow!("a client thread panicked"));
                }
            }
        }
        load.elapsed = start.elapsed();
        match first_err {
            Some(e) => Err(e),
            None => Ok(load),
        }
    })
}

/// Connect: a fresh connection per request (TCP_NODELAY), the server answers and closes first (so the
/// TIME_WAIT sockets are the server's), the client reads to EOF and closes, one at a time for `dur`.
pub fn connect(addr: SocketAddr, req: u32, resp: u32, dur: Duration) -> Result<Load> {
    let mut lat = Vec::with_capacity(1 << 15);
    let start = Instant::now();
    while start.elapsed() < dur && !interrupted() {
        let t = Instant::now();
        connect_once(addr, req, resp)?;
        lat.push(nanos(t.elapsed()));
    }
    Ok(Load {
        amount: lat.len() as u64,
        elapsed: start.elapsed(),
        latencies_ns: lat,
    })
}

/// Load that runs until it is stopped (the side-by-side mode): client threads that count what they
/// moved (bytes for bulk, requests, connections) in one counter, which the bench reads whenever it
/// likes, so that two servers' rates are taken over exactly the same seconds.
pub struct Running {
    units: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

/// What a [`Running`] load does: bulk (one connection, `write_bytes` per write), keep-alive
/// request/response over `conns` connections, or a new connection per request.
#[derive(Clone, Copy, Debug)]
pub enum Traffic {
    Bulk { write_bytes: usize },
    Rr { conns: usize, req: u32, resp: u32 },
    Connect { req: u32, resp: u32 },
}

impl Running {
    /// Starts the client threads (thread i pinned to `cpus[i]` when `cpus` is not empty); returns
    /// once every connection is open and warmed up, or the first error of a thread that could not
    /// pin itself or connect.
    pub fn start(addr: SocketAddr, traffic: Traffic, cpus: &[usize]) -> Result<Running> {
        let units = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let n = match traffic {
            Traffic::Rr { conns, .. } => conns,
            _ => 1,
        };
        let ready = Arc::new(Barrier::new(n + 1));
        let threads = (0..n)
            .map(|i| {
                let (units, stop, ready, failed) =
                    (units.clone(), stop.clone(), ready.clone(), failed.clone());
                let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
                std::thread::spawn(move || {
                    let prepared = cpu
                        .map_or(Ok(()), |c| pin(0, &[c]))
                        .and_then(|()| Client::open(addr, traffic));
                    if prepared.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    // Every thread reaches the barrier once, ready or not, so the starter is
                    // never left waiting.
                    ready.wait();
                    prepared?.run(&units, &stop)
                })
            })
            .collect();
        ready.wait();
        let running = Running {
            units,
            stop,
            threads,
        };
        if failed.load(Ordering::SeqCst) {
            running.stop()?;
            bail!("a client thread failed before the load started");
        }
        Ok(running)
    }

    /// Units moved so far.
    pub fn units(&self) -> u64 {
        self.units.load(Ordering::Relaxed)
    }

    /// Whether a client thread has ended before being stopped (an error: [`Running::stop`] says
    /// which).
    pub fn broken(&self) -> bool {
        self.threads.iter().any(|t| t.is_finished())
    }

    /// Stops and joins the threads; the first error of any of them.
    pub fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let mut first = None;
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first.get_or_insert(e);
                }
                Err(_) => {
                    first.get_or_insert(anyhow::anyhow!("a client thread panicked"));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Pins thread `tid` (0: the calling thread) to `cpus`.
pub fn pin(tid: i32, cpus: &[usize]) -> Result<()> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).with_context(|| format!("CPU {c}"))?;
    }
    sched_setaffinity(Pid::from_raw(tid), &set)
        .with_context(|| format!("pinning thread {tid} to CPUs {cpus:?}"))
}

/// The CPUs this process may run on, in order.
pub fn usable_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Pins every thread of process `pid` to `cpus`.
pub fn pin_process(pid: u32, cpus: &[usize]) -> Result<()> {
    let dir = format!("/proc/{pid}/task");
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let e = e.with_context(|| format!("listing {dir}"))?;
        if let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) {
            pin(tid, cpus)?;
        }
    }
    Ok(())
}

/// One client thread of a [`Running`] load, its connection open (and warmed up).
enum Client {
    Bulk(BulkConn),
    Rr(RrConn),
    /// A new connection per request.
    Connect {
        addr: SocketAddr,
        req: u32,
        resp: u32,
    },
}

impl Client {
    fn open(addr: SocketAddr, traffic: Traffic) -> Result<Client> {
        Ok(match traffic {
            Traffic::Bulk { write_bytes } => Client::Bulk(BulkConn::open(addr, write_bytes)?),
            Traffic::Rr { req, resp, .. } => Client::Rr(RrConn::open(addr, req, resp)?),
            Traffic::Connect { req, resp } => Client::Connect { addr, req, resp },
        })
    }

    /// Moves data until `stop`, adding what it moved to `units`.
    fn run(self, units: &AtomicU64, stop: &AtomicBool) -> Result<()> {
        let go = || !stop.load(Ordering::Relaxed) && !interrupted();
        match self {
            Client::Bulk(mut c) => {
                while go() {
                    units.fetch_add(c.write()?, Ordering::Relaxed);
                }
                c.finish().map(|_| ())
            }
            Client::Rr(mut c) => {
                while go() {
                    c.exchange()?;
                    units.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Client::Connect { addr, req, resp } => {
                while go() {
                    connect_once(addr, req, resp)?;
                    units.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }
}

/// One connection of the connect scenario: request, response, the server closes, then the client.
fn connect_once(addr: SocketAddr, req: u32, resp: u32) -> Result<()> {
    let mut msg = header(MODE_CONNECT, req, resp).to_vec();
    msg.extend(std::iter::repeat_n(b'q', req as usize));
    let mut response = vec![0u8; resp as usize];
    let mut s = open(addr, true)?;
    s.write_all(&msg).context("sending a request")?;
    s.read_exact(&mut response).context("reading a response")?;
    let mut rest = [0u8; 1];
    match s.read(&mut rest) {
        Ok(0) => Ok(()),
        Ok(_) => bail!("the server sent more than the response"),
        Err(e) => Err(e).context("waiting for the server to close"),
    }
}

/// The server: waits to be in `cgroup` (moved there by the bench), then listens on 127.0.0.1:`port`.
/// Bulk and keep-alive connections get a thread each; connect-mode requests are answered inline.
pub fn serve(port: u16, cgroup: &str) -> Result<()> {
    let want = format!("0::{cgroup}");
    let start = Instant::now();
    loop {
        let mine =
            std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        if mine.lines().any(|l| l == want) {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("not moved into the cgroup {cgroup} within 10 s (/proc/self/cgroup: {mine:?})");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .with_context(|| format!("listening on 127.0.0.1:{port}"))?;
    println!(
        "sensor server: pid {} in cgroup {cgroup}, listening on 127.0.0.1:{port}",
        std::process::id()
    );
    for conn in listener.incoming() {
        let mut s = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("sensor server: accept: {e}");
                continue;
            }
        };
        let mut h = [0u8; 9];
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        if s.read_exact(&mut h).is_err() {
            continue; // the readiness probe, or a client that went away
        }
        let req = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
        let resp = u32::from_le_bytes([h[5], h[6], h[7], h[8]]) as usize;
        match h[0] {
            MODE_BULK => {
                std::thread::spawn(move || {
                    if let Err(e) = sink(s) {
                        eprintln!("sensor server: bulk: {e:#}");
                    }
                });
            }
            MODE_RR => {
                std::thread::spawn(move || {
                    if let Err(e) = answer(s, req, resp) {
                        eprintln!("sensor server: request/response: {e:#}");
                    }
                });
            }
            MODE_CONNECT => {
                if let Err(e) = answer_once(&mut s, req, resp) {
                    eprintln!("sensor server: connect: {e:#}");
                }
            }
            m => eprintln!("sensor server: unknown mode {m}"),
        }
    }
    Ok(())
}

fn sink(mut s: TcpStream) -> Result<()> {
    let mut buf = vec![0u8; SINK_BUF];
    let mut total: u64 = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading"),
        }
    }
    s.write_all(&total.to_le_bytes())
        .context("sending the count")
}

fn answer(mut s: TcpStream, req: usize, resp: usize) -> Result<()> {
    s.set_nodelay(true).context("TCP_NODELAY")?;
    // Keep-alive connections idle between phases for as long as they like.
    s.set_read_timeout(None).context("SO_RCVTIMEO")?;
    let mut request = vec![0u8; req];
    let response = vec![b'r'; resp];
    loop {
        match s.read_exact(&mut request) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("reading a request"),
        }
        s.write_all(&response).context("sending a response")?;
    }
}

fn answer_once(s: &mut TcpStream, req: usize, resp: usize) -> Result<()> {
    s.set_nodelay(true).context("TCP_NODELAY")?;
    let mut request = vec![0u8; req];
    s.read_exact(&mut request).context("reading the request")?;
    s.write_all(&vec![b'r'; resp])
        .context("sending the response")
}
