//! etcd's v3 API, through the JSON gateway every etcd serves on its client port (`/v3/…`):
//! ranges, transactions, watches and leases, blocking, over ureq. The store calls it from
//! threads of its own.
//!
//! Why not the `etcd-client` crate: it compiles etcd's protobuf definitions at build time
//! and needs `protoc`, which a machine with only Rust installed does not have. The gateway
//! is the same API (etcd's documented JSON mapping of its gRPC service); this is the
//! part of it the store uses.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::Read;
use std::time::Duration;

/// How long one call may take before etcd counts as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long loading the whole state may take.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest answer read from etcd (a range over the whole state).
const RESPONSE_LIMIT: u64 = 1 << 30;

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered: try again later.
    #[error("etcd at {endpoints} is unreachable: {why}")]
    Unreachable { endpoints: String, why: String },
    /// etcd answered and refused the request: trying again will not help.
    #[error("etcd refused the request: {0}")]
    Refused(String),
}

type Result<T> = std::result::Result<T, EtcdError>;

/// A key and its value at a revision.
#[derive(Clone, Debug)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A change seen by a watch: a key set (with its value) or deleted.
#[derive(Debug)]
pub struct Event {
    pub kv: Kv,
    pub deleted: bool,
}

/// One write of a transaction.
#[derive(Clone, Copy)]
pub enum Write<'a> {
    Put { key: &'a [u8], value: &'a [u8], lease: Option<i64> },
    Delete { key: &'a [u8] },
}

/// What a transaction compares before it writes.
#[derive(Clone, Copy)]
pub enum Compare<'a> {
    /// The key holds exactly this value.
    Value(&'a [u8], &'a [u8]),
    /// The key does not exist.
    Absent(&'a [u8]),
}

/// How a transaction ended: whether its compares held, the revision it left, and (when
/// they did not) the compared keys as they are.
pub struct TxnOutcome {
    pub succeeded: bool,
    pub revision: i64,
    pub current: Vec<Kv>,
}

/// A client of one etcd cluster: its endpoints are tried in turn.
pub struct Etcd {
    endpoints: Vec<String>,
    /// The endpoint that answered last: asked first.
    at: std::sync::atomic::AtomicUsize,
    agent: ureq::Agent,
    /// Loading the whole state: as long as its size needs.
    loading: ureq::Agent,
    /// Watches read for as long as etcd sends.
    streaming: ureq::Agent,
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn unb64(s: &str) -> Result<Vec<u8>> {
    B64.decode(s).map_err(|e| EtcdError::Refused(format!("etcd sent a key or value that is not base64: {e}")))
}

/// etcd writes 64-bit integers as strings, and leaves out fields at their default.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of a range covering every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[derive(Deserialize)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    mod_revision: Value,
}

impl RawKv {
    fn kv(self) -> Result<Kv> {
        Ok(Kv { key: unb64(&self.key)?, value: unb64(&self.value)?, mod_revision: int(&self.mod_revision) })
    }
}

