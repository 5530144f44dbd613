//! Finite-difference gradient checks (f64) of Llama-3.2-Vision's new blocks, on tiny configs:
//! the whole tiled vision encoder (patch conv, class token, gated position and tile-position
//! embeddings, pre/post tile embeddings, local layers, gated global layers, the pad-to-8 bias,
//! intermediate features) and the text model with a gated cross-attention layer (q/k norms,
//! tanh gates, the row mask), every weight and the image features included.

use candle_core::{Device, Tensor};

use super::config::MllamaConfig;
use super::family::param_shapes;
use super::text::{cross_mask, CrossInputs, MllamaTextModel};
use super::vision::MllamaVisionModel;
use crate::model::gradcheck::{check, input, store};
use crate::model::weights::Weights;

fn tiny() -> MllamaConfig {
    MllamaConfig::from_json_str(
        r#"{"model_type": "mllama", "image_token_index": 11,
        "text_config": {"vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 12,
            "cross_attention_layers": [1], "max_position_embeddings": 16},
        "vision_config": {"hidden_size": 8, "attention_heads": 2, "num_hidden_layers": 2,
            "num_global_layers": 1, "intermediate_size": 12, "image_size": 14, "patch_size": 7,
            "max_num_tiles": 2, "intermediate_layers_indices": [0, 1], "vision_output_dim": 24,
            "supported_aspect_ratios": [[1, 1], [1, 2]]}}"#,
        std::path::Path::new("tiny.json"),
    )
    .unwrap()
}

#[test]
fn tiled_vision_encoder() {
    let cfg = tiny();
    let shapes: Vec<(String, Vec<usize>)> = param_shapes(&cfg)
        .into_iter()
        .filter(|(n, _)| n.starts_with("model.vision_model."))
        .collect();
    let named: Vec<(&str, Vec<usize>)> = shapes
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    let (_dir, st) = store(&named, 3);
    let model =
        MllamaVisionModel::new(&Weights::root(&st).pp("model.vision_model"), &cfg.vision).unwrap();
    let pixels = input(&[2, 2, 3, 14, 14], 5);
    // Sample 0: two tiles (aspect id 2); sample 1: one tile and a padding tile (id 1).
    let ids = Tensor::new(&[2u32, 1], &Device::Cpu).unwrap();
    let mask = vec![vec![true, true], vec![true, false]];
    let mut vars: Vec<_> = st.trainable_vars().into_iter().map(|(_, v)| v).collect();
    assert_eq!(vars.len(), shapes.len());
    vars.push(pixels.clone());
    check(&vars, || {
        model.forward(pixels.as_tensor(), &ids, &mask).unwrap()
    });
}

#[test]
fn text_model_with_a_gated_cross_attention_layer() {
    let cfg = tiny();
    let shapes: Vec<(String, Vec<usize>)> = param_shapes(&cfg)
        .into_iter()
        .filter(|(n, _)| n.starts_with("model.language_model.") || n.starts_with("lm_head"))
        .collect();
    let named: Vec<(&str, Vec<usize>)> = shapes
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    let (_dir, st) = store(&named, 4);
    let root = Weights::root(&st);
    let model =
        MllamaTextModel::new(&root.pp("model.language_model"), &root.pp("lm_head"), &cfg).unwrap();
    let dev = Device::Cpu;
    let states = input(&[1, 2 * 5, 8], 6); // 2 tiles of 5 image tokens
    let embeds = input(&[1, 4, 8], 7);
    // Row 0 sees no image (text before the image token); tile 1 is padding.
    let (bias, row_mask) = cross_mask(
        &[vec![false, true, true, true]],
        &[vec![true, false]],
        5,
        &dev,
    )
    .unwrap();
    let positions = Tensor::new(&[[0u32, 1, 2, 3]], &dev).unwrap();
    let causal = crate::model::llama::attention_mask(&[vec![true; 4]], 4, 0, &dev).unwrap();
    // The token embeddings are not on this path (the input embeddings are given).
    let mut vars: Vec<_> = st
        .trainable_vars()
        .into_iter()
        .filter(|(n, _)| !n.ends_with("embed_tokens.weight"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(vars.len(), shapes.len() - 1);
    vars.push(states.clone());
    vars.push(embeds.clone());
    check(&vars, || {
        let cross = CrossInputs {
            states: Some(states.as_tensor().clone()),
            bias: bias.clone(),
            row_mask: row_mask.clone(),
        };
        model
            .forward_embeds(
                embeds.as_tensor(),
                &positions,
                Some(&causal),
                Some(&cross),
                None,
                crate::model::LogitRows::All,
            )
            .unwrap()
    });
}
