use super::*;

const MINIMAL: &str = r#"
[model]
path = "m"
[data]
train = [{ manifest = "pairs.jsonl" }]
[lora]
r = 4
target_modules = ["q_proj", "v_proj"]
[train]
output_dir = "out"
"#;

fn load(text: &str, ov: &[&str]) -> Result<TrainConfig> {
    let ov: Vec<String> = ov.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_toml_str(text, Path::new("x.toml"), &ov)
}

#[test]
fn defaults_and_overrides() {
    let c = load(
        MINIMAL,
        &[
            "optim.lr=1e-4",
            "train.epochs=3",
            "lora.target_modules=.*q_proj",
            "schedule.kind=cosine",
        ],
    )
    .unwrap();
    assert_eq!(c.optim.lr, 1e-4);
    assert_eq!(c.train.epochs, 3);
    assert_eq!(
        c.schedule.kind,
        crate::train::schedule::ScheduleKind::Cosine
    );
    assert_eq!(
        c.lora.unwrap().target_modules,
        crate::model::lora::TargetModules::Pattern(".*q_proj".into())
    );
    assert_eq!(c.optim.max_grad_norm, Some(1.0));
    assert_eq!(c.data.instruction, "Describe this medical scan.");
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let e = load(MINIMAL, &["optim.learning_rate=1"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("learning_rate"), "{e}");
    let e = load(&format!("{MINIMAL}\n[extra]\na=1\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("extra"), "{e}");
    let e = load(
        MINIMAL,
        &["full.groups=[\"vision_tower\",\"vision_tower\"]"],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("full.groups[1]") && e.contains("twice"), "{e}");
    let e = load(MINIMAL, &["nonsense"]).unwrap_err().to_string();
    assert!(e.contains("key=value"), "{e}");
}

const STAGED: &str = r#"
[model]
path = "m"
[data]
train = [{ manifest = "pairs.jsonl" }]
instruction_mode = "proxy"
[lora]
r = 4
target_modules = ["q_proj", "v_proj"]
[full]
groups = ["multi_modal_projector"]
[train]
output_dir = "out"
[[stages]]
name = "warmup"
trainable = ["proxy"]
[[stages]]
name = "main"
trainable = ["lora", "full", "proxy"]
momentum = 0.999
"#;

fn err(text: &str, ov: &[&str]) -> String {
    match load(text, ov) {
        Ok(_) => panic!("{ov:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn enum_values_are_parsed_into_enums_and_typos_list_the_choices() {
    let c = load(
        STAGED,
        &[
            "model.image_aspect=squash",
            "model.dtype=bf16",
            "data.shuffle=sentence",
            "train.on_nonfinite=skip",
        ],
    )
    .unwrap();
    assert_eq!(
        c.model.image_aspect,
        crate::data::processor::AspectMode::Squash
    );
    assert_eq!(c.model.dtype, WeightDType::Bf16);
    assert_eq!(c.train.on_nonfinite, NonFinitePolicy::Skip);
    assert_eq!(c.full.groups, vec!["multi_modal_projector".to_string()]);
    let stages = c.stage_specs();
    assert!(stages[1].train_lora && stages[1].train_full && stages[1].train_proxy);
    assert_eq!(stages[0].instruction_mode, InstructionMode::Proxy);
    for (ov, typo, choice) in [
        ("stages.0.instruction_mode=proxi", "proxi", "fixed"),
        ("data.instruction_mode=proxi", "proxi", "fixed"),
        ("data.shuffle=commas", "commas", "sentence"),
        ("model.dtype=fp32", "fp32", "bf16"),
        ("model.image_aspect=squish", "squish", "squash"),
        ("schedule.kind=cosin", "cosin", "cosine"),
        ("proxy.init=unifrom", "unifrom", "uniform"),
        ("train.on_nonfinite=ignore", "ignore", "skip"),
    ] {
        let text = if ov.starts_with("stages.0.") {
            STAGED.replace(
                "name = \"warmup\"",
                "name = \"warmup\"\ninstruction_mode = \"proxi\"",
            )
        } else {
            STAGED.to_string()
        };
        let ovs: Vec<&str> = if ov.starts_with("stages.0.") {
            vec![]
        } else {
            vec![ov]
        };
        let e = err(&text, &ovs);
        assert!(e.contains(typo) && e.contains(choice), "{ov}: {e}");
    }
    let e = err(
        &STAGED.replace(
            "trainable = [\"lora\", \"full\", \"proxy\"]",
            "trainable = [\"lorra\", \"full\"]",
        ),
        &[],
    );
    assert!(e.contains("lorra") && e.contains("lora"), "{e}");
}

#[test]
fn numbers_outside_their_range_are_errors_naming_the_key() {
    for (ov, key) in [
        ("train.save_every=0", "train.save_every"),
        ("train.keep_last=0", "train.keep_last"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.stop_after=0", "train.stop_after"),
        ("train.epochs=0", "train.epochs"),
        ("proxy.bound=0", "proxy.bound"),
        ("proxy.bound=-0.1", "proxy.bound"),
        ("proxy.bound=nan", "proxy.bound"),
        ("proxy.bound=inf", "proxy.bound"),
        ("proxy.tokens=0", "proxy.tokens"),
        ("lora.r=0", "lora.r"),
        ("lora.alpha=nan", "lora.alpha"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.dropout=1.0", "lora.dropout"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.eps=0", "optim.eps"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1]"),
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("optim.max_grad_norm=0", "optim.max_grad_norm"),
        ("optim.max_grad_norm=nan", "optim.max_grad_norm"),
        ("schedule.warmup_ratio=1.5", "schedule.warmup_ratio"),
        ("schedule.min_lr=nan", "schedule.min_lr"),
        ("data.max_len=0", "data.max_len"),
        (
            "data.train=[{ manifest = \"p.jsonl\", repeat = 1000000000000 }]",
            "data.train[0].repeat",
        ),
        (
            "data.train=[{ manifest = \"p.jsonl\", repeat = 0 }]",
            "data.train[0].repeat",
        ),
        ("model.device=gpu", "model.device"),
    ] {
        let e = err(STAGED, &[ov]);
        assert!(e.contains(&format!("`{key}`")), "{ov}: {e}");
    }
    for (field, key) in [
        ("epochs = 0", "stages[0].epochs"),
        ("max_steps = 0", "stages[0].max_steps"),
        ("lr = nan", "stages[0].lr"),
        ("momentum = 1.0", "stages[0].momentum"),
    ] {
        let text = STAGED.replace(
            "trainable = [\"proxy\"]",
            &format!("trainable = [\"proxy\"]\n{field}"),
        );
        let e = err(&text, &[]);
        assert!(e.contains(&format!("`{key}`")), "{field}: {e}");
    }
    // A momentum on a stage that does not train the proxy means nothing.
    let text = STAGED.replace(
        "trainable = [\"lora\", \"full\", \"proxy\"]",
        "trainable = [\"lora\", \"full\"]",
    );
    let e = err(&text, &[]);
    assert!(e.contains("stages[1].momentum"), "{e}");
}

#[test]
fn stage_names_are_unique_plain_directory_names() {
    for (name, why) in [
        ("../../x", "letters, digits"),
        ("a/b", "letters, digits"),
        (".", "letters, digits"),
        ("..", "letters, digits"),
        ("", "empty"),
        ("main", "unique"),
        ("checkpoints", "reserved"),
    ] {
        let text = STAGED.replace("name = \"warmup\"", &format!("name = {name:?}"));
        let e = err(&text, &[]);
        assert!(e.contains("stages[") && e.contains(why), "{name:?}: {e}");
    }
}

#[test]
fn a_stage_trainable_set_must_fit_its_instruction_mode_and_sections() {
    // A proxy-only stage in fixed mode names the stage, the mode and the fix.
    let text = STAGED.replace(
        "trainable = [\"proxy\"]",
        "trainable = [\"proxy\"]\ninstruction_mode = \"fixed\"",
    );
    let e = err(&text, &[]);
    assert!(
        e.contains("stages[0].trainable") && e.contains("`fixed`") && e.contains("proxy"),
        "{e}"
    );
    let no_full = STAGED.replace("groups = [\"multi_modal_projector\"]", "groups = []");
    let e = err(&no_full, &[]);
    assert!(
        e.contains("stages[1].trainable") && e.contains("full.groups"),
        "{e}"
    );
    let e = err(
        &STAGED.replace(
            "trainable = [\"proxy\"]",
            "trainable = [\"proxy\", \"proxy\"]",
        ),
        &[],
    );
    assert!(e.contains("twice"), "{e}");
    let e = err(
        &STAGED.replace("trainable = [\"proxy\"]", "trainable = []"),
        &[],
    );
    assert!(e.contains("stages[0].trainable"), "{e}");
}

#[test]
fn the_clip_scope_excludes_the_proxy_by_default() {
    let c = load(STAGED, &[]).unwrap();
    assert!(!c.optim.clip_proxy);
    assert!(
        load(STAGED, &["optim.clip_proxy=true"])
            .unwrap()
            .optim
            .clip_proxy
    );
}
