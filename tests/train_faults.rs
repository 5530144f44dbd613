//! Training under bad settings and faults: every one stops with an error that names the culprit,
//! before anything is sized from it or written under its final name, or is handled as documented
//! (non-finite steps, a second run, leftovers of a killed run, resume positions), and the
//! accumulation and LoRA/full semantics the issue fixes.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use lvlm_ift::config::TrainConfig;
use lvlm_ift::train::checkpoint::load_safetensors;
use lvlm_ift::train::metrics::MetricsLog;
use lvlm_ift::train::plan::TrainPlan;
use lvlm_ift::train::recipe::{run_recipe, Resume};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The LoRA fixture recipe (LoRA on attention, projector in full, fixed instruction), no
/// dropout, written to `out`, with `extra` overrides.
fn recipe(out: &Path, extra: &[String]) -> Result<TrainConfig, lvlm_ift::error::Error> {
    let mut ov = common::fixture_overrides(out);
    ov.push("lora.dropout=0.0".into());
    ov.extend(extra.iter().cloned());
    TrainConfig::load(&repo().join("tests/fixtures/recipes/lora.toml"), &ov)
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn run_err(out: &Path, extra: &[&str]) -> String {
    let cfg = recipe(out, &s(extra)).unwrap();
    match run_recipe(&cfg, Resume::No, true) {
        Ok(_) => panic!("{extra:?} trained"),
        Err(e) => common::error_chain(&e),
    }
}

fn lvlm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

#[test]
fn a_non_finite_step_stops_the_stage_naming_the_step_and_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nan");
    // lr 1e30: the first update is finite but huge, so the second step's loss overflows.
    let e = run_err(
        &out,
        &[
            "optim.lr=1e30",
            "train.save_every=1",
            "train.epochs=3",
            "schedule.kind=constant",
            "schedule.warmup_ratio=0.0",
        ],
    );
    println!("{e}");
    assert!(e.contains("non-finite") && e.contains("step 2"), "{e}");
    assert!(e.contains("pairs.jsonl:"), "names the samples: {e}");
    assert!(
        e.contains("checkpoint-1"),
        "names the last good checkpoint: {e}"
    );
    assert!(!out.join("COMPLETE").exists());
    assert!(out.join("checkpoints/checkpoint-1").is_dir());
    assert!(!out.join("checkpoints/checkpoint-2").exists());
    assert!(
        !out.join("adapter").exists(),
        "no stage output from a failed stage"
    );
}

#[test]
fn on_nonfinite_skip_drops_such_steps_and_counts_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("skip");
    let cfg = recipe(
        &out,
        &s(&[
            "optim.lr=1e30",
            "train.on_nonfinite=skip",
            "schedule.kind=constant",
            "schedule.warmup_ratio=0.0",
        ]),
    )
    .unwrap();
    let done = run_recipe(&cfg, Resume::No, true).unwrap();
    assert!(done[0].complete);
    let m = MetricsLog::read_all(&out.join("metrics.jsonl")).unwrap();
    let last = m.last().unwrap();
    assert!(last.skipped_nonfinite >= 1, "{m:?}");
    assert_eq!(
        last.skipped_nonfinite as usize,
        m.iter().filter(|x| !x.loss.is_finite()).count()
    );
    // Skipped steps changed nothing: every exported weight is finite.
    let adapter =
        load_safetensors(&out.join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    for (k, t) in adapter {
        let sum = t.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(sum.is_finite(), "{k}");
    }
}

