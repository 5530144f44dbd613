//! Batched evaluation answers what item-by-item evaluation answers: caches of prompts of different
//! lengths stacked into one decoding batch (left padding, per-row positions), prompts about one
//! image sharing its prefill, rows leaving the batch as they stop — on both model families.

mod common;

use std::path::Path;

use common::fixtures;
use lvlm_ift::data::processor::AspectMode;
use lvlm_ift::eval::mcq::{question_prompt, McqItem};
use lvlm_ift::eval::run::{predict, predict_batch, Scoring, MAX_NEW_TOKENS};
use lvlm_ift::model::generate::{greedy, greedy_batch, prefill, prefill_shared};
use lvlm_ift::session::{Prompt, Session, SessionOptions};

fn session(model: &str) -> Session {
    let opts = match model {
        // One tile per picture keeps the tiny Mllama's cross-attention small.
        "tiny-mllama" => SessionOptions {
            aspect: AspectMode::Squash,
            max_tiles: Some(1),
            ..SessionOptions::default()
        },
        _ => SessionOptions::default(),
    };
    Session::load(&fixtures().join(model).to_string_lossy(), opts).unwrap()
}

/// Five items over three images: two questions about `00` (of different lengths), one about
/// `01`, another about `00` later on, one about `07`.
fn items() -> Vec<McqItem> {
    let img = |n: &str| {
        fixtures()
            .join("pairs/images")
            .join(n)
            .to_string_lossy()
            .into_owned()
    };
    let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let item = |id: &str, image: &str, key: &str, options: &[&str], answer| McqItem {
        id: id.into(),
        image: img(image),
        key: key.into(),
        options: o(options),
        answer,
        source: None,
    };
    vec![
        item(
            "a",
            "00_small_red_circle.png",
            "cell_size",
            &["big", "small"],
            1,
        ),
        item(
            "b",
            "00_small_red_circle.png",
            "shape",
            &["circle", "square", "triangle", "star", "oval"],
            0,
        ),
        item(
            "c",
            "01_big_red_circle.png",
            "cell_size",
            &["big", "small"],
            0,
        ),
        item(
            "d",
            "00_small_red_circle.png",
            "colour",
            &["red", "blue", "green"],
            0,
        ),
        item(
            "e",
            "07_big_red_square.png",
            "shape",
            &["circle", "square"],
            1,
        ),
    ]
}

const MODELS: &[&str] = &["tiny-llava", "tiny-mllama"];

#[test]
fn batched_generation_answers_as_item_by_item() {
    for model in MODELS {
        let s = session(model);
        let items = items();
        let refs: Vec<&McqItem> = items.iter().collect();
        let batched = predict_batch(&s, &refs, Path::new("/"), Scoring::Generate).unwrap();
        assert_eq!(batched.len(), items.len());
        for (item, got) in items.iter().zip(&batched) {
            let prompt = Prompt::Chat(question_prompt(&item.key, &item.options));
            let alone = s
                .generate(Path::new(&item.image), &prompt, MAX_NEW_TOKENS)
                .unwrap();
            assert_eq!(got.id, item.id);
            assert_eq!(
                got.raw.as_deref(),
                Some(alone.text.as_str()),
                "{model} item {}",
                item.id
            );
            assert!(!alone.token_ids.is_empty());
        }
    }
}

#[test]
fn batched_likelihoods_match_item_by_item() {
    for model in MODELS {
        let s = session(model);
        let items = items();
        let refs: Vec<&McqItem> = items.iter().collect();
        for scoring in [Scoring::Likelihood, Scoring::LikelihoodText] {
            let batched = predict_batch(&s, &refs, Path::new("/"), scoring).unwrap();
            for (item, got) in items.iter().zip(&batched) {
                let alone = predict(&s, item, Path::new("/"), scoring).unwrap();
                let (g, a) = (got.scores.as_ref().unwrap(), alone.scores.as_ref().unwrap());
                assert_eq!(g.len(), item.options.len());
                for (x, y) in g.iter().zip(a) {
                    assert!((x - y).abs() < 1e-4, "{model} {}: {x} vs {y}", item.id);
                }
                assert_eq!(got.predicted, alone.predicted);
            }
        }
    }
}

/// Rows that stop at different steps leave the batch (the cache keeps the others' rows), and
/// what remains decodes on unchanged: an end-of-sequence token that one row reaches early.
#[test]
fn rows_leave_the_batch_as_they_stop() {
    for model in MODELS {
        let s = session(model);
        let m = s.model.as_ref();
        let items = items();
        let image = Path::new(&items[0].image);
        let vision = s.vision_input(image).unwrap();
        let prompts: Vec<Vec<u32>> = items[..2]
            .iter()
            .chain(&items[3..4])
            .map(|i| {
                s.prompt_ids(&Prompt::Chat(question_prompt(&i.key, &i.options)))
                    .unwrap()
            })
            .collect();
        assert!(prompts[0].len() != prompts[1].len());
        let free: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| greedy(m, p, Some(&vision), 12, &[], &s.device).unwrap())
            .collect();
        // An EOS that the first row generates at its third step (and that may stop others).
        let eos = [free[0][2]];
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| greedy(m, p, Some(&vision), 12, &eos, &s.device).unwrap())
            .collect();
        assert!(want[0].len() <= 3);
        let shared = prefill_shared(m, &prompts, Some(&vision), &s.device).unwrap();
        let got = greedy_batch(m, shared, 12, &eos, &s.device).unwrap();
        assert_eq!(got, want, "{model}");
        // Prefilled one by one (no shared prefix) and stacked: the same.
        let alone: Vec<_> = prompts
            .iter()
            .map(|p| prefill(m, p, Some(&vision), &s.device).unwrap())
            .collect();
        for (a, b) in alone
            .iter()
            .zip(prefill_shared(m, &prompts, Some(&vision), &s.device).unwrap())
        {
            let (d, _) = common::diff(&a.logits, &b.logits);
            assert!(
                d < 1e-4,
                "{model}: shared-prefix prefill logits differ by {d}"
            );
            assert_eq!(a.len, b.len);
        }
        let got = greedy_batch(m, alone, 12, &eos, &s.device).unwrap();
        assert_eq!(got, want, "{model}");
    }
}
