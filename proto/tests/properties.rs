//! Properties of the topic and payload parsing, over generated input: whatever arrives
//! from the wire, parsing answers (never panics), and what one side builds the other
//! side reads back. Bounded: proptest's default number of cases, in well under a second.

use edge_proto::message::json_payload;
use edge_proto::{Namespace, RequestTopicError};
use proptest::prelude::*;

fn ns() -> Namespace {
    Namespace::for_device("prop-device").expect("valid device id")
}

/// Method names and request ids the protocol allows.
fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.:$()!*~=-]{1,128}"
}

proptest! {
    #[test]
    fn any_topic_parses_to_an_answer_or_an_error(topic in any::<String>()) {
        let _ = ns().parse_request(&topic);
        let _ = ns().parse_response(&topic);
    }

    #[test]
    fn any_suffix_of_the_request_prefix_is_handled(rest in "\\PC{0,300}") {
        let topic = format!("devices/prop-device/$iothub/methods/POST/{rest}");
        match ns().parse_request(&topic) {
            Ok(request) => {
                prop_assert!(!request.method.is_empty() && request.method.len() <= 128);
                prop_assert!(!request.method.contains(['/', '+', '#', ' ']));
                prop_assert!(!request.request_id.is_empty() && request.request_id.len() <= 128);
            }
            Err(RequestTopicError::BadMethod { request_id, .. }) => {
                prop_assert!(!request_id.is_empty() && request_id.len() <= 128);
            }
            Err(_) => {}
        }
    }

    #[test]
    fn built_topics_are_read_back(method in name(), rid in name(), status in any::<u16>()) {
        let ns = ns();
        let request = ns.request_topic(&method, &rid);
        let parsed = ns.parse_request(&request).expect("a built request topic parses");
        prop_assert_eq!((parsed.method, parsed.request_id), (method.as_str(), rid.as_str()));
        let response = ns.response_topic(status, &rid);
        let parsed = ns.parse_response(&response).expect("a built response topic parses");
        prop_assert_eq!((parsed.status, parsed.request_id), (status, rid.as_str()));
    }

    #[test]
    fn any_payload_is_checked_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = json_payload(&bytes, 256);
    }

    #[test]
    fn json_documents_are_accepted_as_sent(value in json()) {
        let text = value.to_string();
        prop_assert_eq!(json_payload(text.as_bytes(), usize::MAX), Ok(text.as_str()));
    }
}

/// Arbitrary JSON documents, a few levels deep.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        "\\PC{0,20}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}
