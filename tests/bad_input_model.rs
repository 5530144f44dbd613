//! Issue 9, model side: bad input never panics, hangs or passes silently. The real binary on
//! corrupted copies of the tiny checkpoints, adapters and eval directories; every error must name
//! what is wrong.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixtures;

fn lvlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .args(args)
        .output()
        .expect("run lvlm-ift")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Run, expect failure without a panic, return stderr.
fn fails(args: &[&str]) -> String {
    let out = lvlm(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail; stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    println!("{args:?}:\n{err}");
    err
}

fn succeeds(args: &[&str]) -> String {
    let out = lvlm(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_has(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "lacks {n:?}: {text}");
    }
}

/// A copy of a committed tiny checkpoint in `dst`, to corrupt.
fn copy_model(name: &str, dst: &Path) -> PathBuf {
    let src = fixtures().join(name);
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst.to_path_buf()
}

fn photo() -> String {
    s(&fixtures().join("images/photo_67x45.png"))
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn generate(model: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        s(model),
        "--image".into(),
        photo(),
        "--prompt".into(),
        "What is shown?".into(),
    ];
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---- 1. generation never hangs and never runs past max_position_embeddings ----

#[test]
fn eos_outside_the_vocabulary_is_an_error_naming_file_id_and_size() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_model("tiny-llava", &tmp.path().join("m"));
    edit_json(&model.join("generation_config.json"), |v| {
        v["eos_token_id"] = serde_json::json!([2, 100000]);
    });
    let err = fails(&strs(&generate(&model, &["--max-new-tokens", "5"])));
    assert_has(
        &err,
        &[
            "generation_config.json",
            "eos_token_id",
            "100000",
            "400 tokens",
        ],
    );
}

#[test]
fn generate_past_max_position_embeddings_is_refused_up_front() {
    let err = fails(&strs(&generate(
        &fixtures().join("tiny-llava"),
        &["--max-new-tokens", "1000000"],
    )));
    assert_has(
        &err,
        &[
            "1000000 new tokens",
            "max_position_embeddings 256",
            "--max-new-tokens",
        ],
    );
    let err = fails(&strs(&generate(
        &fixtures().join("tiny-llava"),
        &["--max-new-tokens", "0"],
    )));
    assert_has(&err, &["--max-new-tokens", "0"]);
}

/// One MCQ item (image copied in) in `data/mcq_test.jsonl`.
fn write_one_item(data: &Path) {
    std::fs::create_dir_all(data).unwrap();
    std::fs::copy(
        fixtures().join("pairs/images/00_small_red_circle.png"),
        data.join("a.png"),
    )
    .unwrap();
    std::fs::write(
        data.join("mcq_test.jsonl"),
        r#"{"id":"q0","image":"a.png","key":"cell_size","options":["big","small"],"answer":1}
{"id":"q1","image":"a.png","key":"shape","options":["circle","square"],"answer":0}
"#,
    )
    .unwrap();
}

#[test]
fn eval_generate_that_would_pass_max_position_embeddings_names_the_item() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_one_item(&data);
    let model = copy_model("tiny-llava", &tmp.path().join("m"));
    // Long enough for the prompts (and likelihood scoring), too short for 50 new tokens.
    edit_json(&model.join("config.json"), |v| {
        v["text_config"]["max_position_embeddings"] = serde_json::json!(120);
    });
    let out = tmp.path().join("out");
    let args = [
        "eval",
        "--benchmark",
        "wbcatt",
        "--data",
        &s(&data),
        "--model",
        &s(&model),
        "--out",
        &s(&out),
        "--quiet",
    ];
    let err = fails(&args);
    assert_has(
        &err,
        &[
            "mcq_test.jsonl",
            "item q0",
            "50 new tokens",
            "max_position_embeddings 120",
        ],
    );
    assert!(!out.join("predictions.jsonl").exists());
    let mut lik = args.to_vec();
    lik.extend(["--scoring", "likelihood"]);
    succeeds(&lik);
}

// ---- 2. merge never replaces or renames what is at --out ----

fn adapter_fixture() -> PathBuf {
    fixtures().join("parity/tiny-llava-lora-init")
}

fn merge_args(model: &Path, adapter: &Path, out: &Path) -> Vec<String> {
    vec![
        "merge".into(),
        "--model".into(),
        s(model),
        "--adapter".into(),
        s(adapter),
        "--out".into(),
        s(out),
    ]
}

