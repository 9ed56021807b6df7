//! Request outcomes: what one upstream attempt came to, as one typed word for the `requests` table,
//! the metrics and the CLI (filled in by the outcome work).
