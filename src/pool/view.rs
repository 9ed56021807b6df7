//! One serialisable view of a pool, which `status --json`, `why --json` and `/metrics` print from
//! (filled in by the view work).
