//! `relprune forward`: one forward pass of a Hugging Face checkpoint on token ids from a JSON
//! file, written as JSON in the layout `transformers`' outputs are dumped (`last_hidden_state` as
//! nested arrays), so the two can be compared number by number.
//!
//! The input is an object with `input_ids` and optionally `attention_mask`, `token_type_ids`
//! (BERT) and `decoder_input_ids` (Marian, T5), each a list of equally long rows of integers; a whole
//! reference file with such an object under `inputs` is accepted too. The model is whatever
//! architecture the directory holds (`relprune_models::hf::load`): an encoder writes
//! `last_hidden_state`, an encoder–decoder `logits` and `encoder_last_hidden_state`, a
//! decoder-only LM `logits`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use clap::Args;
use relprune_models::hf::bert::BertModel;
use relprune_models::hf::llama::CausalLm;
use relprune_models::hf::{HfModel, HfSeq2Seq};
use serde_json::Value;

/// Arguments of `relprune forward`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// The model directory (`config.json` and `model.safetensors`, as `save_pretrained` writes them).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// JSON with `input_ids` (and optionally `attention_mask`, `token_type_ids`; for an
    /// encoder–decoder `decoder_input_ids`).
    #[arg(long, value_name = "IN.json")]
    pub input: PathBuf,
    /// Where to write `{"last_hidden_state": [...]}` (encoders), `{"logits": [...],
    /// "encoder_last_hidden_state": [...]}` (encoder–decoders) or `{"logits": [...]}`
    /// (decoder-only LMs).
    #[arg(long, value_name = "OUT.json")]
    pub out: PathBuf,
    /// Run the pruned layers sparse (their zeros left out; per batch, sparse or dense, whichever
    /// the measured crossover table says is faster).
    #[arg(long)]
    pub sparse: bool,
}

/// Runs `relprune forward`.
pub fn run(args: &ForwardArgs) -> Result<()> {
    // The architecture first (an unsupported one is named), then the input, then the weights.
    relprune_models::hf::detect(&args.model)?;
    let text = relprune_io::read_text_capped(&args.input, relprune_io::CONFIG_CAP)
        .with_context(|| format!("cannot read input file {}", args.input.display()))?;
    let inputs =
        parse_inputs(&text).with_context(|| format!("input file {}", args.input.display()))?;
    let (_, model) = if args.sparse {
        relprune_models::hf::load_sparse(&args.model, &Device::Cpu)?
    } else {
        relprune_models::hf::load(&args.model, &VarMap::new(), &Device::Cpu)?
    };
    let out = match model {
        HfModel::Encoder(m) => run_encoder(args, &inputs, &m)?,
        HfModel::Seq2Seq(m) => run_seq2seq(args, &inputs, m.as_ref())?,
        HfModel::CausalLm(m) => run_causal(args, &inputs, &m)?,
    };
    Ok(relprune_io::write(
        &args.out,
        serde_json::to_string(&out)?.as_bytes(),
    )?)
}

/// A rectangular id matrix as a (B, T) u32 tensor.
fn tensor(rows: &[Vec<u32>]) -> Result<Tensor> {
    let (b, t) = (rows.len(), rows[0].len());
    Ok(Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu)?)
}

/// The encoder's forward pass: `last_hidden_state`.
fn run_encoder(args: &ForwardArgs, inputs: &Inputs, model: &BertModel) -> Result<Value> {
    if inputs.decoder_input_ids.is_some() {
        bail!(
            "input file {}: `decoder_input_ids` given, but {} is an encoder",
            args.input.display(),
            args.model.display()
        );
    }
    let ids = tensor(&inputs.input_ids)?;
    let mask = inputs.attention_mask.as_deref().map(tensor).transpose()?;
    let types = inputs.token_type_ids.as_deref().map(tensor).transpose()?;
    let hidden = model
        .forward(&ids, mask.as_ref(), types.as_ref())
        .with_context(|| format!("forward pass of {}", args.model.display()))?;
    let hidden = crate::output::finite_rows3("hidden states", &hidden)?;
    Ok(serde_json::json!({ "last_hidden_state": hidden }))
}

