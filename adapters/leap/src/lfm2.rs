//! LFM2 (transformers' `Lfm2ForCausalLM`), over the host's tensor interface.
//!
//! A stack of gated short-convolution blocks and grouped-query attention blocks (q/k RMS norms, rope),
//! each followed by a SwiGLU feed-forward whose width is auto-adjusted from the config; pre-norm
//! residuals; final norm (`embedding_norm`); tied output head. Conv blocks keep the last few inputs as
//! state, attention blocks a KV cache. Reads hub checkpoints (HF names) and GGUF (llama.cpp names).

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
    pub conv_kernel: u32,
    /// Per layer: attention (true) or short convolution (false).
    pub attention: Vec<bool>,
    pub rope_base: f32,
    /// Biases on the short convolution's in_proj, depthwise conv and out_proj (transformers' `conv_bias`).
    pub conv_bias: bool,
}

impl Config {
    pub fn parse(json: &str, format: CheckpointFormat) -> R<Config> {
        let c: Value = serde_json::from_str(json).map_err(|e| format!("config is not valid JSON: {e}"))?;
        let c = if format == CheckpointFormat::Gguf { from_gguf(&c)? } else { c };
        let hidden = config_u32(&c, &["hidden_size", "block_dim"])?;
        let layers = config_u32(&c, &["num_hidden_layers"])?;
        let heads = config_u32(&c, &["num_attention_heads", "num_heads"])?;
        let attention: Vec<bool> = match config_value(&c, &["layer_types"]).and_then(Value::as_array) {
            Some(types) => types.iter().map(|t| t.as_str() != Some("conv")).collect(),
            None => {
                let idxs = config_value(&c, &["full_attn_idxs"]).and_then(Value::as_array).ok_or("config has neither layer_types nor full_attn_idxs")?;
                let idxs: Vec<u64> = idxs.iter().filter_map(Value::as_u64).collect();
                (0..layers as u64).map(|i| idxs.contains(&i)).collect()
            }
        };
        if attention.len() != layers as usize {
            return Err(format!("layer_types lists {} layers, num_hidden_layers is {layers}", attention.len()));
        }
        nn::refuse_unimplemented(
            &c,
            &[
                ("tie_word_embeddings", |v| v.as_bool() == Some(true)),
                ("block_use_swiglu", |v| v.as_bool() == Some(true)),
                ("use_pos_enc", |v| v.as_bool() == Some(true)),
                ("rope_scaling", |v| v.get("rope_type").and_then(Value::as_str) == Some("default")),
                ("rope_parameters.rope_type", |v| v.as_str() == Some("default")),
            ],
        )?;
        Ok(Config {
            hidden,
            layers,
            heads,
            kv_heads: config_u32(&c, &["num_key_value_heads"]).unwrap_or(heads),
            head_dim: hidden / heads,
            vocab: 0, // from the embedding table
            eps: config_f32(&c, &["norm_eps", "block_norm_eps"]).unwrap_or(1e-5),
            conv_kernel: config_u32(&c, &["conv_L_cache"]).unwrap_or(3),
            attention,
            rope_base: config_f32(&c, &["rope_parameters.rope_theta", "rope_theta"]).unwrap_or(1_000_000.0),
            conv_bias: config_value(&c, &["conv_bias"]).and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

/// GGUF metadata (lfm2.*) in config.json terms. llama.cpp records the KV head count per layer, zero
/// for convolution layers.
fn from_gguf(meta: &Value) -> R<Value> {
    let key = |k: &str| meta.get(format!("lfm2.{k}")).cloned().unwrap_or(Value::Null);
    let kv = key("attention.head_count_kv");
    let (kv_heads, layer_types) = match kv.as_array() {
        Some(per_layer) => {
            let types: Vec<&str> = per_layer.iter().map(|n| if n.as_u64().unwrap_or(0) > 0 { "full_attention" } else { "conv" }).collect();
            (per_layer.iter().filter_map(Value::as_u64).max().map(Value::from).unwrap_or(Value::Null), serde_json::json!(types))
        }
        None => return Err("GGUF metadata lacks lfm2.attention.head_count_kv per layer".into()),
    };
    Ok(serde_json::json!({
        "hidden_size": key("embedding_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": kv_heads,
        "layer_types": layer_types,
        "norm_eps": key("attention.layer_norm_rms_epsilon"),
        "conv_L_cache": key("shortconv.l_cache"),
        "rope_theta": key("rope.freq_base"),
    }))
}

struct Names {
    gguf: bool,
}

impl Names {
    fn global(&self, hf: &str) -> String {
        match (self.gguf, hf) {
            (false, _) => format!("model.{hf}.weight"),
            (true, "embed_tokens") => "token_embd.weight".into(),
            (true, "embedding_norm") => "token_embd_norm.weight".into(),
            (true, other) => format!("{other}.weight"),
        }
    }

    fn layer(&self, i: u32, hf: &str) -> String {
        self.layer_tensor(i, hf, "weight")
    }

    fn layer_bias(&self, i: u32, hf: &str) -> String {
        self.layer_tensor(i, hf, "bias")
    }

    fn layer_tensor(&self, i: u32, hf: &str, kind: &str) -> String {
        if !self.gguf {
            return format!("model.layers.{i}.{hf}.{kind}");
        }
        let gguf = match hf {
            "operator_norm" => "attn_norm",
            "ffn_norm" => "ffn_norm",
            "feed_forward.w1" => "ffn_gate",
            "feed_forward.w2" => "ffn_down",
            "feed_forward.w3" => "ffn_up",
            "conv.in_proj" => "shortconv.in_proj",
            "conv.out_proj" => "shortconv.out_proj",
            "conv.conv" => "shortconv.conv",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.out_proj" => "attn_output",
            "self_attn.q_layernorm" => "attn_q_norm",
            "self_attn.k_layernorm" => "attn_k_norm",
            other => other,
        };
        format!("blk.{i}.{gguf}.{kind}")
    }
}

enum Operator {
    Conv { in_proj: Linear, out_proj: Linear, kernel: Tensor, bias: Option<Tensor> },
    Attention { q: Linear, k: Linear, v: Linear, out: Linear, q_norm: Tensor, k_norm: Tensor },
}

struct Layer {
    operator_norm: Tensor,
    operator: Operator,
    ffn_norm: Tensor,
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

pub struct Lfm2 {
    pub config: Config,
    embed: Embedding,
    layers: Vec<Layer>,
    final_norm: Tensor,
}

/// Per layer: recent conv inputs (B*x, [1, t, hidden]) or a KV cache.
pub enum LayerCache {
    Conv(History),
    Attention(KvCache),
}

pub struct Cache {
    pub layers: Vec<LayerCache>,
}

impl Cache {
    pub fn length(&self) -> u32 {
        match self.layers.first() {
            Some(LayerCache::Conv(h)) => h.end(),
            Some(LayerCache::Attention(kv)) => kv.offset(),
            None => 0,
        }
    }

    pub fn trim(&mut self, length: u32) -> R<()> {
        self.layers.iter_mut().try_for_each(|layer| match layer {
            LayerCache::Conv(h) => h.trim(length),
            LayerCache::Attention(kv) => kv.trim(length),
        })
    }
}

impl Lfm2 {
    pub fn load() -> R<Self> {
        let format = weights::format();
        let mut config = Config::parse(&weights::config(), format)?;
        let names = Names { gguf: format == CheckpointFormat::Gguf };
        let layers = (0..config.layers)
            .map(|i| {
                let linear = |part: &str| Linear::load(&names.layer(i, part));
                let dense = |part: &str| nn::load_dense(&names.layer(i, part));
                let operator = if config.attention[i as usize] {
                    Operator::Attention {
                        q: linear("self_attn.q_proj")?,
                        k: linear("self_attn.k_proj")?,
                        v: linear("self_attn.v_proj")?,
                        out: linear("self_attn.out_proj")?,
                        q_norm: dense("self_attn.q_layernorm")?,
                        k_norm: dense("self_attn.k_layernorm")?,
                    }
                } else {
                    // HF stores the depthwise kernel as [hidden, 1, k]; llama.cpp as [hidden, k].
                    let kernel = tensor::reshape(&dense("conv.conv")?, &[config.hidden as i32, config.conv_kernel as i32])?;
                    if config.conv_bias {
                        let biased = |part: &str| Linear::load_biased(&names.layer(i, part), &names.layer_bias(i, part));
                        let bias = Some(nn::load_dense(&names.layer_bias(i, "conv.conv"))?);
                        Operator::Conv { in_proj: biased("conv.in_proj")?, out_proj: biased("conv.out_proj")?, kernel, bias }
                    } else {
                        Operator::Conv { in_proj: linear("conv.in_proj")?, out_proj: linear("conv.out_proj")?, kernel, bias: None }
                    }
                };
                Ok(Layer {
                    operator_norm: dense("operator_norm")?,
                    operator,
                    ffn_norm: dense("ffn_norm")?,
                    w1: linear("feed_forward.w1")?,
                    w2: linear("feed_forward.w2")?,
                    w3: linear("feed_forward.w3")?,
                })
            })
            .collect::<R<Vec<_>>>()?;
        let embed = Embedding::load(&names.global("embed_tokens"))?;
        config.vocab = embed.rows()?;
        Ok(Lfm2 { final_norm: nn::load_dense(&names.global("embedding_norm"))?, embed, layers, config })
    }

    pub fn new_cache(&self) -> Cache {
        let c = &self.config;
        let stored = self.layers.iter().find_map(|layer| match &layer.operator {
            Operator::Attention { k, .. } => k.cache_dtype(),
            Operator::Conv { .. } => None,
        });
        let layers = c
            .attention
            .iter()
            .map(|&attention| if attention { LayerCache::Attention(KvCache::new(None, stored)) } else { LayerCache::Conv(History::bounded(1, c.conv_kernel - 1)) })
            .collect();
        Cache { layers }
    }

    pub fn forward(&self, tokens: &[u32], ids: &Tensor, cache: &mut Cache, all_positions: bool) -> R<Tensor> {
        let c = &self.config;
        let offset = cache.length();
        let mut h = self.embed.lookup(ids)?;
        for (layer, state) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let x = tensor::rms_norm(&h, &layer.operator_norm, c.eps)?;
            let y = match (&layer.operator, state) {
                (Operator::Conv { in_proj, out_proj, kernel, bias }, LayerCache::Conv(history)) => {
                    self.short_conv(&x, in_proj, out_proj, (kernel, bias.as_ref()), history, tokens.len() as u32)?
                }
                (Operator::Attention { q, k, v, out, q_norm, k_norm }, LayerCache::Attention(kv)) => {
                    let q = tensor::rms_norm(&nn::split_heads(&q.forward(&x)?, c.heads, c.head_dim)?, q_norm, c.eps)?;
                    let k = tensor::rms_norm(&nn::split_heads(&k.forward(&x)?, c.kv_heads, c.head_dim)?, k_norm, c.eps)?;
                    let v = nn::split_heads(&v.forward(&x)?, c.kv_heads, c.head_dim)?;
                    let q = nn::rope(&q, c.head_dim, c.rope_base, 1.0, offset)?;
                    let k = nn::rope(&k, c.head_dim, c.rope_base, 1.0, offset)?;
                    let attended = kv.attend(&q, k, v, tokens.len() as u32, (c.head_dim as f32).powf(-0.5))?;
                    out.forward(&nn::merge_heads(&attended, c.heads, c.head_dim)?)?
                }
                _ => return Err("cache does not match the model's layers".into()),
            };
            h = tensor::add(&h, &y)?;
            let x = tensor::rms_norm(&h, &layer.ffn_norm, c.eps)?;
            let gated = tensor::multiply(&tensor::silu(&layer.w1.forward(&x)?)?, &layer.w3.forward(&x)?)?;
            h = tensor::add(&h, &layer.w2.forward(&gated)?)?;
        }
        if !all_positions {
            h = nn::last_position(&h, tokens.len() as u32)?;
        }
        let h = tensor::rms_norm(&h, &self.final_norm, c.eps)?;
        nn::finish_logits(&self.embed.as_linear(&h)?, if all_positions { tokens.len() as u32 } else { 1 })
    }

    /// Gated depthwise causal convolution: B, C, x = in_proj(h); y = C * (conv(B * x) + bias); out_proj(y).
    fn short_conv(&self, h: &Tensor, in_proj: &Linear, out_proj: &Linear, conv: (&Tensor, Option<&Tensor>), history: &mut History, t: u32) -> R<Tensor> {
        let (kernel, bias) = conv;
        let hidden = self.config.hidden;
        let bcx = in_proj.forward(h)?;
        let part = |i: u32| nn::slice_axis(&bcx, 2, i * hidden, (i + 1) * hidden);
        let (b, gate, x) = (part(0)?, part(1)?, part(2)?);
        history.append(tensor::multiply(&b, &x)?, t)?;
        // The convolution sees the kernel - 1 inputs before this block; zeros before the first token.
        let context = self.config.conv_kernel - 1;
        let held = history.end() - history.start();
        let all = history.data().ok_or("empty conv state")?;
        let input = if held >= t + context {
            // Counted from the end, so that every decode step records the same slice (see kit::step).
            tensor::slice(all, &[0, -((t + context) as i32)], &[1, i32::MAX])?
        } else {
            let zeros = Tensor::from_f32(&vec![0.0; ((t + context - held) * hidden) as usize], &[1, t + context - held, hidden])?;
            tensor::concatenate(&[&tensor::astype(&zeros, all.dtype()?)?, all], 1)?
        };
        let mut conv = tensor::conv1d_depthwise(&input, kernel)?;
        if let Some(bias) = bias {
            conv = tensor::add(&conv, bias)?;
        }
        history.compact()?;
        out_proj.forward(&tensor::multiply(&gate, &conv)?)
    }
}

/// The kit exports this graph as the adapter's `runtime` (adapters/kit/src/adapter.rs).
impl Graph for Lfm2 {
    type Cache = Cache;

    fn load() -> Result<Self, String> {
        Lfm2::load()
    }

    fn vocab_size(&self) -> u32 {
        self.config.vocab
    }

    fn new_cache(&self) -> Self::Cache {
        Lfm2::new_cache(self)
    }

    fn forward(&self, tokens: &[u32], ids: &Tensor, cache: &mut Self::Cache, all_positions: bool) -> Result<Tensor, String> {
        Lfm2::forward(self, tokens, ids, cache, all_positions)
    }

    fn cache_length(cache: &Self::Cache) -> u32 {
        cache.length()
    }

    fn trim(cache: &mut Self::Cache, length: u32) -> Result<(), String> {
        cache.trim(length)
    }

    fn histories(cache: &mut Self::Cache) -> Vec<&mut History> {
        cache
            .layers
            .iter_mut()
            .flat_map(|layer| match layer {
                LayerCache::Conv(h) => vec![h],
                LayerCache::Attention(kv) => vec![&mut kv.keys, &mut kv.values],
            })
            .collect()
    }
}
