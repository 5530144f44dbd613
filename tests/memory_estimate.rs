//! The `--dry-run` memory estimate against the heap a real CPU training step allocates: a
//! counting allocator records the bytes `Trainer::new` keeps (weights, trainable tensors,
//! optimizer moments) and the peak above that during a step (activations, gradients, the
//! backward's working set), for LLaVA with LoRA in the tower and the language model, in the
//! language model only, or in the projector only, and the Mllama reference recipe's main stage,
//! in f32 and bf16, each with and without activation checkpointing; and the same with the
//! composed ops CUDA runs (`LVLM_IFT_FUSED=0`, in a child process). The margins asserted are the
//! measured ones.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use lvlm_ift::config::TrainConfig;
use lvlm_ift::train::plan::TrainPlan;
use lvlm_ift::train::trainer::Trainer;

/// Counts live heap bytes and their peak.
struct Counting;
static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// One measurement at a time: the counters are process-wide.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn grew(by: usize) {
    let now = NOW.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        NOW.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new > l.size() {
                grew(new - l.size());
            } else {
                NOW.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// (measured, estimated) bytes: what `Trainer::new` keeps against weights + trainable + moments,
/// and the peak of one step above that against activations + gradients.
struct Measured {
    what: String,
    fixed: (f64, f64),
    step: (f64, f64),
}

fn measure(what: String, cfg: &TrainConfig) -> Measured {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let plan = TrainPlan::build(cfg, &cfg.stage_specs()[0], None).unwrap();
    let est = plan.memory_estimate(plan.worst_batch().unwrap()).unwrap();
    let before = NOW.load(Ordering::SeqCst);
    let trainer = Trainer::new(plan).unwrap();
    let loaded = NOW.load(Ordering::SeqCst);
    PEAK.store(loaded, Ordering::SeqCst);
    trainer.run(None, true).unwrap();
    let peak = PEAK.load(Ordering::SeqCst);
    let acts = if est.checkpointing {
        est.activations_checkpointed
    } else {
        est.activations_full
    };
    Measured {
        what,
        fixed: ((loaded - before) as f64, est.fixed() - est.gradients),
        step: ((peak - loaded) as f64, acts + est.gradients),
    }
}

/// One step of all 12 fixture pairs in one micro-batch (the estimate's largest batch is then
/// the batch that runs).
fn llava(out: &std::path::Path, lora: &str, checkpointing: bool) -> TrainConfig {
    let mut ov = common::fixture_overrides(out);
    ov.extend([
        "train.batch_size=12".to_string(),
        "train.grad_accum=1".into(),
        "train.stop_after=1".into(),
        format!("train.activation_checkpointing={checkpointing}"),
    ]);
    match lora {
        "lm" => ov.push(r"lora.target_modules='.*language_model.*\.(q|k|v|o)_proj'".into()),
        "projector" => ov.extend([
            r"lora.target_modules='.*multi_modal_projector\.linear_2'".to_string(),
            "full.groups=[]".into(),
        ]),
        _ => {}
    }
    TrainConfig::load(&repo().join("tests/fixtures/recipes/lora.toml"), &ov).unwrap()
}

fn mllama(out: &std::path::Path, checkpointing: bool, dtype: &str) -> TrainConfig {
    let ov = vec![
        format!(
            "model.path={}",
            repo().join("tests/fixtures/tiny-mllama").display()
        ),
        "model.device=cpu".into(),
        format!("model.dtype={dtype}"),
        format!(
            "data.train=[{{ manifest = \"{}\" }}]",
            repo().join("tests/fixtures/pairs/pairs.jsonl").display()
        ),
        format!("train.output_dir={}", out.display()),
        "train.batch_size=12".into(),
        "train.stop_after=1".into(),
        format!("train.activation_checkpointing={checkpointing}"),
    ];
    let mut cfg =
        TrainConfig::load(&repo().join("configs/instfree-mllama-wbcatt.toml"), &ov).unwrap();
    cfg.stages.remove(0); // the main stage: vision encoder and fusion layers in full
    cfg
}

fn all_cases() -> Vec<Measured> {
    // One step first, measured by nobody: the process's one-off allocations (the matrix
    // products' per-thread buffers, the thread pools) would otherwise count in the first case's
    // peak — 2 MB in the Mllama step, more than a tiny model's layer.
    let tmp = tempfile::tempdir().unwrap();
    measure("warm-up".into(), &mllama(tmp.path(), false, "f32"));
    let mut out = Vec::new();
    for checkpointing in [false, true] {
        for lora in ["all", "lm", "projector"] {
            let tmp = tempfile::tempdir().unwrap();
            let what = format!("llava lora={lora} checkpointing={checkpointing}");
            out.push(measure(what, &llava(tmp.path(), lora, checkpointing)));
        }
        for dtype in ["f32", "bf16"] {
            let tmp = tempfile::tempdir().unwrap();
            let what = format!("mllama main stage {dtype} checkpointing={checkpointing}");
            out.push(measure(what, &mllama(tmp.path(), checkpointing, dtype)));
        }
    }
    out
}

/// Every case's step peak within `[low, high]` times the estimate, the fixed part at least the
/// estimate and at most 512 KiB above it (the loader, tokenizer and processor copies).
fn check(cases: &[Measured], llava: (f64, f64), mllama: (f64, f64)) {
    let mut report = String::new();
    for m in cases {
        report.push_str(&format!(
            "{}: fixed {:.0}/{:.0} KiB, step {:.0}/{:.0} KiB = {:.2}x (measured/estimated)\n",
            m.what,
            m.fixed.0 / 1024.0,
            m.fixed.1 / 1024.0,
            m.step.0 / 1024.0,
            m.step.1 / 1024.0,
            m.step.0 / m.step.1
        ));
    }
    eprint!("{report}");
    for m in cases {
        let (low, high) = if m.what.starts_with("llava") {
            llava
        } else {
            mllama
        };
        let ratio = m.step.0 / m.step.1;
        assert!(
            (low..=high).contains(&ratio),
            "{}: {ratio:.2}x\n{report}",
            m.what
        );
        let extra = m.fixed.0 - m.fixed.1;
        assert!(
            (0.0..=512.0 * 1024.0).contains(&extra),
            "{}: fixed\n{report}",
            m.what
        );
    }
}

#[test]
fn the_estimate_matches_measured_cpu_steps_with_the_fused_kernels() {
    if !lvlm_ift::model::kernels::fused_enabled() {
        return; // the composed run below covers this process's ops
    }
    // Measured (this machine): LLaVA 0.82-0.97x (checkpointed LoRA steps the lowest: the
    // estimate's two layers at a time in the recomputed backward is generous); Mllama
    // 1.00-1.08x.
    check(&all_cases(), (0.75, 1.1), (0.9, 1.2));
}

/// The composed ops (what CUDA runs) measured on the CPU: run by the test below in a child
/// process with `LVLM_IFT_FUSED=0`.
#[test]
#[ignore = "run by the_estimate_matches_measured_cpu_steps_with_the_composed_ops"]
fn composed_ops_child() {
    assert!(!lvlm_ift::model::kernels::fused_enabled());
    // Measured (this machine): LLaVA 0.90-1.02x, Mllama 1.09-1.18x (the most without
    // checkpointing: candle's backward pass holds the gradients of some constant operands —
    // rotary tables, frozen norm weights — to its end; not counted).
    check(&all_cases(), (0.85, 1.1), (1.0, 1.25));
}

#[test]
fn the_estimate_matches_measured_cpu_steps_with_the_composed_ops() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "composed_ops_child", "--ignored", "--nocapture"])
        .env("LVLM_IFT_FUSED", "0")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the child ran no test: {text}");
}
