//! Gemma 3 text decoder (transformers' `Gemma3ForCausalLM`), over the host's tensor interface.
//!
//! Embeddings scaled by √hidden; RMSNorm with (1 + w); q/k norms; grouped-query attention scaled by
//! query_pre_attn_scalar^-½; sliding-window layers with their own rope base, global layers with rope
//! scaling; norms before and after both attention and MLP; gelu-tanh MLP; tied output head; optional
//! final logit soft-capping. Reads hub checkpoints (HF tensor names) and GGUF (llama.cpp names).

use adapter_kit::adapter::Graph;
use adapter_kit::nn::{self, config_f32, config_u32, config_value, Embedding, History, KvCache, Linear, R};
use adapter_kit::ops::{self as tensor, Tensor};
use adapter_kit::wit::edgechat::adapter::weights::{self, CheckpointFormat};
use serde_json::Value;

pub struct Config {
    pub hidden: u32,
    pub layers: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub vocab: u32,
    pub eps: f32,
    pub query_pre_attn_scalar: f32,
    pub sliding_window: u32,
    /// Per layer: attends within the sliding window.
    pub sliding: Vec<bool>,
    pub rope_global_base: f32,
    pub rope_local_base: f32,
    /// Linear rope scaling of global layers (1.0 = none).
    pub rope_global_factor: f32,
    pub final_softcap: Option<f32>,
}

impl Config {
    /// From config.json (transformers 4 or 5 style) or GGUF metadata.
    pub fn parse(json: &str, format: CheckpointFormat) -> R<Config> {
        let c: Value = serde_json::from_str(json).map_err(|e| format!("config is not valid JSON: {e}"))?;
        let c = if format == CheckpointFormat::Gguf { from_gguf(&c)? } else { c };
        let c = c.get("text_config").cloned().unwrap_or(c); // multimodal Gemma 3 configs nest the decoder
        fn rope_supported(v: &Value) -> bool {
            matches!(v.get("rope_type").and_then(Value::as_str), None | Some("default" | "linear"))
        }
        nn::refuse_unimplemented(
            &c,
            &[
                ("tie_word_embeddings", |v| v.as_bool() == Some(true)),
                ("attn_logit_softcapping", |_| false),
                ("use_bidirectional_attention", |v| v.as_bool() == Some(false)),
                ("hidden_activation", |v| v.as_str() == Some("gelu_pytorch_tanh")),
                ("rope_scaling", rope_supported),
                ("rope_parameters.full_attention", rope_supported),
                ("rope_parameters.sliding_attention", |v| matches!(v.get("rope_type").and_then(Value::as_str), None | Some("default"))),
            ],
        )?;
        let hidden = config_u32(&c, &["hidden_size"])?;
        let layers = config_u32(&c, &["num_hidden_layers"])?;
        let heads = config_u32(&c, &["num_attention_heads"])?;
        let head_dim = config_u32(&c, &["head_dim"]).unwrap_or(256);
        let pattern = config_u32(&c, &["sliding_window_pattern", "_sliding_window_pattern"]).unwrap_or(6);
        let sliding = match config_value(&c, &["layer_types"]).and_then(Value::as_array) {
            Some(types) => types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect(),
            None => (0..layers).map(|i| (i + 1) % pattern != 0).collect(),
        };
        let linear_factor = |params: Option<&Value>| {
            params
                .filter(|p| p.get("rope_type").and_then(Value::as_str) == Some("linear"))
                .and_then(|p| p.get("factor"))
                .and_then(Value::as_f64)
                .map(|f| f as f32)
        };
        let config = Config {
            hidden,
            layers,
            heads,
            kv_heads: config_u32(&c, &["num_key_value_heads"]).unwrap_or(heads),
            head_dim,
            vocab: 0, // from the embedding table
            eps: config_f32(&c, &["rms_norm_eps"]).unwrap_or(1e-6),
            query_pre_attn_scalar: config_f32(&c, &["query_pre_attn_scalar"]).unwrap_or(head_dim as f32),
            sliding_window: config_u32(&c, &["sliding_window"]).unwrap_or(512),
            sliding,
            rope_global_base: config_f32(&c, &["rope_parameters.full_attention.rope_theta", "rope_theta"]).unwrap_or(1_000_000.0),
            rope_local_base: config_f32(&c, &["rope_parameters.sliding_attention.rope_theta", "rope_local_base_freq"]).unwrap_or(10_000.0),
            rope_global_factor: linear_factor(config_value(&c, &["rope_parameters.full_attention"]))
                .or_else(|| linear_factor(config_value(&c, &["rope_scaling"])))
                .unwrap_or(1.0),
            final_softcap: config_f32(&c, &["final_logit_softcapping"]),
        };
        if config.sliding.len() != layers as usize {
            return Err(format!("layer_types lists {} layers, num_hidden_layers is {layers}", config.sliding.len()));
        }
        Ok(config)
    }
}