/// Names in `dir`, sorted (hidden temp/old names included).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn merge_refuses_an_existing_file_or_non_empty_dir_before_touching_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-llava");
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "precious").unwrap();
    let err = fails(&strs(&merge_args(&model, &adapter_fixture(), &file)));
    assert_has(&err, &["--out", &s(&file), "is not a directory"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    assert_eq!(listing(tmp.path()), vec!["notes.txt"]);

    let dir = tmp.path().join("full");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    let err = fails(&strs(&merge_args(&model, &adapter_fixture(), &dir)));
    assert_has(&err, &["--out", &s(&dir), "not empty"]);
    assert_eq!(listing(&dir), vec!["keep.txt"]);
    assert_eq!(listing(tmp.path()), vec!["full", "notes.txt"]);

    // An empty directory is fine.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    lvlm(&strs(&merge_args(&model, &adapter_fixture(), &empty)));
    assert!(empty.join("config.json").is_file(), "{:?}", listing(&empty));
}

// ---- 3. merge / adapter messages say what is wrong ----

/// A copy of the fixture adapter with `target_modules` replaced.
fn adapter_with_targets(dst: &Path, targets: serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter_fixture().join(f), dst.join(f)).unwrap();
    }
    edit_json(&dst.join("adapter_config.json"), |v| {
        v["target_modules"] = targets;
    });
    dst.to_path_buf()
}

fn score_args(model: &Path, adapter: &Path) -> Vec<String> {
    vec![
        "score".into(),
        "--model".into(),
        s(model),
        "--adapter".into(),
        s(adapter),
        "--image".into(),
        photo(),
        "--prompt".into(),
        "What is shown?".into(),
        "--continuation".into(),
        "a cell".into(),
    ]
}

#[test]
fn adapter_on_the_wrong_base_names_adapter_base_module_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let mistral = fixtures().join("tiny-llava-mistral");
    let v_proj = "model.language_model.layers.0.self_attn.v_proj";
    let needles = [
        &s(&adapter_fixture())[..],
        &s(&mistral)[..],
        v_proj,
        "was trained for a model where",
        "[64, 64]",
        "[32, 64]",
    ];
    let out = tmp.path().join("merged");
    let err = fails(&strs(&merge_args(&mistral, &adapter_fixture(), &out)));
    assert_has(&err, &needles);
    // Nothing left behind, nothing renamed.
    assert!(listing(tmp.path()).is_empty(), "{:?}", listing(tmp.path()));

    let err = fails(&strs(&score_args(&mistral, &adapter_fixture())));
    assert_has(&err, &needles);

    let data = tmp.path().join("data");
    write_one_item(&data);
    let err = fails(&[
        "eval",
        "--benchmark",
        "wbcatt",
        "--data",
        &s(&data),
        "--model",
        &s(&mistral),
        "--adapter",
        &s(&adapter_fixture()),
        "--scoring",
        "likelihood",
        "--quiet",
    ]);
    assert_has(&err, &needles);
}

#[test]
fn bad_adapter_target_modules_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-llava");

    // Matches nothing: merge used to ignore target_modules, score blamed the weights.
    let none = adapter_with_targets(&tmp.path().join("none"), serde_json::json!(["nope_proj"]));
    let needles = [
        "adapter_config.json",
        "target_modules",
        r#"["nope_proj"]"#,
        "matches no module of base",
        "q_proj",
    ];
    let out = tmp.path().join("merged");
    assert_has(&fails(&strs(&merge_args(&model, &none, &out))), &needles);
    assert!(!out.exists());
    assert_has(&fails(&strs(&score_args(&model, &none))), &needles);

    // Invalid regex.
    let re = adapter_with_targets(&tmp.path().join("re"), serde_json::json!("(q_proj"));
    let needles = [
        "adapter_config.json",
        "key `target_modules`",
        "invalid regex `(q_proj`",
    ];
    assert_has(&fails(&strs(&merge_args(&model, &re, &out))), &needles);
    assert_has(&fails(&strs(&score_args(&model, &re))), &needles);

    // Weights for a module the pattern does not match.
    let q = adapter_with_targets(&tmp.path().join("q"), serde_json::json!(["q_proj"]));
    let needles = [
        "target_modules",
        r#"["q_proj"] does not match `model.language_model.layers.0.self_attn.v_proj`"#,
        "adapter_model.safetensors",
    ];
    assert_has(&fails(&strs(&merge_args(&model, &q, &out))), &needles);
    assert_has(&fails(&strs(&score_args(&model, &q))), &needles);

    // A pattern matching modules the adapter has no weights for (a silent zero before).
    let qkv = adapter_with_targets(
        &tmp.path().join("qkv"),
        serde_json::json!(["q_proj", "k_proj", "v_proj"]),
    );
    assert_has(
        &fails(&strs(&score_args(&model, &qkv))),
        &[
            &s(&qkv)[..],
            "has no LoRA weights for",
            "model.language_model.layers.0.self_attn.k_proj",
        ],
    );
    assert!(!out.exists());
}

