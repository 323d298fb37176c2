//! Taskmaster dialogues (Taskmaster-1's `self-dialogs.json` and `woz-dialogs.json`; Taskmaster-2
//! and -3 share the layout) turned into (context, response) pairs for response generation.
//!
//! What is relied on, per the dataset's README and `sample.json`:
//! - the file is a JSON array of conversations (a single conversation object, as in
//!   `sample.json`, is accepted too);
//! - a conversation has `conversation_id` (a string; the README's spelling `conversationId` is
//!   accepted too) and `utterances`, an array in turn order (the order of the array, which equals
//!   each utterance's `index` in the released files);
//! - an utterance has `speaker`, exactly `"USER"` or `"ASSISTANT"`, and `text`, a string.
//!
//! Everything else (`instruction_id`, `index`, `segments` and their annotations, unknown fields)
//! is not read, so annotation variants between releases do not matter.
//!
//! Each ASSISTANT utterance becomes a response; its context is the previous
//! [`DialogueOptions::context_turns`] utterances (either speaker, oldest first), each prefixed
//! with its speaker tag and joined by [`DialogueOptions::separator`].

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::text::parallel::{EmptyPairs, TextPair};

/// How dialogues become (context, response) pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialogueOptions {
    /// How many previous utterances form the context (at least 1).
    pub context_turns: usize,
    /// Put between the context's utterances.
    pub separator: String,
    /// Put before each USER utterance of the context.
    pub user_tag: String,
    /// Put before each ASSISTANT utterance of the context.
    pub assistant_tag: String,
    /// Pairs with an empty context (the assistant speaks first) or an empty response: skipped
    /// by default, since there is nothing to condition on or nothing to learn.
    pub empty: EmptyPairs,
}

impl Default for DialogueOptions {
    fn default() -> Self {
        Self {
            context_turns: 3,
            separator: " ".into(),
            user_tag: "USER: ".into(),
            assistant_tag: "ASSISTANT: ".into(),
            empty: EmptyPairs::Skip,
        }
    }
}

/// One ASSISTANT response with the conversation context before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialoguePair {
    /// The conversation's `conversation_id`.
    pub conversation_id: String,
    /// 0-based position of the response in the conversation's utterances.
    pub turn: usize,
    /// The previous turns, tagged and joined (empty only if kept by [`EmptyPairs::Keep`]).
    pub context: String,
    /// The ASSISTANT utterance's text.
    pub response: String,
}

impl From<DialoguePair> for TextPair {
    fn from(p: DialoguePair) -> Self {
        TextPair {
            source: p.context,
            target: p.response,
        }
    }
}

/// Reads a Taskmaster JSON file into (context, response) pairs, in file order.
pub fn read_taskmaster(path: &Path, options: &DialogueOptions) -> Result<Vec<DialoguePair>> {
    let bytes = crate::text::read_text_file(path)?;
    parse_taskmaster(&bytes, &path.display().to_string(), options)
}

/// [`read_taskmaster`] on contents already in memory; `source_name` is used in errors.
pub fn parse_taskmaster(
    bytes: &[u8],
    source_name: &str,
    options: &DialogueOptions,
) -> Result<Vec<DialoguePair>> {
    if options.context_turns == 0 {
        return Err(Error::Invalid(
            "dialogue options: context_turns must be at least 1".into(),
        ));
    }
    let json: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::format(source_name, None, format!("invalid JSON: {e}")))?;
    let conversations = match &json {
        Value::Array(items) => items.as_slice(),
        Value::Object(_) => std::slice::from_ref(&json),
        other => {
            return Err(Error::format(
                source_name,
                None,
                format!("expected an array of conversations, found {}", kind(other)),
            ))
        }
    };
    let mut pairs = Vec::new();
    for (position, conversation) in conversations.iter().enumerate() {
        conversation_pairs(conversation, position, source_name, options, &mut pairs)?;
    }
    Ok(pairs)
}

