//! The OpenAI API's shapes: requests parsed and validated (anything that would change the meaning of a
//! request and is not supported is refused by name, never ignored), responses, stream chunks, errors.

use crate::chat::Message;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// An error as OpenAI sends it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: param.map(str::to_owned), code: None, retry_after: None }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn unauthorized() -> ApiError {
        ApiError { status: StatusCode::UNAUTHORIZED, message: "Incorrect or missing API key: send `Authorization: Bearer <key>`.".into(), kind: "invalid_request_error", param: None, code: Some("invalid_api_key"), retry_after: None }
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{}` does not exist (see GET /v1/models).", crate::text::printable(model, 100)),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u32) -> ApiError {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into(), kind: "server_error", param: None, code: None, retry_after: Some(retry_after) }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, code: None, retry_after: None }
    }

    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}

/// What to generate after: a chat (formatted by the adapter) or raw text (`/v1/completions`).
#[derive(Debug, Clone)]
pub enum Input {
    Chat(Vec<Message>),
    Text(String),
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct Request {
    pub model: String,
    pub input: Input,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parameters that change what a request means and are not implemented: refused, not ignored.
fn refuse_unsupported(body: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    let set = |key: &str| body.get(key).filter(|v| !v.is_null());
    let mut refused = Vec::new();
    if set("n").is_some_and(|n| n.as_u64() != Some(1)) {
        refused.push("n (only 1 choice is generated)");
    }
    for key in ["tools", "tool_choice", "functions", "function_call", "logit_bias", "top_logprobs", "audio", "modalities", "prediction"] {
        if set(key).is_some_and(|v| !(v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|o| o.is_empty()))) {
            refused.push(key);
        }
    }
    if set("logprobs").is_some_and(|v| v != &Value::Bool(false) && v.as_u64() != Some(0)) {
        refused.push("logprobs");
    }
    if set("response_format").is_some_and(|v| v.get("type").and_then(Value::as_str) != Some("text")) {
        refused.push("response_format (only text)");
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if set(key).is_some_and(|v| v.as_f64() != Some(0.0)) {
            refused.push(key);
        }
    }
    if let Some(first) = refused.first() {
        let param = first.split(' ').next().unwrap_or(first);
        return Err(ApiError::bad_request(format!("unsupported parameter(s): {}; edgechat does not implement them", refused.join(", ")), Some(param)));
    }
    Ok(())
}

fn number(body: &serde_json::Map<String, Value>, key: &str, ok: impl Fn(f64) -> bool, range: &str) -> Result<Option<f64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && ok(x) => Ok(Some(x)),
            _ => Err(ApiError::bad_request(format!("`{key}` must be a number {range}"), Some(key))),
        },
    }
}

fn text_content(value: &Value, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(text)) => Ok(text.to_owned()),
                _ => Err(ApiError::bad_request(format!("{param}: only text parts are supported"), Some(&param))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        _ => Err(ApiError::bad_request(format!("{param} must be a string or a list of text parts"), Some(&param))),
    }
}

fn messages(body: &serde_json::Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let list = body.get("messages").and_then(Value::as_array).ok_or_else(|| ApiError::bad_request("`messages` must be a list of {role, content}", Some("messages")))?;
    if list.is_empty() {
        return Err(ApiError::bad_request("`messages` must not be empty", Some("messages")));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).filter(|r| ["system", "developer", "user", "assistant", "tool"].contains(r));
            let role = role.ok_or_else(|| ApiError::bad_request(format!("messages[{i}].role must be system, user, assistant or tool"), Some(&format!("messages[{i}].role"))))?;
            let role = if role == "developer" { "system" } else { role };
            Ok(Message { role: role.to_owned(), content: text_content(m.get("content").unwrap_or(&Value::Null), i)? })
        })
        .collect()
}

/// Parses a request body for `/v1/chat/completions` (`chat`) or `/v1/completions`.
pub fn parse(body: &[u8], chat: bool) -> Result<Request, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}"), None))?;
    let body = value.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object", None))?;
    refuse_unsupported(body)?;
    let model = body.get("model").and_then(Value::as_str).filter(|m| !m.is_empty()).ok_or_else(|| ApiError::bad_request("`model` is required", Some("model")))?;
    let input = if chat {
        Input::Chat(messages(body)?)
    } else {
        match body.get("prompt") {
            Some(Value::String(s)) => Input::Text(s.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Input::Text(a[0].as_str().unwrap_or_default().to_owned()),
            _ => return Err(ApiError::bad_request("`prompt` must be a string (one prompt per request)", Some("prompt"))),
        }
    };
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|key| number(body, key, |x| x >= 1.0 && x.fract() == 0.0, "that is a whole number of at least 1").transpose().map(|r| r.map(|x| x as usize)))
        .transpose()?;
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) if list.len() <= 4 && list.iter().all(Value::is_string) => list.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect(),
        Some(_) => return Err(ApiError::bad_request("`stop` must be a string or a list of up to 4 strings", Some("stop"))),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("`stop` strings must not be empty", Some("stop")));
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_request("`stream` must be true or false", Some("stream"))),
    };
    let include_usage = body.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| ApiError::bad_request("`seed` must be an integer", Some("seed")))? as u64),
    };
    Ok(Request {
        model: model.to_owned(),
        input,
        max_tokens,
        temperature: number(body, "temperature", |x| (0.0..=2.0).contains(&x), "from 0 to 2")?.map(|x| x as f32),
        top_p: number(body, "top_p", |x| x > 0.0 && x <= 1.0, "in (0, 1]")?.map(|x| x as f32),
        seed,
        stop,
        stream,
        include_usage,
    })
}

/// Token counts, as OpenAI reports them.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens },
        })
    }
}

/// The fixed part of every response and chunk of one request.
pub struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub chat: bool,
    pub include_usage: bool,
}

impl Envelope {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, true) => "chat.completion.chunk",
            (true, false) => "chat.completion",
            (false, _) => "text_completion",
        }
    }

    fn base(&self, chunk: bool, choices: Value) -> Value {
        let mut value = json!({ "id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "system_fingerprint": null, "choices": choices });
        if chunk && self.include_usage {
            value["usage"] = Value::Null;
        }
        value
    }

    /// A streamed piece: the role first (chat), then content deltas, then the finish reason.
    pub fn chunk(&self, delta: Option<&str>, role: bool, finish_reason: Option<&str>) -> Value {
        let choice = if self.chat {
            let mut d = json!({});
            if role {
                d["role"] = json!("assistant");
                d["content"] = json!("");
            }
            if let Some(text) = delta {
                d["content"] = json!(text);
            }
            json!({ "index": 0, "delta": d, "logprobs": null, "finish_reason": finish_reason })
        } else {
            json!({ "index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish_reason })
        };
        self.base(true, json!([choice]))
    }

    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        let mut value = self.base(true, json!([]));
        value["usage"] = usage.json();
        value
    }

    pub fn complete(&self, text: &str, finish_reason: &str, usage: &Usage) -> Value {
        let choice = if self.chat {
            json!({ "index": 0, "message": { "role": "assistant", "content": text, "refusal": null }, "logprobs": null, "finish_reason": finish_reason })
        } else {
            json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason })
        };
        let mut value = self.base(false, json!([choice]));
        value["usage"] = usage.json();
        value
    }
}
