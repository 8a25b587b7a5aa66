//! Naming: routing ids and endpoints.
