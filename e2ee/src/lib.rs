//! Switchboard end-to-end encryption (work in progress).
#![forbid(unsafe_code)]
