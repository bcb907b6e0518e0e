//! Descriptor passing over `SOCK_SEQPACKET` sockets (the daemon ↔ spawner channel) and
//! adoption of systemd's socket-activation descriptors: the two places where descriptors
//! arrive as bare numbers and must become owned handles.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

/// Largest message either side sends.
pub const MAX_MESSAGE: usize = 192 * 1024;
/// Most descriptors one message carries.
pub const MAX_FDS: usize = 4;

/// A connected, close-on-exec `SOCK_SEQPACKET` pair.
pub fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), Errno> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// Sends one message with `fds` attached (never raises SIGPIPE).
pub fn send(sock: BorrowedFd<'_>, msg: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
    if msg.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(Errno::EMSGSIZE);
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let n = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(msg)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    if n != msg.len() {
        return Err(Errno::EMSGSIZE);
    }
    Ok(())
}

/// Receives one message. `Ok(None)` is end of stream; `Err(EAGAIN)` means nothing is
/// waiting (non-blocking). Descriptors arrive close-on-exec and owned.
pub fn recv(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    blocking: bool,
) -> Result<Option<(usize, Vec<OwnedFd>)>, Errno> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if !blocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), flags)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(list) = c {
            for fd in list {
                // SAFETY: the kernel installed this descriptor in our table for this message;
                // nothing else refers to it, so it is ours to own and close.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Err(Errno::EMSGSIZE);
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((msg.bytes, fds)))
}

/// Descriptors passed by systemd socket activation (`LISTEN_PID`/`LISTEN_FDS`/
/// `LISTEN_FDNAMES`), as `(name, fd)`; empty when not socket-activated. Clears the
/// variables so that nothing started later inherits them.
pub fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(String::from).collect())
        .unwrap_or_default();
    // SAFETY: modifying the environment is unsound only while other threads read it; this
    // runs at start-up, before any thread is created.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if !pid_ok || !(1..=16).contains(&count) {
        return Vec::new();
    }
    (0..count)
        .filter_map(|i| {
            let raw = 3 + i;
            // Only adopt descriptors that are open.
            nix::fcntl::fcntl(
                // SAFETY: borrowing a descriptor number only to query it; fcntl(F_GETFD) fails
                // harmlessly if it is not open.
                unsafe { BorrowedFd::borrow_raw(raw) },
                nix::fcntl::FcntlArg::F_GETFD,
            )
            .ok()?;
            // SAFETY: systemd passed descriptors 3..3+LISTEN_FDS to this process for it to
            // own; each is adopted exactly once (the variables were cleared above).
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let _cloexec = nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            Some((names.get(i as usize).cloned().unwrap_or_default(), fd))
        })
        .collect()
}

/// Adopts a socket descriptor inherited across exec under a known number (the spawner's
/// end of its channel, named on its command line). Refuses anything but a socket.
pub fn adopt_inherited_socket(raw: RawFd) -> Result<OwnedFd, Errno> {
    if raw < 3 {
        return Err(Errno::EBADF);
    }
    // SAFETY: borrowing the number only for fstat, which fails harmlessly if it is closed.
    let st = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(raw) })?;
    if nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
        != nix::sys::stat::SFlag::S_IFSOCK
    {
        return Err(Errno::ENOTSOCK);
    }
    // SAFETY: the daemon passed this descriptor to us for us to own; it is adopted once,
    // at start-up, and marked close-on-exec so no sandbox inherits it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(fd)
}