#[test]
fn resume_refuses_a_checkpoint_whose_position_this_stage_cannot_reach() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let halted = recipe(&out, &s(&["train.stop_after=2", "train.epochs=2"])).unwrap();
    run_recipe(&halted, Resume::No, true).unwrap();
    let ckpt = out.join("checkpoints/checkpoint-2");
    let state_path = ckpt.join("trainer_state.json");
    let good = fs::read_to_string(&state_path).unwrap();
    let resume = |edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        edit(&mut v);
        fs::write(&state_path, serde_json::to_string(&v).unwrap()).unwrap();
        let cfg = recipe(&out, &s(&["train.epochs=2"])).unwrap();
        let e = run_recipe(&cfg, Resume::Checkpoint(ckpt.clone()), true).unwrap_err();
        common::error_chain(&e)
    };
    let e = resume(&|v| v["step"] = 999.into());
    assert!(e.contains("checkpoint-2") && e.contains("999"), "{e}");
    let e = resume(&|v| v["step"] = 999.into());
    assert!(e.contains("cannot resume stage `train`"), "{e}");
    let e = resume(&|v| v["micro_batch"] = 99.into());
    assert!(
        e.contains("micro_batch 99") && e.contains("micro-batches of an epoch"),
        "{e}"
    );
    let e = resume(&|v| v["epoch"] = 7.into());
    assert!(e.contains("epoch 7"), "{e}");
    // A step that disagrees with the directory's name.
    fs::write(&state_path, &good).unwrap();
    let renamed = out.join("checkpoints/checkpoint-1");
    fs::rename(&ckpt, &renamed).unwrap();
    let cfg = recipe(&out, &s(&["train.epochs=2"])).unwrap();
    let e = common::error_chain(
        &run_recipe(&cfg, Resume::Checkpoint(renamed.clone()), true).unwrap_err(),
    );
    assert!(e.contains("checkpoint-1 but its step is 2"), "{e}");
    // The position fits, but this recipe (no accumulation) puts another step there.
    fs::rename(&renamed, &ckpt).unwrap();
    let cfg = recipe(&out, &s(&["train.epochs=2", "train.grad_accum=1"])).unwrap();
    let e =
        common::error_chain(&run_recipe(&cfg, Resume::Checkpoint(ckpt.clone()), true).unwrap_err());
    assert!(e.contains("is step") && e.contains("says step 2"), "{e}");
    // And the untouched checkpoint still resumes.
    let cfg = recipe(&out, &s(&["train.epochs=2"])).unwrap();
    let done = run_recipe(&cfg, Resume::Checkpoint(ckpt), true).unwrap();
    assert!(done[0].complete);
}

