//! Statuses: the ones the host answers with itself, with their error bodies, and the
//! errors a caller sees from the service side (the invoker), numbered as IoT Hub's.

use serde::{Deserialize, Serialize};

/// Why the host answered a call itself instead of a handler answering it. Each has one
/// status and one word (`code`) in the error body, both part of the wire contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: the payload is not UTF-8 JSON.
    InvalidJson,
    /// 400: the method name breaks the naming rules.
    InvalidMethod,
    /// 404: no loaded handler serves the method.
    MethodNotFound,
    /// 413: the request payload is larger than the limit.
    PayloadTooLarge,
    /// 500: the handler trapped (panicked, ran out of memory, failed to instantiate).
    HandlerFailed,
    /// 500: the handler answered something that is not JSON, or is too large.
    InvalidResponse,
    /// 503: too many calls are in flight.
    TooManyCalls,
    /// 503: the device is shutting down.
    ShuttingDown,
    /// 503: the device's connection took no method calls when the request came (it had
    /// unsubscribed from them, as edge-host does before it reconnects): the request
    /// reached no handler, so a caller may send it again once the device is back.
    /// Answered by edge-hub for a device connected through it.
    NotDelivered,
    /// 504: the handler ran past its deadline.
    DeadlineExceeded,
}

impl ErrorCode {
    /// The status the host answers with.
    pub fn status(self) -> u16 {
        match self {
            Self::InvalidJson | Self::InvalidMethod => 400,
            Self::MethodNotFound => 404,
            Self::PayloadTooLarge => 413,
            Self::HandlerFailed | Self::InvalidResponse => 500,
            Self::TooManyCalls | Self::ShuttingDown | Self::NotDelivered => 503,
            Self::DeadlineExceeded => 504,
        }
    }

    /// Whether an answer with `status` and body `payload` is this one (the status, and
    /// an error body with this code).
    pub fn answered(self, status: u16, payload: &[u8]) -> bool {
        status == self.status()
            && serde_json::from_slice::<ErrorBody>(payload)
                .is_ok_and(|body| body.error.code == self.as_str())
    }

    /// The word in the error body's `code` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalidJson",
            Self::InvalidMethod => "invalidMethod",
            Self::MethodNotFound => "methodNotFound",
            Self::PayloadTooLarge => "payloadTooLarge",
            Self::HandlerFailed => "handlerFailed",
            Self::InvalidResponse => "invalidResponse",
            Self::TooManyCalls => "tooManyCalls",
            Self::ShuttingDown => "shuttingDown",
            Self::NotDelivered => "notDelivered",
            Self::DeadlineExceeded => "deadlineExceeded",
        }
    }
}

/// The body of an answer the host gives itself:
/// `{"error":{"code":"methodNotFound","message":"..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// One word, from [`ErrorCode::as_str`].
    pub code: String,
    /// A sentence for people.
    pub message: String,
}

impl ErrorBody {
    /// The body for `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.as_str().to_owned(),
                message: message.into(),
            },
        }
    }

    /// The body as JSON bytes, ready to publish.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of two strings always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What a caller is told when the device did not answer, numbered as IoT Hub's service
/// API numbers them, so that scripts written for IoT Hub read them the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceError {
    /// 400004: an argument (a timeout, the payload) is out of range or malformed.
    ArgumentInvalid,
    /// 404103: the device is not online, and did not come online within the connect
    /// timeout.
    DeviceNotOnline,
    /// 504101: the device did not answer within the response timeout.
    GatewayTimeout,
}

impl ServiceError {
    /// IoT Hub's six-digit error code, such as 404103.
    pub fn code(self) -> u32 {
        match self {
            Self::ArgumentInvalid => 400_004,
            Self::DeviceNotOnline => 404_103,
            Self::GatewayTimeout => 504_101,
        }
    }

    /// IoT Hub's name for the error, such as `DeviceNotOnline`.
    pub fn name(self) -> &'static str {
        match self {
            Self::ArgumentInvalid => "ArgumentInvalid",
            Self::DeviceNotOnline => "DeviceNotOnline",
            Self::GatewayTimeout => "GatewayTimeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_have_the_documented_shape() {
        let body = ErrorBody::new(ErrorCode::MethodNotFound, "no handler serves 'x'");
        let json: serde_json::Value =
            serde_json::from_slice(&body.to_json()).expect("error body is JSON");
        assert_eq!(
            json,
            serde_json::json!({"error":{"code":"methodNotFound","message":"no handler serves 'x'"}})
        );
    }

    #[test]
    fn an_answer_is_recognised_by_status_and_code() {
        let body = ErrorBody::new(ErrorCode::NotDelivered, "not subscribed").to_json();
        assert!(ErrorCode::NotDelivered.answered(503, &body));
        assert!(!ErrorCode::NotDelivered.answered(500, &body));
        assert!(!ErrorCode::ShuttingDown.answered(503, &body));
        assert!(!ErrorCode::NotDelivered.answered(503, b"{\"code\":\"notDelivered\"}"));
        assert!(!ErrorCode::NotDelivered.answered(503, b"not json"));
    }

    #[test]
    fn statuses_are_iot_hubs() {
        assert_eq!(ErrorCode::InvalidJson.status(), 400);
        assert_eq!(ErrorCode::MethodNotFound.status(), 404);
        assert_eq!(ErrorCode::PayloadTooLarge.status(), 413);
        assert_eq!(ErrorCode::HandlerFailed.status(), 500);
        assert_eq!(ErrorCode::TooManyCalls.status(), 503);
        assert_eq!(ErrorCode::DeadlineExceeded.status(), 504);
        assert_eq!(ErrorCode::NotDelivered.status(), 503);
        assert_eq!(ServiceError::DeviceNotOnline.code(), 404103);
        assert_eq!(ServiceError::GatewayTimeout.code(), 504101);
        assert_eq!(ServiceError::ArgumentInvalid.code(), 400004);
    }
}
