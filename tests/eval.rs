//! `lvlm-ift eval` end to end on the committed tiny checkpoint, plus the likelihood scorer checked
//! against the full-sequence `continuation_logprobs`.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use lvlm_ift::eval::mcq::{letter, question_prompt, McqItem};
use lvlm_ift::eval::report::{wilson_interval, Z95};
use lvlm_ift::eval::run::{likelihood_continuation, option_loglikelihoods, predict, Scoring};
use lvlm_ift::model::generate::continuation_logprobs;
use lvlm_ift::session::{Prompt, Session, SessionOptions};

fn model_dir() -> String {
    fixtures().join("tiny-llava").to_string_lossy().into_owned()
}

/// A tiny MCQ set in `dir`: images copied in (relative paths) except one given absolute.
fn write_items(dir: &Path, split: &str) -> Vec<McqItem> {
    let src = fixtures().join("pairs/images");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let names = [
        "00_small_red_circle.png",
        "01_big_red_circle.png",
        "07_big_red_square.png",
        "10_small_blue_square.png",
    ];
    for n in &names[..3] {
        std::fs::copy(src.join(n), dir.join("images").join(n)).unwrap();
    }
    let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let items = vec![
        McqItem {
            id: "q0".into(),
            image: format!("images/{}", names[0]),
            key: "cell_size".into(),
            options: o(&["big", "small"]),
            answer: 1,
            source: None,
        },
        McqItem {
            id: "q1".into(),
            image: format!("images/{}", names[1]),
            key: "cell_size".into(),
            options: o(&["big", "small"]),
            answer: 0,
            source: None,
        },
        McqItem {
            id: "q2".into(),
            image: format!("images/{}", names[2]),
            key: "shape".into(),
            options: o(&["circle", "square", "triangle", "star", "oval"]),
            answer: 1,
            source: None,
        },
        McqItem {
            id: "q3".into(),
            image: src.join(names[3]).to_string_lossy().into_owned(),
            key: "mass_margins".into(),
            options: o(&["red", "green", "blue"]),
            answer: 2,
            source: None,
        },
    ];
    let text: String = items
        .iter()
        .map(|i| serde_json::to_string(i).unwrap() + "\n")
        .collect();
    std::fs::write(dir.join(format!("mcq_{split}.jsonl")), text).unwrap();
    items
}