impl Etcd {
    /// A client of the cluster at `endpoints` (`HOST:PORT` each).
    pub fn new(endpoints: Vec<String>) -> Self {
        let build = |timeout: Option<Duration>| -> ureq::Agent {
            ureq::Agent::config_builder()
                .timeout_global(timeout)
                .timeout_connect(Some(CALL_TIMEOUT))
                .http_status_as_error(false)
                .build()
                .into()
        };
        Etcd {
            endpoints,
            at: Default::default(),
            agent: build(Some(CALL_TIMEOUT)),
            loading: build(Some(LOAD_TIMEOUT)),
            streaming: build(None),
        }
    }

    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    /// Posts `body` to `path` on the first endpoint that answers; returns the response.
    fn post(&self, agent: &ureq::Agent, path: &str, body: &Value) -> Result<ureq::http::Response<ureq::Body>> {
        use std::sync::atomic::Ordering::Relaxed;
        let body = serde_json::to_vec(body).expect("a JSON value serialises");
        let first = self.at.load(Relaxed);
        let mut why = String::new();
        for i in 0..self.endpoints.len() {
            let n = (first + i) % self.endpoints.len();
            let url = format!("http://{}{path}", self.endpoints[n]);
            // A watch on a member cut off from its cluster is cancelled rather than left silent.
            let request =
                agent.post(&url).header("content-type", "application/json").header("grpc-metadata-hasleader", "true");
            match request.send(&body[..]) {
                Ok(r) if r.status().is_server_error() => why = format!("{url} answered {}", r.status()),
                Ok(mut r) if !r.status().is_success() => {
                    let status = r.status().as_u16();
                    let text = r.body_mut().read_to_string().unwrap_or_default();
                    let body = serde_json::from_str::<Value>(&text).unwrap_or_default();
                    let message = body
                        .get("message")
                        .or(body.get("error"))
                        .and_then(Value::as_str)
                        .map_or(text.clone(), str::to_string);
                    // Busy, between leaders, timed out: gRPC's deadline exceeded (4), resource
                    // exhausted (8), aborted (10) and unavailable (14). Worth trying again.
                    let code = body.get("code").and_then(Value::as_u64).unwrap_or(0);
                    // A request larger than etcd takes is refused for good, whatever the code.
                    let too_large = message.contains("too large") || message.contains("larger than max");
                    if !too_large && (matches!(status, 408 | 429) || matches!(code, 4 | 8 | 10 | 14)) {
                        why = format!("{url}: {message}");
                        continue;
                    }
                    return Err(EtcdError::Refused(format!("{path}: {message}")));
                }
                Ok(r) => {
                    self.at.store(n, Relaxed);
                    return Ok(r);
                }
                Err(e) => why = format!("{url}: {e}"),
            }
        }
        Err(EtcdError::Unreachable { endpoints: self.endpoints(), why })
    }

    fn call(&self, path: &str, body: &Value) -> Result<Value> {
        self.call_with(&self.agent, path, body)
    }

