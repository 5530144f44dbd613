//! The shapes a training step's activations take, by layer stack: what the `--dry-run` memory
//! estimate ([`crate::train::plan::memory`]) multiplies out. Each family describes its stacks
//! from `config.json` (no weight is read); the estimate knows what each kind of layer keeps.

/// How many positions a stack runs over, per sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackTokens {
    /// The text sequence (prompt and answer).
    Text,
    /// A fixed number per image (patches, tiles).
    PerImage(usize),
}

/// What kind of layer a stack repeats: each keeps different tensors for the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Llama/Mistral decoder layer: RMSNorm, rotary self-attention, SwiGLU MLP.
    Decoder,
    /// CLIP encoder layer: LayerNorm, attention, quick-GELU MLP.
    ClipEncoder,
    /// Mllama vision layer: LayerNorm, attention, GELU MLP; the global layers scale both
    /// branches by tanh gates.
    MllamaVision { gated: bool },
    /// Mllama cross-attention layer: text queries on `image_tokens` image keys/values per
    /// sample, SwiGLU MLP, tanh gates.
    CrossAttention { image_tokens: usize },
}

/// One stack of identical layers.
#[derive(Debug, Clone)]
pub struct LayerStack {
    pub name: &'static str,
    /// Canonical-name prefix of each layer's parameters (`….layers.3.`): what in the stack
    /// trains, and how.
    pub layer_prefixes: Vec<String>,
    pub kind: LayerKind,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    /// Width of the keys (and values): kv heads × head dim.
    pub kv_dim: usize,
    pub tokens: StackTokens,
}

/// A family's stacks in the order a forward pass runs them, and what surrounds them.
#[derive(Debug, Clone)]
pub struct ActivationProfile {
    pub stacks: Vec<LayerStack>,
    /// Canonical-name prefix of the vision side: stacks under it keep activations only when
    /// something under it trains (the pixels need no gradient).
    pub vision_prefix: String,
    /// Text hidden size and output rows (the head runs at the label positions only).
    pub text_hidden: usize,
    pub vocab: usize,
    /// Projector input and output widths, and its positions per image.
    pub projector: (usize, usize, usize),
    /// What the vision embeddings keep when the vision side trains: elements per vision
    /// position (patch product and its unfolded pixels, class token, position and tile
    /// embeddings, pre/post norms, the stacked intermediate states), and positions per image.
    pub vision_embedding: (usize, usize),
    /// Image positions each text position's cross-attention bias covers (0 without
    /// cross-attention): an f32 `[b, 1, s, image_tokens]` tensor and its row mask.
    pub cross_bias_tokens: usize,
    /// Positions of the vision encoder's additive padding bias, an f32 `[n, 1, L, L]` tensor kept
    /// while the vision side trains (0 where the encoder takes none).
    pub vision_bias_positions: usize,
    /// Whether image features are spliced into the token embeddings (LLaVA), not attended to.
    pub image_splice: bool,
}
