//! Every shipped recipe in `configs/` must stay valid: each is dry-run (plan printed, nothing
//! trained) with its model and data paths pointed at the tiny fixtures of its family (LLaVA or
//! Llama-3.2-Vision) and its device at the CPU, everything else — stages, groups, repeats, image
//! geometry, hyper-parameters — as shipped. The Llama-3.2-Vision recipes are also planned against
//! the real 11B's `config.json` alone (no weights, no tokenizer).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny checkpoint of the recipe's family.
fn tiny_model(config: &Path) -> PathBuf {
    let name = config.file_stem().unwrap().to_string_lossy();
    let model = if name.contains("mllama") {
        "tiny-mllama"
    } else {
        "tiny-llava"
    };
    repo().join("tests/fixtures").join(model)
}

fn dry_run(config: &Path, out: &Path) -> (bool, String) {
    dry_run_on(config, &tiny_model(config), out)
}

fn dry_run_on(config: &Path, model: &Path, out: &Path) -> (bool, String) {
    let text = std::fs::read_to_string(config).unwrap();
    let recipe: toml::Table = toml::from_str(&text).unwrap();
    let sources = recipe["data"]["train"].as_array().unwrap();
    let manifest = repo().join("tests/fixtures/pairs/pairs.jsonl");
    let train: Vec<String> = sources
        .iter()
        .map(|s| {
            let repeat = s.get("repeat").and_then(|r| r.as_integer()).unwrap_or(1);
            format!(
                "{{ manifest = {:?}, repeat = {repeat} }}",
                manifest.display().to_string()
            )
        })
        .collect();
    let o = Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .args(["train", "--config"])
        .arg(config)
        .args(["--dry-run", "--set"])
        .arg(format!("model.path={}", model.display()))
        .args(["--set", "model.device=cpu", "--set"])
        .arg(format!("data.train=[{}]", train.join(", ")))
        .arg("--set")
        .arg(format!("train.output_dir={}", out.display()))
        .current_dir(repo())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    (o.status.success(), stderr)
}

#[test]
fn every_shipped_config_dry_runs_on_the_tiny_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    let mut configs: Vec<PathBuf> = std::fs::read_dir(repo().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    configs.sort();
    assert!(configs.len() >= 4, "{configs:?}");
    for config in &configs {
        let name = config.file_stem().unwrap().to_string_lossy().into_owned();
        let out = tmp.path().join(&name);
        let (ok, stderr) = dry_run(config, &out);
        assert!(ok, "{}: {stderr}", config.display());
        assert!(
            stderr.contains("total steps"),
            "{}: {stderr}",
            config.display()
        );
        assert!(
            !out.exists(),
            "{}: a dry run writes nothing",
            config.display()
        );
        let text = std::fs::read_to_string(config).unwrap();
        if name.starts_with("instfree-") {
            assert!(stderr.contains("images: squash"), "{name}: {stderr}");
        }
        if name.contains("skincon") || name.contains("cbis") {
            assert!(text.contains("repeat = 3"), "{name}");
            // 12 fixture pairs x 3.
            assert!(stderr.contains("training pairs   36"), "{name}: {stderr}");
        }
    }
}

#[test]
fn the_mllama_recipes_plan_the_11b_from_its_config_json_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let eleven_b = repo().join("tests/fixtures/mllama-11b");
    let counts: std::collections::HashMap<String, usize> =
        serde_json::from_str(&std::fs::read_to_string(eleven_b.join("param_counts.json")).unwrap())
            .unwrap();
    for b in ["wbcatt", "cbis", "skincon"] {
        let config = repo().join(format!("configs/instfree-mllama-{b}.toml"));
        let (ok, plan) = dry_run_on(&config, &eleven_b, &tmp.path().join(b));
        assert!(ok, "{b}: {plan}");
        println!("{plan}");
        let main = plan.split("== stage 2/2").nth(1).expect("two stages");
        for (group, how) in [
            ("vision_encoder", "full"),
            ("fusion", "full"),
            ("language_model", "frozen"),
            ("lm_head", "frozen"),
        ] {
            let line = main
                .lines()
                .find(|l| l.starts_with(&format!("group            {group} ")))
                .unwrap_or_else(|| panic!("{b}: no {group} line in {main}"));
            assert!(line.contains(&counts[group].to_string()), "{line}");
            assert!(line.contains(how), "{line}");
        }
        for group in ["vision_encoder", "fusion"] {
            assert!(
                main.contains(&format!("trainable        {group}: {}", counts[group])),
                "{b}: {main}"
            );
        }
        assert!(
            main.contains("memory estimate") && main.contains("bf16"),
            "{main}"
        );
        assert!(main.contains("not rendered"), "{main}");
    }
    // As shipped, `device = "cuda"`: the plan needs no GPU.
    let o = Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .args([
            "train",
            "--config",
            "configs/instfree-mllama-wbcatt.toml",
            "--dry-run",
        ])
        .arg("--set")
        .arg(format!("model.path={}", eleven_b.display()))
        .arg("--set")
        .arg(format!(
            "data.train=[{{ manifest = {:?} }}]",
            repo()
                .join("tests/fixtures/pairs/pairs.jsonl")
                .display()
                .to_string()
        ))
        .current_dir(repo())
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{plan}");
    assert!(plan.contains("on cuda"), "{plan}");
}
