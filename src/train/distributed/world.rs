//! Which rank this process is, read from the launcher's environment: torchrun's names (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), which `lvlm-ift train --devices`
//! sets for its children too, or Slurm's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) when
//! torchrun's are absent. Wrong or half-set variables are errors naming the variable: a rank that
//! silently trained alone would write a second, divergent set of outputs.

use crate::error::{Error, Result};

/// This process's place among the ranks of a data-parallel run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// 0..world_size; rank 0 alone writes checkpoints, metrics and outputs.
    pub rank: usize,
    pub world_size: usize,
    /// The rank's index on its machine: its GPU is `cuda:local_rank` (the launcher restricts
    /// `CUDA_VISIBLE_DEVICES` to the chosen GPUs).
    pub local_rank: usize,
    /// Where rank 0 hands out the NCCL id (`MASTER_ADDR`, `MASTER_PORT`); `None` for one rank.
    pub master: Option<(String, u16)>,
}

impl World {
    /// One process, no peers.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master: None,
        }
    }

    pub fn is_single(&self) -> bool {
        self.world_size == 1
    }

    /// The world of this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The world described by `var` (an environment lookup): torchrun's variables, else Slurm's,
    /// else a single process.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let names = if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            ["RANK", "WORLD_SIZE", "LOCAL_RANK"]
        } else if var("SLURM_PROCID").is_some() && var("SLURM_NTASKS").is_some() {
            ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]
        } else {
            return Ok(Self::single());
        };
        let number = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::Distributed(format!(
                        "environment variable {name}={v:?} is not a non-negative integer"
                    ))
                }),
            }
        };
        let required = |name: &str| -> Result<usize> {
            number(name)?.ok_or_else(|| {
                Error::Distributed(format!(
                    "{} is set but {name} is not: a launcher sets {}, {} and {} together",
                    if name == names[0] { names[1] } else { names[0] },
                    names[0],
                    names[1],
                    names[2]
                ))
            })
        };
        let rank = required(names[0])?;
        let world_size = required(names[1])?;
        if world_size == 0 {
            return Err(Error::Distributed(format!("{}=0: no ranks", names[1])));
        }
        if rank >= world_size {
            return Err(Error::Distributed(format!(
                "{}={rank} is not below {}={world_size}",
                names[0], names[1]
            )));
        }
        let local_rank = number(names[2])?.unwrap_or(rank);
        if local_rank > rank {
            return Err(Error::Distributed(format!(
                "{}={local_rank} exceeds {}={rank}",
                names[2], names[0]
            )));
        }
        if world_size == 1 {
            return Ok(Self::single());
        }
        let addr = var("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| {
                Error::Distributed(format!(
                    "{}={world_size} needs MASTER_ADDR (the host of rank 0)",
                    names[1]
                ))
            })?;
        let port = var("MASTER_PORT").ok_or_else(|| {
            Error::Distributed(format!(
                "{}={world_size} needs MASTER_PORT (a free TCP port on rank 0's host)",
                names[1]
            ))
        })?;
        let port: u16 = port
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Error::Distributed(format!("MASTER_PORT={port:?} is not a TCP port (1-65535)"))
            })?;
        Ok(Self {
            rank,
            world_size,
            local_rank,
            master: Some((addr.trim().to_string(), port)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<World> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_and_slurm_variables() {
        assert_eq!(world(&[]).unwrap(), World::single());
        let w = world(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank), (3, 4, 1));
        assert_eq!(w.master, Some(("node0".to_string(), 29500)));
        let s = world(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "n1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank), (1, 2, 1));
        // One rank needs no rendezvous.
        assert!(world(&[("RANK", "0"), ("WORLD_SIZE", "1")])
            .unwrap()
            .is_single());
    }

    #[test]
    fn bad_variables_are_errors_naming_them() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("RANK", "0")], "WORLD_SIZE"),
            (&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK"),
            (&[("RANK", "2"), ("WORLD_SIZE", "2")], "not below"),
            (&[("RANK", "0"), ("WORLD_SIZE", "0")], "no ranks"),
            (&[("RANK", "1"), ("WORLD_SIZE", "2")], "MASTER_ADDR"),
            (
                &[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
                "MASTER_PORT",
            ),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "99999"),
                ],
                "not a TCP port",
            ),
        ];
        for (vars, needle) in cases {
            let e = world(vars).unwrap_err().to_string();
            assert!(e.contains(needle), "{vars:?}: {e}");
        }
    }
}
