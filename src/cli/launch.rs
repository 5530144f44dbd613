//! `train --devices 0,1,…`: one process per GPU on this machine, as torchrun would start them.
//! Each child is this binary with the same arguments less `--devices`, and the launcher
//! environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`) plus `CUDA_VISIBLE_DEVICES` restricted to the chosen GPUs, so rank i trains on
//! `cuda:i`, the i-th of them. When one rank fails the others are stopped and the error names it.

use std::ffi::OsString;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context};

/// The GPU ordinals of `--devices`: comma-separated, distinct.
pub fn parse_devices(spec: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let n: usize = part.parse().with_context(|| {
            format!("--devices {spec:?}: `{part}` is not a GPU number (expected e.g. 0,1,2,3)")
        })?;
        if out.contains(&n) {
            bail!("--devices {spec:?}: GPU {n} is listed twice");
        }
        out.push(n);
    }
    Ok(out)
}

/// The process arguments without `--devices X` / `--devices=X`.
pub fn without_devices(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        match a.to_str() {
            Some("--devices") => skip_value = true,
            Some(s) if s.starts_with("--devices=") => {}
            _ => out.push(a),
        }
    }
    out
}

/// Start one rank per device and wait for all of them.
pub fn launch(devices: &[usize]) -> anyhow::Result<()> {
    if std::env::var_os("RANK").is_some() || std::env::var_os("WORLD_SIZE").is_some() {
        bail!(
            "--devices starts the ranks itself, but RANK/WORLD_SIZE are already set (by torchrun \
             or Slurm?): use one launcher, not both"
        );
    }
    if !cfg!(feature = "cuda") {
        bail!("--devices trains on GPUs: this binary was built without CUDA (cargo build --release --features nccl)");
    }
    if devices.len() > 1 && !cfg!(feature = "nccl") {
        bail!(
            "--devices {}: training on several GPUs needs NCCL; rebuild with \
             `cargo build --release --features nccl`",
            list(devices)
        );
    }
    let exe = std::env::current_exe().context("finding this binary to start the ranks")?;
    let args = without_devices(std::env::args_os().skip(1));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the ranks' rendezvous")?
        .port();
    let world = devices.len().to_string();
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(devices.len());
    for (rank, gpu) in devices.iter().enumerate() {
        let child = Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", &world)
            .env("LOCAL_WORLD_SIZE", &world)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("CUDA_VISIBLE_DEVICES", list(devices))
            .spawn()
            .with_context(|| format!("starting rank {rank} (GPU {gpu})"))?;
        children.push((rank, child));
    }
    wait_all(children, devices)
}

fn list(devices: &[usize]) -> String {
    devices
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Waits until every rank has exited; the first failure stops the rest (they would wait on it).
fn wait_all(mut running: Vec<(usize, Child)>, devices: &[usize]) -> anyhow::Result<()> {
    while !running.is_empty() {
        let mut i = 0;
        while i < running.len() {
            let (rank, child) = &mut running[i];
            let rank = *rank;
            match child
                .try_wait()
                .with_context(|| format!("waiting for rank {rank}"))?
            {
                None => i += 1,
                Some(status) if status.success() => {
                    running.swap_remove(i);
                }
                Some(status) => {
                    for (_, other) in running.iter_mut() {
                        let _ = other.kill();
                        let _ = other.wait();
                    }
                    bail!(
                        "rank {rank} (GPU {}) exited with {status}; the other ranks were stopped",
                        devices[rank]
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_are_removed_from_the_arguments() {
        assert_eq!(parse_devices("0,1, 3").unwrap(), vec![0, 1, 3]);
        for bad in ["", "0,,1", "a", "0,0", "-1"] {
            assert!(parse_devices(bad).is_err(), "{bad:?}");
        }
        let args = [
            "train",
            "--devices",
            "0,1",
            "--config",
            "r.toml",
            "--devices=2",
            "--quiet",
        ]
        .map(OsString::from);
        assert_eq!(
            without_devices(args),
            ["train", "--config", "r.toml", "--quiet"].map(OsString::from)
        );
    }
}
