//! The service API's errors, as IoT Hub writes them: HTTP status `errorCode / 1000`
//! and a JSON body `{"errorCode", "trackingId", "message", "info": {}, "timestampUtc"}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use edge_invoker::CallError;

/// An error the service API answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {message}")]
pub struct ApiError {
    /// IoT Hub's six-digit code, such as 404103.
    pub code: u32,
    /// A sentence for people.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// 400004 ArgumentInvalid.
    pub fn argument(message: impl Into<String>) -> Self {
        Self::new(400_004, message)
    }

    /// 401002 IotHubUnauthorizedAccess.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401_002, message)
    }

    /// 404001 DeviceNotFound.
    pub fn device_not_found(device: &str) -> Self {
        Self::new(404_001, format!("device '{device}' is not registered"))
    }

    /// 404103 DeviceNotOnline.
    pub fn not_online(device: &str) -> Self {
        Self::new(404_103, format!("device '{device}' is not online"))
    }

    /// 409001 DeviceAlreadyExists.
    pub fn exists(device: &str) -> Self {
        Self::new(409_001, format!("device '{device}' is already registered"))
    }

    /// 412002 PreconditionFailed (etag mismatch).
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(412_002, message)
    }

    /// 413001 MessageTooLarge.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413_001, message)
    }

    /// 500001 ServerError.
    pub fn server(message: impl Into<String>) -> Self {
        Self::new(500_001, message)
    }

    /// The HTTP status: the code divided by 1000.
    pub fn status(&self) -> StatusCode {
        u16::try_from(self.code / 1000)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "errorCode": self.code,
            "trackingId": format!("{:032x}", rand::random::<u128>()),
            "message": self.message,
            "info": {},
            "timestampUtc": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        })
    }
}

impl From<CallError> for ApiError {
    fn from(error: CallError) -> Self {
        match error.code() {
            Some(code) => Self::new(code, error.to_string()),
            None => Self::server(format!("the backend broker: {error}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::debug!(code = self.code, message = %self.message, "service API error");
        (self.status(), axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_the_code_over_a_thousand_and_bodies_have_iot_hubs_fields() {
        let error = ApiError::not_online("d1");
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            ApiError::new(504_101, "x").status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            ApiError::too_large("x").status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let body = error.body();
        assert_eq!(body["errorCode"], 404103);
        for field in ["trackingId", "message", "info", "timestampUtc"] {
            assert!(body.get(field).is_some(), "{field} in {body}");
        }
    }
}
