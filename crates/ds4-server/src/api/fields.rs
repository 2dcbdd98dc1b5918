//! Typed access to request fields: every wrong type is a 400 naming the field.

use serde_json::{Map, Value};

use super::errors::{ApiError, Flavor};
use crate::job::Sampling;

/// A request's JSON object with the flavor its errors use.
pub struct Fields<'a> {
    pub obj: &'a Map<String, Value>,
    pub flavor: Flavor,
}

/// JSON type name for error messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl<'a> Fields<'a> {
    pub fn new(obj: &'a Map<String, Value>, flavor: Flavor) -> Self {
        Fields { obj, flavor }
    }

    /// The field, treating `null` as absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn wrong_type(&self, key: &str, want: &str, got: &Value) -> ApiError {
        ApiError::field(
            self.flavor,
            key,
            format!("'{key}' must be {want}, got {}", type_name(got)),
        )
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "a boolean", v)),
        }
    }

    pub fn f32(&self, key: &str) -> Result<Option<f32>, ApiError> {
        self.number(
            key,
            |n| n.as_f64().filter(|x| x.is_finite()).map(|x| x as f32),
            "a finite number",
            "a number",
        )
    }

    /// A non-negative integer.
    pub fn u64(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.number(
            key,
            serde_json::Number::as_u64,
            "a non-negative integer",
            "an integer",
        )
    }

    /// An integer, negative allowed.
    pub fn i64(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.number(key, serde_json::Number::as_i64, "an integer", "an integer")
    }

    /// A JSON number that `convert` accepts: a number it rejects is "not `range`", anything
    /// else is a wrong type ("not `kind`").
    fn number<T>(
        &self,
        key: &str,
        convert: impl FnOnce(&serde_json::Number) -> Option<T>,
        range: &str,
        kind: &str,
    ) -> Result<Option<T>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match convert(n) {
                Some(x) => Ok(Some(x)),
                None => Err(ApiError::field(
                    self.flavor,
                    key,
                    format!("'{key}' must be {range}"),
                )),
            },
            Some(v) => Err(self.wrong_type(key, kind, v)),
        }
    }

    pub fn array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong_type(key, "an array", v)),
        }
    }

    pub fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => Err(self.wrong_type(key, "an object", v)),
        }
    }

    /// `n`, the number of choices: the server generates one per request, so anything but 1
    /// (or no `n`) is refused rather than answered with fewer choices than asked for.
    pub fn one_choice(&self) -> Result<(), ApiError> {
        match self.u64("n")? {
            None | Some(1) => Ok(()),
            Some(n) => Err(ApiError::field(
                self.flavor,
                "n",
                format!("'n' must be 1: this server generates one choice per request, not {n}"),
            )),
        }
    }

    /// Log probabilities are not computed: a request that asks for them (chat's `logprobs:
    /// true` or `top_logprobs` > 0, the legacy completions' integer `logprobs`) is refused
    /// rather than answered with `"logprobs": null`.
    pub fn no_logprobs(&self) -> Result<(), ApiError> {
        let asked = match self.get("logprobs") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) | Some(Value::Number(_)) => true,
            Some(other) => {
                return Err(self.wrong_type("logprobs", "a boolean or an integer", other))
            }
        };
        if asked || self.u64("top_logprobs")?.is_some_and(|k| k > 0) {
            return Err(ApiError::field(
                self.flavor,
                "logprobs",
                "'logprobs' is not supported by this server",
            ));
        }
        Ok(())
    }

    /// Stop strings: a string or an array of strings.
    pub fn stop(&self, key: &str) -> Result<Vec<String>, ApiError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.wrong_type(key, "a string or an array of strings", other)),
                })
                .collect(),
            Some(v) => Err(self.wrong_type(key, "a string or an array of strings", v)),
        }
    }

    /// The client's sampling fields over ds4's defaults (`top_k` absent from Responses is fine).
    pub fn sampling(&self) -> Result<Sampling, ApiError> {
        let mut s = Sampling::default();
        if let Some(t) = self.f32("temperature")? {
            if t < 0.0 {
                return Err(ApiError::field(
                    self.flavor,
                    "temperature",
                    "'temperature' must be >= 0",
                ));
            }
            s.temperature = t;
        }
        if let Some(p) = self.f32("top_p")? {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::field(
                    self.flavor,
                    "top_p",
                    "'top_p' must be between 0 and 1",
                ));
            }
            s.top_p = p;
        }
        if let Some(p) = self.f32("min_p")? {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::field(
                    self.flavor,
                    "min_p",
                    "'min_p' must be between 0 and 1",
                ));
            }
            s.min_p = p;
        }
        if let Some(k) = self.i64("top_k")? {
            s.top_k = k.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
        }
        if let Some(seed) = self.i64("seed")? {
            s.seed = if seed > 0 { seed as u64 } else { 0 };
        }
        Ok(s)
    }
}
