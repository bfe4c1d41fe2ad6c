//! tandem CPU attention engine (in progress).
