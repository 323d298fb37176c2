//! GGUF input: a llama.cpp checkpoint (`--model file.gguf`, or a directory holding one) read as
//! the Hugging Face model it was converted from, as `transformers` reads it: every tensor
//! dequantized to f32 (by candle: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K–Q6_K),
//! llama.cpp's tensor names mapped to Hugging Face's, the rows of the q/k projections of `llama`
//! files put back in the order llama.cpp's converter permuted them from, and the configuration
//! built from the file's metadata. The tokenizer is the `tokenizer.json` beside the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::llama::{LlamaConfig, TokenIds};
use crate::{Error, Result};

/// The GGUF file a `--model` path names: the path itself if it is a `.gguf` file; for a
/// directory without `model.safetensors`, the one `.gguf` file in it (several are an error);
/// `None` otherwise.
pub fn find(path: &Path) -> Result<Option<PathBuf>> {
    let is_gguf = |p: &Path| {
        p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    };
    if path.is_file() {
        return Ok(is_gguf(path).then(|| path.to_path_buf()));
    }
    if !path.is_dir() || path.join("model.safetensors").exists() {
        return Ok(None);
    }
    let entries = std::fs::read_dir(path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("cannot list: {e}"),
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_gguf(p))
        .collect();
    found.sort();
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!(
                "holds {} GGUF files ({}); pass the one to use",
                found.len(),
                found
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The directory of a `--model` path: where `tokenizer.json` is looked for.
pub fn model_dir(path: &Path) -> PathBuf {
    if path.is_file() {
        path.parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    } else {
        path.to_path_buf()
    }
}

/// An open GGUF file: its header (metadata and tensor table) and a reader for the tensors.
pub struct Gguf {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl Gguf {
    /// Opens `path` and reads its header; a truncated or malformed file is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| err(format!("not a readable GGUF file: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    fn error(&self, msg: impl Into<String>) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String> {
        self.string("general.architecture")
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.error(format!("metadata `{key}` is {other:?}, not a string"))),
            None => Err(self.error(format!("metadata `{key}` is missing"))),
        }
    }

    /// An unsigned integer entry (any integer type), `None` when absent.
    fn uint(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = v.to_u64().or_else(|_| {
            v.to_i64()
                .map_err(|e| e.to_string())
                .and_then(|i| u64::try_from(i).map_err(|e| e.to_string()))
                .map_err(candle_core::Error::Msg)
        });
        match n {
            Ok(n) => usize::try_from(n)
                .map(Some)
                .map_err(|_| self.error(format!("metadata `{key}` = {n} is too large"))),
            Err(_) => Err(self.error(format!("metadata `{key}` is {v:?}, not an integer"))),
        }
    }

    fn require_uint(&self, key: &str) -> Result<usize> {
        self.uint(key)?
            .ok_or_else(|| self.error(format!("metadata `{key}` is missing")))
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v as f64)),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(other) => Err(self.error(format!("metadata `{key}` is {other:?}, not a float"))),
        }
    }

    /// The dims (rows first) of tensor `name`, if the file holds it.
    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| t.shape.dims().to_vec())
    }

    /// The configuration of the model, from the metadata and the tensor table.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        let model_type = match arch.as_str() {
            // llama.cpp files Mistral models (without a sliding window) as llama.
            "llama" => "llama",
            "qwen2" => "qwen2",
            "qwen3" => "qwen3",
            other => {
                return Err(self.error(format!(
                    "general.architecture `{other}` is not supported (supported: llama, qwen2, \
                     qwen3)"
                )))
            }
        };
        if self.dims("rope_freqs.weight").is_some() {
            return Err(self.error(
                "the file carries rope frequency factors (`rope_freqs.weight`, Llama 3.1-style \
                 scaling), which are not supported; load the Hugging Face checkpoint instead",
            ));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let heads = self.require_uint(&key("attention.head_count"))?;
        let hidden = self.require_uint(&key("embedding_length"))?;
        let vocab = match self.dims("token_embd.weight") {
            Some(d) if d.len() == 2 => d[0],
            _ => return Err(self.error("tensor `token_embd.weight` is missing or not a matrix")),
        };
        let head_dim = match self.uint(&key("attention.key_length"))? {
            Some(d) => Some(d),
            None => self.uint(&key("rope.dimension_count"))?,
        };
        let id = |k: &str| -> Result<Option<u32>> {
            self.uint(k)?
                .map(|v| u32::try_from(v).map_err(|_| self.error(format!("metadata `{k}` = {v}"))))
                .transpose()
        };
        let config = LlamaConfig {
            model_type: model_type.into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.require_uint(&key("feed_forward_length"))?,
            num_hidden_layers: self.require_uint(&key("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: self.uint(&key("attention.head_count_kv"))?,
            head_dim: head_dim.filter(|&d| heads == 0 || d != hidden / heads),
            hidden_act: "silu".into(),
            max_position_embeddings: self.uint(&key("context_length"))?.unwrap_or(2048),
            rms_norm_eps: self
                .float(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6),
            tie_word_embeddings: self.dims("output.weight").is_none(),
            attention_bias: model_type == "llama" && self.dims("blk.0.attn_q.bias").is_some(),
            mlp_bias: false,
            rope_theta: Some(self.float(&key("rope.freq_base"))?.unwrap_or(10_000.0)),
            rope_scaling: None,
            rope_parameters: None,
            sliding_window: None,
            use_sliding_window: None,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?.map(TokenIds::One),
            eos_token_id: id("tokenizer.ggml.eos_token_id")?.map(TokenIds::One),
            pad_token_id: id("tokenizer.ggml.padding_token_id")?,
        };
        config
            .validate()
            .map_err(|e| self.error(format!("the configuration it describes: {e}")))?;
        Ok(config)
    }

    /// Every parameter of `config` as an f32 tensor under its Hugging Face name, read and
    /// dequantized one at a time, shapes checked against the configuration.
    pub fn tensors(
        &mut self,
        config: &LlamaConfig,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let permuted = config.model_type == "llama";
        let mut out = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let stored = gguf_name(&name)
                .ok_or_else(|| self.error(format!("no llama.cpp name is known for `{name}`")))?;
            let q = self
                .content
                .tensor(&mut self.reader, &stored, device)
                .map_err(|e| self.error(format!("tensor `{stored}` (for `{name}`): {e}")))?;
            let t = q
                .dequantize(device)
                .map_err(|e| self.error(format!("tensor `{stored}`: cannot dequantize: {e}")))?;
            if t.dims() != shape.as_slice() {
                return Err(self.error(format!(
                    "tensor `{stored}` has shape {:?}, the configuration implies {shape:?}",
                    t.dims()
                )));
            }
            if let Some(msg) = super::non_finite(&stored, &t.flatten_all()?.to_vec1::<f32>()?) {
                return Err(self.error(msg));
            }
            // llama.cpp's converter interleaves the two halves of each head's q/k rows for its
            // RoPE kernel; transformers undoes it on reading, and so do we.
            let heads = if name.contains("q_proj.") {
                Some(config.num_attention_heads)
            } else if name.contains("k_proj.") {
                Some(config.kv_heads())
            } else {
                None
            };
            let t = match heads {
                Some(h) if permuted => unpermute(&t, h)?,
                _ => t,
            };
            out.insert(name, t);
        }
        Ok(out)
    }
}

/// Undoes llama.cpp's `permute(w, n_head)`: rows `(head, half, pair)` back to
/// `(head, pair, half)` (also for a bias, one value per row).
fn unpermute(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The llama.cpp name of the Hugging Face parameter `name`.
fn gguf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.into());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let (module, kind) = part.rsplit_once('.')?;
    let mapped = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).
        let (heads, rows, cols) = (3, 12, 2);
        let w = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, rows / heads / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let back: Vec<Vec<f32>> = unpermute(&permuted, heads).unwrap().to_vec2().unwrap();
        assert_eq!(back, w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn every_parameter_has_a_llama_cpp_name() {
        assert_eq!(
            gguf_name("model.layers.7.self_attn.o_proj.weight").as_deref(),
            Some("blk.7.attn_output.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.q_proj.bias").as_deref(),
            Some("blk.0.attn_q.bias")
        );
        assert_eq!(gguf_name("model.layers.0.mystery.weight"), None);
    }
}
