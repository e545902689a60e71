//! Placeholder, filled by the release-channel work.
