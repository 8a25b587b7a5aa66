//! Security: principals, blessings, caveats, discharges, patterns, credentials.
