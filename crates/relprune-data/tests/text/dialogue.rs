use std::fs;

use relprune_data::text::{
    parse_taskmaster, read_taskmaster, read_taskmaster_split_ids, DialogueOptions, DialoguePair,
    EmptyPairs, TextPair,
};
use relprune_data::Error;
use serde_json::{json, Value};

/// An utterance in the Taskmaster-1 layout, with a segment as the real files have on some.
fn utt(index: usize, speaker: &str, text: &str) -> Value {
    json!({
        "index": index,
        "speaker": speaker,
        "text": text,
        "segments": [{
            "start_index": 0,
            "end_index": 2,
            "text": &text[..2.min(text.len())],
            "annotations": [{"name": "pizza_ordering.name.store"}]
        }]
    })
}

fn conversation(id: &str, turns: &[(&str, &str)]) -> Value {
    json!({
        "conversation_id": id,
        "instruction_id": "pizza-ordering-1",
        "utterances": turns.iter().enumerate().map(|(i, (s, t))| utt(i, s, t)).collect::<Vec<_>>()
    })
}

fn opts(context_turns: usize) -> DialogueOptions {
    DialogueOptions {
        context_turns,
        separator: " | ".into(),
        user_tag: "U: ".into(),
        assistant_tag: "A: ".into(),
        empty: EmptyPairs::Skip,
    }
}

fn parse(v: &Value, o: &DialogueOptions) -> relprune_data::Result<Vec<DialoguePair>> {
    parse_taskmaster(&serde_json::to_vec(v).unwrap(), "dialogs.json", o)
}

fn pizza() -> Value {
    json!([
        conversation(
            "dlg-a",
            &[
                ("USER", "Hi, I want a pizza."),
                ("ASSISTANT", "Which store?"),
                ("USER", "Domino's please."),
                ("ASSISTANT", "Sure."),
                ("ASSISTANT", "What size?"),
            ]
        ),
        conversation("dlg-b", &[("USER", "Large."), ("ASSISTANT", "Done.")]),
    ])
}

#[test]
fn assistant_utterances_become_responses_to_the_tagged_previous_turns() {
    let got = parse(&pizza(), &opts(2)).unwrap();
    let want = [
        ("dlg-a", 1, "U: Hi, I want a pizza.", "Which store?"),
        ("dlg-a", 3, "A: Which store? | U: Domino's please.", "Sure."),
        ("dlg-a", 4, "U: Domino's please. | A: Sure.", "What size?"),
        ("dlg-b", 1, "U: Large.", "Done."),
    ];
    assert_eq!(got.len(), want.len());
    for (g, (id, turn, context, response)) in got.iter().zip(want) {
        assert_eq!(g.conversation_id, id);
        assert_eq!(g.turn, turn);
        assert_eq!(g.context, context);
        assert_eq!(g.response, response);
    }
}

#[test]
fn context_holds_at_most_the_last_n_turns_and_defaults_are_usable() {
    let long = parse(&pizza(), &opts(10)).unwrap();
    assert_eq!(
        long[2].context,
        "U: Hi, I want a pizza. | A: Which store? | U: Domino's please. | A: Sure."
    );
    let one = parse(&pizza(), &opts(1)).unwrap();
    assert_eq!(one[2].context, "A: Sure.");
    let default = parse(&pizza(), &DialogueOptions::default()).unwrap();
    assert_eq!(
        default[1].context,
        "USER: Hi, I want a pizza. ASSISTANT: Which store? USER: Domino's please."
    );
    let err = parse(&pizza(), &opts(0)).unwrap_err().to_string();
    assert!(err.contains("context_turns"), "{err}");
}

#[test]
fn an_assistant_opening_or_an_empty_response_is_skipped_kept_or_rejected() {
    let v = json!([conversation(
        "dlg-open",
        &[
            ("ASSISTANT", "Hello, how can I help?"),
            ("USER", "A coffee."),
            ("ASSISTANT", "  "),
            ("USER", "Hello?"),
            ("ASSISTANT", "Coming."),
        ]
    )]);
    let skipped = parse(&v, &opts(2)).unwrap();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].turn, 4);
    let mut keep = opts(2);
    keep.empty = EmptyPairs::Keep;
    let kept = parse(&v, &keep).unwrap();
    assert_eq!(kept.len(), 3);
    assert_eq!(kept[0].context, "");
    assert_eq!(kept[0].response, "Hello, how can I help?");
    let mut strict = opts(2);
    strict.empty = EmptyPairs::Error;
    let err = parse(&v, &strict).unwrap_err().to_string();
    assert!(
        err.contains("dialogs.json") && err.contains("dlg-open") && err.contains("empty context"),
        "{err}"
    );
}

