//! Placeholder, filled by the CLI acceptance work.
