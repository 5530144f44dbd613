//! Data-parallel training without a GPU: ranks as threads of this process summing through
//! [`ThreadGroup`] run the very loop NCCL ranks run. Several ranks must give the update of one
//! rank whose batch holds all of theirs (LoRA and a fully trained group, with accumulation, and
//! with a short last batch that leaves some ranks nothing), write their outputs once, and resume
//! exactly with the same number of ranks.

mod common;

use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{Device, Tensor};
use lvlm_ift::config::TrainConfig;
use lvlm_ift::train::checkpoint::load_safetensors;
use lvlm_ift::train::distributed::{Collective, ThreadGroup};
use lvlm_ift::train::metrics::MetricsLog;
use lvlm_ift::train::recipe::{run_recipe, run_recipe_on, Resume};

/// The LoRA fixture recipe (adapters on attention, the projector in full) into `out`.
fn recipe(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut ov = common::fixture_overrides(out);
    ov.extend(extra.iter().map(|s| s.to_string()));
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    TrainConfig::load(&repo.join("tests/fixtures/recipes/lora.toml"), &ov).unwrap()
}

/// Runs `cfg` as `world` ranks on threads; every rank's result.
fn run_ranks(cfg: &TrainConfig, world: usize, resume: Resume) -> Vec<Result<u64, String>> {
    let handles: Vec<_> = ThreadGroup::new(world)
        .into_iter()
        .map(|rank| {
            let (cfg, resume) = (cfg.clone(), resume.clone());
            std::thread::spawn(move || {
                let collective: Rc<dyn Collective> = Rc::new(rank);
                run_recipe_on(&cfg, resume, true, collective)
                    .map(|outs| outs.last().map_or(0, |o| o.steps))
                    .map_err(|e| common::error_chain(&e))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn weights(out: &Path, step: u64) -> Vec<(String, Tensor)> {
    let file = out.join(format!(
        "checkpoints/checkpoint-{step}/trainable.safetensors"
    ));
    let mut w: Vec<_> = load_safetensors(&file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// Largest difference between two weight sets, relative to the largest weight.
fn max_rel_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            common::rel_diff(ta, tb)
        })
        .fold(0.0, f32::max)
}

fn losses(out: &Path) -> Vec<f64> {
    MetricsLog::read_all(&out.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|m| m.loss)
        .collect()
}

/// `world` ranks of `per_rank` samples against one rank of `world * per_rank`, same recipe.
fn compare(world: usize, per_rank: usize, accum: usize, epochs: usize, steps: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let (one, many) = (tmp.path().join("one"), tmp.path().join("many"));
    let common = [
        "lora.dropout=0.0".to_string(),
        // At Adam's usual eps (1e-8) a near-zero gradient element moves its weight by about
        // lr·sign(g), so summation-order rounding in it shows as an lr-sized difference; a
        // larger eps keeps the update continuous in the gradient and the comparison about sums.
        "optim.eps=1e-3".to_string(),
        format!("train.grad_accum={accum}"),
        format!("train.epochs={epochs}"),
    ];
    let with = |out: &Path, batch: usize| {
        let mut extra: Vec<String> = common.to_vec();
        extra.push(format!("train.batch_size={batch}"));
        let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        recipe(out, &refs)
    };
    let outs = run_recipe(&with(&one, world * per_rank), Resume::No, true).unwrap();
    assert_eq!(outs[0].steps, steps);
    for (rank, r) in run_ranks(&with(&many, per_rank), world, Resume::No)
        .into_iter()
        .enumerate()
    {
        assert_eq!(r, Ok(steps), "rank {rank}");
    }
    let diff = max_rel_diff(&weights(&one, steps), &weights(&many, steps));
    assert!(
        diff < 1e-5,
        "{world} ranks vs one: weights differ by {diff:e} (relative)"
    );
    let (l1, ln) = (losses(&one), losses(&many));
    // Rank 0 alone logs: one line per step, not one per rank.
    assert_eq!(ln.len(), steps as usize, "{ln:?}");
    for (a, b) in l1.iter().zip(&ln) {
        assert!((a - b).abs() < 1e-5 * a.abs().max(1.0), "loss {a} vs {b}");
    }
    assert!(many.join("adapter/adapter_model.safetensors").is_file());
    assert!(many.join("COMPLETE").is_file());
}

#[test]
fn two_ranks_give_the_update_of_one_rank_with_twice_the_batch() {
    // 12 pairs, 2 x 3 per micro-batch, accumulation 2: one step per epoch of two micro-batches.
    compare(2, 3, 2, 2, 2);
}

#[test]
fn ranks_left_without_samples_in_a_short_last_batch_change_nothing() {
    // 12 pairs in global micro-batches of 5 x 2: the second holds 2 samples, so three of the
    // five ranks have none in it.
    compare(5, 2, 1, 1, 2);
}

#[test]
fn a_data_parallel_run_resumes_exactly_with_the_same_ranks_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, halted) = (tmp.path().join("full"), tmp.path().join("halted"));
    // LoRA dropout on: every rank draws its own masks from (seed, step, rank).
    let base = ["train.batch_size=2", "train.grad_accum=1", "train.epochs=1"];
    for r in run_ranks(&recipe(&full, &base), 2, Resume::No) {
        assert_eq!(r, Ok(3));
    }
    let mut stop = base.to_vec();
    stop.push("train.stop_after=1");
    for r in run_ranks(&recipe(&halted, &stop), 2, Resume::No) {
        assert_eq!(r, Ok(1));
    }
    let e = run_recipe(&recipe(&halted, &base), Resume::Latest, true).unwrap_err();
    let e = common::error_chain(&e);
    assert!(e.contains("2 data-parallel ranks, this one has 1"), "{e}");
    for r in run_ranks(&recipe(&halted, &base), 2, Resume::Latest) {
        assert_eq!(r, Ok(3));
    }
    let diff = max_rel_diff(&weights(&full, 3), &weights(&halted, 3));
    assert_eq!(diff, 0.0, "resumed run differs from the uninterrupted one");
}

#[test]
fn a_failing_rank_stops_the_others_with_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = recipe(&tmp.path().join("out"), &["train.batch_size=2"]);
    let ranks = ThreadGroup::new(2);
    let mut ranks = ranks.into_iter();
    let rank0 = ranks.next().unwrap();
    drop(ranks); // rank 1 is gone before the run starts
    let e = run_recipe_on(&cfg, Resume::No, true, Rc::new(rank0)).unwrap_err();
    let e = common::error_chain(&e);
    assert!(e.contains("rank 1 left the group"), "{e}");
}

fn lvlm(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .envs(env.iter().copied())
        .output()
        .expect("run lvlm-ift");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_plans_for_the_ranks_and_refuses_what_it_cannot_run() {
    let smoke = ["train", "--config", "configs/smoke.toml"];
    let (ok, plan) = lvlm(
        &[&smoke[..], &["--dry-run", "--devices", "0,1"]].concat(),
        &[],
    );
    assert!(ok, "{plan}");
    assert!(plan.contains("2 data-parallel ranks"), "{plan}");
    let (ok, e) = lvlm(&[&smoke[..], &["--devices", "0,0"]].concat(), &[]);
    assert!(!ok && e.contains("GPU 0 is listed twice"), "{e}");
    if !cfg!(feature = "cuda") {
        let (ok, e) = lvlm(&[&smoke[..], &["--devices", "0,1"]].concat(), &[]);
        assert!(!ok && e.contains("built without CUDA"), "{e}");
    }
    // A rank of a launched run whose recipe trains on the CPU: no silent solo run.
    let rank1 = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29999"),
    ];
    let (ok, e) = lvlm(&smoke, &rank1);
    assert!(
        !ok && e.contains("model.device") && e.contains("rank 1 of 2"),
        "{e}"
    );
    let (ok, e) = lvlm(&smoke, &[("RANK", "0")]);
    assert!(!ok && e.contains("WORLD_SIZE"), "{e}");
}
