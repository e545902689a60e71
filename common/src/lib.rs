//! The shared language of Stagehand: the wire protocol and its framing, ids and digests,
//! artifacts as manifests of chunks, the activate message and its rules, TLS and QUIC set-up,
//! and durable filesystem steps. No controller or agent policy lives here.

pub mod activate;
pub mod frame;
pub mod fsx;
pub mod http;
pub mod ids;
pub mod keychain;
pub mod manifest;
pub mod net;
pub mod policy;
pub mod protocol;
pub mod tls;
pub mod token;

pub use ids::{AgentId, Digest};
