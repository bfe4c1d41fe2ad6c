//! Dense device.