#[test]
fn a_second_run_into_the_same_output_dir_fails_naming_the_running_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("busy");
    // This test process holds the lock, as a running `train` would.
    let _held = lvlm_ift::train::lock::OutputLock::acquire(&out).unwrap();
    let o = lvlm(&[
        "train",
        "--config",
        "tests/fixtures/recipes/lora.toml",
        "--quiet",
        "--set",
        &format!("train.output_dir={}", out.display()),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{err}");
    assert!(!o.status.success());
    assert!(
        err.contains("in use by another run")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(
        !out.join("checkpoints").exists(),
        "nothing written by the refused run"
    );
}

#[test]
fn leftovers_of_a_killed_run_are_cleared_and_a_lone_replaced_checkpoint_restored() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("killed");
    let halted = recipe(&out, &s(&["train.stop_after=2", "train.epochs=2"])).unwrap();
    run_recipe(&halted, Resume::No, true).unwrap();
    let ck = out.join("checkpoints");
    fs::create_dir_all(ck.join(".tmp-checkpoint-3-4242")).unwrap();
    fs::write(
        ck.join(".tmp-checkpoint-3-4242/trainable.safetensors"),
        b"half",
    )
    .unwrap();
    fs::create_dir_all(ck.join(".deleting-checkpoint-1-4242")).unwrap();
    // Killed between renaming checkpoint-2 away and renaming its replacement in.
    fs::rename(ck.join("checkpoint-2"), ck.join(".old-checkpoint-2-4242")).unwrap();
    fs::write(out.join(".metrics.jsonl.tmp-4242-0"), b"half").unwrap();
    let cfg = recipe(&out, &s(&["train.epochs=2"])).unwrap();
    let done = run_recipe(&cfg, Resume::Latest, true).unwrap();
    assert!(done[0].complete);
    let mut names: Vec<String> = fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        names.iter().all(|n| n.starts_with("checkpoint-")),
        "{names:?}"
    );
    assert!(!out.join(".metrics.jsonl.tmp-4242-0").exists());
    // It resumed from the restored checkpoint-2: the metrics hold steps 1..=N once each.
    let m = MetricsLog::read_all(&out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = m.iter().map(|x| x.step).collect();
    assert_eq!(steps, (1..=done[0].steps).collect::<Vec<_>>());
}

/// Step-1 loss and gradient norm of the fixture recipe with `batch_size` x `grad_accum` = 4.
fn first_step(dir: &Path, batch: usize, accum: usize) -> (f64, f64) {
    let out = dir.join(format!("b{batch}a{accum}"));
    let cfg = recipe(
        &out,
        &s(&[
            &format!("train.batch_size={batch}"),
            &format!("train.grad_accum={accum}"),
            "train.max_steps=1",
        ]),
    )
    .unwrap();
    run_recipe(&cfg, Resume::No, true).unwrap();
    let m = MetricsLog::read_all(&out.join("metrics.jsonl")).unwrap();
    (m[0].loss, m[0].grad_norm)
}

#[test]
fn accumulated_micro_batches_equal_one_batch_k_times_larger() {
    let tmp = tempfile::tempdir().unwrap();
    let (loss4, norm4) = first_step(tmp.path(), 4, 1);
    for (b, a) in [(2, 2), (1, 4)] {
        let (loss, norm) = first_step(tmp.path(), b, a);
        println!("batch {b} x accum {a}: loss {loss} vs {loss4}, grad norm {norm} vs {norm4}");
        assert!(
            (loss - loss4).abs() <= 1e-5 * loss4.abs(),
            "{loss} vs {loss4}"
        );
        assert!(
            (norm - norm4).abs() <= 1e-4 * norm4.abs(),
            "{norm} vs {norm4}"
        );
    }
}

/// `full.groups` keeps fresh adapters off its groups in every stage once some stage trains
/// `full`; when no stage does, those groups stay frozen and LoRA adapts them like any other.
#[test]
fn lora_leaves_out_only_groups_some_stage_trains_in_full() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = |stages: &str| {
        let extra = s(&[
            "lora.target_modules=all-linear",
            &format!("stages={stages}"),
        ]);
        let cfg = recipe(&tmp.path().join("run"), &extra).unwrap();
        let plan = TrainPlan::build(&cfg, &cfg.stage_specs()[0], None).unwrap();
        let text = plan.describe().unwrap();
        (plan, text)
    };
    let projector = "model.multi_modal_projector.linear_1";
    let (later_full, text) = plan(
        r#"[{ name = "a", trainable = ["lora"] }, { name = "b", trainable = ["lora", "full"] }]"#,
    );
    assert!(!later_full.lora_modules.contains_key(projector), "{text}");
    assert!(
        text.contains("(with multi_modal_projector: trained in full by a stage, not adapted)"),
        "{text}"
    );
    let (never_full, text) = plan(r#"[{ name = "a", trainable = ["lora"] }]"#);
    assert!(never_full.lora_modules.contains_key(projector), "{text}");
    assert!(!text.contains("lora excludes"), "{text}");
    assert_eq!(
        never_full.lora_modules.len(),
        later_full.lora_modules.len() + 2,
        "the projector's two linear layers"
    );
}

#[test]
fn fully_trained_groups_are_excluded_from_lora_and_merge_agrees_with_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("both");
    let cfg = recipe(
        &out,
        &s(&[
            "lora.target_modules=all-linear",
            "train.max_steps=2",
            "optim.lr=1e-2",
        ]),
    )
    .unwrap();
    run_recipe(&cfg, Resume::No, true).unwrap();
    let adapter_cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    let exclude = adapter_cfg["exclude_modules"].as_str().unwrap();
    assert!(exclude.contains("multi_modal_projector"), "{exclude}");
    let adapter =
        load_safetensors(&out.join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(
        adapter.keys().all(|k| !k.contains("multi_modal_projector")),
        "a fully trained module has no adapter"
    );
    // A complete adapter for what the targets match: CLIP's last layer never runs under
    // vision_feature_layer = -2, yet PEFT adapts it, so the adapter must hold it.
    for m in [
        "self_attn.q_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    ] {
        let key = format!(
            "base_model.model.model.vision_tower.vision_model.encoder.layers.2.{m}.lora_A.weight"
        );
        assert!(adapter.contains_key(&key), "{key}");
    }
    // merge folds the adapter and the fully trained weights, and scores like adapter + weights.
    let (with_adapter, from_merged) = merge_and_score(
        &out.join("adapter"),
        &out.join("full_weights.safetensors"),
        &tmp.path().join("merged"),
    );
    let model = repo().join("tests/fixtures/tiny-llava");
    let base = score(&["--model", model.to_str().unwrap()]);
    println!("adapter+full {with_adapter}, merged {from_merged}, base {base}");
    assert!(
        (with_adapter - from_merged).abs() < 1e-3,
        "{with_adapter} vs {from_merged}"
    );
    assert!(
        (with_adapter - base).abs() > 1e-3,
        "training changed the model"
    );
}

/// `score --json` log-probability of the fixture continuation with `model_args`.
fn score(model_args: &[&str]) -> f64 {
    let image = repo().join("tests/fixtures/pairs/images/03_big_green_circle.png");
    let mut args = vec![
        "score",
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "Describe this medical scan.",
        "--continuation",
        " big size, round shape, green colour, circle",
        "--json",
    ];
    args.extend_from_slice(model_args);
    let o = lvlm(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["logprob"].as_f64().unwrap()
}

/// `merge` of `adapter` + `full` onto the tiny checkpoint into `out`, then the fixture score
/// of `--adapter --full-weights` and of the merged checkpoint.
fn merge_and_score(adapter: &Path, full: &Path, out: &Path) -> (f64, f64) {
    let model = repo().join("tests/fixtures/tiny-llava");
    let (model, adapter, full) = (
        model.to_str().unwrap(),
        adapter.to_str().unwrap(),
        full.to_str().unwrap(),
    );
    let o = lvlm(&[
        "merge",
        "--model",
        model,
        "--adapter",
        adapter,
        "--full-weights",
        full,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let applied = score(&[
        "--model",
        model,
        "--adapter",
        adapter,
        "--full-weights",
        full,
    ]);
    (applied, score(&["--model", out.to_str().unwrap()]))
}

#[test]
fn merge_folds_an_adapter_on_a_fully_trained_module_into_its_replacement() {
    // An adapter with LoRA on the projector (written without the exclusion, e.g. by an older
    // lvlm-ift) next to fully trained projector weights of another run.
    let tmp = tempfile::tempdir().unwrap();
    let lora_run = tmp.path().join("lora");
    let cfg = recipe(
        &lora_run,
        &s(&[
            "lora.target_modules=all-linear",
            "full.groups=[]",
            "train.max_steps=2",
            "optim.lr=1e-2",
        ]),
    )
    .unwrap();
    run_recipe(&cfg, Resume::No, true).unwrap();
    let adapter = lora_run.join("adapter");
    let keys = load_safetensors(&adapter.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(keys.keys().any(|k| k.contains("multi_modal_projector")));
    let full_run = tmp.path().join("full");
    let cfg = recipe(&full_run, &s(&["train.max_steps=2", "optim.lr=1e-2"])).unwrap();
    run_recipe(&cfg, Resume::No, true).unwrap();
    let full = full_run.join("full_weights.safetensors");
    let (applied, from_merged) = merge_and_score(&adapter, &full, &tmp.path().join("merged"));
    let model = repo().join("tests/fixtures/tiny-llava");
    let without_lora = score(&[
        "--model",
        model.to_str().unwrap(),
        "--full-weights",
        full.to_str().unwrap(),
    ]);
    println!("adapter+full {applied}, merged {from_merged}, full only {without_lora}");
    assert!(
        (applied - from_merged).abs() < 1e-3,
        "{applied} vs {from_merged}"
    );
    assert!((applied - without_lora).abs() > 1e-3);
}

#[test]
fn settings_the_model_bounds_are_refused_before_anything_is_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bounds");
    let dry = |extra: &[&str]| -> String {
        let cfg = match recipe(&out, &s(extra)) {
            Ok(c) => c,
            Err(e) => return common::error_chain(&e),
        };
        match lvlm_ift::train::recipe::describe_recipe(&cfg, 1) {
            Ok(_) => panic!("{extra:?} accepted"),
            Err(e) => common::error_chain(&e),
        }
    };
    let e = dry(&["lora.r=1000000000"]);
    assert!(e.contains("r = 1000000000 exceeds the rank"), "{e}");
    let e = dry(&["data.max_len=100000"]);
    assert!(
        e.contains("data.max_len") && e.contains("max_position_embeddings (256"),
        "{e}"
    );
    let e = dry(&["data.instruction_mode=proxy", "proxy.tokens=100000"]);
    assert!(e.contains("proxy.tokens") && e.contains("256"), "{e}");
    let e = dry(&["train.epochs=9223372036854775807"]);
    assert!(e.contains("train.epochs") && e.contains("overflow"), "{e}");
    let e = dry(&["lora.target_modules=[\"no_such_proj\"]"]);
    assert!(
        e.contains("lora.target_modules") && e.contains("matches no linear layer"),
        "{e}"
    );
}

#[test]
fn a_sample_longer_than_the_model_allows_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let images = repo().join("tests/fixtures/pairs/images");
    let manifest = tmp.path().join("long.jsonl");
    let long = vec!["a very long description piece"; 400].join(", ");
    fs::write(
        &manifest,
        format!(
            "{}\n",
            serde_json::json!({"image": images.join("00_small_red_circle.png"), "text": long})
        ),
    )
    .unwrap();
    let out = tmp.path().join("long");
    let e = run_err(
        &out,
        &[&format!(
            "data.train=[{{ manifest = \"{}\" }}]",
            manifest.display()
        )],
    );
    assert!(
        e.contains("long.jsonl:1")
            && e.contains("max_position_embeddings (256)")
            && e.contains("data.max_len"),
        "{e}"
    );
}

#[test]
fn the_grad_norm_clip_covers_the_model_only_unless_clip_proxy() {
    // LoRA + the proxy vectors in one stage: the reported (and clipped) norm is the model's;
    // with optim.clip_proxy the proxy's gradient joins it.
    let tmp = tempfile::tempdir().unwrap();
    let norm = |name: &str, clip_proxy: bool| -> f64 {
        let out = tmp.path().join(name);
        let cfg = recipe(
            &out,
            &s(&[
                "data.instruction_mode=proxy",
                "full.groups=[]",
                "train.max_steps=1",
                &format!("optim.clip_proxy={clip_proxy}"),
            ]),
        )
        .unwrap();
        run_recipe(&cfg, Resume::No, true).unwrap();
        MetricsLog::read_all(&out.join("metrics.jsonl")).unwrap()[0].grad_norm
    };
    let (model_only, with_proxy) = (norm("model", false), norm("both", true));
    println!("grad norm: model only {model_only}, with proxy {with_proxy}");
    assert!(model_only > 0.0 && with_proxy > model_only * (1.0 + 1e-6));
}
