//! Who is connected right now: per agent, the live deploy and release sessions and the
//! queues to push work to them. Also a change counter that waiters (`--wait`) watch.

use stagehand_common::protocol::{DeployDown, ReleaseDown};
use stagehand_common::AgentId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::{mpsc, watch};

struct Session<T> {
    token: u64,
    tx: mpsc::UnboundedSender<T>,
    conn: quinn::Connection,
}

#[derive(Default)]
struct Sessions {
    deploy: Option<Session<DeployDown>>,
    release: Option<Session<ReleaseDown>>,
}

pub struct Fleet {
    sessions: Mutex<HashMap<AgentId, Sessions>>,
    next_token: AtomicU64,
    changed: watch::Sender<u64>,
}

/// Which channel a session is on.
#[derive(Clone, Copy, Debug)]
pub enum Channel {
    Deploy,
    Release,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet { sessions: Mutex::default(), next_token: AtomicU64::new(1), changed: watch::channel(0).0 }
    }
}

impl Fleet {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AgentId, Sessions>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open sessions: (deploy, release).
    pub fn session_counts(&self) -> (usize, usize) {
        let all = self.lock();
        (all.values().filter(|s| s.deploy.is_some()).count(), all.values().filter(|s| s.release.is_some()).count())
    }

    /// Registers a deploy session, replacing (and closing) an older one; returns its token.
    pub fn attach_deploy(&self, id: &AgentId, tx: mpsc::UnboundedSender<DeployDown>, conn: quinn::Connection) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let old = self.lock().entry(id.clone()).or_default().deploy.replace(Session { token, tx, conn });
        if let Some(old) = old {
            old.conn.close(0u32.into(), b"replaced by a newer connection");
        }
        self.bump();
        token
    }

    pub fn attach_release(&self, id: &AgentId, tx: mpsc::UnboundedSender<ReleaseDown>, conn: quinn::Connection) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let old = self.lock().entry(id.clone()).or_default().release.replace(Session { token, tx, conn });
        if let Some(old) = old {
            old.conn.close(0u32.into(), b"replaced by a newer connection");
        }
        self.bump();
        token
    }

    /// Removes a session if it is still the one with `token`.
    pub fn detach(&self, id: &AgentId, channel: Channel, token: u64) {
        let mut map = self.lock();
        if let Some(s) = map.get_mut(id) {
            match channel {
                Channel::Deploy if s.deploy.as_ref().is_some_and(|x| x.token == token) => s.deploy = None,
                Channel::Release if s.release.as_ref().is_some_and(|x| x.token == token) => s.release = None,
                _ => {}
            }
        }
        drop(map);
        self.bump();
    }

    pub fn send_deploy(&self, id: &AgentId, msg: DeployDown) -> bool {
        self.lock().get(id).and_then(|s| s.deploy.as_ref()).is_some_and(|s| s.tx.send(msg).is_ok())
    }

    pub fn send_release(&self, id: &AgentId, msg: ReleaseDown) -> bool {
        self.send_release_on(id, msg).is_some()
    }

    /// Sends on the agent's release session; returns that session's token.
    pub fn send_release_on(&self, id: &AgentId, msg: ReleaseDown) -> Option<u64> {
        let map = self.lock();
        let s = map.get(id).and_then(|s| s.release.as_ref())?;
        s.tx.send(msg).ok().map(|()| s.token)
    }

    /// The token of the agent's release session, if one is up.
    pub fn release_session(&self, id: &AgentId) -> Option<u64> {
        self.lock().get(id).and_then(|s| s.release.as_ref()).map(|s| s.token)
    }

    /// Connected means both channels are up.
    pub fn is_connected(&self, id: &AgentId) -> bool {
        self.lock().get(id).is_some_and(|s| s.deploy.is_some() && s.release.is_some())
    }

    /// Agents with a session here.
    pub fn agents(&self) -> Vec<AgentId> {
        self.lock()
            .iter()
            .filter(|(_, s)| s.deploy.is_some() || s.release.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Closes every connection of an agent (revocation).
    pub fn kick(&self, id: &AgentId) {
        if let Some(s) = self.lock().remove(id) {
            for conn in [s.deploy.map(|x| x.conn), s.release.map(|x| x.conn)].into_iter().flatten() {
                conn.close(stagehand_common::protocol::CLOSE_REVOKED.into(), b"revoked");
            }
        }
        self.bump();
    }

    /// Closes and forgets every session (shutdown).
    pub fn close_all(&self) {
        for (_, s) in self.lock().drain() {
            for conn in [s.deploy.map(|x| x.conn), s.release.map(|x| x.conn)].into_iter().flatten() {
                conn.close(0u32.into(), b"controller shutting down");
            }
        }
    }

    /// Tells waiters that something changed.
    pub fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// How many changes there have been: a view built at one generation is current until
    /// the next.
    pub fn generation(&self) -> u64 {
        *self.changed.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
