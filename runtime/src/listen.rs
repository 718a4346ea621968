//! Where a role listens: an address it binds itself, or a socket it was handed already bound
//! (socket activation, as systemd does it: `LISTEN_FDS`, `LISTEN_FDNAMES`).
//!
//! A listen setting such as `gateway.listen` takes either form:
//!
//! - `127.0.0.1:8080`: the role binds the address.
//! - `fd:NAME` or `fd:INDEX`: the role takes the passed socket of that name (from
//!   `LISTEN_FDNAMES`, as systemd's `FileDescriptorName=` sets it) or position (0 is fd 3).
//!
//! A socket handed over is bound before the role starts, by whoever holds it: connections wait
//! in its backlog instead of being refused while the role boots, and nothing else can take the
//! port in between. The tests hand every role its ports this way.

use std::sync::{Mutex, OnceLock};

use anyhow::Context;
use listenfd::ListenFd;
use tokio::net::TcpListener;

/// The sockets this process was handed, and their names.
struct Inherited {
    fds: ListenFd,
    names: Vec<String>,
}

static INHERITED: OnceLock<Mutex<Inherited>> = OnceLock::new();

/// Takes the sockets handed to this process. Call it first thing in `main`, while the process
/// has one thread: it clears `LISTEN_FDS` and `LISTEN_PID` from the environment, so that no
/// child process believes the sockets are its own.
pub fn inherit_sockets() {
    INHERITED.get_or_init(|| {
        let names = std::env::var("LISTEN_FDNAMES")
            .map(|names| names.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        Mutex::new(Inherited { fds: ListenFd::from_env(), names })
    });
}

/// The listener for `address` (see the module documentation); `what` names it in errors and
/// in the log line that says where the role listens.
pub async fn bind(address: &str, what: &str) -> anyhow::Result<TcpListener> {
    let listener = match address.strip_prefix("fd:") {
        Some(name) => take(name).with_context(|| format!("failed to take the {what} socket {address}"))?,
        None => TcpListener::bind(address).await.with_context(|| format!("failed to bind {what} on {address}"))?,
    };
    tracing::info!(address = %listener.local_addr()?, what, handed_over = address.starts_with("fd:"), "listening");
    Ok(listener)
}

/// The handed-over socket `name` (a name from `LISTEN_FDNAMES`, or a position), at most once.
fn take(name: &str) -> anyhow::Result<TcpListener> {
    let inherited = INHERITED.get().context("the process did not take its handed-over sockets at start")?;
    let mut inherited = inherited.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let index = match name.parse::<usize>() {
        Ok(index) => index,
        Err(_) => inherited.names.iter().position(|known| known == name).with_context(|| {
            format!("no socket named {name:?} was handed over (LISTEN_FDNAMES: {:?})", inherited.names.join(":"))
        })?,
    };
    let count = inherited.fds.len();
    let listener = inherited
        .fds
        .take_tcp_listener(index)
        .context("the handed-over socket is not a TCP socket")?
        .with_context(|| format!("socket {index} was not handed over ({count} were), or is used twice"))?;
    listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(listener)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_is_bound_and_a_socket_never_handed_over_is_refused_by_name() {
        inherit_sockets();
        let listener = bind("127.0.0.1:0", "test").await.unwrap();
        assert!(listener.local_addr().unwrap().port() > 0);
        let error = bind("fd:http", "test").await.unwrap_err();
        assert!(format!("{error:#}").contains("no socket named \"http\""), "{error:#}");
        let error = bind("fd:0", "test").await.unwrap_err();
        assert!(format!("{error:#}").contains("socket 0 was not handed over (0 were)"), "{error:#}");
    }
}
