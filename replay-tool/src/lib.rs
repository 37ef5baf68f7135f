//! hookflow-replay: selecting archived events and republishing them as new delivery
//! generations, for endpoints that missed them or were added later.
//!
//! TODO: the crate has no code yet. It needs the events' original payload bytes kept beside
//! the attempt archive (or the local log's history), Parquet reads that push filters down to
//! row groups, and journal entries per generation, so that a replay is delivered exactly once.