fn eval(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .arg("eval")
        .args(args)
        .output()
        .expect("run lvlm-ift");
    assert!(
        out.status.success(),
        "lvlm-ift eval {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read_json(p: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|_| panic!("{p:?}"))).unwrap()
}

fn predictions(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn check_acc(a: &serde_json::Value, n: u64) {
    assert_eq!(a["n"], n, "{a}");
    let acc = a["accuracy"].as_f64().unwrap();
    let (lo, hi) = (
        a["ci95_low"].as_f64().unwrap(),
        a["ci95_high"].as_f64().unwrap(),
    );
    assert!((0.0..=1.0).contains(&acc), "{a}");
    assert!(lo <= acc + 1e-12 && acc <= hi + 1e-12, "{a}");
    assert!((acc - a["correct"].as_f64().unwrap() / n as f64).abs() < 1e-12);
}

fn check_report(dir: &Path, scoring: &str, n: u64) -> serde_json::Value {
    let r = read_json(dir.join("report.json"));
    assert_eq!(r["benchmark"], "wbcatt");
    assert_eq!(r["scoring"], scoring);
    assert_eq!(r["n_predictions"], n);
    let o = &r["overall"];
    assert_eq!(o["n_items"], n);
    check_acc(&o["accuracy"], n);
    for b in ["majority_baseline", "uniform_baseline"] {
        let v = o[b].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{b} {v}");
    }
    let per_key = r["per_key"].as_object().unwrap();
    let total: u64 = per_key
        .values()
        .map(|k| k["n_items"].as_u64().unwrap())
        .sum();
    assert_eq!(total, n);
    for (key, k) in per_key {
        check_acc(&k["accuracy"], k["n_items"].as_u64().unwrap());
        if scoring == "generate" {
            check_acc(&k["lenient_accuracy"], k["n_items"].as_u64().unwrap());
        }
        let png = dir.join(format!("confusion-{key}.png"));
        let img = image::open(&png).unwrap_or_else(|e| panic!("{png:?}: {e}"));
        assert!(img.width() > 100 && img.height() > 100);
    }
    r
}

#[test]
fn eval_generate_and_likelihood_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let items = write_items(data, "test");
    let data_s = data.to_string_lossy().into_owned();
    let model = model_dir();

    // generate, default --out.
    let stdout = eval(&[
        "--benchmark",
        "wbcatt",
        "--data",
        &data_s,
        "--model",
        &model,
        "--quiet",
    ]);
    assert!(stdout.contains("accuracy"), "{stdout}");
    let gen_dir = data.join("eval-test-generate");
    let r = check_report(&gen_dir, "generate", 4);
    // Majority: cell_size 1 of 2 (tie -> A), shape 1, mass_margins 1 => 3/4; uniform mean of 1/n.
    assert!((r["overall"]["majority_baseline"].as_f64().unwrap() - 0.75).abs() < 1e-12);
    let uni = (0.5 + 0.5 + 0.2 + 1.0 / 3.0) / 4.0;
    assert!((r["overall"]["uniform_baseline"].as_f64().unwrap() - uni).abs() < 1e-12);
    check_acc(&r["overall"]["lenient_accuracy"], 4);
    let preds = predictions(&gen_dir);
    assert_eq!(preds.len(), 4);
    for (p, it) in preds.iter().zip(&items) {
        assert_eq!(p["id"], it.id.as_str());
        assert_eq!(p["answer"], letter(it.answer).to_string());
        assert!(p["raw"].is_string());
        assert!(p.get("strict").is_some() && p.get("lenient").is_some());
        assert_eq!(p["predicted"], p["strict"]);
    }

    // likelihood: --limit 2, then --resume completes the rest without duplicates.
    let lik_dir = tmp.path().join("lik");
    let lik_s = lik_dir.to_string_lossy().into_owned();
    let base = [
        "--benchmark",
        "wbcatt",
        "--data",
        &data_s,
        "--model",
        &model,
        "--quiet",
        "--scoring",
        "likelihood",
        "--out",
        &lik_s,
    ];
    let mut a: Vec<&str> = base.to_vec();
    a.extend(["--limit", "2"]);
    eval(&a);
    check_report(&lik_dir, "likelihood", 2);
    let first = predictions(&lik_dir);
    assert_eq!(first.len(), 2);
    let mut a: Vec<&str> = base.to_vec();
    a.push("--resume");
    eval(&a);
    let r = check_report(&lik_dir, "likelihood", 4);
    assert_eq!(r["n_new"], 2);
    let all = predictions(&lik_dir);
    assert_eq!(all.len(), 4);
    assert_eq!(&all[..2], &first[..]);
    let ids: HashSet<&str> = all.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 4);
    for (p, it) in all.iter().zip(&items) {
        let scores: Vec<f64> = p["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(scores.len(), it.options.len());
        assert!(scores.iter().all(|s| s.is_finite() && *s < 0.0));
        let best = (0..scores.len()).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
        assert_eq!(p["predicted"], letter(best).to_string());
    }
    // Resume with nothing left is a no-op on the predictions.
    eval(&a);
    assert_eq!(predictions(&lik_dir), all);
}

#[test]
fn option_loglikelihoods_match_full_forward() {
    let session = Session::load(&model_dir(), SessionOptions::default()).unwrap();
    let image = fixtures().join("pairs/images/03_big_green_circle.png");
    let options: Vec<String> = ["circle", "square", "triangle"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let prompt = Prompt::Chat(question_prompt("shape", &options));
    let prompt_ids = session.prompt_ids(&prompt).unwrap();
    let vision = session.vision_input(&image).unwrap();
    let conts: Vec<Vec<u32>> = (0..options.len())
        .map(|i| {
            session
                .text
                .encode_plain(&likelihood_continuation(letter(i)))
                .unwrap()
        })
        .collect();
    let got = option_loglikelihoods(
        session.model.as_ref(),
        &prompt_ids,
        Some(&vision),
        &conts,
        &session.device,
    )
    .unwrap();
    for (i, c) in conts.iter().enumerate() {
        let want: f32 = continuation_logprobs(
            session.model.as_ref(),
            &prompt_ids,
            c,
            Some(&vision),
            &session.device,
        )
        .unwrap()
        .iter()
        .sum();
        assert!(
            (got[i] - want as f64).abs() < 1e-4,
            "option {i}: cached {} vs full {want}",
            got[i]
        );
        // The same through Session::score.
        let s = session
            .score(&image, &prompt, &likelihood_continuation(letter(i)))
            .unwrap();
        assert!((got[i] - s.logprob as f64).abs() < 1e-4);
    }
    // A single continuation (no shared prefix split) agrees too.
    let one = option_loglikelihoods(
        session.model.as_ref(),
        &prompt_ids,
        Some(&vision),
        &conts[..1],
        &session.device,
    )
    .unwrap();
    assert!((one[0] - got[0]).abs() < 1e-4);
}

#[test]
fn likelihood_text_scores_are_score_per_byte() {
    let session = Session::load(&model_dir(), SessionOptions::default()).unwrap();
    let image = fixtures().join("pairs/images/03_big_green_circle.png");
    let item = McqItem {
        id: "t".into(),
        image: image.to_string_lossy().into_owned(),
        key: "dermatologic feature".into(),
        options: vec![
            "plaque, scale".into(),
            "nodule".into(),
            "papule, plaque, dome-shaped, erythema".into(),
        ],
        answer: 1,
        source: None,
    };
    let pred = predict(&session, &item, Path::new("/"), Scoring::LikelihoodText).unwrap();
    let scores = pred.scores.unwrap();
    let prompt = Prompt::Chat(question_prompt(&item.key, &item.options));
    for (opt, got) in item.options.iter().zip(&scores) {
        let lp = session.score(&image, &prompt, opt).unwrap().logprob as f64;
        let want = lp / opt.len() as f64;
        assert!((got - want).abs() < 1e-5, "{opt}: {got} vs {want}");
    }
    let best = (0..3).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
    assert_eq!(pred.predicted, Some(letter(best)));
    assert!(pred.raw.is_none() && pred.strict.is_none());
}

#[test]
fn wilson_interval_known_values() {
    let (lo, hi) = wilson_interval(8, 10, 1.96);
    assert!((lo - 0.490).abs() < 1e-3, "{lo}");
    assert!((hi - 0.943).abs() < 1e-3, "{hi}");
    let (lo, hi) = wilson_interval(50, 100, Z95);
    assert!((lo - 0.4038).abs() < 1e-3 && (hi - 0.5962).abs() < 1e-3);
}

#[test]
fn eval_runs_every_scoring_on_llama_3_2_vision() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    write_items(data, "test");
    let data_s = data.to_string_lossy().into_owned();
    let model = fixtures()
        .join("tiny-mllama")
        .to_string_lossy()
        .into_owned();
    for scoring in ["generate", "likelihood", "likelihood-text"] {
        let out = data.join(format!("mllama-{scoring}"));
        eval(&[
            "--benchmark",
            "wbcatt",
            "--data",
            &data_s,
            "--model",
            &model,
            "--image-aspect",
            "squash",
            "--max-image-tiles",
            "1",
            "--scoring",
            scoring,
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        check_report(&out, scoring, 4);
        let run = read_json(out.join("run.json"));
        assert_eq!(run["max_image_tiles"], 1, "{run}");
    }
}