// ---- 4. eval --resume never reuses another model's predictions ----

#[test]
fn eval_resume_refuses_predictions_of_another_adapter_model_or_scoring() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_one_item(&data);
    let out = tmp.path().join("out");
    let tiny = s(&fixtures().join("tiny-llava"));
    let adapter = s(&adapter_fixture());
    let run = |model: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "eval",
            "--benchmark",
            "wbcatt",
            "--data",
            &s(&data),
            "--model",
            model,
            "--out",
            &s(&out),
            "--quiet",
            "--scoring",
            "likelihood",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    succeeds(&strs(&run(&tiny, &["--limit", "1"])));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["scoring"], "likelihood");
    assert!(info["adapter"].is_null());
    let before = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();

    // Another adapter.
    let err = fails(&strs(&run(&tiny, &["--resume", "--adapter", &adapter])));
    assert_has(
        &err,
        &[
            "run.json",
            "--resume",
            "adapter: `none (none)` before",
            &adapter,
            "fnv1a64:",
        ],
    );
    // Another model.
    let mistral = s(&fixtures().join("tiny-llava-mistral"));
    let err = fails(&strs(&run(&mistral, &["--resume"])));
    assert_has(&err, &["model: `", &tiny, &mistral]);
    // Another scoring (run.json catches it before the per-prediction check).
    let mut lt = run(&tiny, &["--resume"]);
    let i = lt.iter().position(|a| a == "likelihood").unwrap();
    lt[i] = "likelihood-text".into();
    let err = fails(&strs(&lt));
    assert_has(
        &err,
        &["scoring: `likelihood` before, `likelihood-text` now"],
    );
    // Refusals leave the predictions alone; the same run resumes.
    assert_eq!(
        std::fs::read_to_string(out.join("predictions.jsonl")).unwrap(),
        before
    );
    succeeds(&strs(&run(&tiny, &["--resume"])));
    let after = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    assert!(after.starts_with(&before) && after.lines().count() == 2);

    // Predictions with no record of what made them are not resumed.
    std::fs::remove_file(out.join("run.json")).unwrap();
    let err = fails(&strs(&run(&tiny, &["--resume"])));
    assert_has(&err, &["run.json", "file missing", "2 prediction(s)"]);
}

// ---- 5. a missing preprocessor_config.json is named ----

#[test]
fn missing_preprocessor_config_names_the_file_and_the_model_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_model("tiny-llava", &tmp.path().join("m"));
    std::fs::remove_file(model.join("preprocessor_config.json")).unwrap();
    let args = vec![
        "score".to_string(),
        "--model".into(),
        s(&model),
        "--image".into(),
        photo(),
        "--prompt".into(),
        "What is shown?".into(),
        "--continuation".into(),
        "a cell".into(),
    ];
    // processor_config.json is there, without an image_processor.
    let pre = s(&model.join("preprocessor_config.json"));
    assert_has(
        &fails(&strs(&args)),
        &[
            &pre,
            "does not exist",
            "processor_config.json",
            "image_processor",
            "copy",
        ],
    );
    std::fs::remove_file(model.join("processor_config.json")).unwrap();
    assert_has(
        &fails(&strs(&args)),
        &[
            &pre,
            "not found",
            "processor_config.json",
            &s(&model),
            "copy",
        ],
    );
}

// ---- 6. synth-pairs bounds its inputs ----

#[test]
fn synth_pairs_bounds_image_size_and_count_by_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = s(&tmp.path().join("pairs"));
    let err = fails(&["synth-pairs", "--out", &out, "--image-size", "100000"]);
    assert_has(&err, &["--image-size", "100000", "16..=4096"]);
    let err = fails(&["synth-pairs", "--out", &out, "--count", "1000000000000"]);
    assert_has(&err, &["--count", "1000000000000", "0..=1000000"]);
    assert!(!tmp.path().join("pairs").exists());
    succeeds(&[
        "synth-pairs",
        "--out",
        &out,
        "--count",
        "2",
        "--image-size",
        "16",
    ]);
}
