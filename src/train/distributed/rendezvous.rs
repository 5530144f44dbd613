//! How the ranks find each other before NCCL takes over: rank 0 listens on `MASTER_PORT` and hands
//! each other rank the same few bytes (NCCL's 128-byte unique id); the others connect to
//! `MASTER_ADDR:MASTER_PORT`, retrying while rank 0 starts. This is the bootstrap only, as
//! torchrun's store is; gradients never travel here.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::World;
use crate::error::{Error, Result};

/// Opens every message, so a stray connection to the port is refused instead of misread.
const MAGIC: &[u8; 8] = b"LVLMIFT1";

/// Rank 0's `payload` on every rank. Rank 0 passes it (and returns it once every other rank has
/// received it); the others pass `None`. Fails after `timeout` naming who did not show up.
pub fn share_from_rank0(
    world: &World,
    payload: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let (addr, port) = world.master.as_ref().ok_or_else(|| {
        Error::Distributed("a rendezvous needs MASTER_ADDR and MASTER_PORT".into())
    })?;
    match (world.rank, payload) {
        (0, Some(p)) => serve(world, *port, p, timeout).map(|()| p.to_vec()),
        (0, None) => Err(Error::Distributed("rank 0 has nothing to share".into())),
        (r, _) => fetch(r, addr, *port, timeout),
    }
}

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Distributed(format!("{what}: {e}"))
}

fn serve(world: &World, port: u16, payload: &[u8], timeout: Duration) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(io_error(format!(
        "rank 0 cannot listen on MASTER_PORT={port}"
    )))?;
    listener
        .set_nonblocking(true)
        .map_err(io_error("rank 0's listener".into()))?;
    let deadline = Instant::now() + timeout;
    let mut served = vec![false; world.world_size];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(30))))
                    .map_err(io_error(format!("connection from {peer}")))?;
                // A stray client (a port scanner, another job) is dropped, not fatal.
                match read_hello(&mut stream) {
                    Some(r) if r > 0 && r < world.world_size && !served[r] => {
                        let mut msg = MAGIC.to_vec();
                        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                        msg.extend_from_slice(payload);
                        stream
                            .write_all(&msg)
                            .map_err(io_error(format!("sending to rank {r} at {peer}")))?;
                        served[r] = true;
                    }
                    Some(r) if r > 0 && r < world.world_size => {
                        return Err(Error::Distributed(format!(
                            "two processes claim RANK={r} (the second from {peer})"
                        )))
                    }
                    Some(r) => {
                        return Err(Error::Distributed(format!(
                        "{peer} claims RANK={r}, outside 1..{} (WORLD_SIZE differs between ranks?)",
                        world.world_size
                    )))
                    }
                    None => tracing::warn!("rendezvous: ignored a connection from {peer}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = served
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| !**s)
                        .map(|(r, _)| r.to_string())
                        .collect();
                    return Err(Error::Distributed(format!(
                        "rank 0 waited {}s on port {port} for ranks {} to connect",
                        timeout.as_secs(),
                        missing.join(", ")
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_error(format!("rank 0 accepting on port {port}"))(e)),
        }
    }
    Ok(())
}

/// The rank a connecting process announces, or `None` for anything else.
fn read_hello(stream: &mut TcpStream) -> Option<usize> {
    let mut buf = [0u8; 12];
    stream.read_exact(&mut buf).ok()?;
    if &buf[..8] != MAGIC {
        return None;
    }
    Some(u32::from_le_bytes(buf[8..].try_into().ok()?) as usize)
}

fn fetch(rank: usize, addr: &str, port: u16, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let target = format!("{addr}:{port}");
    let mut stream = loop {
        let attempt = target
            .to_socket_addrs()
            .map_err(io_error(format!("MASTER_ADDR={addr}")))?
            .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok());
        match attempt {
            Some(s) => break s,
            None if Instant::now() > deadline => {
                return Err(Error::Distributed(format!(
                    "rank {rank} could not reach rank 0 at {target} within {}s",
                    timeout.as_secs()
                )))
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let what = format!("rank {rank} reading from rank 0 at {target}");
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io_error(what.clone()))?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    stream.write_all(&hello).map_err(io_error(what.clone()))?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .map_err(io_error(what.clone()))?;
    if &head[..8] != MAGIC {
        return Err(Error::Distributed(format!(
            "{target} is not an lvlm-ift rank 0 (MASTER_PORT used by something else?)"
        )));
    }
    let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).map_err(io_error(what))?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn world(rank: usize, size: usize, port: u16) -> World {
        World {
            rank,
            world_size: size,
            local_rank: rank,
            master: Some(("127.0.0.1".into(), port)),
        }
    }

    #[test]
    fn every_rank_gets_rank_zeros_bytes() {
        let port = free_port();
        let id: Vec<u8> = (0..128u8).collect();
        // The other ranks start first: they retry until rank 0 listens.
        let others: Vec<_> = (1..4)
            .map(|r| {
                std::thread::spawn(move || {
                    share_from_rank0(&world(r, 4, port), None, Duration::from_secs(20))
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let mine = share_from_rank0(&world(0, 4, port), Some(&id), Duration::from_secs(20));
        assert_eq!(mine.unwrap(), id);
        for h in others {
            assert_eq!(h.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn a_missing_rank_times_out_naming_it() {
        let port = free_port();
        let e = share_from_rank0(&world(0, 2, port), Some(b"x"), Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ranks 1 to connect"), "{e}");
    }
}