/// Reads a Taskmaster-1 split file (`train.csv`, `dev.csv`, `test.csv`: one `dlg-…` id per line,
/// each followed by a comma) into the set of conversation ids it names.
pub fn read_taskmaster_split_ids(path: &Path) -> Result<BTreeSet<String>> {
    let bytes = crate::text::read_text_file(path)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::format(
            &path.display().to_string(),
            Some(e.utf8_error().valid_up_to() as u64),
            "invalid UTF-8",
        )
    })?;
    let mut ids = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let id = line.trim().trim_end_matches(',').trim();
        if id.is_empty() {
            continue;
        }
        if id.contains(',') || id.contains(char::is_whitespace) {
            return Err(Error::format(
                &path.display().to_string(),
                None,
                format!(
                    "line {}: expected one conversation id, found {line:?}",
                    i + 1
                ),
            ));
        }
        ids.insert(id.to_string());
    }
    Ok(ids)
}

/// Appends the pairs of one conversation, checking the fields relied on.
fn conversation_pairs(
    conversation: &Value,
    position: usize,
    source_name: &str,
    options: &DialogueOptions,
    pairs: &mut Vec<DialoguePair>,
) -> Result<()> {
    let at = |msg: String| Error::format(source_name, None, msg);
    let Value::Object(fields) = conversation else {
        return Err(at(format!(
            "conversation #{position}: expected an object, found {}",
            kind(conversation)
        )));
    };
    let id = match fields
        .get("conversation_id")
        .or_else(|| fields.get("conversationId"))
    {
        Some(Value::String(id)) => id.as_str(),
        Some(other) => {
            return Err(at(format!(
                "conversation #{position}: conversation_id must be a string, found {}",
                kind(other)
            )))
        }
        None => {
            return Err(at(format!(
                "conversation #{position}: missing field conversation_id"
            )))
        }
    };
    let who = format!("conversation {id} (#{position})");
    let utterances = match fields.get("utterances") {
        Some(Value::Array(u)) => u,
        Some(other) => {
            return Err(at(format!(
                "{who}: utterances must be an array, found {}",
                kind(other)
            )))
        }
        None => return Err(at(format!("{who}: missing field utterances"))),
    };
    // Parsed first, so that a bad utterance anywhere fails the whole conversation.
    let mut turns: Vec<(bool, &str)> = Vec::with_capacity(utterances.len());
    for (i, u) in utterances.iter().enumerate() {
        let Value::Object(u) = u else {
            return Err(at(format!(
                "{who}: utterance {i}: expected an object, found {}",
                kind(u)
            )));
        };
        let is_assistant = match u.get("speaker") {
            Some(Value::String(s)) if s == "ASSISTANT" => true,
            Some(Value::String(s)) if s == "USER" => false,
            Some(other) => {
                return Err(at(format!(
                    "{who}: utterance {i}: speaker must be \"USER\" or \"ASSISTANT\", found {other}"
                )))
            }
            None => return Err(at(format!("{who}: utterance {i}: missing field speaker"))),
        };
        let text = match u.get("text") {
            Some(Value::String(t)) => t.as_str(),
            Some(other) => {
                return Err(at(format!(
                    "{who}: utterance {i}: text must be a string, found {}",
                    kind(other)
                )))
            }
            None => return Err(at(format!("{who}: utterance {i}: missing field text"))),
        };
        turns.push((is_assistant, text));
    }
    for (i, &(is_assistant, response)) in turns.iter().enumerate() {
        if !is_assistant {
            continue;
        }
        let first = i.saturating_sub(options.context_turns);
        let context = turns[first..i]
            .iter()
            .map(|&(a, t)| {
                let tag = if a {
                    &options.assistant_tag
                } else {
                    &options.user_tag
                };
                format!("{tag}{t}")
            })
            .collect::<Vec<_>>()
            .join(&options.separator);
        let is_empty = i == first || response.trim().is_empty();
        if is_empty {
            match options.empty {
                EmptyPairs::Skip => continue,
                EmptyPairs::Keep => {}
                EmptyPairs::Error => {
                    return Err(at(format!(
                        "{who}: utterance {i}: empty {}",
                        if i == first { "context" } else { "response" }
                    )))
                }
            }
        }
        pairs.push(DialoguePair {
            conversation_id: id.to_string(),
            turn: i,
            context,
            response: response.to_string(),
        });
    }
    Ok(())
}

/// A JSON value's kind, for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