/// GGUF metadata (gemma3.*) in config.json terms.
fn from_gguf(meta: &Value) -> R<Value> {
    let arch = meta.get("general.architecture").and_then(Value::as_str).unwrap_or("gemma3");
    let key = |k: &str| meta.get(format!("{arch}.{k}")).cloned().unwrap_or(Value::Null);
    Ok(serde_json::json!({
        "hidden_size": key("embedding_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": key("attention.key_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "sliding_window": key("attention.sliding_window"),
        "rope_theta": key("rope.freq_base"),
        "rope_scaling": key("rope.scaling.factor").as_f64().map(|f| serde_json::json!({"rope_type": "linear", "factor": f})),
        "final_logit_softcapping": key("final_logit_softcapping"),
    }))
}

/// Where each tensor lives in a checkpoint of either format.
struct Names {
    gguf: bool,
}

impl Names {
    fn global(&self, hf: &str) -> String {
        match (self.gguf, hf) {
            (false, _) => format!("model.{hf}.weight"),
            (true, "embed_tokens") => "token_embd.weight".into(),
            (true, "norm") => "output_norm.weight".into(),
            (true, other) => format!("{other}.weight"),
        }
    }

    fn layer(&self, i: u32, hf: &str) -> String {
        if !self.gguf {
            return format!("model.layers.{i}.{hf}.weight");
        }
        let gguf = match hf {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "post_attention_layernorm" => "post_attention_norm",
            "pre_feedforward_layernorm" => "ffn_norm",
            "post_feedforward_layernorm" => "post_ffw_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            other => other,
        };
        format!("blk.{i}.{gguf}.weight")
    }

    /// Gemma's RMSNorm scales by (1 + w). GGUF files store 1 + w already.
    fn norm(&self, name: String) -> R<Tensor> {
        let w = nn::load_dense(&name)?;
        if self.gguf { Ok(w) } else { tensor::add_scalar(&w, 1.0) }
    }
}

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    post_attention_norm: Tensor,
    pre_ffn_norm: Tensor,
    post_ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Gemma3 {
    pub config: Config,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
}

/// Per conversation: one KV cache per layer (window-bounded for sliding layers).
pub struct Cache {
    pub layers: Vec<KvCache>,
}

impl Cache {
    pub fn length(&self) -> u32 {
        self.layers.first().map_or(0, KvCache::offset)
    }
}

impl Gemma3 {
    pub fn load() -> R<Self> {
        let format = weights::format();
        let config = Config::parse(&weights::config(), format)?;
        let names = Names { gguf: format == CheckpointFormat::Gguf };
        let layers = (0..config.layers)
            .map(|i| {
                let linear = |part: &str| Linear::load(&names.layer(i, part));
                let norm = |part: &str| names.norm(names.layer(i, part));
                Ok(Layer {
                    input_norm: norm("input_layernorm")?,
                    q: linear("self_attn.q_proj")?,
                    k: linear("self_attn.k_proj")?,
                    v: linear("self_attn.v_proj")?,
                    o: linear("self_attn.o_proj")?,
                    q_norm: norm("self_attn.q_norm")?,
                    k_norm: norm("self_attn.k_norm")?,
                    post_attention_norm: norm("post_attention_layernorm")?,
                    pre_ffn_norm: norm("pre_feedforward_layernorm")?,
                    post_ffn_norm: norm("post_feedforward_layernorm")?,
                    gate: linear("mlp.gate_proj")?,
                    up: linear("mlp.up_proj")?,
                    down: linear("mlp.down_proj")?,
                })
            })
            .collect::<R<Vec<_>>>()?;
        let embed = Embedding::load(&names.global("embed_tokens"))?;
        let mut config = config;
        config.vocab = embed.rows()?;
        Ok(Gemma3 { embed, norm: names.norm(names.global("norm"))?, layers, config })
    }

    pub fn new_cache(&self) -> Cache {
        let c = &self.config;
        let stored = self.layers.first().and_then(|layer| layer.k.cache_dtype());
        Cache { layers: c.sliding.iter().map(|&s| KvCache::new(s.then_some(c.sliding_window), stored)).collect() }
    }

    pub fn forward(&self, tokens: &[u32], ids: &Tensor, cache: &mut Cache, all_positions: bool) -> R<Tensor> {
        let c = &self.config;
        let offset = cache.length();
        let h = self.embed.lookup(ids)?;
        let mut h = tensor::scale(&h, (c.hidden as f32).sqrt())?;
        for (i, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let x = tensor::rms_norm(&h, &layer.input_norm, c.eps)?;
            let attended = self.attention(layer, &x, kv, c.sliding[i], offset, tokens.len() as u32)?;
            let attended = tensor::rms_norm(&attended, &layer.post_attention_norm, c.eps)?;
            h = tensor::add(&h, &attended)?;
            let x = tensor::rms_norm(&h, &layer.pre_ffn_norm, c.eps)?;
            let gate = tensor::gelu_tanh(&layer.gate.forward(&x)?)?;
            let mlp = layer.down.forward(&tensor::multiply(&gate, &layer.up.forward(&x)?)?)?;
            let mlp = tensor::rms_norm(&mlp, &layer.post_ffn_norm, c.eps)?;
            h = tensor::add(&h, &mlp)?;
        }
        if !all_positions {
            h = nn::last_position(&h, tokens.len() as u32)?;
        }
        let h = tensor::rms_norm(&h, &self.norm, c.eps)?;
        let mut logits = self.embed.as_linear(&h)?;
        if let Some(cap) = c.final_softcap {
            logits = tensor::scale(&tensor::tanh(&tensor::scale(&logits, 1.0 / cap)?)?, cap)?;
        }
        nn::finish_logits(&logits, if all_positions { tokens.len() as u32 } else { 1 })
    }

    fn attention(&self, layer: &Layer, x: &Tensor, kv: &mut KvCache, sliding: bool, offset: u32, t: u32) -> R<Tensor> {
        let c = &self.config;
        let q = nn::split_heads(&layer.q.forward(x)?, c.heads, c.head_dim)?;
        let k = nn::split_heads(&layer.k.forward(x)?, c.kv_heads, c.head_dim)?;
        let v = nn::split_heads(&layer.v.forward(x)?, c.kv_heads, c.head_dim)?;
        let q = tensor::rms_norm(&q, &layer.q_norm, c.eps)?;
        let k = tensor::rms_norm(&k, &layer.k_norm, c.eps)?;
        let (base, scale) = if sliding { (c.rope_local_base, 1.0) } else { (c.rope_global_base, 1.0 / c.rope_global_factor) };
        let q = nn::rope(&q, c.head_dim, base, scale, offset)?;
        let k = nn::rope(&k, c.head_dim, base, scale, offset)?;
        let out = kv.attend(&q, k, v, t, c.query_pre_attn_scalar.powf(-0.5))?;
        layer.o.forward(&nn::merge_heads(&out, c.heads, c.head_dim)?)
    }
}

/// The kit exports this graph as the adapter's `runtime` (adapters/kit/src/adapter.rs).
impl Graph for Gemma3 {
    type Cache = Cache;

    fn load() -> Result<Self, String> {
        Gemma3::load()
    }

    fn vocab_size(&self) -> u32 {
        self.config.vocab
    }

    fn new_cache(&self) -> Self::Cache {
        Gemma3::new_cache(self)
    }

    fn forward(&self, tokens: &[u32], ids: &Tensor, cache: &mut Self::Cache, all_positions: bool) -> Result<Tensor, String> {
        Gemma3::forward(self, tokens, ids, cache, all_positions)
    }

    fn histories(cache: &mut Self::Cache) -> Vec<&mut History> {
        cache.layers.iter_mut().flat_map(|kv| [&mut kv.keys, &mut kv.values]).collect()
    }

    fn cache_length(cache: &Self::Cache) -> u32 {
        cache.length()
    }

    fn trim(cache: &mut Self::Cache, length: u32) -> Result<(), String> {
        cache.layers.iter_mut().try_for_each(|kv| kv.trim(length))
    }
}
