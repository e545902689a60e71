//! What the store asks of a database, and the two that answer: sled in the data directory
//! (one controller), and etcd (several controllers sharing their state).
//!
//! The controller never sees this layer: it speaks to [`super::Store`], whose operations
//! are the controller's own (use a token once, allocate a seq, revoke an agent, start a
//! rollout unless one runs). Each of those that must hold across controllers is one
//! compare-and-swap here, which etcd runs as a transaction.

use super::Result;
use std::sync::Arc;

/// The tables of the state. Their names are sled's tree names and etcd's key prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    Agents,
    Admins,
    Certs,
    Tokens,
    Artifacts,
    Deploys,
    Stage,
    Desired,
    Receipts,
    AppState,
    Meta,
    Rollouts,
    Promoted,
    RecentReceipts,
    /// Which controller each agent is connected to (etcd: kept alive by its lease).
    Presence,
    /// Agents a controller that does not drive asks the driver to catch up.
    CatchUp,
    /// Catch-up messages the driver asks the agent's controller to deliver.
    Outbox,
    /// Release policy (SPEC §14): approval keys, signed policies, freezes, what agents
    /// enforce and what their `[verify]` said, previews.
    Policy,
}

impl Table {
    pub const ALL: [Table; 18] = [
        Table::Agents,
        Table::Admins,
        Table::Certs,
        Table::Tokens,
        Table::Artifacts,
        Table::Deploys,
        Table::Stage,
        Table::Desired,
        Table::Receipts,
        Table::AppState,
        Table::Meta,
        Table::Rollouts,
        Table::Promoted,
        Table::RecentReceipts,
        Table::Presence,
        Table::CatchUp,
        Table::Outbox,
        Table::Policy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Agents => "agents",
            Table::Admins => "admins",
            Table::Certs => "certs",
            Table::Tokens => "tokens",
            Table::Artifacts => "artifacts",
            Table::Deploys => "deploys",
            Table::Stage => "stage",
            Table::Desired => "desired",
            Table::Receipts => "receipts",
            Table::AppState => "appstate",
            Table::Meta => "meta",
            Table::Rollouts => "rollouts",
            Table::Promoted => "promoted",
            Table::RecentReceipts => "recent-receipts",
            Table::Presence => "presence",
            Table::CatchUp => "catch-up",
            Table::Outbox => "outbox",
            Table::Policy => "policy",
        }
    }

    /// This table's bit in a set of changed tables.
    pub fn bit(self) -> u32 {
        1 << self as u32
    }

    pub fn by_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// A value as the database holds it: cheap to clone (a record naming 10,000 hosts is read
/// by every agent that reports).
#[derive(Clone, Debug)]
pub enum Val {
    Sled(sled::IVec),
    Shared(Arc<[u8]>),
}

impl std::ops::Deref for Val {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Val::Sled(v) => v,
            Val::Shared(v) => v,
        }
    }
}

impl PartialEq for Val {
    fn eq(&self, other: &Val) -> bool {
        **self == **other
    }
}

/// The outcome of a compare-and-swap: done, or what the key holds instead.
pub type Swapped = std::result::Result<(), Option<Val>>;

/// A database of tables. Writes are seen by reads in this process at once, and by other
/// controllers (and after a crash) once `flush` returns.
pub trait Backend: Send + Sync {
    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Val>>;
    /// [`Backend::get`], asking the source when this controller may not have seen a write
    /// another made a moment ago (a token made through one, used through another).
    fn get_fresh(&self, t: Table, key: &[u8]) -> Result<Option<Val>> {
        self.get(t, key)
    }
    /// Every key of `t` that starts with `prefix`, in order.
    fn scan(&self, t: Table, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Val)>>;
    fn put(&self, t: Table, key: &[u8], value: Vec<u8>) -> Result<()>;
    fn remove(&self, t: Table, key: &[u8]) -> Result<()>;
    /// Sets `key` to `new` (None: removes it) if it holds `old` (None: absent), atomically
    /// for every controller sharing the state, after every write made before it.
    fn swap(&self, t: Table, key: &[u8], old: Option<&[u8]>, new: Option<Vec<u8>>) -> Result<Swapped> {
        self.swap_and_put(t, key, old, new, Vec::new())
    }
    /// [`Backend::swap`] that also writes `then` (table, key, value) if it succeeds, in the
    /// same transaction: no other controller sees the one without the others.
    fn swap_and_put(
        &self,
        t: Table,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<Vec<u8>>,
        then: Vec<(Table, Vec<u8>, Vec<u8>)>,
    ) -> Result<Swapped>;
    /// Makes every write made so far durable (and, shared, seen by the other controllers).
    /// Blocks: call it off the async threads.
    fn flush(&self) -> Result<()>;
    /// A key that lives as long as this controller does (etcd: on its lease); None removes it.
    fn set_ephemeral(&self, t: Table, key: &[u8], value: Option<Vec<u8>>) -> Result<()>;
    /// Whether other controllers share this state.
    fn shared(&self) -> bool;
    /// Whether this controller drives rollouts and catch-up now (the holder of the lease).
    fn is_leader(&self) -> bool;
    /// Whether writes can be made durable now: an error that says why not.
    fn writable(&self) -> Result<()>;
    /// Bumped when another controller changes something; `take_changed` says which tables.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;
    fn take_changed(&self) -> u32;
    /// Stops background work and gives up the lease (a clean shutdown).
    fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::Table;

    /// The sled backend finds a table's tree by its place in `ALL`, and a change set by its
    /// bit: both follow the declaration, and names are distinct.
    #[test]
    fn tables_are_listed_in_order_with_distinct_names() {
        for (i, t) in Table::ALL.iter().enumerate() {
            assert_eq!(*t as usize, i);
            assert_eq!(Table::by_name(t.name()), Some(*t));
        }
        let names: std::collections::HashSet<_> = Table::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names.len(), Table::ALL.len());
    }
}