/// The encoder–decoder's forward pass: `logits` and `encoder_last_hidden_state`.
fn run_seq2seq(args: &ForwardArgs, inputs: &Inputs, model: &dyn HfSeq2Seq) -> Result<Value> {
    let name = model.model_type();
    if inputs.token_type_ids.is_some() {
        bail!(
            "input file {}: `token_type_ids` given, but {name} has none",
            args.input.display()
        );
    }
    let dec = inputs.decoder_input_ids.as_deref().with_context(|| {
        format!(
            "input file {}: a {name} forward pass needs `decoder_input_ids`",
            args.input.display()
        )
    })?;
    if dec.len() != inputs.input_ids.len() {
        bail!(
            "input file {}: `decoder_input_ids` has {} rows but `input_ids` {}",
            args.input.display(),
            dec.len(),
            inputs.input_ids.len()
        );
    }
    let vocab = model.vocab_size();
    for (name, m) in [
        ("input_ids", inputs.input_ids.as_slice()),
        ("decoder_input_ids", dec),
    ] {
        if let Some(bad) = m.iter().flatten().find(|&&id| id as usize >= vocab) {
            bail!(
                "input file {}: `{name}` holds token id {bad}, outside the vocabulary of {vocab}",
                args.input.display()
            );
        }
    }
    let ids = tensor(&inputs.input_ids)?;
    // Without a mask every source token is attended to, as transformers does.
    let mask = match &inputs.attention_mask {
        Some(m) => tensor(m)?,
        None => Tensor::ones(ids.dims(), candle_core::DType::U32, &Device::Cpu)?,
    };
    let (logits, enc) = model
        .forward(&ids, &mask, &tensor(dec)?)
        .with_context(|| format!("forward pass of {}", args.model.display()))?;
    let logits = crate::output::finite_rows3("logits", &logits)?;
    let enc = crate::output::finite_rows3("encoder hidden states", &enc)?;
    Ok(serde_json::json!({ "logits": logits, "encoder_last_hidden_state": enc }))
}

/// The causal LM's forward pass: `logits`.
fn run_causal(args: &ForwardArgs, inputs: &Inputs, model: &CausalLm) -> Result<Value> {
    let name = &model.config().model_type;
    for (given, what) in [
        (inputs.token_type_ids.is_some(), "token_type_ids"),
        (inputs.decoder_input_ids.is_some(), "decoder_input_ids"),
    ] {
        if given {
            bail!(
                "input file {}: `{what}` given, but {name} is a decoder-only model",
                args.input.display()
            );
        }
    }
    let vocab = model.config().vocab_size;
    if let Some(bad) = inputs
        .input_ids
        .iter()
        .flatten()
        .find(|&&id| id as usize >= vocab)
    {
        bail!(
            "input file {}: `input_ids` holds token id {bad}, outside the vocabulary of {vocab}",
            args.input.display()
        );
    }
    let positions = model.config().max_position_embeddings;
    if inputs.input_ids[0].len() > positions {
        bail!(
            "input file {}: {} tokens per row, the model has {positions} positions",
            args.input.display(),
            inputs.input_ids[0].len()
        );
    }
    let ids = tensor(&inputs.input_ids)?;
    let mask = inputs.attention_mask.as_deref().map(tensor).transpose()?;
    let logits = model
        .forward(&ids, mask.as_ref())
        .with_context(|| format!("forward pass of {}", args.model.display()))?;
    let logits = crate::output::finite_rows3("logits", &logits)?;
    Ok(serde_json::json!({ "logits": logits }))
}

/// The token ids of one forward pass, as rectangular row-major matrices.
#[derive(Debug, PartialEq)]
struct Inputs {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Option<Vec<Vec<u32>>>,
    token_type_ids: Option<Vec<Vec<u32>>>,
    decoder_input_ids: Option<Vec<Vec<u32>>>,
}