    fn call_with(&self, agent: &ureq::Agent, path: &str, body: &Value) -> Result<Value> {
        let r = self.post(agent, path, body)?;
        let mut text = Vec::new();
        r.into_body()
            .into_with_config()
            .limit(RESPONSE_LIMIT)
            .reader()
            .read_to_end(&mut text)
            .map_err(|e| EtcdError::Unreachable { endpoints: self.endpoints(), why: format!("{path}: {e}") })?;
        let v: Value = serde_json::from_slice(&text)
            .map_err(|e| EtcdError::Refused(format!("{path}: an answer that is not JSON: {e}")))?;
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            return Err(EtcdError::Refused(format!("{path}: {e}")));
        }
        Ok(v)
    }

    /// Every key under `prefix`, and the revision they were read at.
    pub fn range(&self, prefix: &[u8]) -> Result<(Vec<Kv>, i64)> {
        let range = json!({ "key": b64(prefix), "range_end": b64(&prefix_end(prefix)) });
        let v = self.call_with(&self.loading, "/v3/kv/range", &range)?;
        let kvs = v.get("kvs").cloned().map(serde_json::from_value::<Vec<RawKv>>).transpose();
        let kvs = kvs.map_err(|e| EtcdError::Refused(format!("a range answer etcd should not send: {e}")))?;
        let kvs = kvs.unwrap_or_default().into_iter().map(RawKv::kv).collect::<Result<_>>()?;
        Ok((kvs, int(&v["header"]["revision"])))
    }

    /// One key as etcd holds it now (a linearizable read), if it exists.
    pub fn get(&self, key: &[u8]) -> Result<Option<Kv>> {
        let v = self.call("/v3/kv/range", &json!({ "key": b64(key) }))?;
        let kvs = v.get("kvs").cloned().map(serde_json::from_value::<Vec<RawKv>>).transpose();
        let kvs = kvs.map_err(|e| EtcdError::Refused(format!("a range answer etcd should not send: {e}")))?;
        kvs.unwrap_or_default().into_iter().next().map(RawKv::kv).transpose()
    }

    /// Writes `writes` at once if every compare holds.
    pub fn txn(&self, compares: &[Compare], writes: &[Write]) -> Result<TxnOutcome> {
        let compare: Vec<Value> = compares
            .iter()
            .map(|c| match c {
                Compare::Value(k, v) => json!({ "key": b64(k), "target": "VALUE", "result": "EQUAL", "value": b64(v) }),
                Compare::Absent(k) => json!({ "key": b64(k), "target": "VERSION", "result": "EQUAL", "version": "0" }),
            })
            .collect();
        let success: Vec<Value> = writes
            .iter()
            .map(|w| match w {
                Write::Put { key, value, lease } => {
                    let mut put = json!({ "key": b64(key), "value": b64(value) });
                    if let Some(l) = lease {
                        put["lease"] = l.to_string().into();
                    }
                    json!({ "request_put": put })
                }
                Write::Delete { key } => json!({ "request_delete_range": { "key": b64(key) } }),
            })
            .collect();
        let failure: Vec<Value> = compares
            .iter()
            .map(|c| match c {
                Compare::Value(k, _) | Compare::Absent(k) => json!({ "request_range": { "key": b64(k) } }),
            })
            .collect();
        let v = self.call("/v3/kv/txn", &json!({ "compare": compare, "success": success, "failure": failure }))?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let mut current = Vec::new();
        if !succeeded {
            for r in v.get("responses").and_then(Value::as_array).into_iter().flatten() {
                let kvs = r["response_range"].get("kvs").cloned().unwrap_or(Value::Array(vec![]));
                let kvs = serde_json::from_value::<Vec<RawKv>>(kvs)
                    .map_err(|e| EtcdError::Refused(format!("a transaction answer etcd should not send: {e}")))?;
                for kv in kvs {
                    current.push(kv.kv()?);
                }
            }
        }
        Ok(TxnOutcome { succeeded, revision: int(&v["header"]["revision"]), current })
    }

    /// A lease that lives `ttl_secs` unless kept alive; its id.
    pub fn lease_grant(&self, ttl_secs: u64) -> Result<i64> {
        let v = self.call("/v3/lease/grant", &json!({ "TTL": ttl_secs.to_string() }))?;
        match int(&v["ID"]) {
            0 => Err(EtcdError::Refused("etcd granted no lease".into())),
            id => Ok(id),
        }
    }

    /// Renews a lease; false if it has expired.
    pub fn lease_keep_alive(&self, id: i64) -> Result<bool> {
        let v = self.call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))?;
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    /// Ends a lease now: the keys attached to it go.
    pub fn lease_revoke(&self, id: i64) -> Result<()> {
        self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() }))?;
        Ok(())
    }

    /// Watches every key under `prefix` from revision `from`: calls `each` with every batch
    /// of events and the revision it brings the reader to, until the stream ends or `each`
    /// returns false. Returns why it ended.
    pub fn watch(&self, prefix: &[u8], from: i64, mut each: impl FnMut(Vec<Event>, i64) -> bool) -> Result<()> {
        let create = json!({ "create_request": {
            "key": b64(prefix), "range_end": b64(&prefix_end(prefix)), "start_revision": from.to_string(),
            "progress_notify": true,
        }});
        let r = self.post(&self.streaming, "/v3/watch", &create)?;
        let reader = r.into_body().into_with_config().limit(u64::MAX).reader();
        let lost = |why: String| EtcdError::Unreachable { endpoints: self.endpoints(), why };
        for msg in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
            let msg = msg.map_err(|e| lost(format!("the watch ended: {e}")))?;
            if let Some(e) = msg.get("error") {
                return Err(lost(format!("the watch failed: {e}")));
            }
            let result = &msg["result"];
            if result.get("canceled").and_then(Value::as_bool).unwrap_or(false) {
                let why = result.get("cancel_reason").and_then(Value::as_str).unwrap_or("compacted");
                return Err(lost(format!("etcd cancelled the watch: {why}")));
            }
            let mut events = Vec::new();
            for e in result.get("events").and_then(Value::as_array).into_iter().flatten() {
                let kv = serde_json::from_value::<RawKv>(e["kv"].clone())
                    .map_err(|e| EtcdError::Refused(format!("a watch event etcd should not send: {e}")))?;
                events.push(Event { kv: kv.kv()?, deleted: e.get("type").and_then(Value::as_str) == Some("DELETE") });
            }
            if !each(events, int(&result["header"]["revision"])) {
                return Ok(());
            }
        }
        Err(lost("the watch stream ended".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_after_its_last_key() {
        assert_eq!(prefix_end(b"/stagehand/"), b"/stagehand0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
