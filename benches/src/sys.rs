//! The few system calls the flood generator makes directly: a monotonic clock shared by all
//! processes on the host, epoll, CPU pinning, the open-file limit and signals. All through
//! `rustix`, except the two that it does not wrap (see [`set_bind_address_no_port`] and
//! [`online_cpus`]), which call `libc`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use rustix::event::epoll;
pub use rustix::io::Errno;
use rustix::process::{Pid, Resource, Rlimit};

pub use rustix::process::Signal;

/// `CLOCK_MONOTONIC` in nanoseconds. The same clock in every process of the host, so a send time
/// written into a payload by one worker can be compared with the receive time in another.
pub fn now_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Wall clock, ms since the Unix epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An epoll instance (edge-triggered use).
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

/// One readiness event: [`event_token`] and [`event_flags`] read it.
pub type Event = epoll::Event;

/// Readiness flags used by the engine.
pub const EV_IN: u32 = epoll::EventFlags::IN.bits();
/// Writable.
pub const EV_OUT: u32 = epoll::EventFlags::OUT.bits();
/// Peer closed or error.
pub const EV_HUP: u32 = epoll::EventFlags::HUP
    .union(epoll::EventFlags::RDHUP)
    .union(epoll::EventFlags::ERR)
    .bits();

/// The token an event was registered with.
pub fn event_token(ev: &Event) -> u64 {
    let data = ev.data;
    data.u64()
}

/// The `EV_*` bits of an event.
pub fn event_flags(ev: &Event) -> u32 {
    let flags = ev.flags;
    flags.bits()
}

impl Epoll {
    /// A new epoll instance (close-on-exec).
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            fd: epoll::create(epoll::CreateFlags::CLOEXEC)?,
        })
    }

    /// Registers `fd` for edge-triggered read, write and hang-up readiness with `token`.
    pub fn add(&self, fd: impl AsFd, token: u64) -> io::Result<()> {
        let flags = epoll::EventFlags::IN
            | epoll::EventFlags::OUT
            | epoll::EventFlags::HUP
            | epoll::EventFlags::RDHUP
            | epoll::EventFlags::ERR
            | epoll::EventFlags::ET;
        epoll::add(&self.fd, fd, epoll::EventData::new_u64(token), flags)?;
        Ok(())
    }

    /// Waits up to `timeout_ms` (negative: forever) and fills `events` (its capacity bounds how
    /// many); returns how many are ready. EINTR counts as zero events.
    pub fn wait(&self, events: &mut Vec<Event>, timeout_ms: i32) -> io::Result<usize> {
        events.clear();
        let timeout = u64::try_from(timeout_ms)
            .ok()
            .map(|ms| rustix::event::Timespec {
                tv_sec: (ms / 1000) as i64,
                tv_nsec: ((ms % 1000) * 1_000_000) as _,
            });
        match epoll::wait(
            &self.fd,
            rustix::buffer::spare_capacity(events),
            timeout.as_ref(),
        ) {
            Ok(n) => Ok(n),
            Err(Errno::INTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` so that binding a source address defers the port choice to
/// `connect`, where the kernel picks per 4-tuple (more than 64K connections across several
/// source addresses to one server port).
///
/// Raw `libc`: neither `rustix` (its `sockopt` module has no `IP_BIND_ADDRESS_NO_PORT`) nor
/// `socket2` 0.5 wraps this option.
pub fn set_bind_address_no_port(fd: impl AsFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is an open socket; the option value is a valid c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread (and processes it spawns later) to `cpus`.
pub fn pin_to_cpus(cpus: &[usize]) -> io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    for &c in cpus
        .iter()
        .filter(|&&c| c < rustix::thread::CpuSet::MAX_CPU)
    {
        set.set(c);
    }
    rustix::thread::sched_setaffinity(None, &set)?;
    Ok(())
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit
/// (`u64::MAX` for unlimited).
pub fn raise_nofile() -> io::Result<u64> {
    let r = rustix::process::getrlimit(Resource::Nofile);
    rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: r.maximum,
            maximum: r.maximum,
        },
    )?;
    Ok(r.maximum.unwrap_or(u64::MAX))
}

/// Sends `sig` to process `pid`.
pub fn kill(pid: u32, sig: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad pid {pid}")))?;
    rustix::process::kill_process(pid, sig)?;
    Ok(())
}

/// Is standard error a terminal (draw a progress bar) or a file (print a line now and then)?
pub fn stderr_is_tty() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// The `errno` of an I/O error, for matching against `Errno::*` constants.
pub fn errno(e: &io::Error) -> Option<Errno> {
    Errno::from_io_error(e)
}

/// CPUs online on the host (not just the ones this thread may run on).
///
/// Raw `libc`: `sysconf(_SC_NPROCESSORS_ONLN)` has no `rustix` wrapper (`rustix::thread`
/// only reads this thread's affinity mask, which is what this must not be limited to).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_reports_a_writable_socket() {
        let ep = Epoll::new().unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        ep.add(&a, (7 << 32) | 3).unwrap();
        let mut events = Vec::with_capacity(4);
        assert_eq!(ep.wait(&mut events, 1000).unwrap(), 1);
        assert_eq!(event_token(&events[0]), (7 << 32) | 3);
        assert_ne!(event_flags(&events[0]) & EV_OUT, 0);
        assert_eq!(ep.wait(&mut events, 0).unwrap(), 0, "edge-triggered");
    }

    #[test]
    fn clock_limits_and_cpus() {
        let a = now_ns();
        assert!(now_ns() >= a);
        assert!(raise_nofile().unwrap() >= 64);
        assert!(online_cpus() >= 1);
        assert_eq!(
            errno(&io::Error::from_raw_os_error(
                Errno::INPROGRESS.raw_os_error()
            )),
            Some(Errno::INPROGRESS)
        );
    }
}