/// Parses and checks the input JSON (the object itself or a reference file's `inputs`).
fn parse_inputs(text: &str) -> Result<Inputs> {
    let value: Value = serde_json::from_str(text).context("not valid JSON")?;
    let obj = match value.get("inputs") {
        Some(inner) if inner.is_object() => inner,
        _ => &value,
    };
    if !obj.is_object() {
        bail!("expected a JSON object with `input_ids`");
    }
    let input_ids = match obj.get("input_ids") {
        Some(v) => matrix(v, "input_ids")?,
        None => bail!("no `input_ids`"),
    };
    let (b, t) = (input_ids.len(), input_ids[0].len());
    let optional = |name: &str| -> Result<Option<Vec<Vec<u32>>>> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let m = matrix(v, name)?;
                if m.len() != b || m[0].len() != t {
                    bail!(
                        "`{name}` is {}×{} but `input_ids` is {b}×{t}",
                        m.len(),
                        m[0].len()
                    );
                }
                Ok(Some(m))
            }
        }
    };
    let attention_mask = optional("attention_mask")?;
    if let Some(m) = &attention_mask {
        if m.iter().flatten().any(|&x| x > 1) {
            bail!("`attention_mask` may only hold 0 and 1");
        }
    }
    let token_type_ids = optional("token_type_ids")?;
    // The target may be as long as it likes; only its rows must be equally long.
    let decoder_input_ids = match obj.get("decoder_input_ids") {
        None | Some(Value::Null) => None,
        Some(v) => Some(matrix(v, "decoder_input_ids")?),
    };
    Ok(Inputs {
        input_ids,
        attention_mask,
        token_type_ids,
        decoder_input_ids,
    })
}

/// A non-empty list of equally long, non-empty rows of non-negative integers.
fn matrix(v: &Value, name: &str) -> Result<Vec<Vec<u32>>> {
    let rows = v
        .as_array()
        .with_context(|| format!("`{name}` must be a list of rows"))?;
    if rows.is_empty() {
        bail!("`{name}` has no rows");
    }
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let row = row
            .as_array()
            .with_context(|| format!("`{name}` row {i} is not a list"))?;
        let row = row
            .iter()
            .enumerate()
            .map(|(j, x)| {
                x.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .with_context(|| format!("`{name}`[{i}][{j}] = {x} is not a token id"))
            })
            .collect::<Result<Vec<u32>>>()?;
        if row.is_empty() {
            bail!("`{name}` row {i} is empty");
        }
        if let Some(first) = out.first().map(Vec::len) {
            if row.len() != first {
                bail!(
                    "`{name}` row {i} has {} entries, row 0 has {first}: pad the rows to one length",
                    row.len()
                );
            }
        }
        out.push(row);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_read_from_the_object_or_its_inputs_field() {
        let a =
            parse_inputs(r#"{"input_ids": [[2, 5, 3]], "attention_mask": [[1, 1, 0]]}"#).unwrap();
        let b = parse_inputs(
            r#"{"inputs": {"input_ids": [[2, 5, 3]], "attention_mask": [[1, 1, 0]]}, "outputs": {}}"#,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.input_ids, [[2, 5, 3]]);
        assert_eq!(a.token_type_ids, None);
    }

    #[test]
    fn malformed_inputs_are_named() {
        let e = |s: &str| format!("{:#}", parse_inputs(s).unwrap_err());
        assert!(e("[1, 2").contains("not valid JSON"));
        assert!(e("{}").contains("no `input_ids`"));
        assert!(e(r#"{"input_ids": [[1, 2], [3]]}"#).contains("row 1 has 1 entries"));
        assert!(e(r#"{"input_ids": [[1, -2]]}"#).contains("`input_ids`[0][1] = -2"));
        assert!(e(r#"{"input_ids": [[1, 2]], "attention_mask": [[1]]}"#)
            .contains("`attention_mask` is 1×1 but `input_ids` is 1×2"));
        assert!(
            e(r#"{"input_ids": [[1]], "decoder_input_ids": [[1], [2, 3]]}"#)
                .contains("`decoder_input_ids` row 1 has 2 entries")
        );
        let ok = parse_inputs(r#"{"input_ids": [[1]], "decoder_input_ids": [[4, 5, 6]]}"#).unwrap();
        assert_eq!(ok.decoder_input_ids, Some(vec![vec![4, 5, 6]]));
    }
}
