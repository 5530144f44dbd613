//! The model-family boundary: one dispatch on `config.json`, shapes from `config.json` alone that
//! agree with the checkpoint, plans (and `--dry-run`) that need no weight file, and module groups
//! the family defines.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::{fixture_overrides, fixtures, MODELS};
use lvlm_ift::config::TrainConfig;
use lvlm_ift::model::checkpoint::weight_files;
use lvlm_ift::model::family::{family_of, layout};
use lvlm_ift::model::weights::WeightStore;
use lvlm_ift::train::recipe::describe_recipe;

/// A copy of `model`'s directory without its weight files.
fn config_only_copy(model: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(fixtures().join(model)).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_file() && !name.ends_with(".safetensors") && !name.ends_with(".index.json") {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}

#[test]
fn the_layout_from_config_json_is_the_checkpoint_parameter_for_parameter() {
    for model in MODELS {
        let dir = fixtures().join(model);
        let layout = layout(&dir).unwrap();
        assert_eq!(layout.family.name(), "llava");
        let files = weight_files(&dir).unwrap();
        let store = WeightStore::open(
            &dir,
            &files,
            &Device::Cpu,
            DType::F32,
            layout.family.key_map(),
        )
        .unwrap();
        let stored: std::collections::BTreeMap<String, Vec<usize>> = store
            .names()
            .into_iter()
            .filter(|n| !n.ends_with(".position_ids"))
            .map(|n| {
                let shape = store.shape_of(&n).unwrap();
                (n, shape)
            })
            .collect();
        assert_eq!(layout.params, stored, "{model}");
        // The unrun parameters are exactly CLIP's pooled-output norm and the layers past the
        // deepest feature layer (vision_feature_layer = -2 on the fixtures: the last layer).
        assert!(layout
            .unrun
            .iter()
            .all(|n| n.contains("post_layernorm") || n.contains("encoder.layers.")));
        assert!(!layout.unrun.is_empty(), "{model}");
        // Linear modules: every 2-D weight but the embedding tables, with [out, in].
        for (m, l) in &layout.linear_modules {
            let shape = &layout.params[&format!("{m}.weight")];
            assert_eq!(shape, &vec![l.out_dim, l.in_dim], "{m}");
        }
        assert!(layout
            .linear_modules
            .contains_key("model.language_model.layers.0.self_attn.q_proj"));
        assert!(!layout
            .linear_modules
            .keys()
            .any(|m| m.ends_with("embed_tokens")));
    }
}

#[test]
fn an_unknown_architecture_is_named_with_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |json: &str| std::fs::write(tmp.path().join("config.json"), json).unwrap();
    write(r#"{"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"}"#);
    let e = common::error_chain(&family_of(tmp.path()).err().unwrap());
    assert!(
        e.contains("Qwen2VLForConditionalGeneration")
            && e.contains("LlavaForConditionalGeneration")
            && e.contains("config.json"),
        "{e}"
    );
    // Without `architectures`, `model_type` decides.
    write(r#"{"model_type": "llava"}"#);
    assert_eq!(family_of(tmp.path()).unwrap().name(), "llava");
    write(r#"{"model_type": "bert"}"#);
    let e = common::error_chain(&family_of(tmp.path()).err().unwrap());
    assert!(e.contains("`bert`") && e.contains("llava"), "{e}");
    write(r#"{"architectures": "LlavaForConditionalGeneration"}"#);
    let e = common::error_chain(&family_of(tmp.path()).err().unwrap());
    assert!(e.contains("architectures") && e.contains("list"), "{e}");
}

#[test]
fn a_dry_run_needs_no_weight_file_and_counts_what_training_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("config-only");
    config_only_copy("tiny-llava", &model);
    let recipe = |model_dir: &Path, out: &Path| {
        let mut ov = fixture_overrides(out);
        ov.push(format!("model.path={}", model_dir.display()));
        TrainConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/smoke.toml"),
            &ov,
        )
        .unwrap()
    };
    let cfg = recipe(&model, &tmp.path().join("out"));
    let plan = describe_recipe(&cfg, 1).unwrap_or_else(|e| panic!("{}", common::error_chain(&e)));
    let with_weights = describe_recipe(
        &recipe(&fixtures().join("tiny-llava"), &tmp.path().join("out")),
        1,
    )
    .unwrap();
    // Same plan with and without the weights, up to the model path.
    assert_eq!(
        plan.replace(&model.display().to_string(), "M"),
        with_weights.replace(&fixtures().join("tiny-llava").display().to_string(), "M")
    );
    for needle in [
        "group            vision_tower",
        "group            multi_modal_projector",
        "lora",
        "full (",
        "trainable        multi_modal_projector:",
        "trainable        proxy:",
    ] {
        assert!(plan.contains(needle), "plan lacks {needle:?}:\n{plan}");
    }
    // Training from that plan needs the weights, and says which are missing.
    let e = lvlm_ift::train::recipe::run_recipe(&cfg, lvlm_ift::train::recipe::Resume::No, true)
        .err()
        .unwrap();
    let e = common::error_chain(&e);
    assert!(e.contains("config-only"), "{e}");
}

#[test]
fn full_groups_name_the_family_groups_and_a_typo_lists_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ov = fixture_overrides(&tmp.path().join("out"));
    ov.push("full.groups=[\"projector\"]".into());
    let cfg = TrainConfig::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/smoke.toml"),
        &ov,
    )
    .unwrap();
    let e = common::error_chain(&describe_recipe(&cfg, 1).err().unwrap());
    assert!(
        e.contains("full.groups[0]")
            && e.contains("`projector`")
            && e.contains("llava")
            && e.contains("multi_modal_projector")
            && e.contains("vision_tower"),
        "{e}"
    );
}
