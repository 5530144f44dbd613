//! End-to-end: the real `lvlm-ift` binary on the committed tiny checkpoints, compared with the
//! numbers HF transformers produced for the same image and prompts (our processor, tokenizer and
//! chat template included, not HF's pixel values).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{fixtures, Expected, MODELS};

fn lvlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .args(args)
        .output()
        .expect("run lvlm-ift")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = lvlm(args);
    assert!(
        out.status.success(),
        "lvlm-ift {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn path(p: PathBuf) -> String {
    p.to_string_lossy().into_owned()
}

fn photo() -> String {
    path(fixtures().join("images/photo_67x45.png"))
}

#[test]
fn score_matches_hf_through_the_chat_template() {
    for model in MODELS {
        let exp = Expected::load(model);
        let v = ok_json(&[
            "score",
            "--model",
            &path(fixtures().join(model)),
            "--image",
            &photo(),
            "--prompt",
            exp.meta["prompts"]["chat_user_text"].as_str().unwrap(),
            "--continuation",
            exp.meta["continuation"].as_str().unwrap(),
            "--json",
        ]);
        let want = exp.tensor("score.token_logprobs").to_vec1::<f32>().unwrap();
        let got: Vec<f32> = v["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), want.len());
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let sum_want = exp.tensor("score.logprob").to_vec1::<f32>().unwrap()[0];
        let sum_got = v["logprob"].as_f64().unwrap() as f32;
        println!("{model} score CLI: token max abs {max:.3e}, sum {sum_got} vs HF {sum_want}");
        assert!(max < 1e-4, "{model}: {max}");
        assert!((sum_got - sum_want).abs() < 1e-4);
    }
}

#[test]
fn generate_matches_hf_greedy_ids_with_raw_and_chat_prompts() {
    for model in MODELS {
        let exp = Expected::load(model);
        let max_new = exp.meta["max_new_tokens"].to_string();
        let dir = path(fixtures().join(model));
        let photo = photo();
        let cases = [
            (
                "--raw-prompt",
                exp.meta["prompts"]["raw"].as_str().unwrap(),
                "generate.raw_ids",
            ),
            (
                "--prompt",
                exp.meta["prompts"]["chat_user_text"].as_str().unwrap(),
                "generate.chat_ids",
            ),
        ];
        for (flag, text, key) in cases {
            let v = ok_json(&[
                "generate",
                "--model",
                &dir,
                "--image",
                &photo,
                flag,
                text,
                "--max-new-tokens",
                &max_new,
                "--json",
            ]);
            let got: Vec<u32> = v["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(got, exp.ids(key), "{model} {flag}");
            assert!(v["text"].is_string());
        }
    }
}

#[test]
fn bad_input_gives_a_clear_error_naming_the_culprit() {
    let dir = path(fixtures().join("tiny-llava"));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "generate".into(),
                "--model".into(),
                dir.clone(),
                "--image".into(),
                "/no/such.png".into(),
                "--prompt".into(),
                "x".into(),
            ],
            "/no/such.png",
        ),
        (
            vec![
                "score".into(),
                "--model".into(),
                "/no/such/model".into(),
                "--image".into(),
                photo(),
                "--prompt".into(),
                "x".into(),
                "--continuation".into(),
                "y".into(),
            ],
            "/no/such/model",
        ),
        (
            // Raw prompt without the image placeholder.
            vec![
                "generate".into(),
                "--model".into(),
                dir.clone(),
                "--image".into(),
                photo(),
                "--raw-prompt".into(),
                "USER: hi ASSISTANT:".into(),
            ],
            "image placeholder",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = lvlm(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains(needle),
            "{args:?}: stderr lacks {needle:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // --prompt and --raw-prompt are exclusive, one is required.
    let out = lvlm(&["generate", "--model", &dir, "--image", &photo()]);
    assert!(!out.status.success());
}
