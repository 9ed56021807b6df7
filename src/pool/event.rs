//! History events: what a row of the `history` table records, as one typed word (filled in by the
//! typed-history work).