#[test]
fn bad_json_is_an_error_naming_the_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("self-dialogs.json");
    let text = serde_json::to_string_pretty(&pizza()).unwrap();
    fs::write(&path, &text[..text.len() - 10]).unwrap();
    let err = read_taskmaster(&path, &opts(2)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    assert!(
        msg.contains("self-dialogs.json") && msg.contains("invalid JSON"),
        "{msg}"
    );
    assert!(msg.contains("line"), "{msg}");
    let err = parse(&json!({"a": 1}), &opts(2)).unwrap_err().to_string();
    assert!(err.contains("missing field conversation_id"), "{err}");
    let err = parse(&json!("text"), &opts(2)).unwrap_err().to_string();
    assert!(
        err.contains("expected an array of conversations, found a string"),
        "{err}"
    );
    let missing = dir.path().join("woz-dialogs.json");
    let err = read_taskmaster(&missing, &opts(2)).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("woz-dialogs.json"));
}

#[test]
fn missing_or_wrong_fields_name_the_file_and_the_conversation_id() {
    let mut v = pizza();
    // No speaker in utterance 1 of dlg-b.
    v[1]["utterances"][1]
        .as_object_mut()
        .unwrap()
        .remove("speaker");
    let err = parse(&v, &opts(2)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    assert!(
        msg.contains("dialogs.json")
            && msg.contains("conversation dlg-b (#1)")
            && msg.contains("utterance 1: missing field speaker"),
        "{msg}"
    );
    let cases: [(&str, Value, &str); 5] = [
        (
            "/0/utterances/0/text",
            Value::Null,
            "utterance 0: text must be a string, found null",
        ),
        (
            "/0/utterances/2/speaker",
            json!("SYSTEM"),
            "speaker must be \"USER\" or \"ASSISTANT\", found \"SYSTEM\"",
        ),
        (
            "/0/utterances",
            json!({}),
            "utterances must be an array, found an object",
        ),
        (
            "/1/conversation_id",
            json!(7),
            "conversation #1: conversation_id must be a string",
        ),
        (
            "/1/utterances/0",
            json!(3),
            "conversation dlg-b (#1): utterance 0: expected an object",
        ),
    ];
    for (pointer, value, want) in cases {
        let mut v = pizza();
        *v.pointer_mut(pointer).unwrap() = value;
        let err = parse(&v, &opts(2)).unwrap_err().to_string();
        assert!(
            err.contains("dialogs.json") && err.contains(want),
            "{pointer}: {err}"
        );
    }
    let mut v = pizza();
    v[0].as_object_mut().unwrap().remove("utterances");
    let err = parse(&v, &opts(2)).unwrap_err().to_string();
    assert!(
        err.contains("conversation dlg-a (#0): missing field utterances"),
        "{err}"
    );
}

#[test]
fn a_single_conversation_object_and_the_readme_spelling_are_accepted() {
    let one = conversation("dlg-x", &[("USER", "Hi."), ("ASSISTANT", "Hello.")]);
    let got = parse(&one, &opts(2)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].conversation_id, "dlg-x");
    let camel = json!([{
        "conversationId": "dlg-y",
        "instructionId": "x",
        "utterances": [{"speaker": "USER", "text": "Hi."}, {"speaker": "ASSISTANT", "text": "Yes?"}]
    }]);
    let got = parse(&camel, &opts(2)).unwrap();
    assert_eq!(got[0].conversation_id, "dlg-y");
    assert_eq!(got[0].context, "U: Hi.");
    let pair: TextPair = got[0].clone().into();
    assert_eq!(
        pair,
        TextPair {
            source: "U: Hi.".into(),
            target: "Yes?".into()
        }
    );
}

#[test]
fn split_id_files_with_trailing_commas_select_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.csv");
    fs::write(&path, "dlg-b,\r\n\ndlg-zzz,\n").unwrap();
    let ids = read_taskmaster_split_ids(&path).unwrap();
    assert_eq!(ids.iter().collect::<Vec<_>>(), ["dlg-b", "dlg-zzz"]);
    let dev: Vec<_> = parse(&pizza(), &opts(2))
        .unwrap()
        .into_iter()
        .filter(|p| ids.contains(&p.conversation_id))
        .collect();
    assert_eq!(dev.len(), 1);
    assert_eq!(dev[0].response, "Done.");
    fs::write(&path, "dlg-1, dlg-2\n").unwrap();
    let err = read_taskmaster_split_ids(&path).unwrap_err().to_string();
    assert!(err.contains("dev.csv") && err.contains("line 1"), "{err}");
}
