//! Decisions, apart from the I/O that carries them out: pure functions over data, with the
//! time passed in. Nothing here touches sled, sockets or the clock; everything is
//! table-tested.

pub mod fleet;
pub mod rollout;
pub mod window;
